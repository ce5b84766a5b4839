//! TLS for every listener and for the client, on rustls (ring): the
//! server's certificate and key ([`TlsServer`]), the one way a listener
//! turns an accepted socket into its stream ([`accept`], which also tells a
//! client of the wrong kind apart and closes it with one log line), and the
//! client's CA ([`TlsClient`]).
//!
//! A TLS connection opens with a handshake record, first byte `0x16`; no
//! spool protocol starts that way (a native frame's first byte is its flags,
//! 0 or 1; HTTP/2 starts with `PRI`, HTTP/1 with a method), so one peeked
//! byte tells a TLS client from a plaintext one.

use crate::error::{Error, Result};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;
/// First byte of a TLS alert record.
const TLS_ALERT: u8 = 0x15;
/// A fatal `unexpected_message` alert (TLS 1.2 record version): what a
/// plaintext client on a TLS listener reads before the close, so that it
/// (and any TLS-aware tool) can tell why.
const UNEXPECTED_MESSAGE_ALERT: [u8; 7] = [TLS_ALERT, 0x03, 0x03, 0x00, 0x02, 0x02, 0x0a];
/// Longest a closing connection is drained so the peer reads what was
/// written rather than a reset.
const CLOSE_LINGER: Duration = Duration::from_millis(500);
/// ALPN protocol of HTTP/2 (gRPC clients require it on TLS).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN protocol of HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether a first byte from a peer opens a TLS handshake.
pub fn is_tls_start(first: u8) -> bool {
    first == TLS_HANDSHAKE
}

/// Whether a first byte from a server is a TLS record (handshake or alert):
/// what a plaintext client reads from a TLS listener.
pub fn is_tls_record(first: u8) -> bool {
    first == TLS_HANDSHAKE || first == TLS_ALERT
}

/// The server's certificate chain and key: what `--tls-cert` and
/// `--tls-key` load, and [`TlsServer::reload`] loads again (every
/// listener's acceptor asks for the identity in force at each handshake).
/// Cloning shares them.
#[derive(Clone)]
pub struct TlsServer {
    config: Arc<rustls::ServerConfig>,
    identity: Arc<Identity>,
    /// The files loaded, for a reload (`None`: built from parts).
    files: Option<(PathBuf, PathBuf)>,
    cert: String,
}

impl fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsServer({})", self.cert)
    }
}

/// The certificate chain and key in force, swapped whole by a reload.
#[derive(Debug)]
struct Identity(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Identity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.0.read().unwrap_or_else(|p| p.into_inner()),
        ))
    }
}

/// What is wrong with a PEM file, in words: the library's own name a
/// marker as a list of byte values, and a key it finds none of says
/// nothing of the kinds it reads.
fn pem_problem(e: rustls_pki_types::pem::Error, text: &[u8]) -> String {
    use rustls_pki_types::pem::Error as Pem;
    let contains = |needle: &[u8]| text.windows(needle.len()).any(|w| w == needle);
    match e {
        Pem::MissingSectionEnd { end_marker } => format!(
            "a PEM block has no end line (-----END {}-----): the file is cut short",
            String::from_utf8_lossy(&end_marker)
        ),
        Pem::IllegalSectionStart { line } => format!(
            "a PEM block begins with a malformed line: {}",
            String::from_utf8_lossy(&line)
        ),
        Pem::Base64Decode(e) => format!("a PEM block is not valid base64 ({e})"),
        Pem::NoItemsFound
            if contains(b"ENCRYPTED PRIVATE KEY") || contains(b"Proc-Type: 4,ENCRYPTED") =>
        {
            "the private key is encrypted, which spool does not read: decrypt it \
             (openssl pkey -in KEY -out PLAIN-KEY) and keep the file readable by the \
             broker's user only"
                .into()
        }
        Pem::NoItemsFound => "no private key in the file: it needs a PEM block \
                              PRIVATE KEY (PKCS#8), RSA PRIVATE KEY (PKCS#1) or \
                              EC PRIVATE KEY (SEC1)"
            .into(),
        other => other.to_string(),
    }
}

/// Reads a PEM certificate chain (leaf first) and its PEM private key.
fn read_identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let pem = |e: rustls_pki_types::pem::Error, text: &[u8], what: &str, path: &Path| {
        Error::InvalidArgument(format!(
            "{what} {}: {}",
            path.display(),
            pem_problem(e, text)
        ))
    };
    let read = |path: &Path, what: &str| {
        crate::storage::io::read_settings_file(path)
            .map_err(|e| Error::io(format!("reading {what} {}", path.display()), e))
    };
    let cert_text = read(cert, "TLS certificate")?;
    let chain = CertificateDer::pem_slice_iter(&cert_text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(e, &cert_text, "TLS certificate", cert))?;
    if chain.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "TLS certificate {}: no CERTIFICATE block in the file",
            cert.display()
        )));
    }
    let key_text = read(key, "TLS key")?;
    let private =
        PrivateKeyDer::from_pem_slice(&key_text).map_err(|e| pem(e, &key_text, "TLS key", key))?;
    Ok((chain, private))
}

