//! What the gateway's events carry, both ways: client requests
//! (`publish`, `subscribe`, `unsubscribe`) read from JSON with an error
//! naming the field at fault, replies `{ok: true, ...}` or
//! `{error: {code, message}}`, and stored messages turned into events.
//!
//! A message published through socket.io keeps its event name in the
//! header [`EVENT_HEADER`] and the form of its data in [`TYPE_HEADER`]
//! (`application/json`, or `application/octet-stream` for binary); a
//! message from another transport without them is delivered as JSON if it
//! parses as JSON, else as a string if it is UTF-8, else as binary.

use super::packet::{Packet, has_placeholder, placeholder, placeholder_num};
use crate::broker::{Position, validate_name};
use crate::error::{Error, Result};
use crate::storage::{Durability, Header, Message, NewMessage};
use bytes::Bytes;
use serde_json::{Map, Value, json};

/// Header naming the socket.io event of a message.
pub const EVENT_HEADER: &str = "socketio-event";
/// Header naming the form of a message's data.
pub const TYPE_HEADER: &str = "content-type";
/// [`TYPE_HEADER`] of JSON data.
pub const JSON_TYPE: &str = "application/json";
/// [`TYPE_HEADER`] of binary data.
pub const BINARY_TYPE: &str = "application/octet-stream";
/// The event a message without [`EVENT_HEADER`] is emitted under.
pub const DEFAULT_EVENT: &str = "message";
/// Longest event name.
pub const MAX_EVENT_LEN: usize = 200;
/// Event names a publish may not use: the client's own, and the gateway's.
pub const RESERVED_EVENTS: &[&str] = &[
    "connect",
    "connect_error",
    "disconnect",
    "disconnecting",
    "newListener",
    "removeListener",
    "error",
    "gap",
    "rooms",
    "join-room",
    "leave-room",
    "create-room",
    "delete-room",
];

/// Whether `name` is an event a message may go out as: 1 to
/// [`MAX_EVENT_LEN`] bytes, and none of [`RESERVED_EVENTS`].
fn check_event(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > MAX_EVENT_LEN {
        return Err(format!(
            "event name has {} bytes; use 1 to {MAX_EVENT_LEN}",
            name.len()
        ));
    }
    if RESERVED_EVENTS.contains(&name) {
        return Err(format!(
            "event name {name:?} is reserved (by the socket.io client or the gateway)"
        ));
    }
    Ok(())
}

/// The answer to a client event.
#[derive(Debug)]
pub enum Reply {
    /// `{ok: true, ...fields}`.
    Ok(Value),
    /// `{error: {code, message}}`.
    Error {
        /// Status code name (`INVALID_ARGUMENT`, `NOT_FOUND`, ...).
        code: String,
        /// What is wrong.
        message: String,
    },
}

impl Reply {
    /// The reply of a broker error (paths relative to `data_dir`).
    pub fn from_error(e: &Error, data_dir: &std::path::Path) -> Reply {
        let wire = crate::protocol::status::to_wire(e, data_dir);
        Reply::Error {
            code: code_name(e).into(),
            message: wire.message,
        }
    }

    /// The JSON the acknowledgement callback receives.
    pub fn into_value(self) -> Value {
        match self {
            Reply::Ok(Value::Object(mut fields)) => {
                fields.insert("ok".into(), Value::Bool(true));
                Value::Object(fields)
            }
            Reply::Ok(_) => json!({ "ok": true }),
            Reply::Error { code, message } => error_value(&code, &message),
        }
    }
}

/// `{error: {code, message}}`, the message cut as on every transport
/// ([`crate::protocol::status::bounded`]).
pub fn error_value(code: &str, message: &str) -> Value {
    let message = crate::protocol::status::bounded(message.to_owned());
    json!({ "error": { "code": code, "message": message } })
}

/// The status code name of `e`, as the other transports report it.
pub fn code_name(e: &Error) -> &'static str {
    crate::protocol::status::code(e).as_str_name()
}

/// The name of a durability in replies.
pub fn durability(d: Durability) -> &'static str {
    match d {
        Durability::Durable => "durable",
        Durability::Written => "written",
    }
}

