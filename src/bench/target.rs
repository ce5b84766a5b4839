//! The broker under test: one started in this process on the scratch
//! directory, or the one named by `--server`. Each run uses a fresh topic,
//! removed afterwards from a broker that outlives the run. With
//! `--transport grpc` the in-process broker also listens for gRPC, and
//! `--server` names the gRPC address.

use super::{BenchError, Params, Transport};
use crate::broker::topic::Position;
use crate::client::{Client, ClientOptions, FetchOptions};
use crate::protocol::convert;
use crate::protocol::pb;
use crate::protocol::pb::spool_client::SpoolClient;
use crate::security::tls::TlsClient;
use crate::server::{Server, ServerConfig};
use crate::storage::NewMessage;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// gRPC: the client's HTTP/2 receive windows, so a fetch of a full batch
/// arrives without waiting for window updates.
const GRPC_WINDOW: u32 = 16 << 20;

/// gRPC: the largest HTTP/2 frame the client accepts (the protocol's
/// maximum), so a fetch's reply is not cut into 16 KiB frames.
const GRPC_MAX_FRAME: u32 = (1 << 24) - 1;

/// A broker to load, with the topic of this run.
#[derive(Debug)]
pub(super) struct Target {
    /// Where the broker listens (for the run's transport).
    pub addr: String,
    /// This run's topic.
    pub topic: String,
    /// The protocol producers and replay readers speak.
    pub transport: Transport,
    /// TLS and token of native connections.
    client: ClientOptions,
    in_process: Option<(watch::Sender<bool>, JoinHandle<crate::Result<()>>)>,
}

/// One connection to the broker, in the run's transport.
#[derive(Debug)]
pub(super) enum Conn {
    /// The native protocol.
    Native(Client),
    /// gRPC: one HTTP/2 connection; calls share it.
    Grpc(SpoolClient<Channel>),
}

/// A stream group and the member reading through it.
#[derive(Debug, Clone)]
pub(super) struct StreamReader {
    pub group: String,
    pub member: String,
    /// A native connection for the group's commit.
    pub commits: Arc<Client>,
}

/// What one replay fetch returned.
pub(super) struct Fetched {
    pub messages: u64,
    pub bytes: u64,
    pub next_offset: u64,
}

impl Conn {
    /// Appends `messages` to `topic`, waiting for the ack. A batch sent
    /// again is shared, not cloned (natively).
    pub async fn produce(
        &self,
        topic: &str,
        messages: Arc<Vec<NewMessage>>,
    ) -> Result<(), BenchError> {
        let what = || format!("producing to {topic}");
        match self {
            Conn::Native(c) => c
                .produce_shared(topic, messages)
                .await
                .map(|_| ())
                .map_err(BenchError::client(what())),
            Conn::Grpc(c) => {
                let request = pb::ProduceRequest {
                    topic: topic.to_owned(),
                    messages: Arc::unwrap_or_clone(messages)
                        .into_iter()
                        .map(convert::new_message_to_wire)
                        .collect(),
                };
                c.clone()
                    .produce(request)
                    .await
                    .map(|_| ())
                    .map_err(BenchError::grpc(what()))
            }
        }
    }

