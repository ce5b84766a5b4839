//! Fetch (with long-poll) and subscribe: requests into broker reads, and a
//! subscription's deliveries into `Delivery` frames no larger than a frame.

use super::wire;
use crate::broker::{Delivery, Event, FetchRequest, SubscribeRequest, Subscription};
use crate::protocol::pb::response::Result as Reply;
use crate::protocol::{convert, pb, status};
use crate::server::connection::{Conn, Pushing, response};
use crate::server::outgoing::Outgoing;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Defaults and caps of fetch and subscribe.
const DEFAULT_MAX_MESSAGES: u32 = 100;
const CAP_MAX_MESSAGES: u32 = 10_000;
const DEFAULT_MAX_BYTES: u32 = 1024 * 1024;
const DEFAULT_MAX_IN_FLIGHT: u32 = 100;
const CAP_MAX_IN_FLIGHT: u32 = 10_000;
/// Longest long-poll.
const CAP_WAIT_MS: u32 = 60_000;
/// Most messages in one pushed frame.
const MAX_PER_DELIVERY: usize = 1000;
/// Bytes read per fetch of a subscription.
const MAX_FETCH_BYTES: u32 = 1024 * 1024;

fn messages(deliveries: Vec<Delivery>) -> Vec<pb::Message> {
    deliveries
        .into_iter()
        .map(|d| convert::message(d.message, d.delivery))
        .collect()
}

/// A fetch; a long-poll ends early when the connection closes (with the
/// reason, or with what there is when the peer is gone).
pub(in crate::server) async fn fetch(conn: &Conn, f: pb::FetchRequest) -> Result<Reply, pb::Error> {
    let max = match f.max_messages {
        0 => DEFAULT_MAX_MESSAGES,
        n => n.min(CAP_MAX_MESSAGES),
    } as usize;
    let limits = conn.shared.delivery_limits(
        max,
        match f.max_bytes {
            0 => DEFAULT_MAX_BYTES,
            n => n,
        },
    );
    let request = FetchRequest {
        topic: f.topic,
        group: f.group,
        from: f
            .from
            .map(|p| convert::position(Some(p), crate::broker::Position::Earliest)),
        member: f.member,
        limits,
        wait: Duration::from_millis(u64::from(f.wait_ms.min(CAP_WAIT_MS))),
    };
    let fetched = conn
        .shared
        .broker
        .fetch(request, conn.closed())
        .await
        .map_err(wire(conn))?;
    if fetched.messages.is_empty()
        && let Some(error) = conn.closing_error()
    {
        return Err(error);
    }
    Ok(Reply::Fetch(pb::FetchResponse {
        messages: messages(fetched.messages),
        next_offset: fetched.next_offset.0,
        end_offset: fetched.end_offset.0,
    }))
}

/// Starts a subscription. Its reply is queued before the subscription can
/// push anything, so a client always learns the id before the first delivery.
pub(in crate::server) async fn subscribe(
    conn: &Conn,
    request_id: u64,
    s: pb::SubscribeRequest,
) -> Result<(), pb::Error> {
    let config = &conn.shared.config;
    let live = conn.subscriptions().len();
    if live >= config.max_subscriptions as usize {
        return Err(status::error(
            pb::Code::ResourceExhausted,
            format!(
                "{live} subscriptions on this connection; the limit is {}",
                config.max_subscriptions
            ),
        ));
    }
    let max_in_flight = match s.max_in_flight {
        0 => DEFAULT_MAX_IN_FLIGHT,
        n => n.min(CAP_MAX_IN_FLIGHT),
    } as usize;
    let subscription = conn
        .shared
        .broker
        .subscribe(SubscribeRequest {
            topic: s.topic,
            group: s.group,
            from: s
                .from
                .map(|p| convert::position(Some(p), crate::broker::Position::Earliest)),
            member: s.member,
            max_in_flight,
            limits: conn
                .shared
                .delivery_limits(MAX_PER_DELIVERY, MAX_FETCH_BYTES),
        })
        .await
        .map_err(wire(conn))?;
    let id = conn.next_subscription.fetch_add(1, Ordering::Relaxed);
    let reply = response(
        request_id,
        Reply::Subscribe(pb::SubscribeResponse {
            subscription_id: id,
        }),
    );
    conn.out
        .send(reply)
        .await
        .map_err(|_| status::error(pb::Code::Cancelled, "connection closed"))?;
    let credit = subscription.credit();
    let shared = std::sync::Arc::clone(&conn.shared);
    let out = conn.out.clone();
    let max_frame = shared.config.max_frame_bytes;
    let task = tokio::spawn(async move {
        push_all(id, subscription, &out, max_frame, |e| shared.wire(&e)).await
    });
    conn.subscriptions().insert(id, Pushing { credit, task });
    Ok(())
}

