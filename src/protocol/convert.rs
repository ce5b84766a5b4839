//! Conversions between wire types and the engine's, with every check that
//! input from the network needs (field limits, names, enum values).

use super::pb;
use crate::broker::topic::Position;
use crate::broker::{
    Cleanup, DeliveryLimits, FetchRequest, MessageLimit, SubscribeRequest, TopicConfig,
};
use crate::error::{Error, Result};
use crate::groups::{GroupInfo, GroupMode};
use crate::storage::{Durability, FsyncPolicy, Header, LogStats, Message, NewMessage};
use std::time::Duration;

/// Bytes of a frame (native) or message (gRPC) left for the envelope around
/// one message: produce takes no message larger than the frame limit less
/// this, and no larger stored message is handed out.
pub const ENVELOPE_ROOM: u32 = 1024;
/// Bytes of a frame kept free of message bytes in a reply or delivery of
/// many messages: room for their envelopes.
pub const FRAME_HEADROOM: u32 = 64 * 1024;
/// Fetch's `max_messages` when unset, and its cap.
pub const DEFAULT_MAX_MESSAGES: u32 = 100;
/// Cap of fetch's `max_messages`.
pub const CAP_MAX_MESSAGES: u32 = 10_000;
/// Fetch's `max_bytes` when unset.
pub const DEFAULT_MAX_BYTES: u32 = 1024 * 1024;
/// Subscribe's `max_in_flight` when unset.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 100;
/// Cap of subscribe's `max_in_flight`.
pub const CAP_MAX_IN_FLIGHT: u32 = 10_000;
/// Longest long-poll (`wait_ms`).
pub const CAP_WAIT_MS: u32 = 60_000;
/// Most messages in one pushed delivery.
pub const MAX_PER_DELIVERY: usize = 1000;
/// Bytes a subscription reads at a time.
pub const MAX_SUBSCRIPTION_READ_BYTES: u32 = 1024 * 1024;

/// What one reply or delivery of a transport whose frames (or messages)
/// hold at most `max_frame` bytes may carry: `messages` messages and about
/// `bytes` of them, capped so their envelopes still fit, and no single
/// message larger than `max_frame` less [`ENVELOPE_ROOM`]. The broker core
/// applies the limits; a transport only says what its frames hold.
pub fn delivery_limits(max_frame: u32, messages: usize, bytes: u32) -> DeliveryLimits {
    DeliveryLimits {
        messages,
        bytes: bytes.min(max_frame.saturating_sub(FRAME_HEADROOM).max(1024)) as usize,
        message_bytes: max_frame.saturating_sub(ENVELOPE_ROOM) as usize,
    }
}

/// The largest message a transport with frames of `max_frame` bytes can
/// deliver, for [`crate::broker::Broker::message_limit`].
pub fn frame_message_limit(max_frame: u32) -> MessageLimit {
    MessageLimit {
        bytes: max_frame.saturating_sub(ENVELOPE_ROOM),
        setting: "max_frame_bytes less 1 KiB",
    }
}

/// A wire fetch as the broker takes it, with the defaults and caps of
/// `max_messages`, `max_bytes` and `wait_ms`, for frames of `max_frame` bytes.
pub fn fetch_request(f: pb::FetchRequest, max_frame: u32) -> FetchRequest {
    let max = match f.max_messages {
        0 => DEFAULT_MAX_MESSAGES,
        n => n.min(CAP_MAX_MESSAGES),
    } as usize;
    let bytes = match f.max_bytes {
        0 => DEFAULT_MAX_BYTES,
        n => n,
    };
    FetchRequest {
        topic: f.topic,
        group: f.group,
        from: given_position(f.from),
        member: f.member,
        limits: delivery_limits(max_frame, max, bytes),
        wait: Duration::from_millis(u64::from(f.wait_ms.min(CAP_WAIT_MS))),
    }
}

/// A wire subscribe as the broker takes it, with the default and cap of
/// `max_in_flight`, for frames of `max_frame` bytes.
pub fn subscribe_request(s: pb::SubscribeRequest, max_frame: u32) -> SubscribeRequest {
    let max_in_flight = match s.max_in_flight {
        0 => DEFAULT_MAX_IN_FLIGHT,
        n => n.min(CAP_MAX_IN_FLIGHT),
    } as usize;
    SubscribeRequest {
        topic: s.topic,
        group: s.group,
        from: given_position(s.from),
        member: s.member,
        max_in_flight,
        limits: delivery_limits(max_frame, MAX_PER_DELIVERY, MAX_SUBSCRIPTION_READ_BYTES),
    }
}

