//! Topic admin, deleting messages and compaction, converted to broker calls.

use super::wire;
use crate::protocol::pb::response::Result as Reply;
use crate::protocol::{convert, pb};
use crate::security::access;
use crate::server::connection::Conn;

/// Creates a topic (unset settings from the broker's defaults).
pub(in crate::server) async fn create_topic(
    conn: &Conn,
    c: pb::CreateTopicRequest,
) -> Result<Reply, pb::Error> {
    if let Some(access) = access::dead_letter(&c) {
        conn.principal.allow(access).map_err(wire(conn))?;
    }
    let broker = &conn.shared.broker;
    let config =
        convert::topic_config(c.config, &broker.config().topic_defaults).map_err(wire(conn))?;
    let info = broker
        .create_topic(&c.name, config)
        .await
        .map_err(wire(conn))?;
    Ok(Reply::Topic(conn.shared.topic_info(&info)))
}

/// Lists the topics the caller has any permission on.
pub(in crate::server) async fn list_topics(conn: &Conn) -> Result<Reply, pb::Error> {
    let topics = conn
        .shared
        .broker
        .list_topics()
        .await
        .map_err(wire(conn))?
        .iter()
        .filter(|t| conn.principal.may_see(&t.name))
        .map(|t| conn.shared.topic_info(t))
        .collect();
    Ok(Reply::Topics(pb::ListTopicsResponse { topics }))
}

/// Describes a topic.
pub(in crate::server) async fn describe_topic(
    conn: &Conn,
    d: pb::DescribeTopicRequest,
) -> Result<Reply, pb::Error> {
    let info = conn
        .shared
        .broker
        .describe_topic(&d.name)
        .await
        .map_err(wire(conn))?;
    Ok(Reply::Topic(conn.shared.topic_info(&info)))
}

/// Deletes a topic with its data.
pub(in crate::server) async fn delete_topic(
    conn: &Conn,
    d: pb::DeleteTopicRequest,
) -> Result<Reply, pb::Error> {
    conn.shared
        .broker
        .delete_topic(&d.name)
        .await
        .map_err(wire(conn))?;
    Ok(Reply::Ok(pb::Empty {}))
}

/// Deletes messages by offset.
pub(in crate::server) async fn delete_messages(
    conn: &Conn,
    d: pb::DeleteRequest,
) -> Result<Reply, pb::Error> {
    conn.shared
        .broker
        .delete(&d.topic, convert::offsets(d.offsets))
        .await
        .map_err(wire(conn))?;
    Ok(Reply::Ok(pb::Empty {}))
}

/// Compacts one topic or all.
pub(in crate::server) async fn compact(
    conn: &Conn,
    c: pb::CompactRequest,
) -> Result<Reply, pb::Error> {
    let results = conn
        .shared
        .broker
        .compact(c.topic.as_deref())
        .await
        .map_err(wire(conn))?;
    Ok(Reply::Compact(pb::CompactResponse {
        topics: results
            .iter()
            .map(|(t, s)| convert::compaction(t, s))
            .collect(),
    }))
}