/// Stops a subscription of this connection.
pub(in crate::server) fn unsubscribe(
    conn: &Conn,
    u: pb::UnsubscribeRequest,
) -> Result<Reply, pb::Error> {
    match conn.subscriptions().remove(&u.subscription_id) {
        Some(pushing) => {
            pushing.task.abort();
            Ok(Reply::Ok(pb::Empty {}))
        }
        None => Err(wire(conn)(crate::Error::NotFound(format!(
            "subscription {} does not exist on this connection",
            u.subscription_id
        )))),
    }
}

/// Pushes a subscription's deliveries until it ends or the client is gone.
async fn push_all(
    id: u64,
    mut subscription: Subscription,
    out: &Outgoing,
    max_frame: u32,
    wire: impl Fn(crate::Error) -> pb::Error,
) {
    while let Some(event) = subscription.next().await {
        let pushed = match event {
            Ok(Event::Messages(m)) => push(out, id, messages(m), max_frame).await,
            Ok(Event::Skipped { offset, error }) => out
                .send(skipped(id, offset, wire(error)))
                .await
                .map_err(|_| ()),
            Err(e) => {
                let error = wire(e);
                tracing::debug!(subscription = id, error = %error.message, "subscription ended");
                let _ = out.send(ended(id, error)).await;
                return;
            }
        };
        if pushed.is_err() {
            return;
        }
    }
}

fn delivery(id: u64, messages: Vec<pb::Message>) -> pb::Delivery {
    pb::Delivery {
        subscription_id: id,
        messages,
        error: None,
        skipped_offset: None,
    }
}

/// The frame saying the message at `offset` was skipped, and why.
fn skipped(id: u64, offset: u64, error: pb::Error) -> pb::ServerFrame {
    pb::ServerFrame {
        kind: Some(pb::server_frame::Kind::Delivery(pb::Delivery {
            subscription_id: id,
            messages: Vec::new(),
            error: Some(error),
            skipped_offset: Some(offset),
        })),
    }
}

/// Pushes `messages` in frames of at most `max_frame` bytes: normally one;
/// split in halves if the envelopes came out larger than planned, and a
/// single message that still does not fit is reported as skipped rather than
/// closing the connection (the codec would refuse the frame).
async fn push(
    out: &Outgoing,
    id: u64,
    messages: Vec<pb::Message>,
    max_frame: u32,
) -> Result<(), ()> {
    let mut pending = vec![messages];
    while let Some(batch) = pending.pop() {
        let d = delivery(id, batch);
        let body = prost::Message::encoded_len(&d);
        // The frame: the tag of `ServerFrame.delivery` (one byte), the
        // body's length, the body.
        let len = 1 + prost::length_delimiter_len(body) + body;
        if len <= max_frame as usize {
            let frame = pb::ServerFrame {
                kind: Some(pb::server_frame::Kind::Delivery(d)),
            };
            out.send(frame).await.map_err(|_| ())?;
            continue;
        }
        let mut batch = d.messages;
        if batch.len() > 1 {
            let second = batch.split_off(batch.len() / 2);
            pending.push(second);
            pending.push(batch);
        } else if let Some(m) = batch.pop() {
            let error = status::error(
                pb::Code::ResourceExhausted,
                format!(
                    "the message at offset {} takes a {len}-byte frame; max_frame_bytes is {max_frame}",
                    m.offset
                ),
            );
            out.send(skipped(id, m.offset, error))
                .await
                .map_err(|_| ())?;
        }
    }
    Ok(())
}

/// The last frame of subscription `id`: no messages, and why it ends.
pub(in crate::server) fn ended(id: u64, error: pb::Error) -> pb::ServerFrame {
    pb::ServerFrame {
        kind: Some(pb::server_frame::Kind::Delivery(pb::Delivery {
            subscription_id: id,
            messages: Vec::new(),
            error: Some(error),
            skipped_offset: None,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_length_push_plans_with_is_the_encoded_length() {
        for (n, value) in [(0, 0), (1, 10), (3, 200), (2, 70_000)] {
            let messages = (0..n)
                .map(|i| pb::Message {
                    offset: i,
                    value: vec![1u8; value].into(),
                    ..Default::default()
                })
                .collect();
            let d = delivery(7, messages);
            let body = prost::Message::encoded_len(&d);
            let planned = 1 + prost::length_delimiter_len(body) + body;
            let frame = pb::ServerFrame {
                kind: Some(pb::server_frame::Kind::Delivery(d)),
            };
            assert_eq!(planned, prost::Message::encoded_len(&frame));
        }
    }
}
