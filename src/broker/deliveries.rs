//! What one read hands a consumer: messages in offset order with their
//! delivery counts. Replay and stream-group reads keep the records where
//! they lie in the log's maps (no message built, no reference counted per
//! message), so a transport can encode its reply straight from them; queue
//! groups hand out owned messages, since each carries its own count.

use super::topic::{Delivery, GroupIdentity};
use crate::storage::record::RecordRef;
use crate::storage::{Message, Offset, Records, Shape};

/// Messages handed out by one read; a queue read's also name the group
/// that leased them (see [`GroupIdentity`]), so that what is given back
/// goes to that group and never to one created again under its name.
#[derive(Debug, Clone)]
pub struct Deliveries(Kind, Option<GroupIdentity>);

#[derive(Debug, Clone)]
enum Kind {
    /// Records of a replay or stream-group read (delivery count 0).
    Records(Records),
    /// Messages leased by a queue group.
    Messages(Vec<Delivery>),
}

impl Default for Deliveries {
    fn default() -> Deliveries {
        Deliveries(Kind::Messages(Vec::new()), None)
    }
}

impl From<Records> for Deliveries {
    fn from(records: Records) -> Deliveries {
        Deliveries(Kind::Records(records), None)
    }
}

impl From<Vec<Delivery>> for Deliveries {
    fn from(messages: Vec<Delivery>) -> Deliveries {
        Deliveries(Kind::Messages(messages), None)
    }
}

impl Deliveries {
    /// Messages `group` leased.
    pub(crate) fn leased_by(messages: Vec<Delivery>, group: GroupIdentity) -> Deliveries {
        Deliveries(Kind::Messages(messages), Some(group))
    }

    /// The group that leased them, for a queue read.
    pub(crate) fn group(&self) -> Option<&GroupIdentity> {
        self.1.as_ref()
    }

    /// Number of messages.
    pub fn len(&self) -> usize {
        match &self.0 {
            Kind::Records(r) => r.len(),
            Kind::Messages(m) => m.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Offset of the first message.
    pub fn first_offset(&self) -> Option<Offset> {
        match &self.0 {
            Kind::Records(r) => r.first_offset(),
            Kind::Messages(m) => m.first().map(|d| d.message.offset),
        }
    }

    /// With none: where a replay or stream-group read went past records
    /// all deleted (see [`Records::passed`]).
    pub fn passed(&self) -> Option<Offset> {
        match &self.0 {
            Kind::Records(r) => r.passed(),
            Kind::Messages(_) => None,
        }
    }

    /// Offset of the last message.
    pub fn last_offset(&self) -> Option<Offset> {
        match &self.0 {
            Kind::Records(r) => r.last_offset(),
            Kind::Messages(m) => m.last().map(|d| d.message.offset),
        }
    }

    /// The offsets, in order.
    pub fn offsets(&self) -> Vec<Offset> {
        match &self.0 {
            Kind::Records(r) => r.offsets().collect(),
            Kind::Messages(m) => m.iter().map(|d| d.message.offset).collect(),
        }
    }

    /// Bytes of keys, headers and values (what the delivered-bytes metric counts).
    pub fn content_bytes(&self) -> u64 {
        match &self.0 {
            Kind::Records(r) => r.content_bytes(),
            Kind::Messages(m) => m
                .iter()
                .map(|d| {
                    let m = &d.message;
                    crate::metrics::payload_bytes(m.key.as_ref(), &m.headers, &m.value)
                })
                .sum(),
        }
    }

    /// Splits off the messages from index `at` on.
    pub fn split_off(&mut self, at: usize) -> Deliveries {
        match &mut self.0 {
            Kind::Records(r) => Deliveries(Kind::Records(r.split_off(at)), None),
            Kind::Messages(m) => Deliveries(Kind::Messages(m.split_off(at)), self.1.clone()),
        }
    }

    /// The messages, borrowed.
    pub fn iter(&self) -> impl Iterator<Item = DeliveryRef<'_>> + '_ {
        let (records, messages) = match &self.0 {
            Kind::Records(r) => (Some(r.iter().map(DeliveryRef::Record)), None),
            Kind::Messages(m) => (None, Some(m.iter().map(DeliveryRef::Message))),
        };
        records
            .into_iter()
            .flatten()
            .chain(messages.into_iter().flatten())
    }

    /// Calls `f` with each message in order: [`Deliveries::iter`] without
    /// the iterator's per-message choice of kind (the encoder's loop).
    pub fn for_each<'s>(&'s self, mut f: impl FnMut(DeliveryRef<'s>)) {
        match &self.0 {
            Kind::Records(r) => r.iter().for_each(|r| f(DeliveryRef::Record(r))),
            Kind::Messages(m) => m.iter().for_each(|d| f(DeliveryRef::Message(d))),
        }
    }

    /// Calls `f` with each message in order, as a [`Shape`] where the read
    /// noted one (records without headers), else in place.
    pub fn for_each_shape<'s>(&'s self, mut f: impl FnMut(Result<Shape, DeliveryRef<'s>>)) {
        match &self.0 {
            Kind::Records(r) => r.shapes().for_each(|s| f(s.map_err(DeliveryRef::Record))),
            Kind::Messages(m) => m.iter().for_each(|d| f(Err(DeliveryRef::Message(d)))),
        }
    }

    /// The messages, owned (keys and values still share the log's maps).
    pub fn into_vec(self) -> Vec<Delivery> {
        match self.0 {
            Kind::Records(r) => r
                .to_messages()
                .into_iter()
                .map(|message| Delivery {
                    message,
                    delivery: 0,
                })
                .collect(),
            Kind::Messages(m) => m,
        }
    }
}

/// One delivered message, borrowed from [`Deliveries`].
#[derive(Debug, Clone, Copy)]
pub enum DeliveryRef<'a> {
    /// A record read in place (delivery count 0).
    Record(RecordRef<'a>),
    /// A leased message.
    Message(&'a Delivery),
}

impl<'a> DeliveryRef<'a> {
    /// Its offset.
    pub fn offset(&self) -> u64 {
        match self {
            DeliveryRef::Record(r) => r.offset,
            DeliveryRef::Message(d) => d.message.offset.0,
        }
    }

    /// Its timestamp.
    pub fn timestamp_ms(&self) -> u64 {
        match self {
            DeliveryRef::Record(r) => r.timestamp_ms,
            DeliveryRef::Message(d) => d.message.timestamp_ms,
        }
    }

    /// Its key, if any.
    pub fn key(&self) -> Option<&'a [u8]> {
        match self {
            DeliveryRef::Record(r) => r.key,
            DeliveryRef::Message(d) => d.message.key.as_deref(),
        }
    }

    /// Its value.
    pub fn value(&self) -> &'a [u8] {
        match self {
            DeliveryRef::Record(r) => r.value,
            DeliveryRef::Message(d) => &d.message.value,
        }
    }

    /// Which delivery this is (0 outside queue groups).
    pub fn delivery(&self) -> u32 {
        match self {
            DeliveryRef::Record(_) => 0,
            DeliveryRef::Message(d) => d.delivery,
        }
    }

    /// Its headers in order, as name and value.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        let (record, message): (Option<RecordRef<'a>>, Option<&'a Message>) = match *self {
            DeliveryRef::Record(r) => (Some(r), None),
            DeliveryRef::Message(d) => (None, Some(&d.message)),
        };
        record.into_iter().flat_map(|r| r.headers()).chain(
            message
                .into_iter()
                .flat_map(|m| m.headers.iter().map(|h| (h.name.as_str(), &h.value[..]))),
        )
    }
}
