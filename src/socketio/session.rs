//! One socket.io socket, from CONNECT to close: its packets are handled in
//! the order they arrive, one at a time; each room it reads has a pump task
//! that emits the room's messages, every one carrying the recovery token
//! of the socket's positions at that point (see [`super::offset`]), so the
//! last token a client saw names exactly what it has and has not seen.
//!
//! Everything the socket emits goes through [`Shared::lock`], which keeps
//! positions, tokens and emission order together.
//!
//! The principal the CONNECT packet's token stands for is asked before
//! every event and every push ([`Out::allowed`]), so an auth file reload
//! reaches a socket at its next one; a socket whose token is gone is
//! disconnected.

use super::codec::{self, Reply};
use super::offset::{PID_LEN, Token, TokenError, pid_from_text, pid_text};
use super::packet::{Decoded, Kind, Packet, PacketError};
use super::{Gateway, guard};
use crate::broker::topic::GroupIdentity;
use crate::broker::{Event, Position, SubscribeRequest, Subscription, validate_name};
use crate::error::{Error, Result};
use crate::groups::GroupMode;
use crate::security::auth::{Access, Principal};
use crate::server::admission::Limit;
use crate::storage::Offset;
use bytes::Bytes;
use engineioxide::Socket;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;

/// What the Engine.IO layer hands a socket's task.
#[derive(Debug)]
pub enum Inbound {
    /// A text message (a packet, or the text part of a binary one).
    Text(engineioxide::Str),
    /// A binary message (an attachment).
    Binary(Bytes),
    /// The socket closed.
    Closed,
    /// The broker is stopping: what came before is served and answered,
    /// events after it are refused, and the socket closes soon after.
    Stopping,
    /// The pump of room subscription `id` ended by itself (a refusal after
    /// a reload, the room's topic deleted, a failed send).
    RoomEnded {
        /// The room.
        room: String,
        /// Which subscription of it ([`RoomSub::id`]).
        id: u64,
    },
    /// The pump of queue subscription `id` ended by itself (a refusal, the
    /// topic gone, a failed read).
    QueueEnded {
        /// The room.
        room: String,
        /// The group.
        group: String,
        /// Which subscription ([`QueueSub::id`]).
        id: u64,
    },
}

/// Most messages from a client waiting for its socket's task.
pub const INBOX_MESSAGES: usize = 1024;
/// Most bytes of messages from a client waiting for its socket's task.
pub const INBOX_BYTES: usize = 64 << 20;

/// The per-socket data Engine.IO keeps: the way into the socket's task.
#[derive(Debug, Default)]
pub struct Session {
    inbox: std::sync::OnceLock<mpsc::UnboundedSender<Inbound>>,
    /// Messages and bytes in the inbox: a client that sends faster than its
    /// packets are served is closed past [`INBOX_MESSAGES`] or
    /// [`INBOX_BYTES`], not queued for without bound.
    queued: std::sync::atomic::AtomicUsize,
    queued_bytes: std::sync::atomic::AtomicUsize,
    /// Set once the inbox overflowed: nothing more is taken.
    overflowed: std::sync::atomic::AtomicBool,
    /// Set when Engine.IO closed the socket: nothing more reaches the
    /// client.
    closed: std::sync::atomic::AtomicBool,
    /// Set once the socket is being disconnected for its token: the
    /// events and pushes that find the token gone after that only get
    /// their own refusals.
    token_gone: std::sync::atomic::AtomicBool,
    /// Held while one packet's messages go out, so a binary packet's
    /// attachments follow it with nothing in between.
    sending: Mutex<()>,
}

impl Inbound {
    fn len(&self) -> usize {
        match self {
            Inbound::Text(text) => text.len(),
            Inbound::Binary(data) => data.len(),
            Inbound::Closed
            | Inbound::Stopping
            | Inbound::RoomEnded { .. }
            | Inbound::QueueEnded { .. } => 0,
        }
    }

    /// Whether it is the client's (counted against the inbox bounds); the
    /// server's own notes always get through.
    fn is_the_clients(&self) -> bool {
        matches!(self, Inbound::Text(_) | Inbound::Binary(_))
    }
}

impl Session {
    /// Marks the socket closed by Engine.IO ([`Session::is_closed`]).
    pub fn set_closed(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether Engine.IO closed the socket.
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Hands `message` to the socket's task (dropped once it has ended).
    /// False when the inbox is full: the caller closes the socket. The
    /// socket's closing always gets through.
    pub fn push(&self, message: Inbound) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(tx) = self.inbox.get() else {
            return true;
        };
        if message.is_the_clients() {
            if self.overflowed.load(Relaxed) {
                return false;
            }
            let bytes = message.len();
            let messages = self.queued.fetch_add(1, Relaxed) + 1;
            let total = self.queued_bytes.fetch_add(bytes, Relaxed) + bytes;
            if messages > INBOX_MESSAGES || total > INBOX_BYTES {
                self.overflowed.store(true, Relaxed);
                tracing::warn!(
                    messages,
                    bytes = total,
                    "closing a socket.io socket whose client sends faster than its packets are served"
                );
                return false;
            }
        }
        let _ = tx.send(message);
        true
    }

    /// The socket's task took `message` out of the inbox.
    fn taken(&self, message: &Inbound) {
        use std::sync::atomic::Ordering::Relaxed;
        if message.is_the_clients() {
            self.queued.fetch_sub(1, Relaxed);
            self.queued_bytes.fetch_sub(message.len(), Relaxed);
        }
    }
}

/// An Engine.IO socket of the gateway.
pub type EioSocket = Arc<Socket<Session>>;

/// Most messages one read hands a pump; also its credit.
pub(super) const PUMP_BATCH: usize = 64;
/// Bytes one read hands a pump.
pub(super) const PUMP_BYTES: usize = 1 << 20;
/// Queue deliveries unacknowledged at once per subscription, by default.
const DEFAULT_QUEUE_IN_FLIGHT: usize = 16;
/// How long an emit waits for room in the socket's send buffer before the
/// socket is closed as not reading.
const SEND_STALL: Duration = Duration::from_secs(30);
/// How long a socket refused at CONNECT, or disconnected for its token, has
/// to read why before the server closes it (the stock client closes first).
pub(super) const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A queue delivery waiting for the client's acknowledgement callback.
#[derive(Debug)]
struct PendingAck {
    target: AckTarget,
    credit: crate::broker::Credit,
}

/// The message an acknowledgement callback acknowledges.
#[derive(Debug)]
struct AckTarget {
    room: String,
    group: String,
    offset: Offset,
    /// The group as it was when it leased the message: a callback does
    /// nothing to a group of the name made since (or a topic's).
    leased_by: Option<GroupIdentity>,
}

/// Callbacks remembered per socket after their delivery's lease ran out:
/// called late, each still acknowledges its message, as an ack of any
/// offset does natively (until the subscription ends: its messages went
/// back to the group). Past this many, the oldest is forgotten (its
/// callback then does nothing).
const LATE_ACKS_KEPT: usize = 4096;

/// What the socket's task and its pumps share.
#[derive(Debug)]
pub struct Shared {
    pid: [u8; PID_LEN],
    /// Room to the next offset to emit.
    positions: BTreeMap<String, u64>,
    /// Ack id of a queue delivery to what it acknowledges.
    pending: HashMap<u64, PendingAck>,
    /// Ack ids of deliveries whose lease ran out while their subscription
    /// goes on, up to [`LATE_ACKS_KEPT`].
    late: BTreeMap<u64, AckTarget>,
    next_ack: u64,
    /// Where tokens are built (kept: sealing allocates nothing).
    scratch: Vec<u8>,
}

