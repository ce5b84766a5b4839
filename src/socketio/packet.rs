//! The Socket.IO v5 packet codec: one text packet
//! `<type>[<attachments>-][<namespace>,][<ack id>][<JSON>]`, followed for
//! binary packets by that many Engine.IO binary messages, each standing in
//! for a `{"_placeholder":true,"num":N}` in the JSON.
//!
//! | type | name          | JSON                                   |
//! |------|---------------|----------------------------------------|
//! | 0    | CONNECT       | client: auth object; server: `{sid,pid}` |
//! | 1    | DISCONNECT    | none                                   |
//! | 2    | EVENT         | `[name, ...args]`                      |
//! | 3    | ACK           | `[...args]`                            |
//! | 4    | CONNECT_ERROR | `{message, data?}`                     |
//! | 5    | BINARY_EVENT  | as EVENT, with placeholders            |
//! | 6    | BINARY_ACK    | as ACK, with placeholders              |
//!
//! Decoding keeps "invalid" ([`PacketError`]) apart from "waiting for
//! attachments" ([`Decoded::NeedsAttachments`]).

use bytes::Bytes;
use serde_json::Value;
use std::fmt::Write as _;

/// The packet types of Socket.IO v5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Opens a namespace (client) or confirms it (server).
    Connect = 0,
    /// Leaves a namespace.
    Disconnect = 1,
    /// An event, maybe with an acknowledgement id.
    Event = 2,
    /// The answer to an event's acknowledgement id.
    Ack = 3,
    /// The server refused a CONNECT.
    ConnectError = 4,
    /// An event with binary attachments.
    BinaryEvent = 5,
    /// An acknowledgement with binary attachments.
    BinaryAck = 6,
}

impl Kind {
    fn from_digit(c: u8) -> Option<Kind> {
        Some(match c {
            b'0' => Kind::Connect,
            b'1' => Kind::Disconnect,
            b'2' => Kind::Event,
            b'3' => Kind::Ack,
            b'4' => Kind::ConnectError,
            b'5' => Kind::BinaryEvent,
            b'6' => Kind::BinaryAck,
            _ => return None,
        })
    }

    fn is_binary(self) -> bool {
        matches!(self, Kind::BinaryEvent | Kind::BinaryAck)
    }
}

/// Most binary attachments one packet may announce.
pub const MAX_ATTACHMENTS: usize = 16;

/// One Socket.IO packet, its binary attachments included.
#[derive(Debug, Clone, PartialEq)]
pub struct Packet {
    /// Its type.
    pub kind: Kind,
    /// Namespace (`/` unless named).
    pub namespace: String,
    /// Acknowledgement id of an EVENT or ACK.
    pub id: Option<u64>,
    /// The JSON part (placeholders where attachments go).
    pub data: Option<Value>,
    /// The binary attachments, in placeholder order.
    pub attachments: Vec<Bytes>,
}

/// Why a packet is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid socket.io packet: {0}")]
pub struct PacketError(pub String);

/// What decoding a text packet gives.
#[derive(Debug)]
pub enum Decoded {
    /// A whole packet.
    Packet(Packet),
    /// A binary packet whose `attachments` more binary messages follow.
    NeedsAttachments(Packet, usize),
}

impl Packet {
    /// An EVENT (BINARY_EVENT when `attachments` is not empty) of the
    /// default namespace.
    pub fn event(data: Value, id: Option<u64>, attachments: Vec<Bytes>) -> Packet {
        let kind = if attachments.is_empty() {
            Kind::Event
        } else {
            Kind::BinaryEvent
        };
        Packet {
            kind,
            namespace: "/".into(),
            id,
            data: Some(data),
            attachments,
        }
    }

    /// An ACK of the default namespace.
    pub fn ack(id: u64, data: Value) -> Packet {
        Packet {
            kind: Kind::Ack,
            namespace: "/".into(),
            id: Some(id),
            data: Some(data),
            attachments: Vec::new(),
        }
    }

    /// A packet of `kind` with a JSON body for `namespace`.
    pub fn control(kind: Kind, namespace: &str, data: Option<Value>) -> Packet {
        Packet {
            kind,
            namespace: namespace.into(),
            id: None,
            data,
            attachments: Vec::new(),
        }
    }