fn object<'a>(event: &str, body: &'a Value) -> Result<&'a Map<String, Value>> {
    body.as_object().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{event}: the first argument is an object like {{room: \"name\"}}, not {}",
            kind_of(body)
        ))
    })
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null or nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn room_of(event: &str, o: &Map<String, Value>) -> Result<String> {
    match o.get("room") {
        Some(Value::String(room)) => {
            if room == super::SYSTEM_ROOM && event != "publish" {
                return Ok(room.clone());
            }
            validate_name("room", room)?;
            Ok(room.clone())
        }
        Some(other) => Err(Error::InvalidArgument(format!(
            "{event}: room is a string, not {}",
            kind_of(other)
        ))),
        None => Err(Error::InvalidArgument(format!("{event}: room is missing"))),
    }
}

fn check_fields(event: &str, o: &Map<String, Value>, known: &[&str]) -> Result<()> {
    match o.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(Error::InvalidArgument(format!(
            "{event}: unknown field {k:?}; it takes {}",
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

/// A `publish` request.
#[derive(Debug)]
pub struct Publish {
    /// The room (topic).
    pub room: String,
    /// The message to store.
    pub message: NewMessage,
}

impl Publish {
    /// Reads `{room, event?, data, key?}`, `data` maybe a binary attachment.
    pub fn parse(body: &Value, attachments: &[Bytes]) -> Result<Publish> {
        let o = object("publish", body)?;
        check_fields("publish", o, &["room", "event", "data", "key"])?;
        let room = room_of("publish", o)?;
        let mut headers = Vec::new();
        match o.get("event") {
            None | Some(Value::Null) => {}
            Some(Value::String(e)) => {
                if let Err(why) = check_event(e) {
                    return Err(Error::InvalidArgument(format!("publish: {why}")));
                }
                if e != DEFAULT_EVENT {
                    headers.push(Header::new(EVENT_HEADER, Bytes::from(e.clone())));
                }
            }
            Some(other) => {
                return Err(Error::InvalidArgument(format!(
                    "publish: event is a string, not {}",
                    kind_of(other)
                )));
            }
        }
        let key = match o.get("key") {
            None | Some(Value::Null) => None,
            Some(Value::String(k)) => Some(Bytes::from(k.clone())),
            Some(other) => {
                return Err(Error::InvalidArgument(format!(
                    "publish: key is a string, not {}",
                    kind_of(other)
                )));
            }
        };
        let Some(data) = o.get("data") else {
            return Err(Error::InvalidArgument(
                "publish: data is missing (any JSON value or binary)".into(),
            ));
        };
        let value = if let Some(num) = placeholder_num(data) {
            let Some(bytes) = attachments.get(num) else {
                return Err(Error::InvalidArgument(format!(
                    "publish: data refers to binary attachment {num}, which did not arrive"
                )));
            };
            headers.push(Header::new(
                TYPE_HEADER,
                Bytes::from_static(BINARY_TYPE.as_bytes()),
            ));
            bytes.clone()
        } else if has_placeholder(data) {
            return Err(Error::InvalidArgument(
                "publish: binary data must be the whole of data, not inside an object or array"
                    .into(),
            ));
        } else {
            headers.push(Header::new(
                TYPE_HEADER,
                Bytes::from_static(JSON_TYPE.as_bytes()),
            ));
            Bytes::from(data.to_string())
        };
        Ok(Publish {
            room,
            message: NewMessage {
                timestamp_ms: None,
                key,
                headers,
                value,
            },
        })
    }
}

/// A `subscribe` request.
#[derive(Debug)]
pub struct Subscribe {
    /// The room, or [`super::SYSTEM_ROOM`].
    pub room: String,
    /// Where a room subscription starts.
    pub from: Position,
    /// The queue group, for `mode: "queue"`.
    pub group: Option<String>,
    /// Queue deliveries unacknowledged at once.
    pub max_in_flight: Option<usize>,
}

impl Subscribe {
    /// Reads `{room, from?}` or `{room, group, mode: "queue", maxInFlight?}`.
    pub fn parse(body: &Value) -> Result<Subscribe> {
        let o = object("subscribe", body)?;
        check_fields(
            "subscribe",
            o,
            &["room", "from", "group", "mode", "maxInFlight"],
        )?;
        let room = room_of("subscribe", o)?;
        let from = match o.get("from") {
            None | Some(Value::Null) => Position::Latest,
            Some(Value::String(s)) if s == "latest" => Position::Latest,
            Some(Value::String(s)) if s == "earliest" => Position::Earliest,
            Some(Value::Number(n)) if n.as_u64().is_some() => {
                Position::Offset(n.as_u64().unwrap_or_default())
            }
            Some(Value::Object(t))
                if t.len() == 1 && t.get("timestamp").is_some_and(|v| v.as_u64().is_some()) =>
            {
                Position::Timestamp(
                    t.get("timestamp")
                        .and_then(Value::as_u64)
                        .unwrap_or_default(),
                )
            }
            Some(other) => {
                return Err(Error::InvalidArgument(format!(
                    "subscribe: from is \"latest\", \"earliest\", an offset (a whole number) or {{timestamp: ms}}, not {other}"
                )));
            }
        };
        let mode = match o.get("mode") {
            None | Some(Value::Null) => None,
            Some(Value::String(m)) if m == "queue" => Some(m.clone()),
            Some(other) => {
                return Err(Error::InvalidArgument(format!(
                    "subscribe: mode is \"queue\" (leave it out to read the room), not {other}"
                )));
            }
        };
        let group = match o.get("group") {
            None | Some(Value::Null) => None,
            Some(Value::String(g)) => {
                validate_name("group", g)?;
                Some(g.clone())
            }
            Some(other) => {
                return Err(Error::InvalidArgument(format!(
                    "subscribe: group is a string, not {}",
                    kind_of(other)
                )));
            }
        };
        if group.is_some() != mode.is_some() {
            return Err(Error::InvalidArgument(
                "subscribe: a queue subscription names both group and mode: \"queue\"".into(),
            ));
        }
        if group.is_some() && o.get("from").is_some_and(|v| !v.is_null()) {
            return Err(Error::InvalidArgument(
                "subscribe: from does not apply to a queue group (it reads what is not yet done)"
                    .into(),
            ));
        }
        if room == super::SYSTEM_ROOM && group.is_some() {
            return Err(Error::InvalidArgument(format!(
                "subscribe: {} is the room of room events, not a queue",
                super::SYSTEM_ROOM
            )));
        }
        let max_in_flight = match o.get("maxInFlight") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(n @ 1..=1000) => Some(n as usize),
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "subscribe: maxInFlight is a whole number from 1 to 1000, not {v}"
                    )));
                }
            },
        };
        Ok(Subscribe {
            room,
            from,
            group,
            max_in_flight,
        })
    }
}