/// A chain and key checked to belong together (`name` says where they
/// came from, in errors).
fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    name: &str,
) -> Result<Arc<CertifiedKey>> {
    CertifiedKey::from_der(chain, key, &provider())
        .map(Arc::new)
        .map_err(|e| {
            let why = match e {
                rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                    "the key is not the first certificate's: the file lists the server's \
                     own certificate first, then the CAs that signed it, and the key is \
                     that first certificate's"
                        .to_owned()
                }
                rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding) => {
                    "the first certificate does not parse (its bytes are damaged)".to_owned()
                }
                other => other.to_string(),
            };
            Error::InvalidArgument(format!(
                "TLS certificate {name} and its key do not make a server identity: {why}"
            ))
        })
}

impl TlsServer {
    /// Loads a PEM certificate chain (leaf first) and its PEM private key.
    pub fn load(cert: &Path, key: &Path) -> Result<TlsServer> {
        let (chain, private) = read_identity(cert, key)?;
        let mut server = TlsServer::from_parts(chain, private, &cert.display().to_string())?;
        server.files = Some((cert.to_owned(), key.to_owned()));
        Ok(server)
    }

    /// A server identity from a parsed chain and key (`name` says where they
    /// came from, in errors and debug output).
    pub fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        name: &str,
    ) -> Result<TlsServer> {
        let identity = Arc::new(Identity(RwLock::new(certified(chain, key, name)?)));
        let resolver: Arc<dyn ResolvesServerCert> = Arc::clone(&identity) as _;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Internal(format!("TLS protocol versions: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        Ok(TlsServer {
            config: Arc::new(config),
            identity,
            files: None,
            cert: name.to_owned(),
        })
    }

    /// Reads the certificate and key files again and puts them in force for
    /// every handshake from now on (connections already open keep theirs);
    /// on an error the identity in force stays. Returns the certificate's
    /// file.
    pub fn reload(&self) -> Result<&Path> {
        let Some((cert, key)) = &self.files else {
            return Err(Error::InvalidArgument(
                "this TLS identity was not loaded from files".into(),
            ));
        };
        let (chain, private) = read_identity(cert, key)?;
        let fresh = certified(chain, private, &cert.display().to_string())?;
        *self.identity.0.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(cert)
    }

    /// An acceptor offering `alpn` (e.g. [`ALPN_H2`] for gRPC; empty for
    /// the native protocol).
    pub fn acceptor(&self, alpn: &[&[u8]]) -> TlsAcceptor {
        let mut config = (*self.config).clone();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsAcceptor::from(Arc::new(config))
    }
}

/// A listener's stream: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum MaybeTls<S> {
    /// No TLS on this listener.
    Plain(S),
    /// TLS, handshake done.
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Turns an accepted socket into the listener's stream: with `tls`, after
/// the TLS handshake (the client's first byte must open one: a plaintext
/// client is sent a TLS alert, closed and logged in one line naming
/// `listener` and `peer`); without, as is, at once, so that the protocol's
/// own deadlines govern a silent client: a plaintext protocol tells a TLS
/// client by its first byte ([`is_tls_start`]) and closes it with
/// [`log_tls_client`]. `None` when the connection ends here (wrong kind,
/// failed handshake, no byte within `wait`, peer gone); `timed_out` runs
/// when it ends for `wait`.
pub async fn accept(
    tls: Option<&TlsAcceptor>,
    stream: TcpStream,
    peer: SocketAddr,
    listener: &str,
    wait: Option<Duration>,
    timed_out: impl FnOnce(),
) -> Option<MaybeTls<TcpStream>> {
    let Some(acceptor) = tls else {
        return Some(MaybeTls::Plain(stream));
    };
    let mut first = [0u8; 1];
    let peeked = match wait {
        Some(wait) => match tokio::time::timeout(wait, stream.peek(&mut first)).await {
            Ok(peeked) => peeked,
            Err(_) => {
                timed_out();
                tracing::debug!(%peer, listener, "no first byte from the peer");
                return None;
            }
        },
        None => stream.peek(&mut first).await,
    };
    match peeked {
        Ok(1) => {}
        Ok(_) => {
            tracing::debug!(%peer, listener, "peer closed before its first byte");
            return None;
        }
        Err(e) => {
            tracing::debug!(%peer, listener, error = %e, "no first byte from the peer");
            return None;
        }
    }
    if !is_tls_start(first[0]) {
        tracing::info!(%peer, listener, "a plaintext client connected to this TLS listener; closing (the client needs TLS: --tls-ca)");
        close(stream, &UNEXPECTED_MESSAGE_ALERT).await;
        return None;
    }
    let handshake = acceptor.accept(stream);
    let done = match wait {
        Some(wait) => tokio::time::timeout(wait, handshake)
            .await
            .unwrap_or_else(|_| {
                timed_out();
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake not complete in time (frame_timeout_ms)",
                ))
            }),
        None => handshake.await,
    };
    match done {
        Ok(s) => Some(MaybeTls::Tls(Box::new(s))),
        Err(e) => {
            tracing::info!(%peer, listener, error = %e, "TLS handshake failed; closing");
            None
        }
    }
}