    /// The text part of the packet (its attachments go after it, one
    /// binary message each).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(64);
        out.push(char::from(b'0' + self.kind as u8));
        if self.kind.is_binary() {
            let _ = write!(out, "{}-", self.attachments.len());
        }
        if self.namespace != "/" {
            out.push_str(&self.namespace);
            out.push(',');
        }
        if let Some(id) = self.id {
            let _ = write!(out, "{id}");
        }
        if let Some(data) = &self.data {
            out.push_str(&data.to_string());
        }
        out
    }

    /// How many attachments the header of a binary packet announces, read
    /// as far as it goes (`5<n>-…`, `6<n>-…`; 0 for any other packet):
    /// the binary messages that follow a packet that does not decode are
    /// its own, not packets of their own.
    pub fn announced_attachments(text: &str) -> usize {
        if !matches!(text.as_bytes().first(), Some(b'5' | b'6')) {
            return 0;
        }
        let digits = text[1..].bytes().take_while(u8::is_ascii_digit).count();
        match &text[1..1 + digits] {
            "" => 0,
            n => n.parse().unwrap_or(usize::MAX),
        }
    }

    /// The acknowledgement id of an event packet of the default namespace
    /// that does not decode, when its header says one (`2<id>…`,
    /// `5<n>-<id>…`): its sender waits on that id for a reply.
    pub fn event_ack_id(text: &str) -> Option<u64> {
        let mut rest = match text.as_bytes().first() {
            Some(b'2') => &text[1..],
            Some(b'5') => {
                let dash = text.find('-')?;
                &text[dash + 1..]
            }
            _ => return None,
        };
        if rest.starts_with('/') {
            return None;
        }
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        rest = &rest[..digits];
        rest.parse().ok()
    }

    /// Decodes the text part of a packet.
    pub fn decode(text: &str) -> Result<Decoded, PacketError> {
        let bytes = text.as_bytes();
        let Some(&first) = bytes.first() else {
            return Err(PacketError("empty packet".into()));
        };
        let kind = Kind::from_digit(first)
            .ok_or_else(|| PacketError(format!("unknown packet type {:?}", char::from(first))))?;
        let mut rest = &text[1..];
        let mut attachments = 0;
        if kind.is_binary() {
            let Some(dash) = rest.find('-') else {
                return Err(PacketError(
                    "a binary packet announces its attachment count".into(),
                ));
            };
            attachments = rest[..dash]
                .parse::<usize>()
                .map_err(|_| PacketError(format!("bad attachment count {:?}", &rest[..dash])))?;
            if attachments > MAX_ATTACHMENTS {
                return Err(PacketError(format!(
                    "{attachments} attachments announced; the limit is {MAX_ATTACHMENTS}"
                )));
            }
            rest = &rest[dash + 1..];
        }
        let mut namespace = "/".to_owned();
        if rest.starts_with('/') {
            match rest.find(',') {
                Some(comma) => {
                    namespace = rest[..comma].to_owned();
                    rest = &rest[comma + 1..];
                }
                None => {
                    namespace = rest.to_owned();
                    rest = "";
                }
            }
        }
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let id = if digits > 0 {
            Some(
                rest[..digits]
                    .parse::<u64>()
                    .map_err(|_| PacketError(format!("bad ack id {:?}", &rest[..digits])))?,
            )
        } else {
            None
        };
        rest = &rest[digits..];
        let data = if rest.is_empty() {
            None
        } else {
            Some(serde_json::from_str::<Value>(rest).map_err(|e| {
                let text = e.to_string();
                let why = if text.starts_with("recursion limit exceeded") {
                    "JSON nested more than 128 arrays and objects deep, the most spool reads"
                } else if text.contains("escape") || text.contains("surrogate") {
                    "a \\u escape that is no character (a lone UTF-16 surrogate, such as \\ud800)"
                } else {
                    "not JSON"
                };
                PacketError(format!("payload refused, {why}: {text}"))
            })?)
        };
        match kind {
            Kind::Event | Kind::BinaryEvent => match &data {
                Some(Value::Array(a)) if matches!(a.first(), Some(Value::String(_))) => {}
                _ => {
                    return Err(PacketError(
                        "an event's payload is an array starting with the event name".into(),
                    ));
                }
            },
            Kind::Ack | Kind::BinaryAck => {
                if id.is_none() || !matches!(data, Some(Value::Array(_))) {
                    return Err(PacketError(
                        "an acknowledgement has an id and an array payload".into(),
                    ));
                }
            }
            Kind::Connect => {
                if !matches!(data, None | Some(Value::Object(_))) {
                    return Err(PacketError("a CONNECT payload is an object".into()));
                }
            }
            Kind::Disconnect | Kind::ConnectError => {}
        }
        let packet = Packet {
            kind,
            namespace,
            id,
            data,
            attachments: Vec::new(),
        };
        Ok(if attachments > 0 {
            Decoded::NeedsAttachments(packet, attachments)
        } else {
            Decoded::Packet(packet)
        })
    }
}

/// The placeholder that stands for attachment `num` in a binary packet.
pub fn placeholder(num: usize) -> Value {
    serde_json::json!({ "_placeholder": true, "num": num })
}