/// An `unsubscribe` request.
#[derive(Debug)]
pub struct Unsubscribe {
    /// The room.
    pub room: String,
    /// The queue group, if it is one.
    pub group: Option<String>,
}

impl Unsubscribe {
    /// Reads `{room, group?}`.
    pub fn parse(body: &Value) -> Result<Unsubscribe> {
        let o = object("unsubscribe", body)?;
        check_fields("unsubscribe", o, &["room", "group"])?;
        let room = room_of("unsubscribe", o)?;
        let group = match o.get("group") {
            None | Some(Value::Null) => None,
            Some(Value::String(g)) => Some(g.clone()),
            Some(other) => {
                return Err(Error::InvalidArgument(format!(
                    "unsubscribe: group is a string, not {}",
                    kind_of(other)
                )));
            }
        };
        Ok(Unsubscribe { room, group })
    }
}

fn header<'a>(m: &'a Message, name: &str) -> Option<&'a [u8]> {
    m.headers
        .iter()
        .find(|h| h.name == name)
        .map(|h| h.value.as_ref())
}

/// A room message encoded once for every socket that reads it: the packet
/// text up to where each socket's recovery token goes.
#[derive(Debug)]
pub struct Encoded {
    /// The message's offset.
    pub offset: u64,
    /// The packet text without its closing `]`.
    head: String,
    /// Its binary attachments.
    pub attachments: Vec<Bytes>,
}

impl Encoded {
    /// Encodes message `m` of `room` (see [`message_event`]).
    pub fn new(room: &str, m: &Message) -> Encoded {
        let packet = message_event(room, m, None, None, None);
        let mut head = packet.encode();
        head.pop();
        Encoded {
            offset: m.offset.0,
            head,
            attachments: packet.attachments,
        }
    }

