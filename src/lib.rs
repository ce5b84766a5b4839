//! spool: a durable message queue and log broker.
//!
//! Producers append messages to a topic's log; every message gets a dense
//! offset that never changes, is checksummed on disk, and stays readable until
//! retention or compaction removes it, so a consumer that was offline catches
//! up, and a new one can replay from any offset.
//!
//! # Layout
//!
//! - `bench` (feature `bench`, on by default through `cli`): `spool bench`'s
//!   load generator: workloads, open-loop pacing, latency histograms, the
//!   disk baseline and the report.
//! - [`client`]: the async Rust client.
//! - [`error`]: the one error type, carrying file, byte range and offset.
//! - [`storage`]: the engine.
//!   - [`storage::record`]: record framing and the decoder (byte table in its docs).
//!   - [`storage::message`]: messages as appended and as read, and the `Offset` type.
//!   - [`storage::segment`]: one `.log` file with its sparse indexes; the read path.
//!   - [`storage::records`]: a read's result: CRC-checked records kept in
//!     place in the maps, one shared view per window rather than per message.
//!   - [`storage::index`]: sparse offset (`.idx`) and time (`.tix`) indexes.
//!   - [`storage::log`]: a topic's segments, the single writer, group commit, retention.
//!   - [`storage::checkpoint`]: a log's recovery point and manifest, and the
//!     clean-stop flag (what may be cut as a torn write and what is damage).
//!   - [`storage::recovery`]: opening after a crash: torn tails, damage, index rebuild.
//!   - [`storage::compact`]: reclaiming deleted and superseded records of
//!     sealed segments, and the crash-safe swap that replaces them.
//!   - [`storage::verify`]: offline check of a whole data directory.
//!   - [`storage::datadir`]: the data directory, its exclusive `LOCK`, and the
//!     staging and trash folders of topic creation and deletion.
//!   - [`storage::io`]: the file-access trait, the real disk (all `unsafe` lives
//!     in its `mmap` module) and, with feature `test-support`, the simulated
//!     disk used by the crash tests.
//!   - [`storage::config`]: per-log settings, fsync policy, recovery mode.
//! - [`broker`]: the broker core every transport calls, and the topics under it.
//!   - [`broker::core`]: the [`broker::Broker`] handle: async produce, fetch
//!     (long-poll), subscribe, ack, nack, commit, seek, delete, topic and
//!     group admin, compaction, answering with [`Error`]; the open topics'
//!     runtimes; dead letters through the dead-letter topic's writer; the
//!     one sweeper that closes idle topics, keeps the open ones within
//!     `max_open_files` and deletes rooms idle for `delete_when_idle_ms`.
//!   - [`broker::runtime`]: each topic's tasks (writer with group commit,
//!     fsync ticker, checkpoints, compaction, retention) and change signal.
//!   - [`broker::subscription`]: subscriptions with credit, read by the
//!     transport that pushes them.
//!   - [`broker::deliveries`]: what a read hands out: records in place
//!     (replay, stream groups) or leased messages with their counts (queue groups).
//!   - [`broker::topic`]: one topic: its log, deletions and groups, replay,
//!     group lifecycle, seeks, deletes and retention; its queue groups
//!     (leases, dead letters, acks and nacks), stream groups (fetch, commit)
//!     and compaction each in a file of their own under `broker/topic/`.
//!   - [`broker::registry`]: the topics of a data directory, each opened on
//!     first use and closed when unused (the start-up scan recovers those a
//!     crash left unclean); and a synchronous queue fetch with dead-letter
//!     hand-off for use without a running broker.
//!   - `broker::cleaner`: the cleaner policy, which records compaction removes.
//!   - [`broker::deletions`]: a topic's deleted offsets, their journal and
//!     its one range codec.
//!   - [`broker::config`]: `topic.toml` and name rules.
//!   - [`broker::gate`]: the way into a topic that a delete closes.
//! - [`groups`]: consumer-group and deletion state.
//!   - [`groups::state`]: one group: its journal entries, leases, delivery
//!     counts, commits and retention losses.
//!   - [`groups::ranges`]: sets of offsets as ranges (memory stays bounded).
//!   - [`groups::journal`]: checksummed journal + atomic snapshot files, with
//!     their recovery points.
//! - [`protocol`]: the wire protocol: generated types, frame codec, the one
//!   mapping of errors to status codes (`status`), conversions between wire
//!   and broker types (`convert`), produce requests encoded (client) and
//!   decoded (server) without the generated types (`request`), the native
//!   server's frames encoded straight from what a read handed out
//!   (`outbound`), and the connection writer both ends share (`outbox`).
//! - [`server`]: the native transport: listener, admission (connection slots
//!   and per-address caps), connections with their handshake, frame, idle and
//!   write deadlines and bounded send queues, and one handler module per
//!   request group (`produce`, `fetch` with subscribe, `groups`, `admin`)
//!   converting protobuf to [`broker::Broker`] calls and back.
//! - [`grpc`]: the gRPC transport: `spool.v1.Spool` (its `service` module
//!   converting protobuf to [`broker::Broker`] calls and back, errors as
//!   statuses with the native protocol's codes and messages), health and
//!   reflection, on a listener of its own that [`server::Server`] runs;
//!   its connections take the native listener's slots and limits (module
//!   `connection`).
//! - [`metrics`]: the broker's Prometheus metrics: counters and histograms
//!   updated where things happen (per-topic handles kept by each topic's
//!   runtime, syncs timed by a wrapper of the storage), topic and group
//!   gauges computed at scrape time, and the calls a transport makes for
//!   its requests and connections.
//! - [`http`]: the HTTP listener for operations: `/metrics`, `/healthz`,
//!   `/readyz`, run by [`server::Server`].
//! - [`security`]: TLS on every listener and for the client, the auth file
//!   of tokens with per-topic permissions (reloaded on SIGHUP), the one
//!   table of what each request needs, and the refusal to listen beyond
//!   loopback without auth.
//! - [`socketio`]: the socket.io transport: Engine.IO v4 from `engineioxide`
//!   on hyper, spool's own Socket.IO v5 packet codec (`packet`), requests,
//!   replies and messages as events (`codec`), the sealed recovery token
//!   that lets a reconnecting client resume with nothing kept in server
//!   memory (`offset`), one socket's rooms and queue groups (`session`),
//!   one shared feed per room, and the demo page (`page`).
//! - `cli` (binary only, feature `cli`): the `spool` command line.
//!
//! # Features
//!
//! `cli` (default) builds the `spool` binary and turns on `bench`; without
//! default features the library is the engine, the protocol, the native and
//! gRPC servers and the client, with none of the command line's dependencies.
//! `test-support` adds `storage::io::SimDisk`.

#[cfg(feature = "bench")]
pub mod bench;
pub mod broker;
pub mod client;
pub mod error;
pub mod groups;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod protocol;
pub mod security;
pub mod server;
pub mod socketio;
pub mod storage;

pub use error::{Error, Result};