/// The attachment number `value` stands for, if it is a placeholder.
pub fn placeholder_num(value: &Value) -> Option<usize> {
    let o = value.as_object()?;
    if o.get("_placeholder")?.as_bool()? && o.len() == 2 {
        o.get("num")?.as_u64().map(|n| n as usize)
    } else {
        None
    }
}

/// Whether `value` holds a placeholder anywhere.
pub fn has_placeholder(value: &Value) -> bool {
    if placeholder_num(value).is_some() {
        return true;
    }
    match value {
        Value::Array(a) => a.iter().any(has_placeholder),
        Value::Object(o) => o.values().any(has_placeholder),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn whole(text: &str) -> Packet {
        match Packet::decode(text) {
            Ok(Decoded::Packet(p)) => p,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn decodes_the_forms_the_client_sends() {
        let p = whole("0");
        assert_eq!(
            (p.kind, p.namespace.as_str(), p.data),
            (Kind::Connect, "/", None)
        );
        let p = whole(r#"0{"pid":"a","offset":"b"}"#);
        assert_eq!(p.data, Some(json!({"pid":"a","offset":"b"})));
        let p = whole(r#"0/admin,{"token":1}"#);
        assert_eq!(p.namespace, "/admin");
        let p = whole(r#"212["publish",{"room":"r"}]"#);
        assert_eq!((p.kind, p.id), (Kind::Event, Some(12)));
        let p = whole(r#"37["ok"]"#);
        assert_eq!((p.kind, p.id), (Kind::Ack, Some(7)));
        match Packet::decode(r#"51-3["publish",{"_placeholder":true,"num":0}]"#) {
            Ok(Decoded::NeedsAttachments(p, 1)) => {
                assert_eq!((p.kind, p.id), (Kind::BinaryEvent, Some(3)))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_binary_header_says_how_many_attachments_follow_even_when_the_rest_is_bad() {
        assert_eq!(Packet::announced_attachments("53-[\"publish\",{bad"), 3);
        assert_eq!(Packet::announced_attachments("617-/x,4[]"), 17);
        assert_eq!(Packet::announced_attachments("5-[]"), 0);
        assert_eq!(Packet::announced_attachments("2[\"publish\"]"), 0);
        assert_eq!(Packet::announced_attachments(""), 0);
        assert_eq!(
            Packet::announced_attachments("599999999999999999999999-"),
            usize::MAX
        );
    }

    #[test]
    fn refuses_what_is_not_a_packet() {
        for bad in [
            "",
            "9",
            "2",
            "2{}",
            "2[1]",
            "3[]",
            "5[\"x\"]",
            "599-[\"x\"]",
            "2[\"x\"",
            "0[1]",
        ] {
            assert!(Packet::decode(bad).is_err(), "{bad:?} decoded");
        }
    }

    /// Valid JSON spool does not read is named for what it is, not "not
    /// JSON": nesting past serde_json's limit, a lone surrogate escape.
    #[test]
    fn json_past_what_is_read_says_why() {
        let deep = format!(
            "2[\"publish\",{{\"room\":\"r\",\"data\":{}{}}}]",
            "[".repeat(200),
            "]".repeat(200)
        );
        let lone = r#"2["publish",{"room":"r","data":"\ud800"}]"#;
        for (text, says) in [
            (deep.as_str(), "more than 128"),
            (lone, "lone UTF-16 surrogate"),
            ("2[\"x\"", "not JSON"),
        ] {
            match Packet::decode(text) {
                Err(e) => assert!(e.to_string().contains(says), "{e}"),
                Ok(_) => panic!("{text:?} decoded"),
            }
        }
    }

    #[test]
    fn encodes_what_the_client_expects() {
        assert_eq!(
            Packet::control(Kind::Connect, "/", Some(json!({"sid":"s"}))).encode(),
            r#"0{"sid":"s"}"#
        );
        assert_eq!(Packet::ack(4, json!([1])).encode(), "34[1]");
        let p = Packet::event(
            json!(["m", placeholder(0)]),
            None,
            vec![Bytes::from_static(b"x")],
        );
        assert_eq!(p.encode(), r#"51-["m",{"_placeholder":true,"num":0}]"#);
        assert_eq!(
            Packet::control(Kind::ConnectError, "/x", Some(json!({"message":"no"}))).encode(),
            r#"4/x,{"message":"no"}"#
        );
    }

    proptest! {
        #[test]
        fn events_round_trip(id in proptest::option::of(0u64..1_000_000), name in "[a-z]{1,8}", n in any::<i64>(), s in ".{0,20}") {
            let p = Packet::event(json!([name, n, s]), id, Vec::new());
            let back = whole(&p.encode());
            prop_assert_eq!(back, p);
        }

        #[test]
        fn decoding_never_panics(text in ".{0,40}") {
            let _ = Packet::decode(&text);
        }
    }
}