    /// Up to `max_messages` of `topic` from offset `from`: a replay, or
    /// through `stream`'s group.
    pub async fn fetch_from(
        &self,
        topic: &str,
        stream: Option<&StreamReader>,
        from: u64,
        max_messages: u32,
    ) -> Result<Fetched, BenchError> {
        let what = || match stream {
            None => format!("replaying {topic} at {from}"),
            Some(s) => format!("reading {topic} at {from} through group {}", s.group),
        };
        match self {
            Conn::Native(c) => {
                let options = FetchOptions {
                    group: stream.map(|s| s.group.clone()),
                    member: stream.map(|s| s.member.clone()).unwrap_or_default(),
                    from: Some(Position::Offset(from)),
                    max_messages,
                    max_bytes: c.welcome().max_frame_bytes,
                    ..FetchOptions::default()
                };
                let fetched = c
                    .fetch(topic, options)
                    .await
                    .map_err(BenchError::client(what()))?;
                Ok(Fetched {
                    messages: fetched.messages.len() as u64,
                    bytes: fetched
                        .messages
                        .iter()
                        .map(|r| r.message.value.len() as u64)
                        .sum(),
                    next_offset: fetched.next_offset,
                })
            }
            Conn::Grpc(c) => {
                let request = pb::FetchRequest {
                    topic: topic.to_owned(),
                    group: stream.map(|s| s.group.clone()),
                    member: stream.map(|s| s.member.clone()).unwrap_or_default(),
                    from: Some(convert::position_to_wire(Position::Offset(from))),
                    max_messages,
                    // The broker caps this at its frame limit, as for native fetches.
                    max_bytes: u32::MAX,
                    ..pb::FetchRequest::default()
                };
                let fetched = c
                    .clone()
                    .fetch(request)
                    .await
                    .map_err(BenchError::grpc(what()))?
                    .into_inner();
                Ok(Fetched {
                    messages: fetched.messages.len() as u64,
                    bytes: fetched.messages.iter().map(|m| m.value.len() as u64).sum(),
                    next_offset: fetched.next_offset,
                })
            }
        }
    }
}

impl Target {
    /// Starts (or finds) the broker and creates the run's topic with the
    /// requested fsync policy.
    pub async fn start(params: &Params, data: &Path) -> Result<Target, BenchError> {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let topic = format!("bench-{}-{unix_ms}-{}", params.workload, std::process::id());
        let grpc = params.transport == Transport::Grpc;
        let (addr, in_process) = match &params.server {
            Some(addr) => (addr.clone(), None),
            None => {
                let config = ServerConfig {
                    listen: "127.0.0.1:0".into(),
                    grpc: grpc.then(|| "127.0.0.1:0".into()),
                    data: data.to_owned(),
                    ..ServerConfig::default()
                };
                let server = Server::bind(config).await?;
                let addr = match server.grpc_addr()? {
                    Some(grpc_addr) => grpc_addr.to_string(),
                    None => server.local_addr()?.to_string(),
                };
                let (stop, stopped) = watch::channel(false);
                let task = tokio::spawn(server.run(stopped));
                (addr, Some((stop, task)))
            }
        };
        let tls = match &params.tls_ca {
            Some(path) => Some(TlsClient::load_ca(path)?),
            None => None,
        };
        let target = Target {
            addr,
            topic,
            transport: params.transport,
            // The CLI's connect timeout and lost-connection check, so a
            // bench against a broker that does not answer ends by itself.
            client: ClientOptions {
                tls,
                token: params.token.clone(),
                ..ClientOptions::new("spool-bench")
            },
            in_process,
        };
        let config = pb::TopicConfig {
            fsync: Some(params.fsync.to_string()),
            ..pb::TopicConfig::default()
        };
        // `reached`: the request got to the broker.
        let created = match target.conn("spool-bench-admin").await {
            Ok(conn) => target
                .create_topic(conn, config)
                .await
                .map_err(|e| (e, true)),
            Err(e) => Err((e, false)),
        };
        if let Err((e, reached)) = created {
            match target.in_process {
                Some(_) => target.finish().await,
                // Refused, or its answer lost: should the broker have made
                // the topic, it goes; a failure to remove it is not news.
                None if reached => {
                    let _ = target.remove_topic().await;
                }
                // Nothing reached the broker: no topic to remove.
                None => {}
            }
            return Err(e);
        }
        Ok(target)
    }

    async fn create_topic(&self, conn: Conn, config: pb::TopicConfig) -> Result<(), BenchError> {
        let what = format!("creating topic {}", self.topic);
        match conn {
            Conn::Native(client) => client
                .create_topic(&self.topic, config)
                .await
                .map(|_| ())
                .map_err(BenchError::client(what)),
            Conn::Grpc(mut client) => client
                .create_topic(pb::CreateTopicRequest {
                    name: self.topic.clone(),
                    config: Some(config),
                })
                .await
                .map(|_| ())
                .map_err(BenchError::grpc(what)),
        }
    }