impl Shared {
    /// Remembers the callback `id` of a delivery no longer pending, so a
    /// late call still acknowledges `target`; forgets the oldest past
    /// [`LATE_ACKS_KEPT`].
    fn keep_late(&mut self, id: u64, target: AckTarget) {
        self.late.insert(id, target);
        while self.late.len() > LATE_ACKS_KEPT {
            self.late.pop_first();
        }
    }
}

/// The socket's emitting side: positions, tokens and emission order.
#[derive(Debug, Clone)]
pub struct Out {
    socket: EioSocket,
    gateway: Arc<Gateway>,
    shared: Arc<Mutex<Shared>>,
    /// Who the socket authenticated as at CONNECT (`None` before).
    principal: Option<Principal>,
    /// Events other sockets' tasks send this one ([`Out::post`]), emitted
    /// in order by a task of this socket's own (`None` in that task).
    side: Option<mpsc::Sender<(String, Vec<Value>)>>,
    /// When that task last emitted one (ms since the epoch).
    side_progress: Arc<std::sync::atomic::AtomicU64>,
}

/// Events from other sockets' tasks one socket may have waiting (a burst
/// of joins after a restart can be many).
const SIDE_EVENTS: usize = 16 * 1024;

impl Out {
    /// Sends `packet`, waiting (bounded) for room in the send buffer.
    async fn send(&self, packet: &Packet) -> bool {
        send(&self.socket, packet).await
    }

    /// Moves the socket's position in `room` to `next`, past a message
    /// that cannot be sent to it (the tokens of later emits carry it).
    async fn passed(&self, room: &str, next: u64) {
        let mut shared = self.shared.lock().await;
        let at = shared.positions.entry(room.to_owned()).or_insert(next);
        *at = (*at).max(next);
    }

    /// The token of the current positions.
    fn token(&self, shared: &Shared) -> String {
        super::offset::encode(&shared.pid, &shared.positions, &self.gateway.key)
    }

    /// Queues `name` with `args` for this socket's own task to emit (as
    /// [`Out::emit`]) and returns at once: what one socket tells others
    /// (presence, room events) never waits on their send buffers, so a
    /// socket that does not read holds up no other. A socket with
    /// [`SIDE_EVENTS`] of them waiting does not read, and is closed.
    pub fn post(&self, name: &str, args: Vec<Value>) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(side) = &self.side else { return };
        if let Err(mpsc::error::TrySendError::Full(_)) = side.try_send((name.to_owned(), args)) {
            // Full while it still reads (a burst): this one event is
            // dropped. Full with nothing emitted for as long as a push may
            // wait: it does not read.
            let idle =
                crate::storage::log::timer_ms().saturating_sub(self.side_progress.load(Relaxed));
            if idle >= SEND_STALL.as_millis() as u64 {
                tracing::warn!(sid = %self.socket.id, "socket.io client reads nothing: closing it");
                self.socket
                    .close(engineioxide::DisconnectReason::TransportError);
            } else {
                tracing::debug!(sid = %self.socket.id, event = name, "socket.io side event dropped: the socket is far behind");
            }
        }
    }

    /// Emits `name` with `args` and the token of the current positions
    /// as the last argument. Every event gets one: the client takes the
    /// last string argument of any event as its recovery offset.
    pub async fn emit(&self, name: &str, mut args: Vec<Value>) -> bool {
        let shared = self.shared.lock().await;
        args.push(Value::String(self.token(&shared)));
        let mut all = vec![Value::String(name.into())];
        all.extend(args);
        self.send(&Packet::event(Value::Array(all), None, Vec::new()))
            .await
    }

    /// The socket's Engine.IO id.
    pub fn sid(&self) -> String {
        self.socket.id.to_string()
    }

    /// Whether the socket's token allows `access` now (an auth file reload
    /// may have narrowed it): `PERMISSION_DENIED`, or `UNAUTHENTICATED`
    /// once a reload removed or replaced the token.
    fn allow(&self, access: Access<'_>) -> Result<()> {
        match &self.principal {
            Some(p) => p.allow(access),
            None => Err(Error::Unauthenticated(
                "the socket has not connected (no CONNECT packet)".into(),
            )),
        }
    }

    /// Whether the socket's token has any permission on topic `room` now.
    pub fn may_see(&self, room: &str) -> bool {
        self.allow(Access::See(room)).is_ok()
    }

    /// [`Out::allow`], disconnecting the socket when its token is gone.
    pub async fn allowed(&self, access: Access<'_>) -> Result<()> {
        let result = self.allow(access);
        if let Err(e @ Error::Unauthenticated(_)) = &result {
            self.disconnect(e).await;
        }
        result
    }

    /// Whether the socket may still read `room` (through queue group
    /// `group`, if any), asked before each push: if not, an `error` event
    /// naming the room (and the group) says why and the push ends.
    async fn may_push(&self, room: &str, group: Option<&str>) -> bool {
        match self.allowed(guard::access("subscribe", room)).await {
            Ok(()) => true,
            Err(e) => {
                self.refused(room, group, &e).await;
                false
            }
        }
    }

    /// `e` as a client reads it: paths relative to the data directory, as
    /// every transport says them.
    fn say(&self, e: &Error) -> String {
        crate::protocol::status::to_wire(e, self.gateway.broker.data_dir()).message
    }

    /// Tells the client why pushes of `room` (as queue `group`) end: an
    /// `error` event, unless the token is gone (the socket is then
    /// disconnected with that error instead).
    async fn refused(&self, room: &str, group: Option<&str>, e: &Error) {
        if matches!(e, Error::Unauthenticated(_)) {
            return;
        }
        let which = match group {
            Some(group) => format!("room {room}, queue group {group}"),
            None => format!("room {room}"),
        };
        let err = codec::error_value(codec::code_name(e), &format!("{which}: {}", self.say(e)));
        self.emit("error", vec![err]).await;
    }

    /// Ends a socket whose token is gone: an `error` event with `e`
    /// (`UNAUTHENTICATED`), a DISCONNECT packet (the client does not
    /// reconnect by itself), and the Engine.IO connection closed.
    async fn disconnect(&self, e: &Error) {
        if self
            .socket
            .data
            .token_gone
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        tracing::info!(
            sid = %self.socket.id,
            token = self.principal.as_ref().and_then(Principal::name).unwrap_or("-"),
            "closing a socket.io socket whose token was removed or replaced"
        );
        let err = codec::error_value(codec::code_name(e), &e.to_string());
        self.emit("error", vec![err]).await;
        self.send(&Packet::control(Kind::Disconnect, "/", None))
            .await;
        close_soon(&self.socket);
    }
}

/// The status code of `e` as the wire (and the request metrics) carry it.
fn wire_code(e: &Error) -> i32 {
    crate::protocol::status::code(e) as i32
}

/// Closes `socket` once its client has had [`CLOSE_GRACE`] to read what
/// was last sent (engineioxide drops what is still queued when it closes).
fn close_soon(socket: &EioSocket) {
    let socket = Arc::clone(socket);
    tokio::spawn(async move {
        let _ = tokio::time::timeout(CLOSE_GRACE, socket.closed()).await;
        socket.close(engineioxide::DisconnectReason::ClosingServer);
    });
}

/// Sends `packet` on `socket` (its text, then each attachment as an
/// Engine.IO message of its own, with nothing from other senders in
/// between), waiting while the send buffer is full for up to
/// [`SEND_STALL`]; false if the socket is closed (or closed for stalling).
///
/// Attachments are not handed to Engine.IO in one batch with the text:
/// its polling encoder (engineioxide 0.17) joins such a batch without the
/// record separator when a poll is already waiting.
pub async fn send(socket: &EioSocket, packet: &Packet) -> bool {
    send_text(socket, packet.encode(), &packet.attachments).await
}