/// The one log line of a plaintext listener closing a TLS client.
pub fn log_tls_client(peer: SocketAddr, listener: &str) {
    tracing::info!(%peer, listener, "a TLS client connected to this plaintext listener; closing (start the broker with --tls-cert and --tls-key, or connect without TLS)");
}

/// Reads what the peer already sent (unread bytes would turn the close into
/// a reset that may destroy `last` in flight), writes `last`, closes the
/// write side and waits briefly for the peer to close.
async fn close(mut stream: TcpStream, last: &[u8]) {
    let finish = async {
        let mut sink = [0u8; 4096];
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(20), stream.read(&mut sink)).await
        {
            if n == 0 {
                break;
            }
        }
        stream.write_all(last).await?;
        stream.shutdown().await?;
        while stream.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(CLOSE_LINGER, finish).await;
}

/// The CAs a client trusts: what `--tls-ca` loads. Cloning shares them.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsClient")
    }
}

impl TlsClient {
    /// Trusts the CA certificates of a PEM file.
    pub fn load_ca(path: &Path) -> Result<TlsClient> {
        let pem = crate::storage::io::read_settings_file(path)
            .map_err(|e| Error::io(format!("reading TLS CA {}", path.display()), e))?;
        TlsClient::from_pem(&pem, &path.display().to_string())
    }

    /// Trusts the CA certificates of PEM text (`name` says where it came
    /// from, in errors).
    pub fn from_pem(pem: &[u8], name: &str) -> Result<TlsClient> {
        let mut roots = rustls::RootCertStore::empty();
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| Error::InvalidArgument(format!("TLS CA {name}: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| Error::InvalidArgument(format!("TLS CA {name}: {e}")))?;
            n += 1;
        }
        if n == 0 {
            return Err(Error::InvalidArgument(format!(
                "TLS CA {name}: no CERTIFICATE block in the file"
            )));
        }
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Internal(format!("TLS protocol versions: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsClient {
            config: Arc::new(config),
        })
    }

    /// The rustls configuration (for clients built on other stacks).
    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        Arc::clone(&self.config)
    }

    /// Runs the TLS handshake over `stream`, checking that the server's
    /// certificate is valid for `server_name` (a DNS name or an IP address).
    pub async fn connect(
        &self,
        stream: TcpStream,
        server_name: &str,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = ServerName::try_from(server_name.to_owned()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{server_name:?} is not a valid TLS server name: {e}"),
            )
        })?;
        TlsConnector::from(Arc::clone(&self.config))
            .connect(name, stream)
            .await
    }
}