    /// A new native connection to the broker.
    pub async fn connect(&self, name: &str) -> Result<Client, BenchError> {
        let options = ClientOptions {
            client_name: name.to_owned(),
            ..self.client.clone()
        };
        Client::connect_with(&self.addr, &options)
            .await
            .map_err(BenchError::client(format!("connecting to {}", self.addr)))
    }

    /// A new connection to the broker in the run's transport (`name` is the
    /// native client's name).
    pub async fn conn(&self, name: &str) -> Result<Conn, BenchError> {
        match self.transport {
            Transport::Native => Ok(Conn::Native(self.connect(name).await?)),
            Transport::Grpc => {
                let channel = Channel::from_shared(format!("http://{}", self.addr))
                    .map_err(BenchError::grpc(format!("gRPC address {}", self.addr)))?
                    .tcp_nodelay(true)
                    .initial_stream_window_size(GRPC_WINDOW)
                    .initial_connection_window_size(GRPC_WINDOW)
                    .max_frame_size(GRPC_MAX_FRAME)
                    .connect()
                    .await
                    .map_err(BenchError::grpc(format!("connecting to {}", self.addr)))?;
                Ok(Conn::Grpc(
                    SpoolClient::new(channel)
                        .max_decoding_message_size(usize::MAX)
                        .max_encoding_message_size(usize::MAX),
                ))
            }
        }
    }

    /// Removes the topic from a broker that outlives the run, or stops the
    /// in-process one (which syncs and releases its directory).
    pub async fn finish(self) {
        match self.in_process {
            Some((stop, task)) => {
                let _ = stop.send(true);
                match task.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "in-process broker stopped with an error")
                    }
                    Err(e) => tracing::warn!(error = %e, "in-process broker task failed"),
                }
            }
            None => {
                if let Err(e) = self.remove_topic().await {
                    tracing::warn!(topic = %self.topic, error = %e, "could not remove the bench topic");
                }
            }
        }
    }

    /// As [`Target::finish`], for a run dropped mid-way. Produce requests
    /// its connections had already sent may still reach an outside broker
    /// after the topic is deleted, and such a produce creates the topic
    /// again (brokers create topics on first produce by default), so the
    /// delete is repeated, [`REMOVE_RECHECK`] apart, until the topic stays
    /// gone (at most [`REMOVE_ATTEMPTS`] times).
    pub async fn finish_interrupted(self) {
        if self.in_process.is_some() {
            return self.finish().await;
        }
        for _ in 0..REMOVE_ATTEMPTS {
            match self.remove_topic().await {
                Ok(false) => return,
                Ok(true) => tokio::time::sleep(REMOVE_RECHECK).await,
                Err(e) => {
                    tracing::warn!(topic = %self.topic, error = %e, "could not remove the bench topic");
                    return;
                }
            }
        }
        tracing::warn!(topic = %self.topic, "the bench topic keeps coming back; not removed");
    }

    /// Deletes the run's topic from an outside broker: `Ok(false)` when
    /// there was none to delete.
    async fn remove_topic(&self) -> Result<bool, String> {
        let removed = match self.conn("spool-bench-admin").await {
            Ok(Conn::Native(c)) => c
                .delete_topic(&self.topic)
                .await
                .map_err(|e| match e.code() {
                    Some(pb::Code::NotFound) => None,
                    _ => Some(e.to_string()),
                }),
            Ok(Conn::Grpc(mut c)) => c
                .delete_topic(pb::DeleteTopicRequest {
                    name: self.topic.clone(),
                })
                .await
                .map(|_| ())
                .map_err(|e| match e.code() {
                    tonic::Code::NotFound => None,
                    _ => Some(e.to_string()),
                }),
            Err(e) => Err(Some(e.to_string())),
        };
        match removed {
            Ok(()) => Ok(true),
            Err(None) => Ok(false),
            Err(Some(e)) => Err(e),
        }
    }
}

/// Deletes of an interrupted run's topic before giving up on it.
const REMOVE_ATTEMPTS: u32 = 5;
/// Time for produce requests still on their way to reach the broker
/// between two deletes of an interrupted run's topic.
const REMOVE_RECHECK: Duration = Duration::from_millis(200);