/// The queue-group subscription the first request of a gRPC `Consume`
/// stream asks for: `kind` must be `start`, naming topic, group and member.
pub fn consume_start(
    kind: Option<pb::consume_request::Kind>,
    max_frame: u32,
) -> Result<SubscribeRequest> {
    use pb::consume_request::Kind;
    let invalid = |m: String| Err(Error::InvalidArgument(m));
    let start = match kind {
        Some(Kind::Start(start)) => start,
        Some(other) => {
            return invalid(format!(
                "start: the first ConsumeRequest must be start, not {}",
                consume_kind(&other)
            ));
        }
        None => {
            return invalid(
                "start: the first ConsumeRequest must be start (topic, group, member, max_in_flight)"
                    .to_owned(),
            );
        }
    };
    for (field, value) in [
        ("start.topic", &start.topic),
        ("start.group", &start.group),
        ("start.member", &start.member),
    ] {
        if value.is_empty() {
            return invalid(format!("{field} is required"));
        }
    }
    Ok(subscribe_request(
        pb::SubscribeRequest {
            topic: start.topic,
            group: Some(start.group),
            member: start.member,
            from: None,
            max_in_flight: start.max_in_flight,
        },
        max_frame,
    ))
}

/// The field name of a `ConsumeRequest` kind, for error messages.
pub fn consume_kind(kind: &pb::consume_request::Kind) -> &'static str {
    use pb::consume_request::Kind;
    match kind {
        Kind::Start(_) => "start",
        Kind::Ack(_) => "ack",
        Kind::Nack(_) => "nack",
        Kind::Extend(_) => "extend",
    }
}

/// `deliveries` of subscription `id` as gRPC deliveries, split as
/// [`super::outbound::pieces`] splits them for native frames of `max_frame` bytes.
pub fn deliveries(
    id: u64,
    deliveries: crate::broker::Deliveries,
    max_frame: u32,
) -> Vec<pb::Delivery> {
    super::outbound::pieces(id, deliveries, max_frame)
        .into_iter()
        .map(|piece| match piece {
            super::outbound::Piece::Messages(m) => pb::Delivery {
                subscription_id: id,
                messages: messages(m.into_deliveries()),
                error: None,
                skipped_offset: None,
            },
            super::outbound::Piece::Skipped { offset, error } => pb::Delivery {
                subscription_id: id,
                messages: Vec::new(),
                error: Some(error),
                skipped_offset: Some(offset),
            },
        })
        .collect()
}

/// A wire message into an engine message.
pub fn new_message(m: pb::NewMessage) -> NewMessage {
    NewMessage {
        timestamp_ms: m.timestamp_ms,
        key: m.key,
        headers: headers_from_wire(m.headers),
        value: m.value,
    }
}

/// An engine message onto the wire as a producer sends it.
pub fn new_message_to_wire(m: NewMessage) -> pb::NewMessage {
    pb::NewMessage {
        timestamp_ms: m.timestamp_ms,
        key: m.key,
        headers: headers_to_wire(m.headers),
        value: m.value,
    }
}

/// A stored wire message into an engine message.
pub fn message_from_wire(m: pb::Message) -> Message {
    Message {
        offset: crate::storage::Offset(m.offset),
        timestamp_ms: m.timestamp_ms,
        key: m.key,
        headers: headers_from_wire(m.headers),
        value: m.value,
    }
}

fn headers_from_wire(headers: Vec<pb::Header>) -> Vec<Header> {
    headers
        .into_iter()
        .map(|h| Header {
            name: h.name,
            value: h.value,
        })
        .collect()
}

fn headers_to_wire(headers: Vec<Header>) -> Vec<pb::Header> {
    headers
        .into_iter()
        .map(|h| pb::Header {
            name: h.name,
            value: h.value,
        })
        .collect()
}

/// An engine message onto the wire.
pub fn message(m: Message, delivery: u32) -> pb::Message {
    pb::Message {
        offset: m.offset.0,
        timestamp_ms: m.timestamp_ms,
        key: m.key,
        headers: headers_to_wire(m.headers),
        value: m.value,
        delivery,
    }
}

/// Broker deliveries (messages with their delivery count) onto the wire.
pub fn messages(deliveries: crate::broker::Deliveries) -> Vec<pb::Message> {
    deliveries
        .into_vec()
        .into_iter()
        .map(|d| message(d.message, d.delivery))
        .collect()
}

/// Durability onto the wire.
pub fn durability(d: Durability) -> i32 {
    match d {
        Durability::Written => pb::Durability::Written as i32,
        Durability::Durable => pb::Durability::Durable as i32,
    }
}

/// A wire position (absent = `default`).
pub fn position(p: Option<pb::Position>, default: Position) -> Position {
    match p.and_then(|p| p.kind) {
        None => default,
        Some(pb::position::Kind::Earliest(_)) => Position::Earliest,
        Some(pb::position::Kind::Latest(_)) => Position::Latest,
        Some(pb::position::Kind::Offset(o)) => Position::Offset(o),
        Some(pb::position::Kind::TimestampMs(t)) => Position::Timestamp(t),
    }
}

