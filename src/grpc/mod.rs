//! The gRPC transport: `spool.v1.Spool` ([`service`]), the standard
//! `grpc.health.v1.Health` and server reflection (v1 and v1alpha) on one
//! HTTP/2 listener, over the same [`Broker`] as the native transport.
//!
//! - `service`: the `Spool` service, converting protobuf to
//!   [`Broker`] calls and back; errors become statuses through
//!   [`crate::protocol::status::to_wire`], so a gRPC client sees the same
//!   code and message as a native one.
//! - `connection`: admission of each connection into the server's shared
//!   slots, its idle and write deadlines, and its count of streams.
//! - `measured`: the one place calls are counted into the broker's metrics.
//! - `consume`: one bidirectional `Consume` stream over a queue group, and
//!   the leases it gives back when it ends.
//!
//! Like the native transport it holds no broker rule. It stops with the
//! server: health turns `NOT_SERVING`, subscriptions and long-polls end,
//! in-flight calls finish.

pub(crate) mod codec;
mod connection;
mod consume;
mod measured;
mod service;

pub(crate) use connection::Limits;

use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::protocol::pb::spool_server::SpoolServer;
use crate::security::Security;
use crate::security::auth::Auth;
use crate::server::stopping;
use connection::ConnInfo;
use service::Service;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The label of this transport's metrics.
const LISTENER: &str = "grpc";

/// Largest HTTP/2 frame the server accepts (the protocol's maximum is
/// 16 MiB - 1; the default, 16 KiB, cuts a 1 MiB produce into 64 frames).
const HTTP2_MAX_FRAME: u32 = (1 << 24) - 1;
/// HTTP/2 receive windows of a stream and of a connection.
const HTTP2_WINDOW: u32 = 16 << 20;
/// Calls one connection has open at once (HTTP/2 streams; without a
/// setting, none is sent and a peer may open any number): as many as the
/// native listener serves, so a client cannot make the broker hold more
/// decoded requests than there (more when `max_subscriptions` is over
/// 192: room for every subscription and 64 calls beside them).
const HTTP2_MAX_STREAMS: u32 = 256;

/// Default gRPC listen address of `spool serve`.
pub const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:7412";

/// `proto/spool.proto` compiled, as an encoded `FileDescriptorSet`: what
/// reflection serves.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/spool_descriptor.bin"));

/// How often the server pings a connection that sent nothing, and how long
/// it waits for the answer: a peer that vanished while a call of its waits
/// (a subscription, a long-poll) gives its slot back. Pings and their
/// answers are not activity for `idle_timeout_ms`.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Authenticates each call of `spool.v1.Spool` by its `authorization:
/// Bearer TOKEN` metadata, handing the principal to the service as a
/// request extension; a call without a valid token fails with
/// `UNAUTHENTICATED`. (Health and reflection answer anyone.)
fn authenticate(
    auth: Auth,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |mut request: tonic::Request<()>| {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let conn = request.extensions().get::<ConnInfo>();
        match auth.authenticate_bearer(header) {
            Ok(principal) => {
                if let Some(conn) = conn {
                    conn.authenticated();
                }
                request.extensions_mut().insert(principal);
                Ok(request)
            }
            Err(e) => {
                match conn {
                    Some(conn) => conn.refused(&e),
                    None => tracing::debug!(error = %e, "gRPC call refused: not authenticated"),
                }
                Err(tonic::Status::unauthenticated(e.to_string()))
            }
        }
    }
}

/// Serves gRPC on `listener` until `shutdown` turns true. No request or
/// response message may exceed `max_frame_bytes` (the server's
/// `max_frame_bytes`), and no stored message larger than that less 1 KiB
/// is handed out, as on the native protocol. Connections are held to
/// `limits`, in the slots the native listener uses too.
pub(crate) async fn serve(
    listener: TcpListener,
    broker: Broker,
    max_frame_bytes: u32,
    limits: Limits,
    security: Security,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<SpoolServer<Service>>().await;
    let reflection =
        |e: tonic_reflection::server::Error| Error::Internal(format!("gRPC reflection: {e}"));
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(reflection)?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(reflection)?;
    let limit = max_frame_bytes as usize;
    let metrics = broker.metrics().clone();
    let accepting = broker.clone();
    let spool = SpoolServer::new(Service::new(broker, max_frame_bytes, shutdown.clone()))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let spool = tonic::service::interceptor::InterceptedService::new(
        spool,
        authenticate(security.auth.clone()),
    );
    let spool = measured::Measured::new(spool, metrics);
    // Room for every subscription allowed and calls beside them.
    let streams = HTTP2_MAX_STREAMS.max(limits.max_subscriptions.saturating_add(64));
    // Every call needs a token: a connection has frame_timeout to make
    // one that carries a valid one.
    let authenticate_within = limits.frame_timeout.filter(|_| security.auth.enabled());
    limits.admission.listening(LISTENER);
    let incoming = connection::incoming(
        listener,
        limits,
        authenticate_within,
        security.listener("grpc", &[crate::security::tls::ALPN_H2]),
        accepting,
    );
    let mut signal = shutdown;
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        // A produce of a full batch arrives in a few large frames rather
        // than hundreds of 16 KiB ones, without waiting for window updates.
        .max_frame_size(Some(HTTP2_MAX_FRAME))
        .initial_stream_window_size(Some(HTTP2_WINDOW))
        .initial_connection_window_size(Some(HTTP2_WINDOW))
        .max_concurrent_streams(Some(streams))
        .add_service(health)
        .add_service(v1)
        .add_service(v1alpha)
        .add_service(spool)
        .serve_with_incoming_shutdown(incoming, async move {
            stopping(&mut signal).await;
            reporter.set_not_serving::<SpoolServer<Service>>().await;
            reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        })
        .await
        .map_err(|e| Error::Internal(format!("gRPC server: {e}")))
}
