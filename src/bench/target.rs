//! The broker under test: one started in this process on the scratch
//! directory, or the one named by `--server`. Each run uses a fresh topic,
//! removed afterwards from a broker that outlives the run.

use super::{BenchError, Params};
use crate::client::Client;
use crate::protocol::pb;
use crate::server::{Server, ServerConfig};
use std::path::Path;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A broker to load, with the topic of this run.
#[derive(Debug)]
pub(super) struct Target {
    /// Where the broker listens.
    pub addr: String,
    /// This run's topic.
    pub topic: String,
    in_process: Option<(watch::Sender<bool>, JoinHandle<crate::Result<()>>)>,
}

impl Target {
    /// Starts (or finds) the broker and creates the run's topic with the
    /// requested fsync policy.
    pub async fn start(params: &Params, data: &Path) -> Result<Target, BenchError> {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let topic = format!("bench-{}-{unix_ms}-{}", params.workload, std::process::id());
        let (addr, in_process) = match &params.server {
            Some(addr) => (addr.clone(), None),
            None => {
                let config = ServerConfig {
                    listen: "127.0.0.1:0".into(),
                    data: data.to_owned(),
                    ..ServerConfig::default()
                };
                let server = Server::bind(config).await?;
                let addr = server.local_addr()?.to_string();
                let (stop, stopped) = watch::channel(false);
                let task = tokio::spawn(server.run(stopped));
                (addr, Some((stop, task)))
            }
        };
        let target = Target {
            addr,
            topic,
            in_process,
        };
        let client = target.connect("spool-bench-admin").await?;
        let config = pb::TopicConfig {
            fsync: Some(params.fsync.to_string()),
            ..pb::TopicConfig::default()
        };
        if let Err(e) = client.create_topic(&target.topic, config).await {
            let what = format!("creating topic {}", target.topic);
            target.finish().await;
            return Err(BenchError::client(what)(e));
        }
        Ok(target)
    }

    /// A new connection to the broker.
    pub async fn connect(&self, name: &str) -> Result<Client, BenchError> {
        Client::connect(&self.addr, name)
            .await
            .map_err(BenchError::client(format!("connecting to {}", self.addr)))
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
                let removed = match Client::connect(&self.addr, "spool-bench-admin").await {
                    Ok(c) => c.delete_topic(&self.topic).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = removed {
                    tracing::warn!(topic = %self.topic, error = %e, "could not remove the bench topic");
                }
            }
        }
    }
}
