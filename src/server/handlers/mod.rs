//! One module per request group, each converting protobuf to
//! [`crate::broker::Broker`] calls and the answers back: `produce`, `fetch`
//! (fetch and subscribe), `groups` (group admin, ack, nack, commit, seek)
//! and `admin` (topics, deleting messages, compaction). Broker outcomes
//! reach the wire through [`crate::protocol::status::to_wire`] only.

pub(super) mod admin;
pub(super) mod fetch;
pub(super) mod groups;
pub(super) mod produce;

use super::connection::Conn;
use crate::protocol::pb;
use crate::protocol::pb::client_frame::Request;
use crate::protocol::pb::response::Result as Reply;
use crate::protocol::status;

/// Serves one request other than `Subscribe` (see [`fetch::subscribe`]).
pub(super) async fn dispatch(conn: &Conn, request: Request) -> Result<Reply, pb::Error> {
    match request {
        Request::Hello(_) => Err(status::error(
            pb::Code::FailedPrecondition,
            "Hello was already received",
        )),
        Request::Ping(p) => Ok(Reply::Ping(pb::PingResponse { nonce: p.nonce })),
        // Decoded as `ClientIn::Produce` and served before this dispatch.
        Request::Produce(_) => Err(status::error(
            pb::Code::Internal,
            "produce is served by handlers::produce::produce",
        )),
        Request::Fetch(_) => Err(status::error(
            pb::Code::Internal,
            "fetch is served by handlers::fetch::fetch",
        )),
        Request::Subscribe(_) => Err(status::error(
            pb::Code::Internal,
            "subscribe is served by handlers::fetch::subscribe",
        )),
        Request::Unsubscribe(u) => fetch::unsubscribe(conn, u),
        Request::Ack(a) => groups::ack(conn, a).await,
        Request::Nack(n) => groups::nack(conn, n).await,
        Request::Commit(c) => groups::commit(conn, c).await,
        Request::Seek(s) => groups::seek(conn, s).await,
        Request::CreateGroup(c) => groups::create(conn, c).await,
        Request::ListGroups(l) => groups::list(conn, l).await,
        Request::DescribeGroup(d) => groups::describe(conn, d).await,
        Request::DeleteGroup(d) => groups::delete(conn, d).await,
        Request::Delete(d) => admin::delete_messages(conn, d).await,
        Request::CreateTopic(c) => admin::create_topic(conn, c).await,
        Request::ListTopics(_) => admin::list_topics(conn).await,
        Request::DescribeTopic(d) => admin::describe_topic(conn, d).await,
        Request::DeleteTopic(d) => admin::delete_topic(conn, d).await,
        Request::Compact(c) => admin::compact(conn, c).await,
    }
}

/// The name of `request`'s operation in metrics (fixed names: the label
/// stays bounded).
pub(super) fn operation(request: &Request) -> &'static str {
    match request {
        Request::Hello(_) => "hello",
        Request::Ping(_) => "ping",
        Request::Produce(_) => "produce",
        Request::Fetch(_) => "fetch",
        Request::Subscribe(_) => "subscribe",
        Request::Unsubscribe(_) => "unsubscribe",
        Request::Ack(_) => "ack",
        Request::Nack(_) => "nack",
        Request::Commit(_) => "commit",
        Request::Seek(_) => "seek",
        Request::CreateGroup(_) => "create_group",
        Request::ListGroups(_) => "list_groups",
        Request::DescribeGroup(_) => "describe_group",
        Request::DeleteGroup(_) => "delete_group",
        Request::Delete(_) => "delete",
        Request::CreateTopic(_) => "create_topic",
        Request::ListTopics(_) => "list_topics",
        Request::DescribeTopic(_) => "describe_topic",
        Request::DeleteTopic(_) => "delete_topic",
        Request::Compact(_) => "compact",
    }
}

/// A broker outcome onto the wire.
fn wire(conn: &Conn) -> impl Fn(crate::Error) -> pb::Error + '_ {
    move |e| conn.shared.wire(&e)
}