/// [`send`] of a packet already encoded as `text` and `attachments`.
pub async fn send_text(socket: &EioSocket, text: String, attachments: &[Bytes]) -> bool {
    let _sending = socket.data.sending.lock().await;
    let deadline = tokio::time::Instant::now() + SEND_STALL;
    emit_parts(socket, text, attachments, deadline).await
}

/// Hands `text` and then each of `attachments` to Engine.IO, waiting for
/// room (see [`reserve`]); the caller holds the socket's `sending` lock.
async fn emit_parts(
    socket: &EioSocket,
    text: String,
    attachments: &[Bytes],
    deadline: tokio::time::Instant,
) -> bool {
    let Some(permit) = reserve(socket, deadline).await else {
        return false;
    };
    permit.emit(text.into());
    for attachment in attachments {
        let Some(permit) = reserve(socket, deadline).await else {
            return false;
        };
        permit.emit_binary(attachment.clone());
    }
    true
}

/// Room for one Engine.IO message in `socket`'s send buffer, waiting while
/// it is full until `deadline` (then closing the socket as not reading);
/// `None` if the socket is closed.
async fn reserve(
    socket: &EioSocket,
    deadline: tokio::time::Instant,
) -> Option<engineioxide::socket::Permit<'_>> {
    loop {
        match socket.reserve() {
            Ok(permit) => return Some(permit),
            Err(tokio::sync::mpsc::error::TrySendError::Closed(())) => return None,
            Err(tokio::sync::mpsc::error::TrySendError::Full(())) => {
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!(sid = %socket.id, "socket.io client reads nothing: closing it");
                    socket.close(engineioxide::DisconnectReason::TransportError);
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
}

/// What a recovery gives back.
#[derive(Default)]
struct Restored {
    /// Whether nothing was lost.
    recovered: bool,
    /// Whether the token had the system room `$rooms` (not watched yet).
    system: bool,
    /// The `gap` events.
    gaps: Vec<Value>,
    /// The `error` events of rooms the token may no longer read.
    refused: Vec<Value>,
    /// The subscriptions of the rooms restored.
    subs: Vec<(String, Subscription)>,
}

/// A room the socket reads.
#[derive(Debug)]
struct RoomSub {
    pump: JoinHandle<()>,
    /// Tells this subscription of the room from a later one.
    id: u64,
}

/// A queue group the socket consumes.
#[derive(Debug)]
struct QueueSub {
    pump: JoinHandle<()>,
    /// The member it leases as: one of its own, so giving back what it
    /// holds touches no later subscription of the socket.
    member: String,
    /// Tells this subscription from a later one of the same group.
    id: u64,
}

/// What starts once a subscribe's reply is out, so that nothing of the
/// subscription reaches the client before it.
enum AfterReply {
    /// A `rooms` event, whose recovery offset has the system room `$rooms`
    /// as the reply left it (a reply carries no offset).
    Rooms,
    /// A room's subscription, whose pump starts then.
    Room(String, Subscription),
    /// A queue subscription's pump, which leases nothing until told.
    Queue(oneshot::Sender<()>),
}

/// The socket's task state.
struct Conn {
    out: Out,
    member: String,
    connected: bool,
    /// A binary packet waiting for its attachments.
    partial: Option<(Packet, usize)>,
    /// Attachments still to come of a binary packet that was refused:
    /// dropped as they arrive, until the next text message.
    unwanted: usize,
    /// The broker is stopping ([`Inbound::Stopping`]).
    stopping: bool,
    rooms: BTreeMap<String, RoomSub>,
    queues: BTreeMap<(String, String), QueueSub>,
    system: bool,
    /// A subscription whose pump starts once the reply is out.
    after_reply: Option<AfterReply>,
    /// The id of the next room or queue subscription.
    next_room_id: u64,
    /// The task emitting what [`Out::post`] queued.
    side_task: JoinHandle<()>,
    /// When the socket is closed unless a CONNECT has been taken by then
    /// (`None` once one has, or without `frame_timeout`).
    connect_by: Option<tokio::time::Instant>,
    /// A CONNECT was refused for its token: the socket is closing, and
    /// nothing it sends after is read.
    refused: bool,
}

/// Starts the task of a new Engine.IO socket.
pub fn start(gateway: Arc<Gateway>, socket: EioSocket) {
    let (tx, rx) = mpsc::unbounded_channel();
    if socket.data.inbox.set(tx).is_err() {
        return;
    }
    // A stop that began as this socket connected may have missed it (its
    // inbox was not there yet): it learns of the stop here.
    if gateway.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        socket.data.push(Inbound::Stopping);
    }
    let pid = match super::offset::random::<PID_LEN>() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "no randomness for a socket.io pid: closing the socket");
            socket.close(engineioxide::DisconnectReason::ClosingServer);
            return;
        }
    };
    let (side, mut posted) = mpsc::channel::<(String, Vec<Value>)>(SIDE_EVENTS);
    let emitter = Out {
        socket: Arc::clone(&socket),
        gateway: Arc::clone(&gateway),
        shared: Arc::new(Mutex::new(Shared {
            pid,
            positions: BTreeMap::new(),
            pending: HashMap::new(),
            late: BTreeMap::new(),
            next_ack: 1,
            scratch: Vec::new(),
        })),
        principal: None,
        side: None,
        side_progress: Arc::new(std::sync::atomic::AtomicU64::new(
            crate::storage::log::timer_ms(),
        )),
    };
    let out = Out {
        side: Some(side),
        ..emitter.clone()
    };
    let side_task = tokio::spawn(async move {
        while let Some((name, args)) = posted.recv().await {
            // Stamped as each emit starts too: a queue quiet for long is not
            // taken for one stuck (only an emit blocked 30 s is).
            emitter.side_progress.store(
                crate::storage::log::timer_ms(),
                std::sync::atomic::Ordering::Relaxed,
            );
            if !emitter.emit(&name, args).await {
                return;
            }
            emitter.side_progress.store(
                crate::storage::log::timer_ms(),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    });
    let conn = Conn {
        out,
        member: format!("socketio-{}", socket.id),
        connected: false,
        partial: None,
        unwanted: 0,
        stopping: false,
        rooms: BTreeMap::new(),
        queues: BTreeMap::new(),
        system: false,
        after_reply: None,
        next_room_id: 0,
        side_task,
        connect_by: gateway.connect_deadline(),
        refused: false,
    };
    gateway.tasks.spawn(conn.run(rx));
}

impl Conn {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Inbound>) {
        loop {
            let message = match self.connect_by {
                Some(by) => match tokio::time::timeout_at(by, rx.recv()).await {
                    Ok(message) => message,
                    Err(_) => {
                        // As a native connection without its Hello: the
                        // slot goes back.
                        self.connect_by = None;
                        self.out.gateway.admission.count(Limit::Frame);
                        tracing::debug!(sid = %self.out.socket.id,
                            "socket.io socket closed: no CONNECT within frame_timeout_ms");
                        self.out
                            .socket
                            .close(engineioxide::DisconnectReason::TransportError);
                        continue;
                    }
                },
                None => rx.recv().await,
            };
            let Some(message) = message else { break };
            self.out.socket.data.taken(&message);
            if self.refused && matches!(message, Inbound::Text(_) | Inbound::Binary(_)) {
                continue;
            }
            let packet = match message {
                Inbound::Closed => break,
                Inbound::Stopping => {
                    if !self.stopping {
                        // Every packet received before the stop has been
                        // served and its reply queued: the client has a
                        // moment to read them before the connection closes
                        // (it then reconnects, and recovers, once a broker
                        // is back). Queue members take no more leases; the
                        // acks of what they hold still apply.
                        self.stopping = true;
                        for q in self.queues.values() {
                            q.pump.abort();
                        }
                        close_soon(&self.out.socket);
                    }
                    continue;
                }
                Inbound::RoomEnded { room, id } => {
                    Box::pin(self.room_ended(room, id)).await;
                    continue;
                }
                Inbound::QueueEnded { room, group, id } => {
                    let key = (room, group);
                    if self.queues.get(&key).is_some_and(|q| q.id == id)
                        && let Some(q) = self.queues.remove(&key)
                    {
                        Box::pin(self.stop_queue(&key.0, &key.1, q)).await;
                    }
                    continue;
                }
                Inbound::Text(text) => {
                    self.unwanted = 0;
                    // A binary packet still waiting for attachments never
                    // gets them: a text message comes first.
                    if let Some((p, n)) = self.partial.take() {
                        if p.namespace != "/" {
                            // Ignored as a whole one would be.
                        } else if matches!(p.kind, Kind::BinaryAck) {
                            // An acknowledgement's id is a delivery's, not a
                            // call of the client's: it acks (its data is not
                            // read) and gets no reply.
                            Box::pin(self.ack(p.id)).await;
                        } else {
                            let e = PacketError(format!(
                                "a binary packet got {} of its {n} attachments before the next text message",
                                p.attachments.len()
                            ));
                            Box::pin(self.refuse_packet(p.id, e)).await;
                        }
                    }
                    match Packet::decode(&text) {
                        Ok(Decoded::Packet(p)) => p,
                        Ok(Decoded::NeedsAttachments(p, n)) => {
                            self.partial = Some((p, n));
                            continue;
                        }
                        // An event whose header names its acknowledgement id
                        // gets the refusal there, where its sender waits.
                        Err(e) => {
                            self.unwanted = Packet::announced_attachments(&text);
                            Box::pin(self.refuse_packet(Packet::event_ack_id(&text), e)).await;
                            continue;
                        }
                    }
                }
                Inbound::Binary(data) => match self.partial.take() {
                    Some((mut p, n)) => {
                        p.attachments.push(data);
                        if p.attachments.len() < n {
                            self.partial = Some((p, n));
                            continue;
                        }
                        p
                    }
                    None if self.unwanted > 0 => {
                        self.unwanted -= 1;
                        continue;
                    }
                    None => {
                        let e =
                            PacketError("a binary message that no binary packet announced".into());
                        Box::pin(self.bad_packet(e)).await;
                        continue;
                    }
                },
            };
            // Boxed: the task's future stays small while the socket idles
            // (the larger request futures live only while one is handled).
            Box::pin(self.handle(packet)).await;
        }
        Box::pin(self.close()).await;
    }

    /// A packet refused before it is handled: the reply to its
    /// acknowledgement id if it has one, else an `error` event; the socket
    /// stays open.
    async fn refuse_packet(&self, id: Option<u64>, e: PacketError) {
        let Some(id) = id else {
            return self.bad_packet(e).await;
        };
        self.count_refused();
        tracing::debug!(sid = %self.out.socket.id, error = %e, "socket.io packet refused");
        let reply = Reply::Error {
            code: "INVALID_ARGUMENT".into(),
            message: e.to_string(),
        };
        self.answer(id, reply).await;
    }

    /// A packet refused unread is a request too: an `unknown` one,
    /// `INVALID_ARGUMENT`, as an event of no known name is.
    fn count_refused(&self) {
        let code = wire_code(&Error::InvalidArgument(String::new()));
        self.out.gateway.broker.metrics().request(
            super::LISTENER,
            "unknown",
            code,
            std::time::Duration::ZERO,
        );
    }

    /// Sends `reply` as the acknowledgement of the client's packet `id`.
    async fn answer(&self, id: u64, reply: Reply) {
        self.out
            .send(&Packet::ack(id, Value::Array(vec![reply.into_value()])))
            .await;
    }

    /// A packet that cannot be read: reported to the client as an `error`
    /// event; the socket stays open.
    async fn bad_packet(&self, e: PacketError) {
        self.count_refused();
        tracing::debug!(sid = %self.out.socket.id, error = %e, "bad socket.io packet");
        let err = codec::error_value("INVALID_ARGUMENT", &e.to_string());
        self.out.emit("error", vec![err]).await;
    }

    async fn handle(&mut self, packet: Packet) {
        // Only `/` is ever connected (a CONNECT to another gets its
        // connect_error): a packet addressed to another namespace is
        // ignored, as socket.io's own server ignores packets for a
        // namespace the socket has not joined.
        if packet.kind != Kind::Connect && packet.namespace != "/" {
            tracing::debug!(sid = %self.out.socket.id, namespace = %packet.namespace,
                "socket.io packet for a namespace the socket is not in: ignored");
            return;
        }
        match packet.kind {
            Kind::Connect => self.connect(packet).await,
            Kind::Disconnect => {
                self.leave_all().await;
                // A CONNECT on this connection starts afresh: no token it
                // gets names a room the socket left.
                self.out.shared.lock().await.positions.clear();
                // As a new socket: a CONNECT within frame_timeout, or closed.
                if self.connected {
                    self.connect_by = self.out.gateway.connect_deadline();
                }
                self.connected = false;
            }
            Kind::Event | Kind::BinaryEvent
                if self.stopping || self.out.socket.data.is_closed() =>
            {
                // Acknowledgements are still taken, as on the other
                // transports; new requests are not, nor requests whose
                // answer could no longer reach the client (a publish is
                // stored only where its reply can go out).
                if let Some(id) = packet.id {
                    let reply = Reply::Error {
                        code: "UNAVAILABLE".into(),
                        message: "broker is stopping".into(),
                    };
                    self.answer(id, reply).await;
                }
            }
            Kind::Event | Kind::BinaryEvent => {
                if !self.connected {
                    self.refuse_packet(packet.id, PacketError("an event before CONNECT".into()))
                        .await;
                    return;
                }
                let id = packet.id;
                let started = std::time::Instant::now();
                let (operation, result) = self.event(packet).await;
                // Taken now: whatever the reply's path, none is left for
                // the next event.
                let after_reply = self.after_reply.take();
                let data_dir = self.out.gateway.broker.data_dir();
                let code = result.as_ref().map_or_else(wire_code, |_| 0);
                self.out.gateway.broker.metrics().request(
                    super::LISTENER,
                    operation,
                    code,
                    started.elapsed(),
                );
                // A token gone: the reply, then the socket is disconnected.
                let revoked = match &result {
                    Err(e @ Error::Unauthenticated(_)) => {
                        Some(Error::Unauthenticated(e.to_string()))
                    }
                    _ => None,
                };
                let reply = match result {
                    Ok(v) => Reply::Ok(v),
                    Err(e) => Reply::from_error(&e, data_dir),
                };
                match id {
                    Some(id) => self.answer(id, reply).await,
                    None => {
                        if let Reply::Error { code, message } = &reply {
                            let err = codec::error_value(code, message);
                            self.out.emit("error", vec![err]).await;
                        }
                    }
                }
                if let Some(e) = revoked {
                    self.out.disconnect(&e).await;
                    return;
                }
                match after_reply {
                    Some(AfterReply::Rooms) => {
                        let names = json!(self.room_names());
                        self.out.emit("rooms", vec![names]).await;
                    }
                    Some(AfterReply::Room(room, sub)) => {
                        // The new position reaches the client before any
                        // message.
                        let mut names = self.room_names();
                        if !names.contains(&room.as_str()) {
                            names.push(&room);
                        }
                        let names = json!(names);
                        self.out.emit("rooms", vec![names]).await;
                        self.start_room(room, sub).await;
                    }
                    Some(AfterReply::Queue(go)) => {
                        let _ = go.send(());
                    }
                    None => {}
                }
            }
            Kind::Ack | Kind::BinaryAck => self.ack(packet.id).await,
            Kind::ConnectError => {
                self.bad_packet(PacketError("CONNECT_ERROR comes from servers only".into()))
                    .await
            }
        }
    }

    /// CONNECT: a fresh socket, or a recovery when the client sends back a
    /// `pid` and an `offset`.
    async fn connect(&mut self, packet: Packet) {
        let refuse = |message: String, code: &str| {
            let message = crate::protocol::status::bounded(message);
            Packet::control(
                Kind::ConnectError,
                &packet.namespace,
                Some(json!({ "message": message, "data": { "code": code } })),
            )
        };
        if packet.namespace != "/" {
            let p = refuse(
                format!(
                    "namespace {} does not exist: spool serves the main namespace /",
                    packet.namespace
                ),
                "NOT_FOUND",
            );
            self.out.send(&p).await;
            return;
        }
        if self.connected {
            self.bad_packet(PacketError("CONNECT on a connected socket".into()))
                .await;
            return;
        }
        if self.stopping {
            self.out
                .send(&refuse("broker is stopping".into(), "UNAVAILABLE"))
                .await;
            return;
        }
        let auth = packet.data.unwrap_or(Value::Null);
        let principal = match guard::authenticate(&self.out.gateway.auth, &auth) {
            Ok(p) => p,
            Err(e) => {
                // As the native listener logs a refused Hello.
                let peer = self.out.socket.req_parts.extensions.get::<super::Peer>();
                tracing::info!(peer = %peer.map_or_else(|| "-".into(), |p| p.0.to_string()),
                    sid = %self.out.socket.id, error = %e,
                    "socket.io socket refused: not authenticated");
                self.out
                    .send(&refuse(e.to_string(), codec::code_name(&e)))
                    .await;
                // Whatever else the client sends is not read, a CONNECT
                // with another token included: one guess per socket.
                self.refused = true;
                self.connect_by = None;
                close_soon(&self.out.socket);
                return;
            }
        };
        self.out.principal = Some(principal);
        let pid = auth.get("pid").filter(|v| !v.is_null());
        let offset = auth.get("offset").filter(|v| !v.is_null());
        // A token that does not verify (made with another key, altered,
        // another socket's) starts a new session, as socket.io's own server
        // does with a session it does not know: the client connects with
        // `recovered === false`, and an `error` event says why.
        let mut restored = None;
        let mut bad_token = None;
        match (pid.map(Value::as_str), offset.map(Value::as_str)) {
            // No offset (a socket that got no event yet): nothing to
            // recover.
            (_, None) => {}
            (Some(Some(pid)), Some(Some(offset))) => {
                match Token::decode(offset, &self.out.gateway.key) {
                    Ok(token) if pid_from_text(pid) == Some(token.pid) => restored = Some(token),
                    Ok(_) => {
                        bad_token = Some((
                            "PERMISSION_DENIED",
                            format!("{}: pid does not match", TokenError::Tampered),
                        ))
                    }
                    Err(e) => {
                        let code = match e {
                            TokenError::Tampered => "PERMISSION_DENIED",
                            TokenError::Malformed(_) => "INVALID_ARGUMENT",
                        };
                        bad_token = Some((code, e.to_string()));
                    }
                }
            }
            _ => {
                bad_token = Some((
                    "INVALID_ARGUMENT",
                    "recovery offset is malformed: it needs a string pid and a string offset"
                        .into(),
                ))
            }
        }
        let Restored {
            recovered,
            system,
            gaps,
            mut refused,
            subs,
        } = match restored {
            Some(token) => self.restore(token).await,
            None => Restored::default(),
        };
        if let Some((code, why)) = bad_token {
            tracing::debug!(sid = %self.out.socket.id, error = %why, "socket.io recovery offset refused");
            let message = format!("{why}: a new session starts, in no room");
            refused.insert(0, codec::error_value(code, &message));
        }
        let pid = {
            let mut shared = self.out.shared.lock().await;
            if !recovered {
                // A failed recovery starts a new session: the client sees
                // `recovered === false`.
                match super::offset::random::<PID_LEN>() {
                    Ok(p) => shared.pid = p,
                    Err(e) => tracing::warn!(error = %e, "no randomness for a new pid"),
                }
            }
            pid_text(&shared.pid)
        };
        if system {
            self.watch_rooms().await;
        }
        self.connected = true;
        self.connect_by = None;
        self.out
            .send(&Packet::control(
                Kind::Connect,
                "/",
                Some(json!({ "sid": self.out.socket.id.to_string(), "pid": pid })),
            ))
            .await;
        for gap in gaps {
            self.out.emit("gap", vec![gap]).await;
        }
        for err in refused {
            self.out.emit("error", vec![err]).await;
        }
        for (room, sub) in subs {
            self.start_room(room, sub).await;
        }
    }

    /// Puts the socket back in the rooms of `token` at its positions, those
    /// its token may still read; returns whether nothing was lost, whether
    /// the token had the system room `$rooms` (not watched yet), the gaps,
    /// the errors of rooms dropped, and the subscriptions.
    async fn restore(&mut self, token: Token) -> Restored {
        let broker = &self.out.gateway.broker;
        let mut r = Restored {
            recovered: true,
            ..Restored::default()
        };
        {
            let mut shared = self.out.shared.lock().await;
            shared.pid = token.pid;
        }
        for (room, next) in token.rooms {
            if let Err(e) = self.out.allow(guard::access("subscribe", &room)) {
                r.recovered = false;
                let message = format!("room {room}: {}", self.out.say(&e));
                r.refused
                    .push(codec::error_value(codec::code_name(&e), &message));
                continue;
            }
            if room == super::SYSTEM_ROOM {
                // Not a topic: back in it once every room is and the pid is
                // settled (an event of it must not carry an offset without
                // them).
                r.system = true;
                continue;
            }
            let info = match broker.describe_topic(&room).await {
                Ok(info) => info,
                Err(e) => {
                    r.recovered = false;
                    r.gaps.push(
                        json!({ "room": room, "from": next, "to": null, "reason": self.out.say(&e) }),
                    );
                    continue;
                }
            };
            let (start, end) = (info.stats.start.0, info.stats.end.0);
            let mut from = next;
            if next > end {
                // Offsets this socket read are gone: the room was deleted
                // and created again (everything in it came meanwhile), or a
                // power cut took its last messages. It reads the room again
                // from its start: some messages twice rather than any lost.
                r.recovered = false;
                from = start;
                r.gaps.push(json!({
                    "room": room,
                    "from": end,
                    "to": next,
                    "reason": format!(
                        "room {room} ends at offset {end}, before this socket's position {next}: it was deleted and created again, or a power cut took its last messages; reading it again from offset {start}"
                    ),
                }));
            }
            if next < start {
                r.recovered = false;
                r.gaps.push(json!({
                    "room": room,
                    "from": next,
                    "to": start,
                    "reason": format!("messages {next} to {} of room {room} are gone (retention dropped them, or compaction removed the room's first records)", start - 1),
                }));
            }
            match self.subscribe_replay(&room, Position::Offset(from)).await {
                Ok(sub) => {
                    let mut shared = self.out.shared.lock().await;
                    shared.positions.insert(room.clone(), sub.position().0);
                    drop(shared);
                    r.subs.push((room, sub));
                }
                Err(e) => {
                    r.recovered = false;
                    r.gaps.push(
                        json!({ "room": room, "from": next, "to": null, "reason": self.out.say(&e) }),
                    );
                }
            }
        }
        r
    }

    async fn subscribe_replay(&self, room: &str, from: Position) -> Result<Subscription> {
        let gateway = &self.out.gateway;
        gateway.ensure_room(room).await?;
        gateway
            .broker
            .subscribe(SubscribeRequest {
                topic: room.to_owned(),
                group: None,
                from: Some(from),
                member: self.member.clone(),
                max_in_flight: PUMP_BATCH,
                limits: gateway.delivery_limits(),
            })
            .await
    }

    /// Starts the pump of `room` (replacing one there was) and tells the
    /// room's members.
    async fn start_room(&mut self, room: String, sub: Subscription) {
        if let Some(old) = self.rooms.remove(&room) {
            old.pump.abort();
        }
        let id = self.next_room_id;
        self.next_room_id += 1;
        let (out, name, from) = (self.out.clone(), room.clone(), sub.position().0);
        drop(sub);
        let pump = tokio::spawn(async move {
            // Ended by itself, not aborted, and for good: the socket's task
            // takes the room off (in turn with the client's own events).
            if pump_room(out.clone(), name.clone(), from).await {
                out.socket.data.push(Inbound::RoomEnded { room: name, id });
            }
        });
        self.rooms.insert(room.clone(), RoomSub { pump, id });
        self.out.gateway.join(&room, &self.out).await;
    }

    /// The pump of subscription `id` of `room` ended by itself (it said
    /// why in an `error` event): the socket is no longer in the room, as
    /// after an `unsubscribe`, unless it has subscribed to it again since.
    async fn room_ended(&mut self, room: String, id: u64) {
        if self.rooms.get(&room).is_none_or(|r| r.id != id) {
            return;
        }
        if let Some(r) = self.rooms.remove(&room) {
            self.leave_room(&room, r).await;
        }
    }

    /// Leaves `room`, whose subscription `r` was taken out of `rooms`: its
    /// pump stopped first (a push under way would write the position
    /// back), then its position, its membership, and a `rooms` event.
    async fn leave_room(&mut self, room: &str, r: RoomSub) {
        r.pump.abort();
        let _ = r.pump.await;
        self.out.shared.lock().await.positions.remove(room);
        self.out.gateway.leave(room, &self.out).await;
        self.out.emit("rooms", vec![json!(self.room_names())]).await;
    }

    /// Serves one client event: its operation (for metrics) and its result.
    async fn event(&mut self, packet: Packet) -> (&'static str, Result<Value>) {
        let invalid = |m: &str| ("unknown", Err(Error::InvalidArgument(m.into())));
        let Some(Value::Array(mut args)) = packet.data else {
            return invalid("an event is an array");
        };
        let name = match args.first() {
            Some(Value::String(s)) => s.clone(),
            _ => return invalid("an event starts with its name"),
        };
        let body = if args.len() > 1 {
            args.swap_remove(1)
        } else {
            Value::Null
        };
        let result = match name.as_str() {
            "publish" => self.publish(body, &packet.attachments).await,
            "subscribe" => self.subscribe(body).await,
            "unsubscribe" => self.unsubscribe(body).await,
            other => Err(Error::InvalidArgument(format!(
                "unknown event {other:?}: spool takes publish, subscribe and unsubscribe"
            ))),
        };
        (guard::operation(&name), result)
    }

    async fn publish(&mut self, body: Value, attachments: &[Bytes]) -> Result<Value> {
        let request = codec::Publish::parse(&body, attachments)?;
        self.out.allow(guard::access("publish", &request.room))?;
        let gateway = &self.out.gateway;
        let room = request.room.clone();
        let appended = gateway
            .broker
            .produce(&room, vec![request.message], gateway.message_limit())
            .await
            .map_err(|e| match e {
                // One message per publish: not "message 0" of a batch.
                Error::InvalidArgument(why) => {
                    Error::InvalidArgument(why.replacen(": message 0 ", ": the message ", 1))
                }
                e => e,
            })?;
        Ok(json!({
            "room": room,
            "offset": appended.first.0,
            "durability": codec::durability(appended.durability),
        }))
    }

    /// Puts the socket in the system room (in its recovery token too).
    async fn watch_rooms(&mut self) {
        self.system = true;
        self.out.gateway.watch_rooms(&self.out).await;
        let mut shared = self.out.shared.lock().await;
        shared.positions.insert(super::SYSTEM_ROOM.to_owned(), 0);
    }

    /// Takes the socket out of the system room (and its recovery token).
    async fn unwatch_rooms(&mut self) {
        self.system = false;
        self.out.gateway.unwatch_rooms(&self.out).await;
        let mut shared = self.out.shared.lock().await;
        shared.positions.remove(super::SYSTEM_ROOM);
    }

    async fn subscribe(&mut self, body: Value) -> Result<Value> {
        let request = codec::Subscribe::parse(&body)?;
        self.out.allow(guard::access("subscribe", &request.room))?;
        if request.room == super::SYSTEM_ROOM {
            self.watch_rooms().await;
            self.after_reply = Some(AfterReply::Rooms);
            return Ok(json!({ "room": request.room }));
        }
        let max = self.out.gateway.max_subscriptions;
        let held = self.rooms.len() + self.queues.len();
        let renewing = match &request.group {
            None => self.rooms.contains_key(&request.room),
            Some(g) => self.queues.contains_key(&(request.room.clone(), g.clone())),
        };
        if !renewing && held >= max {
            return Err(Error::LimitReached(format!(
                "this socket already reads {held} rooms and queues; the limit is {max} (max_subscriptions)"
            )));
        }
        if !renewing && request.group.is_none() && self.rooms.len() >= super::offset::MAX_ROOMS {
            return Err(Error::LimitReached(format!(
                "this socket already reads {} rooms, the most a recovery offset holds",
                self.rooms.len()
            )));
        }
        match request.group {
            Some(group) => {
                self.subscribe_queue(request.room, group, request.max_in_flight)
                    .await
            }
            None => {
                let room = request.room;
                let sub = self.subscribe_replay(&room, request.from).await?;
                let position = sub.position().0;
                let info = self.out.gateway.broker.describe_topic(&room).await?;
                if let Some(old) = self.rooms.remove(&room) {
                    // Stopped before the new position is written and the
                    // reply goes out: nothing of the old reading may follow
                    // the reply or move the socket's position after it.
                    old.pump.abort();
                    let _ = old.pump.await;
                }
                {
                    let mut shared = self.out.shared.lock().await;
                    shared.positions.insert(room.clone(), position);
                }
                // The reply goes out before the first message of the room.
                let reply = json!({
                    "room": room,
                    "from": position,
                    "start": info.stats.start.0,
                    "end": info.stats.end.0,
                });
                self.after_reply = Some(AfterReply::Room(room, sub));
                Ok(reply)
            }
        }
    }

    async fn subscribe_queue(
        &mut self,
        room: String,
        group: String,
        max_in_flight: Option<usize>,
    ) -> Result<Value> {
        validate_name("group", &group)?;
        let gateway = Arc::clone(&self.out.gateway);
        gateway.ensure_room(&room).await?;
        match gateway
            .broker
            .create_group(&room, &group, GroupMode::Queue, Position::Earliest)
            .await
        {
            Ok(_) | Err(Error::AlreadyExists(_)) => {}
            Err(e) => return Err(e),
        }
        let in_flight = max_in_flight.unwrap_or(DEFAULT_QUEUE_IN_FLIGHT);
        let key = (room.clone(), group.clone());
        let id = self.next_room_id;
        self.next_room_id += 1;
        let member = format!("{}-{id}", self.member);
        let sub = gateway
            .broker
            .subscribe_queue(SubscribeRequest {
                topic: room.clone(),
                group: Some(group.clone()),
                from: None,
                member: member.clone(),
                max_in_flight: in_flight,
                limits: gateway.delivery_limits(),
            })
            .await?;
        let info = gateway.broker.describe_topic(&room).await?;
        let ack_timeout = Duration::from_millis(info.config.ack_timeout_ms.max(1));
        if let Some(old) = self.queues.remove(&key) {
            // The new subscription is made (a failure keeps the old one);
            // what the old one holds goes back before the new one reads, so
            // it starts with nothing outstanding.
            self.stop_queue(&room, &group, old).await;
        }
        let (out, r, g) = (self.out.clone(), room.clone(), group.clone());
        // Nothing of the subscription reaches the client before its reply
        // (a reply that never went out starts none).
        let (go, after_reply) = oneshot::channel();
        let pump = tokio::spawn(async move {
            if after_reply.await.is_ok() {
                pump_queue(out.clone(), r.clone(), g.clone(), sub, ack_timeout).await;
            }
            // Ended by itself: the socket's task gives back what it holds.
            out.socket.data.push(Inbound::QueueEnded {
                room: r,
                group: g,
                id,
            });
        });
        self.queues.insert(key, QueueSub { pump, member, id });
        self.after_reply = Some(AfterReply::Queue(go));
        Ok(json!({ "room": room, "group": group, "mode": "queue", "maxInFlight": in_flight }))
    }

    async fn unsubscribe(&mut self, body: Value) -> Result<Value> {
        let request = codec::Unsubscribe::parse(&body)?;
        self.out
            .allow(guard::access("unsubscribe", &request.room))?;
        if request.room == super::SYSTEM_ROOM {
            if !self.system {
                return Err(Error::NotFound(format!(
                    "this socket is not subscribed to room {}",
                    request.room
                )));
            }
            self.unwatch_rooms().await;
            self.after_reply = Some(AfterReply::Rooms);
            return Ok(json!({ "room": request.room }));
        }
        let found = match &request.group {
            Some(group) => {
                let key = (request.room.clone(), group.clone());
                match self.queues.remove(&key) {
                    Some(q) => {
                        self.stop_queue(&request.room, group, q).await;
                        true
                    }
                    None => false,
                }
            }
            None => match self.rooms.remove(&request.room) {
                Some(r) => {
                    // Nothing of the room follows the reply.
                    self.leave_room(&request.room, r).await;
                    true
                }
                None => false,
            },
        };
        if !found {
            return Err(Error::NotFound(format!(
                "this socket is not subscribed to room {}{}",
                request.room,
                request
                    .group
                    .as_deref()
                    .map(|g| match validate_name("group", g) {
                        Ok(()) => format!(" as group {g}"),
                        // Quoted, so it shows and cannot read as the message.
                        Err(_) => format!(" as group {g:?}"),
                    })
                    .unwrap_or_default()
            )));
        }
        Ok(json!({ "room": request.room }))
    }

    fn room_names(&self) -> Vec<&str> {
        self.rooms.keys().map(String::as_str).collect()
    }

    /// The client called an acknowledgement callback of a queue delivery.
    /// Counted as the native `ack`; the token must still consume the room.
    async fn ack(&mut self, id: Option<u64>) {
        let Some(id) = id else { return };
        let started = std::time::Instant::now();
        // Pending, or late (its lease ran out): acknowledged either way, as
        // any offset may be natively; only a pending one frees a place in
        // its subscription's window.
        let (credit, target) = {
            let mut shared = self.out.shared.lock().await;
            match shared.pending.remove(&id) {
                Some(p) => (Some(p.credit), Some(p.target)),
                None => (None, shared.late.remove(&id)),
            }
        };
        let metrics = self.out.gateway.broker.metrics();
        let count = |code: i32| metrics.request(super::LISTENER, "ack", code, started.elapsed());
        let Some(p) = target else {
            // Never issued, or forgotten: nothing to do, once the token is
            // known valid.
            let result = self.out.allowed(Access::Open).await;
            count(result.as_ref().map_or_else(wire_code, |()| 0));
            return;
        };
        let broker = &self.out.gateway.broker;
        let result = match self.out.allowed(guard::access("ack", &p.room)).await {
            Ok(()) => {
                let leased_by = p.leased_by.as_ref();
                (broker.ack_of(&p.room, &p.group, leased_by, vec![p.offset], true)).await
            }
            Err(e) => Err(e),
        };
        count(result.as_ref().map_or_else(wire_code, |()| 0));
        match result {
            Ok(()) => {}
            Err(Error::Unauthenticated(_)) => {}
            Err(e) => {
                let err = codec::error_value(
                    codec::code_name(&e),
                    &format!(
                        "ack of offset {} in room {}: {}",
                        p.offset.0,
                        p.room,
                        self.out.say(&e)
                    ),
                );
                self.out.emit("error", vec![err]).await;
            }
        }
        if let Some(credit) = credit {
            credit.give(1);
        }
    }

    /// Stops queue subscription `q` of `group` in `room` and gives back at
    /// once everything it holds: the deliveries waiting for their
    /// acknowledgement, and whatever its member was leased besides (a pump
    /// stopped between a read and recording it). A read the stop cuts short
    /// gives back what it leases itself (see `Leased` in the broker core).
    async fn stop_queue(&self, room: &str, group: &str, q: QueueSub) {
        q.pump.abort();
        let _ = q.pump.await;
        {
            // Their callbacks, called later, do nothing: the messages went
            // back to the group.
            let mut shared = self.out.shared.lock().await;
            shared
                .pending
                .retain(|_, p| !(p.target.room == room && p.target.group == group));
            shared
                .late
                .retain(|_, t| !(t.room == room && t.group == group));
        }
        let broker = &self.out.gateway.broker;
        if let Err(e) = broker.release_member(room, group, &q.member).await {
            tracing::debug!(room, group, error = %e, "giving back leases");
        }
    }

    async fn leave_all(&mut self) {
        for (room, r) in std::mem::take(&mut self.rooms) {
            r.pump.abort();
            self.out.gateway.leave(&room, &self.out).await;
        }
        let queues = std::mem::take(&mut self.queues);
        for ((room, group), q) in queues {
            self.stop_queue(&room, &group, q).await;
        }
        if self.system {
            self.unwatch_rooms().await;
        }
    }

    async fn close(&mut self) {
        self.leave_all().await;
        self.side_task.abort();
    }
}

