//! Consumer groups: group admin, ack, nack, commit and seek, converted to
//! broker calls; acks and nacks also return credit to the connection's
//! subscription they name.

use super::wire;
use crate::broker::Position;
use crate::protocol::pb::response::Result as Reply;
use crate::protocol::{convert, pb};
use crate::server::connection::Conn;
use crate::storage::Offset;

/// Acknowledges messages. Without a group, an ack only returns credit to a
/// replay subscription, which must be named.
pub(in crate::server) async fn ack(conn: &Conn, a: pb::AckRequest) -> Result<Reply, pb::Error> {
    let n = a.offsets.len();
    if a.group.is_empty() {
        if a.subscription_id.is_none() {
            return Err(wire(conn)(crate::Error::InvalidArgument(format!(
                "ack on topic {}: name a group, or a subscription_id to return credit",
                a.topic
            ))));
        }
        conn.give_credit(a.subscription_id, n);
        return Ok(Reply::Ok(pb::Empty {}));
    }
    conn.shared
        .broker
        .ack(
            &a.topic,
            &a.group,
            convert::offsets(a.offsets),
            a.subscription_id.is_some(),
        )
        .await
        .map_err(wire(conn))?;
    conn.give_credit(a.subscription_id, n);
    Ok(Reply::Ok(pb::Empty {}))
}

/// Gives messages back to a queue group.
pub(in crate::server) async fn nack(conn: &Conn, n: pb::NackRequest) -> Result<Reply, pb::Error> {
    let count = n.offsets.len();
    let requeued = conn
        .shared
        .broker
        .nack(&n.topic, &n.group, convert::offsets(n.offsets), n.delay_ms)
        .await
        .map_err(wire(conn))?;
    conn.give_credit(n.subscription_id, count);
    Ok(Reply::Nack(pb::NackResponse {
        requeued: requeued as u32,
    }))
}

/// Commits a stream group's offset.
pub(in crate::server) async fn commit(
    conn: &Conn,
    c: pb::CommitRequest,
) -> Result<Reply, pb::Error> {
    conn.shared
        .broker
        .commit(&c.topic, &c.group, Offset(c.offset))
        .await
        .map_err(wire(conn))?;
    Ok(Reply::Ok(pb::Empty {}))
}

/// Moves a group.
pub(in crate::server) async fn seek(conn: &Conn, s: pb::SeekRequest) -> Result<Reply, pb::Error> {
    let to = convert::position(s.to, Position::Earliest);
    let offset = conn
        .shared
        .broker
        .seek(&s.topic, &s.group, to)
        .await
        .map_err(wire(conn))?;
    Ok(Reply::Seek(pb::SeekResponse { offset: offset.0 }))
}

/// Creates a group.
pub(in crate::server) async fn create(
    conn: &Conn,
    c: pb::CreateGroupRequest,
) -> Result<Reply, pb::Error> {
    let mode = convert::group_mode(c.mode).map_err(wire(conn))?;
    let start = convert::position(c.start, Position::Earliest);
    let info = conn
        .shared
        .broker
        .create_group(&c.topic, &c.group, mode, start)
        .await
        .map_err(wire(conn))?;
    Ok(Reply::Group(convert::group_info(&c.topic, info)))
}

/// Lists a topic's groups.
pub(in crate::server) async fn list(
    conn: &Conn,
    l: pb::ListGroupsRequest,
) -> Result<Reply, pb::Error> {
    let groups = conn
        .shared
        .broker
        .list_groups(&l.topic)
        .await
        .map_err(wire(conn))?;
    Ok(Reply::Groups(pb::ListGroupsResponse {
        groups: groups
            .into_iter()
            .map(|g| convert::group_info(&l.topic, g))
            .collect(),
    }))
}

/// Describes a group.
pub(in crate::server) async fn describe(
    conn: &Conn,
    d: pb::DescribeGroupRequest,
) -> Result<Reply, pb::Error> {
    let info = conn
        .shared
        .broker
        .describe_group(&d.topic, &d.group)
        .await
        .map_err(wire(conn))?;
    Ok(Reply::Group(convert::group_info(&d.topic, info)))
}

/// Deletes a group.
pub(in crate::server) async fn delete(
    conn: &Conn,
    d: pb::DeleteGroupRequest,
) -> Result<Reply, pb::Error> {
    conn.shared
        .broker
        .delete_group(&d.topic, &d.group)
        .await
        .map_err(wire(conn))?;
    Ok(Reply::Ok(pb::Empty {}))
}
