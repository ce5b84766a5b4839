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
    let token = payload.get("token").filter(|t| !t.is_null());
    if auth.enabled()
        && let Some(other) = token.filter(|t| !t.is_string())
    {
        let kind = match other {
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::Array(_) => "an array",
            _ => "an object",
        };
        return Err(crate::Error::Unauthenticated(format!(
            "the token is {kind}; it must be a string: connect with auth: {{token: SECRET}}"
        )));
    }
    auth.authenticate_as(
        token.and_then(Value::as_str),
        "connect with auth: {token: SECRET}",
    )
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

    /// A token that is not a string is named as such, not taken for a
    /// missing one ("requires a token" when one was sent).
    #[test]
    fn a_token_that_is_not_a_string_is_named_so() {
        use crate::security::auth::{TokenEntry, hash_secret};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("auth.toml");
        let entry = TokenEntry {
            name: "a".into(),
            hash: hash_secret("spool_secret"),
            ..TokenEntry::default()
        };
        std::fs::write(&path, entry.to_toml()).expect("write auth file");
        let auth = Auth::load(&path).expect("auth file");
        for (token, kind) in [
            (serde_json::json!(5), "a number"),
            (serde_json::json!(["spool_secret"]), "an array"),
            (serde_json::json!({"s": 1}), "an object"),
            (serde_json::json!(true), "a boolean"),
        ] {
            let e = authenticate(&auth, &serde_json::json!({ "token": token }))
                .expect_err("not a string");
            assert!(
                matches!(e, crate::Error::Unauthenticated(_))
                    && e.to_string()
                        .contains(&format!("the token is {kind}; it must be a string")),
                "{e}"
            );
        }
        let e = authenticate(&auth, &serde_json::json!({})).expect_err("none");
        assert!(e.to_string().contains("requires a token"), "{e}");
        let p = authenticate(&auth, &serde_json::json!({"token": "spool_secret"})).expect("valid");
        assert_eq!(p.name(), Some("a"));
    }

    #[test]
    fn without_auth_any_payload_is_everyone() {
        let p = authenticate(&Auth::off(), &Value::Null).expect("anyone");
        assert!(p.name().is_none());
        assert!(p.allow(Access::Topic(Operation::Admin, "x")).is_ok());
    }
}