/// Emits the messages of `room` from offset `from` to the socket, in
/// offset order, each with the token of the socket's positions once it is
/// emitted: first what is stored (catching up, with reads of its own), then
/// from the room's shared feed, going back to reading whenever it falls
/// behind the feed. When it ends: whether the socket is out of the room
/// for good (its topic deleted, the token may no longer read it, the
/// socket gone), not just its pushes for now (a failed read, out of
/// descriptors: the position stays for a recovery).
async fn pump_room(out: Out, room: String, from: u64) -> bool {
    let gateway = Arc::clone(&out.gateway);
    let mut next = from;
    let fail = |e: &Error| {
        codec::error_value(codec::code_name(e), &format!("room {room}: {}", out.say(e)))
    };
    let for_good = |e: &Error| {
        matches!(
            e,
            Error::TopicNotFound(_) | Error::PermissionDenied(_) | Error::Unauthenticated(_)
        )
    };
    let mut feed = match gateway.feed(&room).await {
        Ok(rx) => rx,
        Err(e) => {
            out.emit("error", vec![fail(&e)]).await;
            return for_good(&e);
        }
    };
    loop {
        // Catch up: everything stored from `next`.
        loop {
            // Boxed: a live pump's future holds no fetch state.
            let fetched = Box::pin(gateway.broker.fetch(
                crate::broker::FetchRequest {
                    topic: room.clone(),
                    group: None,
                    from: Some(Position::Offset(next)),
                    member: String::new(),
                    limits: gateway.delivery_limits(),
                    wait: Duration::ZERO,
                },
                std::future::ready(()),
            ))
            .await;
            let fetched = match fetched {
                Ok(f) => f,
                // A message stored while frames were larger: said, and
                // passed by (the positions too), as a subscription does.
                Err(e @ Error::TooLarge { offset, .. }) => {
                    // As a push: only to a socket still there, whose token
                    // may still read the room.
                    if !out.may_push(&room, None).await {
                        return true;
                    }
                    // The position first: the event's token carries it.
                    out.passed(&room, offset + 1).await;
                    if !out.emit("error", vec![fail(&e)]).await {
                        return true;
                    }
                    next = offset + 1;
                    continue;
                }
                Err(e) => {
                    out.emit("error", vec![fail(&e)]).await;
                    return for_good(&e);
                }
            };
            // A topic's end never goes back: one that ends before the
            // room's position is another topic of the name (the room's was
            // deleted, and this one created since).
            if next > fetched.end_offset.0 {
                let e = Error::TopicNotFound(format!(
                    "room {room} ended: its topic was deleted (the one of that name now ends at {}, before this room's position {next})",
                    fetched.end_offset.0
                ));
                out.emit("error", vec![fail(&e)]).await;
                return true;
            }
            if fetched.messages.is_empty() {
                break;
            }
            let messages: Vec<codec::Encoded> = fetched
                .messages
                .into_vec()
                .iter()
                .filter(|d| d.message.offset.0 >= next)
                .map(|d| codec::Encoded::new(&room, &d.message))
                .collect();
            if let Some(last) = messages.last() {
                let after = last.offset + 1;
                if !Box::pin(deliver(&out, &room, &messages)).await {
                    return true;
                }
                next = after;
            }
            if next >= fetched.end_offset.0 {
                break;
            }
        }
        // Live: the feed took every message appended since it was joined.
        loop {
            match feed.recv().await {
                Ok(batch) => {
                    let fresh = batch.partition_point(|m| m.offset < next);
                    let Some(last) = batch.last() else { continue };
                    if fresh == batch.len() {
                        continue;
                    }
                    if !Box::pin(deliver(&out, &room, &batch[fresh..])).await {
                        return true;
                    }
                    next = last.offset + 1;
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    // The feed ended: its topic deleted, the broker
                    // stopping (the room and its position stay, for a
                    // recovery), or a failed read. A new feed says which,
                    // or carries on from `next`.
                    feed = match gateway.feed(&room).await {
                        Ok(rx) => rx,
                        Err(e) => {
                            out.emit("error", vec![fail(&e)]).await;
                            return for_good(&e);
                        }
                    };
                    break;
                }
            }
        }
    }
}