/// A wire position where the request leaves the default to the reader
/// (a stream group's committed offset, say): `None` when absent or when
/// it names no kind, as the protocol says both mean.
fn given_position(p: Option<pb::Position>) -> Option<Position> {
    p.filter(|p| p.kind.is_some())
        .map(|p| position(Some(p), Position::Earliest))
}

/// A position onto the wire.
pub fn position_to_wire(p: Position) -> pb::Position {
    let kind = match p {
        Position::Earliest => pb::position::Kind::Earliest(pb::Empty {}),
        Position::Latest => pb::position::Kind::Latest(pb::Empty {}),
        Position::Offset(o) => pb::position::Kind::Offset(o),
        Position::Timestamp(t) => pb::position::Kind::TimestampMs(t),
    };
    pb::Position { kind: Some(kind) }
}

/// A wire group mode.
pub fn group_mode(mode: i32) -> Result<GroupMode> {
    match pb::GroupMode::try_from(mode) {
        Ok(pb::GroupMode::Stream) => Ok(GroupMode::Stream),
        Ok(pb::GroupMode::Queue) => Ok(GroupMode::Queue),
        _ => Err(Error::InvalidArgument(format!(
            "mode {mode}: expected STREAM (1) or QUEUE (2)"
        ))),
    }
}

/// A group mode onto the wire.
pub fn group_mode_to_wire(mode: GroupMode) -> i32 {
    match mode {
        GroupMode::Stream => pb::GroupMode::Stream as i32,
        GroupMode::Queue => pb::GroupMode::Queue as i32,
    }
}

/// Group info onto the wire.
pub fn group_info(topic: &str, g: GroupInfo) -> pb::GroupInfo {
    pb::GroupInfo {
        lost_to_retention: g.lost_to_retention,
        topic: topic.to_owned(),
        name: g.name,
        mode: group_mode_to_wire(g.mode),
        committed: g.committed,
        pending: g.pending as u64,
        lag: g.lag,
        members: g
            .members
            .into_iter()
            .map(|(name, last_seen_ms)| pb::GroupMember { name, last_seen_ms })
            .collect(),
    }
}

/// A wire topic config applied over `base` (absent fields keep `base`).
pub fn topic_config(c: Option<pb::TopicConfig>, base: &TopicConfig) -> Result<TopicConfig> {
    let mut out = base.clone();
    let Some(c) = c else { return Ok(out) };
    if let Some(v) = c.segment_bytes {
        out.log.segment_bytes = v;
    }
    if c.segment_ms.is_some() {
        out.log.segment_ms = c.segment_ms;
    }
    if c.retention_bytes.is_some() {
        out.log.retention_bytes = c.retention_bytes;
    }
    if c.retention_ms.is_some() {
        out.log.retention_ms = c.retention_ms;
    }
    if let Some(f) = c.fsync {
        out.log.fsync = f.parse::<FsyncPolicy>()?;
    }
    if let Some(cleanup) = c.cleanup {
        out.cleanup = match cleanup.as_str() {
            "delete" => Cleanup::Delete,
            "compact" => Cleanup::Compact,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "cleanup {other:?}: expected delete or compact"
                )));
            }
        };
    }
    if let Some(v) = c.delete_when_consumed {
        out.delete_when_consumed = v;
    }
    if c.dead_letter.is_some() {
        out.dead_letter = c.dead_letter;
    }
    if let Some(v) = c.max_deliveries {
        out.max_deliveries = v;
    }
    if let Some(v) = c.ack_timeout_ms {
        out.ack_timeout_ms = v;
    }
    if let Some(v) = c.delete_retention_ms {
        out.delete_retention_ms = v;
    }
    if c.compact_min_dirty_ratio.is_some() {
        out.compact_min_dirty_ratio = c.compact_min_dirty_ratio;
    }
    if let Some(v) = c.compact_check_ms {
        out.compact_check_ms = v;
    }
    if let Some(v) = c.retention_respects_groups {
        out.retention_respects_groups = v;
    }
    if c.retention_bytes_max.is_some() {
        out.retention_bytes_max = c.retention_bytes_max;
    }
    if c.delete_when_idle_ms.is_some() {
        out.delete_when_idle_ms = c.delete_when_idle_ms;
    }
    out.validate()?;
    Ok(out)
}

