//! Who may reach the broker and what they may do, for every listener alike.
//!
//! - [`tls`]: the server's certificate ([`tls::TlsServer`], reloadable), turning an
//!   accepted socket into a listener's stream ([`tls::accept`], which
//!   closes a client of the wrong kind with one log line), and the
//!   client's CA ([`tls::TlsClient`]).
//! - [`auth`]: the auth file of tokens, reloadable, and
//!   [`auth::Principal::allow`], the one permission check.
//! - [`access`]: what each request of the protocol needs of its caller.
//!
//! A listener takes the server's [`Security`] and does four things:
//!
//! 1. once: `let tls = security.listener("NAME", &[ALPN...])` (a
//!    [`Listener`]; [`tls::ALPN_H2`] for HTTP/2, [`tls::ALPN_HTTP1`] for
//!    HTTP/1.1 and WebSocket upgrades), and its bound address joins the
//!    list [`refuse_exposed`] checks in `Server::bind`;
//! 2. per accepted socket: `tls.accept(tcp, peer, frame_timeout).await`
//!    gives the stream ([`tls::MaybeTls`], `AsyncRead + AsyncWrite`), or
//!    `None` when the connection is already over and logged; a plaintext
//!    listener may tell a TLS client by its first byte
//!    ([`tls::is_tls_start`], then [`tls::log_tls_client`]);
//! 3. per client: `security.auth.authenticate(token)` (or
//!    [`auth::Auth::authenticate_bearer`] for an `authorization` header)
//!    gives a [`auth::Principal`] or [`Error::Unauthenticated`];
//! 4. per request: `principal.allow(access)?` with the request's
//!    [`auth::Access`] ([`access::Guarded::access`] for the protocol's
//!    messages), and `principal.may_see(topic)` to filter listings.
//!
//! Errors map to status codes through [`crate::protocol::status`] like any
//! other. Without an auth file the principal is allowed everything, and the
//! broker only listens on loopback addresses unless told `--insecure`.

pub mod access;
pub mod auth;
pub mod tls;

use crate::error::{Error, Result};
use auth::Auth;
use std::net::SocketAddr;
use std::time::Duration;
use tls::{MaybeTls, TlsServer};
use tokio::net::TcpStream;

/// What every listener of a broker shares: its TLS identity (if any) and
/// its tokens. Cloning shares them.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// TLS on every listener, when set.
    pub tls: Option<TlsServer>,
    /// The tokens callers must present ([`Auth::off`] when unset).
    pub auth: Auth,
}

impl Security {
    /// Re-reads the auth file and the TLS certificate and key on every
    /// SIGHUP, logging each outcome (one that fails keeps what is in
    /// force), until the process ends; with neither set, a SIGHUP is logged
    /// and ignored rather than ending the process.
    pub fn reload_on_sighup(&self) -> Result<()> {
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| Error::io("listening for SIGHUP", e))?;
        let security = self.clone();
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                if !security.auth.enabled() && security.tls.is_none() {
                    tracing::info!(
                        "SIGHUP: nothing to reload (neither --auth nor --tls-cert is set)"
                    );
                    continue;
                }
                security.auth.reload_and_log();
                if let Some(tls) = &security.tls {
                    match tls.reload() {
                        Ok(cert) => tracing::info!(file = %cert.display(),
                            "TLS certificate and key reloaded; new connections get them"),
                        Err(e) => tracing::warn!(error = %e,
                            "TLS certificate and key not reloaded; the ones in force stay"),
                    }
                }
            }
        });
        Ok(())
    }

    /// A listener's way in: `alpn` are the protocols its TLS offers (see
    /// [`tls::ALPN_H2`]); the returned acceptor is what [`Listener::accept`]
    /// runs each socket through.
    pub fn listener(&self, name: &'static str, alpn: &[&[u8]]) -> Listener {
        Listener {
            name,
            tls: self.tls.as_ref().map(|t| t.acceptor(alpn)),
        }
    }
}

/// One listener's TLS, built once: see [`Security::listener`].
#[derive(Clone)]
pub struct Listener {
    name: &'static str,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Listener({}, tls: {})", self.name, self.tls.is_some())
    }
}

impl Listener {
    /// Turns an accepted socket into this listener's stream (see
    /// [`tls::accept`]); `None`: the connection is over, and was logged
    /// (and `timed_out` ran if `wait` ended it).
    pub async fn accept(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        wait: Option<Duration>,
        timed_out: impl FnOnce(),
    ) -> Option<MaybeTls<TcpStream>> {
        tls::accept(self.tls.as_ref(), stream, peer, self.name, wait, timed_out).await
    }

    /// Whether this listener speaks TLS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }
}

/// Refuses to serve when a listener is bound beyond loopback without an
/// auth file, unless `insecure`: anyone who can reach such a port could
/// read and delete every topic. `listeners` are each listener's name and
/// bound address.
pub fn refuse_exposed(listeners: &[(&str, SocketAddr)], auth: &Auth, insecure: bool) -> Result<()> {
    if auth.enabled() || insecure {
        return Ok(());
    }
    let exposed: Vec<String> = listeners
        .iter()
        .filter(|(_, addr)| !addr.ip().is_loopback())
        .map(|(name, addr)| format!("{addr} ({name})"))
        .collect();
    if exposed.is_empty() {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "refusing to listen on {} without --auth: anyone who can reach it could read and delete every topic; pass --auth FILE, or --insecure to serve it unauthenticated",
        exposed.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_listeners_need_no_auth() {
        let lo: SocketAddr = "127.0.0.1:7411".parse().expect("addr");
        let lo6: SocketAddr = "[::1]:7412".parse().expect("addr");
        let any: SocketAddr = "0.0.0.0:7412".parse().expect("addr");
        let off = Auth::off();
        assert!(refuse_exposed(&[("native", lo), ("grpc", lo6)], &off, false).is_ok());
        let e = refuse_exposed(&[("native", lo), ("grpc", any)], &off, false).expect_err("exposed");
        assert!(
            e.to_string()
                .starts_with("refusing to listen on 0.0.0.0:7412 (grpc) without --auth"),
            "{e}"
        );
        assert!(refuse_exposed(&[("grpc", any)], &off, true).is_ok());
    }
}
