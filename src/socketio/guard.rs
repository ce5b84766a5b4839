//! socket.io's side of [`crate::security`]: the token a socket presents in
//! its CONNECT packet (`auth: {token}`), and what each client event needs
//! of it, in one table like the native protocol's
//! ([`crate::security::access`]); the checks themselves are
//! [`crate::security::auth::Principal::allow`].

use crate::error::Result;
use crate::security::auth::{Access, Auth, Operation, Principal};
use serde_json::Value;

/// The principal of a CONNECT packet's payload `{token, pid?, offset?}`:
/// `UNAUTHENTICATED` when the broker has an auth file and the token is
/// missing or unknown.
pub fn authenticate(auth: &Auth, payload: &Value) -> Result<Principal> {
    let token = payload.get("token").and_then(Value::as_str);
    auth.authenticate_as(token, "connect with auth: {token: SECRET}")
}

/// What a client event needs of the socket's token: `publish` produces to
/// its room; `subscribe` and queue acknowledgements consume from it (the
/// system room [`super::SYSTEM_ROOM`] only tells of the topics the token
/// may see); `unsubscribe` ends the socket's own subscription, which needs
/// nothing, as on every listener.
pub fn access<'a>(event: &str, room: &'a str) -> Access<'a> {
    match event {
        "publish" => Access::Topic(Operation::Produce, room),
        "subscribe" if room == super::SYSTEM_ROOM => Access::Filtered,
        "subscribe" | "ack" => Access::Topic(Operation::Consume, room),
        _ => Access::Open,
    }
}

/// The operation a client event is counted as in the request metrics
/// (the native protocol's names).
pub fn operation(event: &str) -> &'static str {
    match event {
        "publish" => "produce",
        "subscribe" => "subscribe",
        "unsubscribe" => "unsubscribe",
        "ack" => "ack",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_needs_what_the_same_request_needs_natively() {
        assert_eq!(
            access("publish", "r"),
            Access::Topic(Operation::Produce, "r")
        );
        assert_eq!(
            access("subscribe", "r"),
            Access::Topic(Operation::Consume, "r")
        );
        assert_eq!(access("ack", "r"), Access::Topic(Operation::Consume, "r"));
        assert_eq!(
            access("subscribe", super::super::SYSTEM_ROOM),
            Access::Filtered
        );
        assert_eq!(access("unsubscribe", "r"), Access::Open);
        assert_eq!(operation("publish"), "produce");
        assert_eq!(operation("dance"), "unknown");
    }

    #[test]
    fn without_auth_any_payload_is_everyone() {
        let p = authenticate(&Auth::off(), &Value::Null).expect("anyone");
        assert!(p.name().is_none());
        assert!(p.allow(Access::Topic(Operation::Admin, "x")).is_ok());
    }
}
