//! The one table of what each request needs of its caller's token: every
//! request message of the protocol implements [`Guarded`], and the native
//! protocol's [`Request`] maps each of its kinds through it in one
//! exhaustive `match`, so a request kind added to the protocol does not
//! compile until it says what it needs. gRPC methods take the same
//! messages, so both transports ask the same question of the same table.

use super::auth::{Access, Operation};
use crate::protocol::pb;
use crate::protocol::pb::client_frame::Request;
use crate::protocol::request::ProduceIn;

/// A request that names what it needs of the caller.
pub trait Guarded {
    /// The operation and topic the request needs.
    fn access(&self) -> Access<'_>;
}

macro_rules! guarded {
    ($($ty:ty => |$r:ident| $access:expr;)*) => {
        $(impl Guarded for $ty {
            fn access(&self) -> Access<'_> {
                let $r = self;
                $access
            }
        })*
    };
}

guarded! {
    pb::PingRequest => |_r| Access::Open;
    pb::ProduceRequest => |r| Access::Topic(Operation::Produce, &r.topic);
    // The native server's produce request, decoded without the generated type.
    ProduceIn => |r| Access::Topic(Operation::Produce, &r.topic);
    pb::FetchRequest => |r| Access::Topic(Operation::Consume, &r.topic);
    pb::SubscribeRequest => |r| Access::Topic(Operation::Consume, &r.topic);
    // Ends a subscription of the caller's own connection.
    pb::UnsubscribeRequest => |_r| Access::Open;
    pb::AckRequest => |r| Access::Topic(Operation::Consume, &r.topic);
    pb::NackRequest => |r| Access::Topic(Operation::Consume, &r.topic);
    pb::CommitRequest => |r| Access::Topic(Operation::Consume, &r.topic);
    pb::SeekRequest => |r| Access::Topic(Operation::Consume, &r.topic);
    pb::DeleteRequest => |r| Access::Topic(Operation::Admin, &r.topic);
    pb::CreateTopicRequest => |r| Access::Topic(Operation::Admin, &r.name);
    pb::ListTopicsRequest => |_r| Access::Filtered;
    pb::DescribeTopicRequest => |r| Access::See(&r.name);
    pb::DeleteTopicRequest => |r| Access::Topic(Operation::Admin, &r.name);
    pb::CreateGroupRequest => |r| Access::Topic(Operation::Admin, &r.topic);
    pb::ListGroupsRequest => |r| Access::Topic(Operation::Admin, &r.topic);
    pb::DescribeGroupRequest => |r| Access::Topic(Operation::Admin, &r.topic);
    pb::DeleteGroupRequest => |r| Access::Topic(Operation::Admin, &r.topic);
    pb::CompactRequest => |r| match &r.topic {
        Some(topic) => Access::Topic(Operation::Admin, topic),
        None => Access::Every(Operation::Admin),
    };
}

/// What creating a topic needs beyond `admin` on its name: a topic that
/// names its own dead-letter topic sends messages there (creating it if
/// missing), so the caller must be one that may produce to it. The default
/// (`<name>.dlq`) needs nothing more.
pub fn dead_letter(r: &pb::CreateTopicRequest) -> Option<Access<'_>> {
    let name = r.config.as_ref()?.dead_letter.as_deref()?;
    Some(Access::Topic(Operation::Produce, name))
}