/// A topic config onto the wire.
pub fn topic_config_to_wire(c: &TopicConfig) -> pb::TopicConfig {
    pb::TopicConfig {
        segment_bytes: Some(c.log.segment_bytes),
        segment_ms: c.log.segment_ms,
        retention_bytes: c.log.retention_bytes,
        retention_ms: c.log.retention_ms,
        fsync: Some(c.log.fsync.to_string()),
        cleanup: Some(match c.cleanup {
            Cleanup::Delete => "delete".into(),
            Cleanup::Compact => "compact".into(),
        }),
        delete_when_consumed: Some(c.delete_when_consumed),
        dead_letter: c.dead_letter.clone(),
        max_deliveries: Some(c.max_deliveries),
        ack_timeout_ms: Some(c.ack_timeout_ms),
        delete_retention_ms: Some(c.delete_retention_ms),
        compact_min_dirty_ratio: c.compact_min_dirty_ratio,
        compact_check_ms: Some(c.compact_check_ms),
        retention_respects_groups: Some(c.retention_respects_groups),
        retention_bytes_max: c.retention_bytes_max,
        delete_when_idle_ms: c.delete_when_idle_ms,
    }
}

/// Topic info onto the wire; `max_message_bytes` is the largest message a
/// produce to the topic takes (the transport's limit and the topic's own).
pub fn topic_info(
    name: &str,
    config: &TopicConfig,
    s: LogStats,
    max_message_bytes: u64,
) -> pb::TopicInfo {
    pb::TopicInfo {
        name: name.to_owned(),
        config: Some(topic_config_to_wire(config)),
        start_offset: s.start.0,
        end_offset: s.end.0,
        durable_end_offset: s.durable_end.0,
        segments: s.segments as u32,
        bytes: s.bytes,
        max_message_bytes,
    }
}

/// Compaction figures onto the wire.
pub fn compaction(topic: &str, s: &crate::storage::compact::CompactStats) -> pb::TopicCompaction {
    pb::TopicCompaction {
        topic: topic.to_owned(),
        bytes_before: s.bytes_before,
        bytes_after: s.bytes_after,
        records_kept: s.records_kept,
        records_removed: s.records_removed,
        segments_rewritten: s.segments_rewritten,
        segments_deleted: s.segments_deleted,
        segments_merged: s.segments_merged,
        millis: s.millis,
    }
}

/// Wire offsets as the broker takes them.
pub fn offsets(offsets: Vec<u64>) -> Vec<crate::storage::Offset> {
    offsets.into_iter().map(crate::storage::Offset).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_without_a_kind_is_an_absent_one() {
        let empty = Some(pb::Position { kind: None });
        let fetch = fetch_request(
            pb::FetchRequest {
                topic: "t".into(),
                from: empty,
                ..Default::default()
            },
            1 << 20,
        );
        assert!(fetch.from.is_none(), "a stream group reads from its commit");
        let subscribe = subscribe_request(
            pb::SubscribeRequest {
                topic: "t".into(),
                from: empty,
                ..Default::default()
            },
            1 << 20,
        );
        assert!(subscribe.from.is_none());
        let latest = fetch_request(
            pb::FetchRequest {
                topic: "t".into(),
                from: Some(position_to_wire(Position::Latest)),
                ..Default::default()
            },
            1 << 20,
        );
        assert_eq!(latest.from, Some(Position::Latest));
    }

    #[test]
    fn a_consume_start_becomes_a_queue_subscription_and_names_what_is_missing() {
        use pb::consume_request::Kind;
        let start = |topic: &str, group: &str, member: &str, max_in_flight| {
            Some(Kind::Start(pb::ConsumeStart {
                topic: topic.into(),
                group: group.into(),
                member: member.into(),
                max_in_flight,
            }))
        };
        let request =
            consume_start(start("jobs", "workers", "w1", 0), 1 << 20).expect("a full start");
        assert_eq!(
            (
                request.topic.as_str(),
                request.group.as_deref(),
                request.member.as_str()
            ),
            ("jobs", Some("workers"), "w1")
        );
        assert_eq!(request.max_in_flight, DEFAULT_MAX_IN_FLIGHT as usize);
        assert!(request.from.is_none());
        let capped =
            consume_start(start("jobs", "workers", "w1", u32::MAX), 1 << 20).expect("a full start");
        assert_eq!(capped.max_in_flight, CAP_MAX_IN_FLIGHT as usize);

        let refused = |kind| match consume_start(kind, 1 << 20) {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("refused as invalid: {other:?}"),
        };
        assert_eq!(
            refused(start("", "workers", "w1", 1)),
            "start.topic is required"
        );
        assert_eq!(
            refused(start("jobs", "", "w1", 1)),
            "start.group is required"
        );
        assert_eq!(
            refused(start("jobs", "workers", "", 1)),
            "start.member is required"
        );
        let ack = Some(Kind::Ack(pb::ConsumeAck { offsets: vec![1] }));
        assert_eq!(
            refused(ack),
            "start: the first ConsumeRequest must be start, not ack"
        );
        assert!(refused(None).starts_with("start: "));
    }
}
