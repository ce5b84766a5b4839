//! Produce: a request's messages (decoded straight into the engine's by
//! [`crate::protocol::request::ClientIn`]) into a broker append, the
//! offsets back.

use super::wire;
use crate::protocol::pb::response::Result as Reply;
use crate::protocol::request::ProduceIn;
use crate::protocol::{convert, pb};
use crate::server::connection::Conn;

/// Appends a batch; the broker checks its size against the message limit
/// this transport's frames allow.
pub(in crate::server) async fn produce(conn: &Conn, p: ProduceIn) -> Result<Reply, pb::Error> {
    let limit = conn.shared.message_limit();
    let appended = conn
        .shared
        .broker
        .produce(&p.topic, p.messages, limit)
        .await
        .map_err(wire(conn))?;
    Ok(Reply::Produce(pb::ProduceResponse {
        first_offset: appended.first.0,
        last_offset: appended.last.0,
        durability: convert::durability(appended.durability),
    }))
}