/// The host part of `addr` (`host:port`, `[v6]:port`): the name a client
/// checks the server's certificate against unless told otherwise.
pub fn host_of(addr: &str) -> &str {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => addr,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Why a client's TLS handshake failed, in one line naming `addr`.
pub fn handshake_error(addr: &str, e: &io::Error) -> String {
    let rustls_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::InvalidMessage(_)) => not_tls(addr),
        Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. },
        )) => format!(
            "the server at {addr} presented a certificate that has expired; the server needs a new one (--tls-cert)"
        ),
        Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidYet
            | rustls::CertificateError::NotValidYetContext { .. },
        )) => format!(
            "the server at {addr} presented a certificate that is not valid yet (check the clocks, or the certificate's start date)"
        ),
        Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForNameContext {
                expected,
                presented,
            },
        )) => format!(
            "the server at {addr} presented a certificate this client does not trust: it is for {} and not for {}; connect by one of its names, or pass one with --tls-server-name",
            presented
                .iter()
                .map(|p| presented_name(p))
                .collect::<Vec<_>>()
                .join(", "),
            expected.to_str()
        ),
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {
            format!(
                "the server at {addr} presented a certificate this client does not trust: no CA in --tls-ca (SPOOL_TLS_CA) signed it; pass the CA that did"
            )
        }
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature)) => format!(
            "the server at {addr} presented a certificate this client does not trust: its signature does not verify against the CA in --tls-ca (SPOOL_TLS_CA) that bears its issuer's name"
        ),
        Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::InvalidPurpose
            | rustls::CertificateError::InvalidPurposeContext { .. },
        )) => format!(
            "the server at {addr} presented a certificate that is not for TLS servers (its extended key usage lacks serverAuth); the server needs one made for a server (--tls-cert)"
        ),
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)))
            if matches!(
                other.0.downcast_ref::<webpki::Error>(),
                Some(webpki::Error::CaUsedAsEndEntity)
            ) =>
        {
            format!(
                "the server at {addr} presented a CA certificate (basic constraints CA:TRUE) as its own, which this client refuses; the server needs a certificate a CA signed for its name (--tls-cert; docs/security.md shows how to make one)"
            )
        }
        Some(rustls::Error::InvalidCertificate(c)) => format!(
            "the server at {addr} presented a certificate this client does not trust ({c:?}); check --tls-ca (SPOOL_TLS_CA) and --tls-server-name"
        ),
        Some(other) => format!("TLS handshake with the server at {addr} failed: {other}"),
        None if matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
        ) =>
        {
            not_tls(addr)
        }
        None => format!("TLS handshake with the server at {addr} failed: {e}"),
    }
}

/// A name a certificate carries as the verifier reports it
/// (`DnsName("host")`, `IpAddress(127.0.0.1)`), as a user writes it.
fn presented_name(p: &str) -> &str {
    p.strip_prefix("DnsName(\"")
        .and_then(|r| r.strip_suffix("\")"))
        .or_else(|| {
            p.strip_prefix("IpAddress(")
                .and_then(|r| r.strip_suffix(')'))
        })
        .unwrap_or(p)
}

fn not_tls(addr: &str) -> String {
    format!("the server at {addr} does not speak TLS (is --tls-ca meant for a plaintext listener?)")
}

/// What a plaintext client says on finding a TLS listener at `addr`.
pub fn tls_required(addr: &str) -> String {
    format!("the server at {addr} requires TLS: pass --tls-ca (or SPOOL_TLS_CA)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_of_an_address_drops_the_port_and_brackets() {
        assert_eq!(host_of("127.0.0.1:7411"), "127.0.0.1");
        assert_eq!(host_of("broker.example:7411"), "broker.example");
        assert_eq!(host_of("[::1]:7411"), "::1");
        assert_eq!(host_of("broker"), "broker");
    }

    /// A server certificate signed by a CA, PEM: (CA, leaf, leaf's key).
    fn signed_pair() -> (String, String, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().expect("key");
        let params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        let leaf = params.signed_by(&key, &issuer).expect("leaf");
        (ca.pem(), leaf.pem(), key.serialize_pem())
    }

    /// `TlsServer::load` of files holding these.
    fn load(cert: &str, key: &str) -> Result<TlsServer> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&c, cert).expect("write cert");
        std::fs::write(&k, key).expect("write key");
        TlsServer::load(&c, &k)
    }

    /// The error `TlsServer::load` gives for files holding these.
    fn load_error(cert: &str, key: &str) -> String {
        match load(cert, key) {
            Ok(_) => panic!("loaded"),
            Err(e) => e.to_string(),
        }
    }

    /// Why: the PEM library's words ("no items found", an end marker as a
    /// list of byte values, "KeyMismatch") said nothing an operator could
    /// act on.
    #[test]
    fn certificate_and_key_files_that_do_not_load_say_what_to_mend() {
        let (ca, leaf, key) = signed_pair();
        assert!(load(&leaf, &key).is_ok());
        let cut = leaf
            .trim_end()
            .rsplit_once('\n')
            .map_or("", |(head, _)| head);
        let e = load_error(cut, &key);
        assert!(
            e.contains("no end line (-----END CERTIFICATE-----): the file is cut short"),
            "{e}"
        );
        let encrypted =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let e = load_error(&leaf, encrypted);
        assert!(e.contains("the private key is encrypted"), "{e}");
        let e = load_error(&leaf, &leaf);
        assert!(
            e.contains("no private key in the file: it needs a PEM block"),
            "{e}"
        );
        let e = load_error(&format!("{ca}{leaf}"), &key);
        assert!(
            e.contains("the key is not the first certificate's: the file lists the server's own certificate first"),
            "{e}"
        );
    }

    #[test]
    fn no_spool_protocol_starts_like_tls() {
        assert!(is_tls_start(0x16));
        for first in [0u8, 1, b'P', b'G'] {
            assert!(!is_tls_start(first));
        }
    }
}