/// What a request of the native protocol needs (`Hello` is the handshake:
/// it needs nothing more).
pub fn of(request: &Request) -> Access<'_> {
    match request {
        Request::Hello(_) => Access::Open,
        Request::Ping(r) => r.access(),
        Request::Produce(r) => r.access(),
        Request::Fetch(r) => r.access(),
        Request::Subscribe(r) => r.access(),
        Request::Unsubscribe(r) => r.access(),
        Request::Ack(r) => r.access(),
        Request::Nack(r) => r.access(),
        Request::Commit(r) => r.access(),
        Request::Seek(r) => r.access(),
        Request::Delete(r) => r.access(),
        Request::CreateTopic(r) => r.access(),
        Request::ListTopics(r) => r.access(),
        Request::DescribeTopic(r) => r.access(),
        Request::DeleteTopic(r) => r.access(),
        Request::CreateGroup(r) => r.access(),
        Request::ListGroups(r) => r.access(),
        Request::DescribeGroup(r) => r.access(),
        Request::DeleteGroup(r) => r.access(),
        Request::Compact(r) => r.access(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind of request names the operation the brief's permission
    /// model gives it; adding a kind to `of` without a row here fails.
    #[test]
    fn every_native_request_kind_needs_the_operation_of_its_group() {
        let t = || "t".to_string();
        let cases: Vec<(Request, Access<'static>)> = vec![
            (Request::Hello(Default::default()), Access::Open),
            (Request::Ping(Default::default()), Access::Open),
            (Request::Unsubscribe(Default::default()), Access::Open),
            (Request::ListTopics(Default::default()), Access::Filtered),
            (
                Request::DescribeTopic(pb::DescribeTopicRequest { name: t() }),
                Access::See("t"),
            ),
            (
                Request::Produce(pb::ProduceRequest {
                    topic: t(),
                    ..Default::default()
                }),
                Access::Topic(Operation::Produce, "t"),
            ),
            (
                Request::Fetch(pb::FetchRequest {
                    topic: t(),
                    ..Default::default()
                }),
                Access::Topic(Operation::Consume, "t"),
            ),
            (
                Request::Subscribe(pb::SubscribeRequest {
                    topic: t(),
                    ..Default::default()
                }),
                Access::Topic(Operation::Consume, "t"),
            ),
            (
                Request::Ack(pb::AckRequest {
                    topic: t(),
                    ..Default::default()
                }),
                Access::Topic(Operation::Consume, "t"),
            ),
            (
                Request::Nack(pb::NackRequest {
                    topic: t(),
                    ..Default::default()
                }),
                Access::Topic(Operation::Consume, "t"),
            ),
            (
                Request::Commit(pb::CommitRequest {
                    topic: t(),
                    ..Default::default()
                }),
                Access::Topic(Operation::Consume, "t"),
            ),
            (
                Request::Seek(pb::SeekRequest {
                    topic: t(),
                    ..Default::default()
                }),
                Access::Topic(Operation::Consume, "t"),
            ),
            (
                Request::Delete(pb::DeleteRequest {
                    topic: t(),
                    ..Default::default()
                }),
                Access::Topic(Operation::Admin, "t"),
            ),
            (
                Request::CreateTopic(pb::CreateTopicRequest {
                    name: t(),
                    ..Default::default()
                }),
                Access::Topic(Operation::Admin, "t"),
            ),
            (
                Request::DeleteTopic(pb::DeleteTopicRequest { name: t() }),
                Access::Topic(Operation::Admin, "t"),
            ),
            (
                Request::CreateGroup(pb::CreateGroupRequest {
                    topic: t(),
                    ..Default::default()
                }),
                Access::Topic(Operation::Admin, "t"),
            ),
            (
                Request::ListGroups(pb::ListGroupsRequest { topic: t() }),
                Access::Topic(Operation::Admin, "t"),
            ),
            (
                Request::DescribeGroup(pb::DescribeGroupRequest {
                    topic: t(),
                    ..Default::default()
                }),
                Access::Topic(Operation::Admin, "t"),
            ),
            (
                Request::DeleteGroup(pb::DeleteGroupRequest {
                    topic: t(),
                    ..Default::default()
                }),
                Access::Topic(Operation::Admin, "t"),
            ),
            (
                Request::Compact(pb::CompactRequest { topic: Some(t()) }),
                Access::Topic(Operation::Admin, "t"),
            ),
            (
                Request::Compact(pb::CompactRequest { topic: None }),
                Access::Every(Operation::Admin),
            ),
        ];
        for (request, want) in &cases {
            assert_eq!(of(request), *want, "{request:?}");
        }
    }
}