/// Emits room messages `messages` (in offset order) one after the other,
/// each with the token of the positions it leads to, under one hold of the
/// socket's locks (so Engine.IO writes them together).
///
/// Callers box it: an idle pump's future then holds none of its state.
async fn deliver(out: &Out, room: &str, messages: &[codec::Encoded]) -> bool {
    if !out.may_push(room, None).await {
        return false;
    }
    let mut shared = out.shared.lock().await;
    let shared = &mut *shared;
    let _sending = out.socket.data.sending.lock().await;
    let deadline = tokio::time::Instant::now() + SEND_STALL;
    for m in messages {
        match shared.positions.get_mut(room) {
            Some(next) => *next = m.offset + 1,
            None => {
                shared.positions.insert(room.to_owned(), m.offset + 1);
            }
        }
        let len = super::offset::encoded_len(&shared.positions);
        let text = m.with_token(len, |text| {
            super::offset::encode_into(
                &shared.pid,
                &shared.positions,
                &out.gateway.key,
                &mut shared.scratch,
                text,
            )
        });
        if !emit_parts(&out.socket, text, &m.attachments, deadline).await {
            return false;
        }
    }
    true
}

/// Emits the deliveries of queue group `group` of `room`, each with an
/// acknowledgement id; one the client does not acknowledge within
/// `ack_timeout` gives its credit back (the broker delivers it again).
async fn pump_queue(
    out: Out,
    room: String,
    group: String,
    mut sub: Subscription,
    ack_timeout: Duration,
) {
    let credit = sub.credit();
    let leased_by = sub.group_identity();
    while let Some(event) = sub.next().await {
        let deliveries = match event {
            Ok(Event::Messages(deliveries)) => deliveries,
            Ok(Event::Skipped { .. }) => {
                if !out.may_push(&room, Some(&group)).await {
                    return;
                }
                continue;
            }
            Err(e) => {
                if out.may_push(&room, Some(&group)).await {
                    let message = format!("room {room}, queue group {group}: {}", out.say(&e));
                    let err = codec::error_value(codec::code_name(&e), &message);
                    out.emit("error", vec![err]).await;
                }
                return;
            }
        };
        // None goes out to a socket that may no longer read the room (a
        // reload took the token's `consume`) or is gone: given back at
        // once, uncounted.
        if let Err(e) = out.allowed(guard::access("subscribe", &room)).await {
            // Before the pump ends, and before the client hears why (it may
            // unsubscribe at once): the pump's end gives back, counted, all
            // the member still holds.
            sub.give_back(deliveries).await;
            out.refused(&room, Some(&group), &e).await;
            return;
        }
        // Leased now: each is pending before anything goes out, so a push
        // cut short leaves them all for the socket's close (or unsubscribe)
        // to give back at once.
        let mut batch = Vec::new();
        {
            let mut shared = out.shared.lock().await;
            for d in deliveries.into_vec() {
                let id = shared.next_ack;
                shared.next_ack += 1;
                shared.pending.insert(
                    id,
                    PendingAck {
                        target: AckTarget {
                            room: room.clone(),
                            group: group.clone(),
                            offset: d.message.offset,
                            leased_by: leased_by.clone(),
                        },
                        credit: credit.clone(),
                    },
                );
                batch.push((id, d));
            }
        }
        for (id, d) in batch {
            let shared = out.shared.lock().await;
            let packet = codec::message_event(
                &room,
                &d.message,
                Some((&group, d.delivery)),
                None,
                Some(id),
            );
            if !out.send(&packet).await {
                return;
            }
            drop(shared);
            let shared = Arc::clone(&out.shared);
            tokio::spawn(async move {
                tokio::time::sleep(ack_timeout).await;
                let mut shared = shared.lock().await;
                if let Some(p) = shared.pending.remove(&id) {
                    p.credit.give(1);
                    shared.keep_late(id, p.target);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_that_sends_faster_than_it_is_served_overflows_a_bounded_inbox() {
        let session = Session::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        session.inbox.set(tx).expect("a new session");
        for _ in 0..INBOX_MESSAGES {
            assert!(session.push(Inbound::Text("2[\"ping\"]".into())));
        }
        assert!(
            !session.push(Inbound::Text("2[\"ping\"]".into())),
            "one message past the bound"
        );
        assert!(
            !session.push(Inbound::Binary(Bytes::from_static(b"x"))),
            "nothing more once it overflowed"
        );
        assert!(
            session.push(Inbound::Closed),
            "the close always gets through"
        );
        let mut taken = 0;
        while let Ok(message) = rx.try_recv() {
            session.taken(&message);
            taken += 1;
        }
        assert_eq!(taken, INBOX_MESSAGES + 1, "what was taken, and the close");

        // Bytes bound the inbox too; served messages make room.
        let session = Session::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        session.inbox.set(tx).expect("a new session");
        let big = || Inbound::Binary(Bytes::from(vec![0u8; INBOX_BYTES / 4]));
        for _ in 0..4 {
            assert!(session.push(big()));
        }
        let first = rx.try_recv().expect("queued");
        session.taken(&first);
        assert!(session.push(big()), "room again once one was served");
        assert!(!session.push(Inbound::Binary(Bytes::from_static(b"x"))));
    }
}
