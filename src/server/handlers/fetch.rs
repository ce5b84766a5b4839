//! Fetch (with long-poll) and subscribe: requests into broker reads, and a
//! subscription's deliveries into `Delivery` frames no larger than a frame.

use super::wire;
use crate::broker::{Deliveries, Event, Subscription};
use crate::protocol::outbound::{self, Outbound, Piece, WireMessages};
use crate::protocol::pb::response::Result as Reply;
use crate::protocol::{convert, pb, status};
use crate::security::auth::{Access, Operation};
use crate::server::connection::{Conn, Pushing, Revoker, response};
use crate::server::outgoing::Outgoing;
use std::sync::atomic::Ordering;

/// A fetch, answered with its messages encoded straight from the read; a
/// long-poll ends early when the connection closes (with the reason, or
/// with what there is when the peer is gone).
pub(in crate::server) async fn fetch(
    conn: &Conn,
    request_id: u64,
    f: pb::FetchRequest,
) -> Result<Outbound, pb::Error> {
    // A long-poll asks again once it has messages: a reload of the auth
    // file may have narrowed or revoked the token while it waited.
    let asked = (f.wait_ms > 0).then(|| (f.topic.clone(), f.group.clone(), f.member.clone()));
    let request = convert::fetch_request(f, conn.shared.config.max_frame_bytes);
    let broker = &conn.shared.broker;
    let fetched = broker
        .fetch(request, conn.closed())
        .await
        .map_err(wire(conn))?;
    if let Some((topic, group, member)) = asked
        && !fetched.messages.is_empty()
        && let Err(e) = conn
            .principal
            .allow(Access::Topic(Operation::Consume, &topic))
    {
        if let Some(group) = group {
            broker
                .give_back(&topic, &group, &member, fetched.messages)
                .await;
        }
        return Err(conn.refusal(&e));
    }
    if fetched.messages.is_empty()
        && let Some(error) = conn.closing_error()
    {
        return Err(error);
    }
    Ok(Outbound::Fetch {
        request_id,
        messages: WireMessages::new(fetched.messages),
        next_offset: fetched.next_offset.0,
        end_offset: fetched.end_offset.0,
    })
}

/// Starts a subscription. Its reply is queued before the subscription can
/// push anything, so a client always learns the id before the first delivery.
pub(in crate::server) async fn subscribe(
    conn: &Conn,
    request_id: u64,
    s: pb::SubscribeRequest,
) -> Result<(), pb::Error> {
    let config = &conn.shared.config;
    let reservation = conn
        .reserve_subscription(config.max_subscriptions as usize)
        .map_err(|live| {
            crate::server::admission::too_many_subscriptions(live, config.max_subscriptions)
        })?;
    let topic = s.topic.clone();
    let subscription = conn
        .shared
        .broker
        .subscribe(convert::subscribe_request(
            s,
            conn.shared.config.max_frame_bytes,
        ))
        .await
        .map_err(wire(conn))?;
    let id = conn.next_subscription.fetch_add(1, Ordering::Relaxed);
    let reply = response(
        request_id,
        Reply::Subscribe(pb::SubscribeResponse {
            subscription_id: id,
        }),
    );
    let credit = subscription.credit();
    let shared = std::sync::Arc::clone(&conn.shared);
    let out = conn.out.clone();
    let max_frame = shared.config.max_frame_bytes;
    let principal = conn.principal.clone();
    let allowed = move || principal.allow(Access::Topic(Operation::Consume, &topic));
    let revoker = conn.revoker();
    // Registered before the reply goes out, so an unsubscribe the client
    // sends once it knows the id always finds it; pushing starts only once
    // the reply is queued, so the client learns the id first.
    let (start, started) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        if started.await.is_err() {
            return;
        }
        push_all(id, subscription, &out, max_frame, allowed, revoker, |e| {
            shared.wire(&e)
        })
        .await
    });
    let pushing = Pushing {
        credit,
        task,
        replied: false,
    };
    conn.start_subscription(id, pushing, reservation);
    if conn.out.send(reply).await.is_err() {
        if let Some(pushing) = conn.subscriptions().remove(&id) {
            pushing.task.abort();
        }
        return Err(status::error(pb::Code::Cancelled, "connection closed"));
    }
    if !conn.replied(id) {
        // The connection closed meanwhile and left the last word to this
        // handler: after the reply, as for every subscription it ended.
        if let Some(error) = conn.closing_error() {
            let _ = conn.out.send(ended(id, error)).await;
        }
        return Ok(());
    }
    let _ = start.send(());
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

/// Pushes a subscription's deliveries until it ends, the client is gone,
/// or the caller may no longer read them (`allowed`, asked before each
/// delivery: an auth file reload may have narrowed or revoked its token;
/// a token gone closes the connection too, through `revoker`).
async fn push_all(
    id: u64,
    mut subscription: Subscription,
    out: &Outgoing,
    max_frame: u32,
    allowed: impl Fn() -> crate::Result<()>,
    revoker: Revoker,
    wire: impl Fn(crate::Error) -> pb::Error,
) {
    while let Some(event) = subscription.next().await {
        if let Err(e) = allowed() {
            if let Ok(Event::Messages(m)) = event {
                subscription.give_back(m).await;
            }
            let gone = matches!(e, crate::Error::Unauthenticated(_));
            let error = wire(e);
            let _ = out.send(ended(id, error.clone())).await;
            if gone {
                revoker.revoke(&error);
            }
            return;
        }
        let pushed = match event {
            // A message no frame can carry is skipped: it took credit the
            // client will never give back by an ack.
            Ok(Event::Messages(m)) => push(out, id, m, max_frame).await.map(|skipped| {
                if skipped > 0 {
                    subscription.credit().give(skipped);
                }
            }),
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

/// Pushes `messages` in frames of at most `max_frame` bytes (see
/// [`outbound::pieces`]); how many of them were skipped (too large for
/// any frame).
async fn push(out: &Outgoing, id: u64, messages: Deliveries, max_frame: u32) -> Result<usize, ()> {
    let mut skipped_count = 0;
    for piece in outbound::pieces(id, messages, max_frame) {
        let frame = match piece {
            Piece::Messages(messages) => Outbound::Delivery {
                subscription_id: id,
                messages,
            },
            Piece::Skipped { offset, error } => {
                skipped_count += 1;
                skipped(id, offset, error).into()
            }
        };
        out.send(frame).await.map_err(|_| ())?;
    }
    Ok(skipped_count)
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