    /// The packet text with the token `token` appends (base64url: nothing
    /// to escape) as the last argument, built in one allocation.
    pub fn with_token(&self, token_len: usize, token: impl FnOnce(&mut String)) -> String {
        let mut text = String::with_capacity(self.head.len() + token_len + 4);
        text.push_str(&self.head);
        text.push_str(",\"");
        token(&mut text);
        text.push_str("\"]");
        text
    }
}

/// The event a stored message goes out as: `[event, data, meta, token?]`
/// with `meta = {room, offset, timestamp, key?}` (queue deliveries add
/// `group` and `delivery`), and `id` for an acknowledgement callback.
pub fn message_event(
    room: &str,
    m: &Message,
    queue: Option<(&str, u32)>,
    token: Option<String>,
    id: Option<u64>,
) -> Packet {
    // A name another transport stored that a publish could not use (one
    // the client or the gateway reserves, or of no or too many bytes) goes
    // out as the default: the client would take a reserved one for a
    // broken packet, and drop the socket at it again after each recovery.
    let event = header(m, EVENT_HEADER)
        .and_then(|e| std::str::from_utf8(e).ok())
        .filter(|e| check_event(e).is_ok())
        .unwrap_or(DEFAULT_EVENT);
    let mut attachments = Vec::new();
    let as_json = |v: &Bytes| serde_json::from_slice::<Value>(v).ok();
    let data = match header(m, TYPE_HEADER) {
        Some(t) if t == BINARY_TYPE.as_bytes() => None,
        Some(t) if t == JSON_TYPE.as_bytes() => as_json(&m.value),
        _ => as_json(&m.value).or_else(|| {
            std::str::from_utf8(&m.value)
                .ok()
                .map(|s| Value::String(s.to_owned()))
        }),
    };
    let data = data.unwrap_or_else(|| {
        attachments.push(m.value.clone());
        placeholder(0)
    });
    let mut meta = json!({
        "room": room,
        "offset": m.offset.0,
        "timestamp": m.timestamp_ms,
    });
    // A key that is not UTF-8 goes as binary, as such a value does: as a
    // string its bytes would be lost (two keys could read the same).
    if let Some(key) = &m.key {
        meta["key"] = match std::str::from_utf8(key) {
            Ok(k) => Value::String(k.to_owned()),
            Err(_) => {
                attachments.push(key.clone());
                placeholder(attachments.len() - 1)
            }
        };
    }
    if let Some((group, delivery)) = queue {
        meta["group"] = Value::String(group.to_owned());
        meta["delivery"] = Value::from(delivery);
    }
    let mut args = vec![Value::String(event.to_owned()), data, meta];
    if let Some(token) = token {
        args.push(Value::String(token));
    }
    Packet::event(Value::Array(args), id, attachments)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Offset;

    fn err(r: Result<impl std::fmt::Debug>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn publish_names_what_is_wrong() {
        assert!(err(Publish::parse(&json!("x"), &[])).contains("first argument is an object"));
        assert!(err(Publish::parse(&json!({"data": 1}), &[])).contains("room is missing"));
        assert!(err(Publish::parse(&json!({"room": "a/b", "data": 1}), &[])).contains("room name"));
        assert!(err(Publish::parse(&json!({"room": "a"}), &[])).contains("data is missing"));
        assert!(
            err(Publish::parse(
                &json!({"room": "a", "data": 1, "x": 1}),
                &[]
            ))
            .contains("unknown field \"x\"")
        );
        assert!(
            err(Publish::parse(
                &json!({"room": "a", "data": 1, "event": "connect"}),
                &[]
            ))
            .contains("reserved")
        );
        assert!(
            err(Publish::parse(
                &json!({"room": "a", "data": {"b": placeholder(0)}}),
                &[Bytes::new()]
            ))
            .contains("whole of data")
        );
        assert!(
            err(Publish::parse(
                &json!({"room": "a", "data": placeholder(1)}),
                &[]
            ))
            .contains("did not arrive")
        );
    }

    #[test]
    fn data_round_trips_as_json_or_binary() {
        let p = Publish::parse(
            &json!({"room": "a", "event": "chat", "data": {"x": [1, "y"]}, "key": "k"}),
            &[],
        )
        .unwrap();
        let m = Message {
            offset: Offset(9),
            timestamp_ms: 5,
            key: p.message.key.clone(),
            headers: p.message.headers.clone(),
            value: p.message.value.clone(),
        };
        let e = message_event("a", &m, None, Some("t".into()), None);
        assert_eq!(
            e.data,
            Some(
                json!(["chat", {"x": [1, "y"]}, {"room": "a", "offset": 9, "timestamp": 5, "key": "k"}, "t"])
            )
        );
        let bin = Bytes::from_static(&[0, 255, 1]);
        let p = Publish::parse(
            &json!({"room": "a", "data": placeholder(0)}),
            std::slice::from_ref(&bin),
        )
        .unwrap();
        let m = Message {
            offset: Offset(0),
            timestamp_ms: 1,
            key: None,
            headers: p.message.headers,
            value: p.message.value,
        };
        let e = message_event("a", &m, None, None, None);
        assert_eq!(e.attachments, vec![bin]);
        assert_eq!(
            e.data,
            Some(json!(["message", placeholder(0), {"room": "a", "offset": 0, "timestamp": 1}]))
        );
    }

    #[test]
    fn a_key_that_is_not_utf8_goes_out_as_binary() {
        let key = Bytes::from_static(&[0xff, 0x00]);
        let m = Message {
            offset: Offset(3),
            timestamp_ms: 1,
            key: Some(key.clone()),
            headers: Vec::new(),
            value: Bytes::from_static(&[0xfe]),
        };
        let e = message_event("a", &m, None, None, None);
        assert_eq!(e.attachments, vec![Bytes::from_static(&[0xfe]), key]);
        assert_eq!(
            e.data,
            Some(json!(["message", placeholder(0),
                {"room": "a", "offset": 3, "timestamp": 1, "key": placeholder(1)}]))
        );
        let m = Message {
            key: Some(Bytes::from_static(b"k")),
            ..m
        };
        let data = message_event("a", &m, None, None, None)
            .data
            .expect("an event");
        assert_eq!(data[2]["key"], json!("k"));
    }

    #[test]
    fn a_stored_event_name_a_publish_could_not_use_goes_out_as_message() {
        // Written by another transport with the header set by hand.
        let long = "e".repeat(MAX_EVENT_LEN + 1);
        for name in ["connect", "disconnect", "rooms", "error", "", long.as_str()] {
            let m = Message {
                offset: Offset(0),
                timestamp_ms: 1,
                key: None,
                headers: vec![Header::new(EVENT_HEADER, Bytes::from(name.to_owned()))],
                value: Bytes::from_static(b"1"),
            };
            let e = message_event("a", &m, None, None, None);
            let data = e.data.expect("an event");
            assert_eq!(data[0], json!("message"), "{name:?}");
        }
        let m = Message {
            offset: Offset(0),
            timestamp_ms: 1,
            key: None,
            headers: vec![Header::new(EVENT_HEADER, Bytes::from_static(b"chat"))],
            value: Bytes::from_static(b"1"),
        };
        let data = message_event("a", &m, None, None, None)
            .data
            .expect("an event");
        assert_eq!(data[0], json!("chat"));
    }

    #[test]
    fn subscribe_reads_every_form_of_from() {
        let from = |v: Value| Subscribe::parse(&json!({"room": "r", "from": v})).map(|s| s.from);
        assert_eq!(from(json!("earliest")).unwrap(), Position::Earliest);
        assert_eq!(from(json!("latest")).unwrap(), Position::Latest);
        assert_eq!(from(json!(7)).unwrap(), Position::Offset(7));
        assert_eq!(
            from(json!({"timestamp": 9})).unwrap(),
            Position::Timestamp(9)
        );
        assert!(err(from(json!(-1))).contains("from is"));
        assert!(err(from(json!("soon"))).contains("from is"));
        assert!(err(Subscribe::parse(&json!({"room": "r", "group": "g"}))).contains("mode"));
        assert!(
            err(Subscribe::parse(
                &json!({"room": "r", "group": "g", "mode": "stream"})
            ))
            .contains("mode is")
        );
    }
}
