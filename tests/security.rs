//! TLS and tokens through the real binary: certificates made here (rcgen),
//! a TLS round trip on the native and gRPC listeners, a client that does
//! not trust the server's CA, plaintext and TLS meeting the wrong listener
//! (one line on each side), tokens missing, wrong, valid and outside their
//! permissions on both protocols, the auth file reloaded on SIGHUP, and the
//! refusal to listen beyond loopback without auth.

mod common;

use common::pki::{make_pki, spool, token_create};
use common::{Broker, metric};
use spool::client::{Client, ClientError, ClientOptions};
use spool::protocol::pb;
use spool::protocol::pb::spool_client::SpoolClient;
use spool::security::tls::TlsClient;
use spool::storage::NewMessage;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// Runs a client command; (success, stdout, stderr).
fn cli(args: &[&str]) -> (bool, String, String) {
    let out = spool()
        .args(args)
        .env_remove("SPOOL_TOKEN")
        .env_remove("SPOOL_TLS_CA")
        .output()
        .expect("run spool");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn options(tls: Option<&Path>, token: Option<&str>) -> ClientOptions {
    ClientOptions {
        tls: tls.map(|ca| TlsClient::load_ca(ca).expect("load CA")),
        token: token.map(str::to_owned),
        ..ClientOptions::new("security-test")
    }
}

fn code(e: &ClientError) -> Option<pb::Code> {
    e.code()
}

/// A broker on `data` serving TLS with `pki`'s certificate and key.
fn tls_broker(data: &Path, pki: &common::pki::Pki) -> Broker {
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
    Broker::start(
        data,
        &["--tls-cert", &path(&pki.cert), "--tls-key", &path(&pki.key)],
    )
}

#[tokio::test]
async fn tls_round_trip_on_the_native_and_grpc_listeners() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(dir.path(), "good");
    let broker = tls_broker(&dir.path().join("data"), &pki);

    // The library client, checking the certificate against 127.0.0.1.
    let client = Client::connect_with(&broker.addr, &options(Some(&pki.ca), None))
        .await
        .expect("TLS connect");
    let produced = client
        .produce("t", vec![NewMessage::from_value("over tls")])
        .await
        .expect("produce over TLS");
    assert_eq!(produced.first_offset, 0);
    let got = common::replay_all(&client, "t").await;
    assert_eq!(&got[0].message.value[..], b"over tls");

    // ... and by name, as a client given `localhost` would.
    let by_name = ClientOptions {
        server_name: Some("localhost".into()),
        ..options(Some(&pki.ca), None)
    };
    Client::connect_with(&broker.addr, &by_name)
        .await
        .expect("TLS connect checking the name localhost");

    // The command line.
    let ca = pki.ca.to_str().expect("utf-8 path");
    let (ok, out, err) = cli(&[
        "produce",
        "t",
        "from the cli",
        "--server",
        &broker.addr,
        "--tls-ca",
        ca,
    ]);
    assert!(ok, "{out}{err}");

    // gRPC over TLS (ALPN h2).
    let grpc = broker.grpc.as_deref().expect("gRPC listener");
    let port = grpc.rsplit(':').next().expect("a port");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(&pki.ca).expect("read CA"),
        ))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://localhost:{port}"))
        .expect("uri")
        .tls_config(tls)
        .expect("tls config")
        .connect()
        .await
        .expect("gRPC over TLS");
    let fetched = SpoolClient::new(channel)
        .fetch(pb::FetchRequest {
            topic: "t".into(),
            max_messages: 10,
            ..Default::default()
        })
        .await
        .expect("fetch over gRPC and TLS")
        .into_inner();
    assert_eq!(fetched.messages.len(), 2);
}

/// A renewed certificate and key are put in force by SIGHUP for new
/// connections, while open ones keep going; files that do not make an
/// identity leave the one in force.
#[tokio::test]
async fn sighup_reloads_the_tls_certificate_and_keeps_it_when_the_new_files_are_bad() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = make_pki(dir.path(), "first");
    let renewed = make_pki(dir.path(), "renewed");
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).expect("mkdir");
    let (cert, key) = (live.join("cert.pem"), live.join("key.pem"));
    std::fs::copy(&first.cert, &cert).expect("copy");
    std::fs::copy(&first.key, &key).expect("copy");
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
    let broker = Broker::start(
        &dir.path().join("data"),
        &["--tls-cert", &path(&cert), "--tls-key", &path(&key)],
    );
    let hup = || {
        let status = Command::new("kill")
            .args(["-HUP", &broker.child.id().to_string()])
            .status()
            .expect("kill -HUP");
        assert!(status.success());
    };
    let open = Client::connect_with(&broker.addr, &options(Some(&first.ca), None))
        .await
        .expect("the first certificate");

    std::fs::copy(&renewed.cert, &cert).expect("renew");
    std::fs::copy(&renewed.key, &key).expect("renew");
    hup();
    eventually("the renewed certificate is served", || async {
        Client::connect_with(&broker.addr, &options(Some(&renewed.ca), None))
            .await
            .is_ok()
    })
    .await;
    Client::connect_with(&broker.addr, &options(Some(&first.ca), None))
        .await
        .expect_err("the first certificate is no longer served");
    open.ping(1).await.expect("an open connection keeps going");

    // A key that is not the certificate's, then a file that is no PEM:
    // each reload fails and the renewed identity stays.
    std::fs::copy(&first.key, &key).expect("mismatched key");
    hup();
    // The broker reads the files when its handler runs, after the signal;
    // a second signal before that would be the same reload.
    let refused = "TLS certificate and key not reloaded; the ones in force stay";
    eventually("the mismatched key is refused", || async {
        broker.log_count(refused) >= 1
    })
    .await;
    std::fs::write(&cert, "not a certificate").expect("garbage");
    hup();
    eventually("the garbage certificate is refused", || async {
        broker.log_count(refused) >= 2
    })
    .await;
    Client::connect_with(&broker.addr, &options(Some(&renewed.ca), None))
        .await
        .expect("the renewed certificate stays in force");
    let (_, logs) = broker.terminate();
    assert!(logs.contains("TLS certificate and key reloaded"), "{logs}");
    assert_eq!(
        logs.matches("TLS certificate and key not reloaded; the ones in force stay")
            .count(),
        2,
        "{logs}"
    );
    assert!(logs.contains("do not make a server identity"), "{logs}");
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_servers_ca_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = make_pki(dir.path(), "good");
    let other = make_pki(dir.path(), "other");
    let broker = tls_broker(&dir.path().join("data"), &good);
    let e = Client::connect_with(&broker.addr, &options(Some(&other.ca), None))
        .await
        .expect_err("an untrusted certificate");
    assert!(
        matches!(&e, ClientError::Tls(m) if m.contains("does not trust: no CA in --tls-ca")
            && m.contains(&broker.addr)),
        "{e}"
    );
    // A name the certificate does not carry is refused too.
    let wrong_name = ClientOptions {
        server_name: Some("broker.example".into()),
        ..options(Some(&good.ca), None)
    };
    let e = Client::connect_with(&broker.addr, &wrong_name)
        .await
        .expect_err("a name not in the certificate");
    assert!(
        matches!(&e, ClientError::Tls(m) if m.contains("does not trust")
            && m.contains("it is for localhost, 127.0.0.1 and not for broker.example")),
        "{e}"
    );
}

/// A server certificate that has expired is named as such, not as one the
/// client's CA does not vouch for.
#[tokio::test]
async fn an_expired_server_certificate_is_named_as_expired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = common::pki::make_expired_pki(dir.path(), "old");
    let broker = tls_broker(&dir.path().join("data"), &old);
    let e = Client::connect_with(&broker.addr, &options(Some(&old.ca), None))
        .await
        .expect_err("an expired certificate");
    assert!(
        matches!(&e, ClientError::Tls(m) if m.contains("has expired") && m.contains(&broker.addr)),
        "{e}"
    );
}

/// A server certificate that is a CA certificate (a bare `openssl req
/// -x509`), or one made for TLS clients, is named as such by the CLI, not
/// as one the client's CA does not vouch for.
#[tokio::test]
async fn a_ca_certificate_or_a_client_certificate_serving_is_named_as_such() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_as_server = common::pki::make_ca_as_server_pki(dir.path(), "ca-as-server");
    let broker = tls_broker(&dir.path().join("a"), &ca_as_server);
    let ca = ca_as_server.ca.to_str().expect("utf-8");
    let (ok, _, err) = cli(&["topic", "list", "--server", &broker.addr, "--tls-ca", ca]);
    assert!(!ok);
    assert_eq!(
        err.trim_end(),
        format!(
            "spool: the server at {} presented a CA certificate (basic constraints CA:TRUE) as its own, which this client refuses; the server needs a certificate a CA signed for its name (--tls-cert; docs/security.md shows how to make one)",
            broker.addr
        )
    );
    let client_only = common::pki::make_client_only_pki(dir.path(), "client-only");
    let broker = tls_broker(&dir.path().join("b"), &client_only);
    let e = Client::connect_with(&broker.addr, &options(Some(&client_only.ca), None))
        .await
        .expect_err("a certificate for clients");
    assert!(
        matches!(&e, ClientError::Tls(m) if m.contains("is not for TLS servers (its extended key usage lacks serverAuth)")
            && m.contains(&broker.addr)),
        "{e}"
    );
}

#[tokio::test]
async fn plaintext_and_tls_meeting_the_wrong_listener_get_one_line_each_side() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(dir.path(), "good");
    let ca = pki.ca.to_str().expect("utf-8");
    let tls = tls_broker(&dir.path().join("tls"), &pki);
    let plain = Broker::start(&dir.path().join("plain"), &[]);

    let (ok, _, err) = cli(&["topic", "list", "--server", &tls.addr]);
    assert!(!ok);
    assert_eq!(
        err.trim_end(),
        format!(
            "spool: the server at {} requires TLS: pass --tls-ca (or SPOOL_TLS_CA)",
            tls.addr
        )
    );
    let (ok, _, err) = cli(&["topic", "list", "--server", &plain.addr, "--tls-ca", ca]);
    assert!(!ok);
    assert_eq!(
        err.trim_end(),
        format!(
            "spool: the server at {} does not speak TLS (is --tls-ca meant for a plaintext listener?)",
            plain.addr
        )
    );

    // gRPC, both ways.
    let tls_grpc = tls.grpc.clone().expect("gRPC listener");
    let refused = match Channel::from_shared(format!("http://{tls_grpc}"))
        .expect("uri")
        .connect()
        .await
    {
        Err(_) => true,
        Ok(channel) => SpoolClient::new(channel)
            .list_topics(pb::ListTopicsRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "plaintext gRPC on a TLS listener");
    let plain_grpc = plain.grpc.clone().expect("gRPC listener");
    let port = plain_grpc.rsplit(':').next().expect("a port");
    let config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca).expect("CA")))
        .domain_name("localhost");
    Channel::from_shared(format!("https://localhost:{port}"))
        .expect("uri")
        .tls_config(config)
        .expect("tls config")
        .connect()
        .await
        .expect_err("TLS gRPC on a plaintext listener");

    for (broker, line) in [
        (tls, "plaintext client connected to this TLS listener"),
        (plain, "TLS client connected to this plaintext listener"),
    ] {
        let (stopped, logs) = broker.terminate();
        assert!(stopped, "{logs}");
        for listener in ["\"native\"", "\"grpc\""] {
            let lines: Vec<_> = logs
                .lines()
                .filter(|l| l.contains(line) && l.contains(listener))
                .collect();
            assert_eq!(lines.len(), 1, "{listener}: {logs}");
        }
    }
}

/// An auth file with a producer of `orders*` that may also consume
/// `orders`, and an admin of everything: (file, producer, admin).
fn auth_file(dir: &Path) -> (PathBuf, String, String) {
    let (writer, writer_entry) =
        token_create("writer", &["--produce", "orders*", "--consume", "orders"]);
    let (admin, admin_entry) = token_create(
        "root",
        &["--admin", "*", "--produce", "*", "--consume", "*"],
    );
    let path = dir.join("auth.toml");
    std::fs::write(&path, format!("{writer_entry}\n{admin_entry}")).expect("write auth file");
    (path, writer, admin)
}

#[tokio::test]
async fn tokens_none_wrong_valid_and_outside_permissions_on_the_native_protocol() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (auth, writer, admin) = auth_file(dir.path());
    let broker = Broker::start(
        &dir.path().join("data"),
        &["--auth", auth.to_str().expect("utf-8")],
    );

    for token in [None, Some("spool_wrong")] {
        let e = Client::connect_with(&broker.addr, &options(None, token))
            .await
            .expect_err("no valid token");
        assert_eq!(code(&e), Some(pb::Code::Unauthenticated), "{e}");
    }
    // The client's name goes into the refusal's log line escaped: a client
    // that is not let in writes no line of its own into the log.
    let forged = ClientOptions {
        client_name: "evil\n2026-01-01T00:00:00Z  INFO forged \u{1b}[31m".into(),
        ..options(None, Some("spool_wrong"))
    };
    let e = Client::connect_with(&broker.addr, &forged)
        .await
        .expect_err("no valid token");
    assert_eq!(code(&e), Some(pb::Code::Unauthenticated), "{e}");
    let escaped = r"client=evil\n2026-01-01T00:00:00Z  INFO forged \u{1b}[31m";
    let waited = Instant::now();
    while broker.log_count(escaped) == 0 && waited.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = broker.log_so_far();
    assert!(
        log.contains(escaped) && !log.lines().any(|l| l.starts_with("2026-01-01")),
        "{log}"
    );

    let root = Client::connect_with(&broker.addr, &options(None, Some(&admin)))
        .await
        .expect("admin token");
    root.create_topic("payments", Default::default())
        .await
        .expect("admin creates a topic");

    let client = Client::connect_with(&broker.addr, &options(None, Some(&writer)))
        .await
        .expect("valid token");
    client
        .produce("orders", vec![NewMessage::from_value("a")])
        .await
        .expect("produce within permissions");
    client
        .produce("orders.eu", vec![NewMessage::from_value("b")])
        .await
        .expect("produce to a prefix match");
    let e = client
        .produce("payments", vec![NewMessage::from_value("c")])
        .await
        .expect_err("outside permissions");
    assert_eq!(code(&e), Some(pb::Code::PermissionDenied), "{e}");
    assert!(
        e.to_string()
            .contains("token writer may not produce to topic payments"),
        "{e}"
    );
    let e = client
        .delete_topic("orders")
        .await
        .expect_err("not an admin");
    assert!(
        e.to_string()
            .contains("token writer may not administer topic orders"),
        "{e}"
    );
    let e = client
        .fetch("orders.eu", Default::default())
        .await
        .expect_err("may produce but not consume orders.eu");
    assert_eq!(code(&e), Some(pb::Code::PermissionDenied), "{e}");
    // The connection stays open after a refusal.
    assert_eq!(common::replay_all(&client, "orders").await.len(), 1);
    // Listing shows only the topics the token has a permission on.
    let mut names: Vec<String> = client
        .list_topics()
        .await
        .expect("list")
        .into_iter()
        .map(|t| t.name)
        .collect();
    names.sort();
    assert_eq!(names, ["orders", "orders.eu"]);
    assert_eq!(root.list_topics().await.expect("list").len(), 3);

    // The command line: --token and SPOOL_TOKEN, and the one-line refusal.
    let (ok, out, err) = cli(&["topic", "list", "--server", &broker.addr]);
    assert!(!ok, "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("(Unauthenticated)"), "{err}");
    let (ok, out, err) = cli(&[
        "topic",
        "list",
        "--server",
        &broker.addr,
        "--token",
        &writer,
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("orders.eu") && !out.contains("payments"),
        "{out}"
    );
    let out = spool()
        .args(["topic", "list", "--server", &broker.addr])
        .env("SPOOL_TOKEN", &admin)
        .output()
        .expect("run spool");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("payments"),
        "{out:?}"
    );
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii"),
        );
    }
    request
}

#[tokio::test]
async fn tokens_none_wrong_valid_and_outside_permissions_over_grpc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (auth, writer, admin) = auth_file(dir.path());
    let broker = Broker::start(
        &dir.path().join("data"),
        &["--auth", auth.to_str().expect("utf-8")],
    );
    let grpc = broker.grpc.as_deref().expect("gRPC listener");
    let mut client = SpoolClient::connect(format!("http://{grpc}"))
        .await
        .expect("connect");
    let produce = |topic: &str| pb::ProduceRequest {
        topic: topic.into(),
        messages: vec![pb::NewMessage {
            value: b"x".to_vec().into(),
            ..Default::default()
        }],
    };
    for token in [None, Some("spool_wrong")] {
        let status = client
            .produce(with_token(produce("orders"), token))
            .await
            .expect_err("no valid token");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    }
    client
        .produce(with_token(produce("orders"), Some(&writer)))
        .await
        .expect("valid token");
    client
        .create_topic(with_token(
            pb::CreateTopicRequest {
                name: "payments".into(),
                config: None,
            },
            Some(&admin),
        ))
        .await
        .expect("admin creates a topic");
    let status = client
        .produce(with_token(produce("payments"), Some(&writer)))
        .await
        .expect_err("outside permissions");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        status.message(),
        "token writer may not produce to topic payments"
    );
    let status = client
        .compact(with_token(
            pb::CompactRequest { topic: None },
            Some(&writer),
        ))
        .await
        .expect_err("compacting every topic needs admin on *");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    let topics = client
        .list_topics(with_token(pb::ListTopicsRequest {}, Some(&writer)))
        .await
        .expect("list")
        .into_inner()
        .topics;
    let names: Vec<_> = topics.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["orders"]);
    // The same channel goes on serving after refusals.
    client
        .produce(with_token(produce("orders.us"), Some(&writer)))
        .await
        .expect("still served");
}

/// Why: a gRPC connection whose calls carried no valid token held its
/// connection slot as long as it kept making them (or just answered
/// pings), so tokenless clients could take every slot; and a refused
/// call was not logged, where a refused native `Hello` is. With an auth
/// file, a gRPC connection that has made no call with a valid token within
/// `frame_timeout_ms` is closed; the first refusal on each connection is
/// logged with the peer's address.
#[tokio::test]
async fn a_grpc_connection_without_a_valid_token_is_closed_after_frame_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let (auth, writer, _) = auth_file(dir.path());
    let broker = Broker::start(
        &dir.path().join("data"),
        &[
            "--auth",
            auth.to_str().expect("utf-8"),
            "--frame-timeout-ms",
            "1500",
        ],
    );
    let grpc = broker.grpc.clone().expect("gRPC listener");
    let metrics = broker.metrics.clone().expect("metrics listener");
    let closes = || {
        metric(
            &metrics,
            r#"spool_connections_closed_by_limit_total{reason="frame_timeout_ms"}"#,
        )
    };

    // HTTP/2's preface and settings, then nothing: closed once the time
    // for a call passed.
    let mut raw = tokio::net::TcpStream::connect(&grpc)
        .await
        .expect("connect");
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("preface");
    let started = Instant::now();
    let mut sink = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        while raw.read(&mut sink).await.is_ok_and(|n| n > 0) {}
    })
    .await;
    assert!(closed.is_ok(), "the connection is closed");
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "not at once"
    );
    assert_eq!(closes(), 1.0);

    // A connection that makes only refused calls, twice: closed, one line.
    let channel = Channel::from_shared(format!("http://{grpc}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut refused = SpoolClient::new(channel);
    for _ in 0..2 {
        let status = refused
            .list_topics(with_token(pb::ListTopicsRequest {}, Some("spool_wrong")))
            .await
            .expect_err("no valid token");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }
    // One made with a valid token: kept past the time.
    let mut valid = SpoolClient::connect(format!("http://{grpc}"))
        .await
        .expect("connect");
    valid
        .list_topics(with_token(pb::ListTopicsRequest {}, Some(&writer)))
        .await
        .expect("valid token");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(closes(), 2.0, "the refused connection only");
    valid
        .list_topics(with_token(pb::ListTopicsRequest {}, Some(&writer)))
        .await
        .expect("still served");
    assert_eq!(closes(), 2.0);
    let log = broker.log_so_far();
    let lines: Vec<_> = log
        .lines()
        .filter(|l| l.contains("gRPC call refused: not authenticated"))
        .collect();
    assert_eq!(lines.len(), 1, "once per connection: {log}");
    assert!(lines[0].contains("peer=127.0.0.1:"), "{log}");
}

/// Polls `check` for up to 10 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_auth_file_is_reloaded_on_sighup_without_dropping_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("auth.toml");
    let (a, a_entry) = token_create("a", &["--produce", "a"]);
    std::fs::write(&path, &a_entry).expect("write auth file");
    let broker = Broker::start(
        &dir.path().join("data"),
        &["--auth", path.to_str().expect("utf-8")],
    );
    let hup = || {
        let status = Command::new("kill")
            .args(["-HUP", &broker.child.id().to_string()])
            .status()
            .expect("kill -HUP");
        assert!(status.success());
    };
    let client_a = Client::connect_with(&broker.addr, &options(None, Some(&a)))
        .await
        .expect("token a");
    let one = || vec![NewMessage::from_value("m")];
    client_a
        .produce("a", one())
        .await
        .expect("a may produce to a");
    assert!(client_a.produce("b", one()).await.is_err());

    // Widen a, add b.
    let (b, b_entry) = token_create("b", &["--consume", "*"]);
    let widened = a_entry.replace("produce = [\"a\"]", "produce = [\"a\", \"b\"]");
    assert_ne!(widened, a_entry);
    std::fs::write(&path, format!("{widened}\n{b_entry}")).expect("rewrite");
    hup();
    eventually("a may produce to b on its open connection", || async {
        client_a.produce("b", one()).await.is_ok()
    })
    .await;
    let client_b = Client::connect_with(&broker.addr, &options(None, Some(&b)))
        .await
        .expect("the new token b");
    assert_eq!(common::replay_all(&client_b, "b").await.len(), 1);

    // A broken file keeps the tokens in force.
    std::fs::write(&path, "[[token]]\nname = 1\n").expect("break");
    hup();
    // Its reload is done before the file changes again: a second signal
    // before that would be the same reload.
    eventually("the broken file is refused", || async {
        broker.log_count("auth file not reloaded") >= 1
    })
    .await;
    client_a
        .produce("b", one())
        .await
        .expect("tokens in force stay");

    // Remove a: its open connection is no longer served; b's still is.
    std::fs::write(&path, &b_entry).expect("rewrite without a");
    hup();
    eventually("a is no longer authenticated", || async {
        // (Listing writes nothing while the reload is on its way.)
        matches!(
            client_a.list_topics().await,
            Err(e) if e.code() == Some(pb::Code::Unauthenticated)
        )
    })
    .await;
    // ... and its connection is closed; b's is not.
    eventually("a's connection is closed", || async {
        client_a.ping(1).await.is_err()
    })
    .await;
    assert_eq!(common::replay_all(&client_b, "a").await.len(), 1);

    let (stopped, logs) = broker.terminate();
    assert!(stopped, "{logs}");
    assert!(logs.contains("auth file not reloaded"), "{logs}");
    assert_eq!(logs.matches("auth file reloaded").count(), 2, "{logs}");
}

#[test]
fn the_broker_refuses_non_loopback_addresses_without_auth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8");
    for (listen, grpc, socketio, names) in [
        ("0.0.0.0:0", "off", "off", "(native)"),
        ("127.0.0.1:0", "0.0.0.0:0", "off", "(grpc)"),
        ("127.0.0.1:0", "off", "0.0.0.0:0", "(socketio)"),
    ] {
        let out = spool()
            .args(["serve", "--data", data, "--listen", listen, "--grpc", grpc])
            .args(["--metrics", "off", "--socketio", socketio])
            .stdin(Stdio::null())
            .output()
            .expect("run spool serve");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        let refusals: Vec<_> = err.lines().filter(|l| l.starts_with("spool: ")).collect();
        assert_eq!(refusals.len(), 1, "{err}");
        assert!(
            refusals[0].starts_with("spool: refusing to listen on 0.0.0.0:"),
            "{err}"
        );
        assert!(refusals[0].contains(names), "{err}");
        assert!(refusals[0].contains("--insecure"), "{err}");
    }

    // --insecure and --auth each let it serve there.
    let auth = dir.path().join("auth.toml");
    std::fs::write(&auth, "").expect("an auth file with no token");
    for extra in [
        vec!["--insecure"],
        vec!["--auth", auth.to_str().expect("utf-8")],
    ] {
        let line = serve_exposed(Path::new(data), &extra);
        assert!(line.contains("listening on 0.0.0.0:"), "{extra:?}: {line}");
    }
}

/// A token with a permission on another topic only: every request kind
/// naming topic `t` is refused, on both protocols, so no kind can skip the
/// check (the native protocol's table is also checked by a unit test).
#[tokio::test]
async fn every_request_kind_is_checked_on_both_protocols() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (other, other_entry) = token_create("other", &["--admin", "u", "--produce", "u"]);
    let (root, root_entry) = token_create("root", &["--admin", "*", "--produce", "*"]);
    let path = dir.path().join("auth.toml");
    std::fs::write(&path, format!("{other_entry}\n{root_entry}")).expect("write");
    let broker = Broker::start(
        &dir.path().join("data"),
        &["--auth", path.to_str().expect("utf-8")],
    );
    let admin = Client::connect_with(&broker.addr, &options(None, Some(&root)))
        .await
        .expect("root");
    admin
        .produce("t", vec![NewMessage::from_value("m")])
        .await
        .expect("produce");
    admin
        .create_group("t", "g", spool::groups::GroupMode::Queue, None)
        .await
        .expect("group");

    let c = Client::connect_with(&broker.addr, &options(None, Some(&other)))
        .await
        .expect("other");
    let denied = |what: &str, r: Result<(), ClientError>| {
        let e = r.expect_err(what);
        assert_eq!(e.code(), Some(pb::Code::PermissionDenied), "{what}: {e}");
        assert!(e.to_string().contains("token other may not"), "{what}: {e}");
    };
    let one = || vec![NewMessage::from_value("x")];
    denied("produce", c.produce("t", one()).await.map(drop));
    denied("fetch", c.fetch("t", Default::default()).await.map(drop));
    denied(
        "subscribe",
        c.subscribe("t", None, "m", None, 1).await.map(drop),
    );
    denied("ack", c.ack("t", "g", &[0], None).await);
    denied("nack", c.nack("t", "g", &[0], 0, None).await.map(drop));
    denied("commit", c.commit("t", "g", 0).await);
    denied(
        "seek",
        c.seek("t", "g", spool::broker::Position::Earliest)
            .await
            .map(drop),
    );
    denied("delete", c.delete("t", &[0]).await);
    denied(
        "create_topic",
        c.create_topic("t2", Default::default()).await.map(drop),
    );
    // A topic it may administer, naming a dead-letter topic it may not
    // write to: nacked messages would land there, so creating it is refused.
    let into_t = || pb::TopicConfig {
        dead_letter: Some("t".into()),
        ..Default::default()
    };
    let e = c
        .create_topic("u", into_t())
        .await
        .expect_err("dead_letter");
    assert_eq!(e.code(), Some(pb::Code::PermissionDenied), "{e}");
    assert!(e.to_string().contains("may not produce to topic t"), "{e}");
    let e = c.describe_topic("t").await.expect_err("describe");
    assert_eq!(e.code(), Some(pb::Code::PermissionDenied), "{e}");
    denied("delete_topic", c.delete_topic("t").await);
    denied(
        "create_group",
        c.create_group("t", "g2", spool::groups::GroupMode::Stream, None)
            .await
            .map(drop),
    );
    denied("list_groups", c.list_groups("t").await.map(drop));
    denied("describe_group", c.describe_group("t", "g").await.map(drop));
    denied("delete_group", c.delete_group("t", "g").await);
    denied("compact", c.compact(Some("t")).await.map(drop));
    denied("compact all", c.compact(None).await.map(drop));
    // Allowed ones still are: its own topic, ping, listing (filtered).
    c.produce("u", one()).await.expect("its own topic");
    c.ping(7).await.expect("ping");
    let names: Vec<_> = c
        .list_topics()
        .await
        .expect("list")
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["u"]);

    // gRPC: every method of spool.v1.Spool.
    let grpc = broker.grpc.as_deref().expect("gRPC listener");
    let mut g = SpoolClient::connect(format!("http://{grpc}"))
        .await
        .expect("connect");
    let tok = Some(other.as_str());
    let t = || "t".to_string();
    let check = |what: &str, r: Result<(), tonic::Status>| {
        let s = r.expect_err(what);
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "{what}: {s:?}");
    };
    check(
        "Produce",
        g.produce(with_token(
            pb::ProduceRequest {
                topic: t(),
                messages: vec![pb::NewMessage::default()],
            },
            tok,
        ))
        .await
        .map(drop),
    );
    check(
        "Fetch",
        g.fetch(with_token(
            pb::FetchRequest {
                topic: t(),
                ..Default::default()
            },
            tok,
        ))
        .await
        .map(drop),
    );
    check(
        "Subscribe",
        g.subscribe(with_token(
            pb::SubscribeRequest {
                topic: t(),
                ..Default::default()
            },
            tok,
        ))
        .await
        .map(drop),
    );
    check(
        "Ack",
        g.ack(with_token(
            pb::AckRequest {
                topic: t(),
                group: "g".into(),
                offsets: vec![0],
                ..Default::default()
            },
            tok,
        ))
        .await
        .map(drop),
    );
    check(
        "Nack",
        g.nack(with_token(
            pb::NackRequest {
                topic: t(),
                group: "g".into(),
                offsets: vec![0],
                ..Default::default()
            },
            tok,
        ))
        .await
        .map(drop),
    );
    check(
        "Commit",
        g.commit(with_token(
            pb::CommitRequest {
                topic: t(),
                group: "g".into(),
                offset: 0,
            },
            tok,
        ))
        .await
        .map(drop),
    );
    check(
        "Seek",
        g.seek(with_token(
            pb::SeekRequest {
                topic: t(),
                group: "g".into(),
                ..Default::default()
            },
            tok,
        ))
        .await
        .map(drop),
    );
    check(
        "Delete",
        g.delete(with_token(
            pb::DeleteRequest {
                topic: t(),
                offsets: vec![0],
            },
            tok,
        ))
        .await
        .map(drop),
    );
    check(
        "CreateTopic",
        g.create_topic(with_token(
            pb::CreateTopicRequest {
                name: "t2".into(),
                config: None,
            },
            tok,
        ))
        .await
        .map(drop),
    );
    check(
        "CreateTopic with a dead_letter it may not produce to",
        g.create_topic(with_token(
            pb::CreateTopicRequest {
                name: "u".into(),
                config: Some(into_t()),
            },
            tok,
        ))
        .await
        .map(drop),
    );
    check(
        "DescribeTopic",
        g.describe_topic(with_token(pb::DescribeTopicRequest { name: t() }, tok))
            .await
            .map(drop),
    );
    check(
        "DeleteTopic",
        g.delete_topic(with_token(pb::DeleteTopicRequest { name: t() }, tok))
            .await
            .map(drop),
    );
    check(
        "CreateGroup",
        g.create_group(with_token(
            pb::CreateGroupRequest {
                topic: t(),
                group: "g2".into(),
                ..Default::default()
            },
            tok,
        ))
        .await
        .map(drop),
    );
    check(
        "ListGroups",
        g.list_groups(with_token(pb::ListGroupsRequest { topic: t() }, tok))
            .await
            .map(drop),
    );
    check(
        "DescribeGroup",
        g.describe_group(with_token(
            pb::DescribeGroupRequest {
                topic: t(),
                group: "g".into(),
            },
            tok,
        ))
        .await
        .map(drop),
    );
    check(
        "DeleteGroup",
        g.delete_group(with_token(
            pb::DeleteGroupRequest {
                topic: t(),
                group: "g".into(),
            },
            tok,
        ))
        .await
        .map(drop),
    );
    check(
        "Compact",
        g.compact(with_token(pb::CompactRequest { topic: Some(t()) }, tok))
            .await
            .map(drop),
    );
    let start = pb::ConsumeRequest {
        kind: Some(pb::consume_request::Kind::Start(pb::ConsumeStart {
            topic: t(),
            group: "g".into(),
            member: "m".into(),
            ..Default::default()
        })),
    };
    let consume = g
        .consume(with_token(futures_util::stream::iter(vec![start]), tok))
        .await;
    check("Consume", consume.map(drop));
    assert_eq!(
        g.list_topics(with_token(pb::ListTopicsRequest {}, tok))
            .await
            .expect("list")
            .into_inner()
            .topics
            .len(),
        1
    );
}

/// The config file's keys (`tls_cert`, `tls_key`, `auth`, `insecure`),
/// `SPOOL_TLS_CA`, `--tls-server-name`, and `spool bench` with `--tls-ca`
/// and `--token` against such a broker.
#[test]
fn config_keys_environment_and_bench_reach_a_tls_broker_with_auth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(dir.path(), "good");
    let (secret, entry) =
        token_create("all", &["--produce", "*", "--consume", "*", "--admin", "*"]);
    let auth = dir.path().join("auth.toml");
    std::fs::write(&auth, entry).expect("auth file");
    let config = dir.path().join("spool.toml");
    std::fs::write(
        &config,
        format!(
            "tls_cert = {:?}\ntls_key = {:?}\nauth = {:?}\n",
            pki.cert, pki.key, auth
        ),
    )
    .expect("config");
    let broker = Broker::start(
        &dir.path().join("data"),
        &["--config", config.to_str().expect("utf-8")],
    );
    let ca = pki.ca.to_str().expect("utf-8");

    // TLS is on (a plaintext client is told), and so is auth.
    let (ok, _, err) = cli(&["topic", "list", "--server", &broker.addr]);
    assert!(!ok && err.contains("requires TLS"), "{err}");
    let (ok, _, err) = cli(&["topic", "list", "--server", &broker.addr, "--tls-ca", ca]);
    assert!(!ok && err.contains("(Unauthenticated)"), "{err}");

    // SPOOL_TLS_CA and SPOOL_TOKEN, and the name given apart from the address.
    let out = spool()
        .args(["produce", "t", "m", "--server", &broker.addr])
        .args(["--tls-server-name", "localhost"])
        .env("SPOOL_TLS_CA", ca)
        .env("SPOOL_TOKEN", &secret)
        .output()
        .expect("run spool");
    assert!(out.status.success(), "{out:?}");
    let out = spool()
        .args(["produce", "t", "m", "--server", &broker.addr])
        .args([
            "--tls-server-name",
            "broker.example",
            "--tls-ca",
            ca,
            "--token",
            &secret,
        ])
        .output()
        .expect("run spool");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not trust"),
        "{out:?}"
    );

    // spool bench, over TLS with a token.
    let out = spool()
        .args(["bench", "produce", "--messages", "2000", "--batch", "100"])
        .args([
            "--baseline-mib",
            "1",
            "--format",
            "json",
            "--server",
            &broker.addr,
        ])
        .args(["--tls-ca", ca, "--token", &secret])
        .env_remove("SPOOL_TOKEN")
        .output()
        .expect("run spool bench");
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    assert_eq!(report["throughput"]["messages"], 2000);
    assert_eq!(report["params"]["tls_ca"], ca);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&secret),
        "the report never holds the token"
    );
    let out = spool()
        .args(["bench", "produce", "--messages", "10", "--tls-ca", ca])
        .output()
        .expect("run spool bench");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--tls-ca and --token go with --server"),
        "{out:?}"
    );

    // insecure = true in the config file lifts the loopback-only rule.
    let open = dir.path().join("open.toml");
    std::fs::write(&open, "insecure = true\n").expect("config");
    let config = open.to_str().expect("utf-8");
    let line = serve_exposed(&dir.path().join("data2"), &["--config", config]);
    assert!(line.contains("listening on 0.0.0.0:"), "{line}");
}

/// A broker under an auth file of a `reader` (consume anything) and a
/// `writer` (produce anything), and the writer's client, which has
/// produced "first" to topic `t`.
struct ReaderAndWriter {
    broker: Broker,
    path: PathBuf,
    reader: String,
    reader_entry: String,
    writer_entry: String,
    producer: Client,
}

async fn reader_and_writer(dir: &Path) -> ReaderAndWriter {
    let path = dir.join("auth.toml");
    let (reader, reader_entry) = token_create("reader", &["--consume", "*"]);
    let (writer, writer_entry) = token_create("writer", &["--produce", "*"]);
    std::fs::write(&path, format!("{reader_entry}\n{writer_entry}")).expect("write");
    let broker = Broker::start(
        &dir.join("data"),
        &["--auth", path.to_str().expect("utf-8")],
    );
    let producer = Client::connect_with(&broker.addr, &options(None, Some(&writer)))
        .await
        .expect("writer");
    producer
        .produce("t", vec![NewMessage::from_value("first")])
        .await
        .expect("produce");
    ReaderAndWriter {
        broker,
        path,
        reader,
        reader_entry,
        writer_entry,
        producer,
    }
}

/// A subscription already running stops delivering once a reload takes
/// the topic out of its token's permissions: it ends with
/// `PERMISSION_DENIED`, on the native protocol and on gRPC.
#[tokio::test]
async fn a_reload_ends_running_subscriptions_the_token_may_no_longer_read() {
    use futures_util::StreamExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let ReaderAndWriter {
        broker,
        path,
        reader,
        reader_entry,
        writer_entry,
        producer,
    } = reader_and_writer(dir.path()).await;

    let native = Client::connect_with(&broker.addr, &options(None, Some(&reader)))
        .await
        .expect("reader");
    let mut sub = native
        .subscribe("t", None, "m", Some(spool::broker::Position::Earliest), 100)
        .await
        .expect("subscribe");
    let first = sub.next().await.expect("a delivery").expect("a message");
    assert_eq!(&first.message.value[..], b"first");

    let grpc = broker.grpc.as_deref().expect("gRPC listener");
    let mut g = SpoolClient::connect(format!("http://{grpc}"))
        .await
        .expect("connect");
    let mut deliveries = g
        .subscribe(with_token(
            pb::SubscribeRequest {
                topic: "t".into(),
                from: Some(pb::Position {
                    kind: Some(pb::position::Kind::Earliest(pb::Empty {})),
                }),
                max_in_flight: 100,
                ..Default::default()
            },
            Some(&reader),
        ))
        .await
        .expect("gRPC subscribe")
        .into_inner();
    let d = deliveries
        .next()
        .await
        .expect("a delivery")
        .expect("not an error");
    assert_eq!(d.messages.len(), 1);

    // The reader may now consume only topic "other".
    let narrowed = reader_entry.replace("consume = [\"*\"]", "consume = [\"other\"]");
    assert_ne!(narrowed, reader_entry);
    std::fs::write(&path, format!("{narrowed}\n{writer_entry}")).expect("rewrite");
    let status = Command::new("kill")
        .args(["-HUP", &broker.child.id().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success());

    // Keep producing until both subscriptions have ended, without a
    // message delivered after the reload took effect.
    let ended = async {
        let mut native_end = None;
        let mut grpc_end = None;
        while native_end.is_none() || grpc_end.is_none() {
            producer
                .produce("t", vec![NewMessage::from_value("later")])
                .await
                .expect("produce");
            if native_end.is_none()
                && let Ok(Some(item)) =
                    tokio::time::timeout(Duration::from_millis(50), sub.next()).await
                && let Err(e) = item
            {
                native_end = Some(e);
            }
            if grpc_end.is_none()
                && let Ok(Some(item)) =
                    tokio::time::timeout(Duration::from_millis(50), deliveries.next()).await
                && let Err(s) = item
            {
                grpc_end = Some(s);
            }
        }
        (native_end, grpc_end)
    };
    let (native_end, grpc_end) = tokio::time::timeout(Duration::from_secs(10), ended)
        .await
        .expect("both subscriptions end within 10 s");
    let e = native_end.expect("native end");
    assert_eq!(e.code(), Some(pb::Code::PermissionDenied), "{e}");
    assert!(
        e.to_string()
            .contains("token reader may not consume from topic t"),
        "{e}"
    );
    let s = grpc_end.expect("gRPC end");
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    // The connection itself is still served.
    native.ping(1).await.expect("still open");
}

/// Why: a long-poll or subscription answered `UNAUTHENTICATED` after a
/// reload removed its token left its connection open (only the next new
/// request closed it), though a token gone closes the connection.
#[tokio::test]
async fn a_long_poll_or_subscription_that_finds_its_token_gone_closes_its_connection() {
    use futures_util::StreamExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let ReaderAndWriter {
        broker,
        path,
        reader,
        reader_entry: _,
        writer_entry,
        producer,
    } = reader_and_writer(dir.path()).await;
    let polling = std::sync::Arc::new(
        Client::connect_with(&broker.addr, &options(None, Some(&reader)))
            .await
            .expect("reader"),
    );
    let subscribed = Client::connect_with(&broker.addr, &options(None, Some(&reader)))
        .await
        .expect("reader");
    let mut sub = subscribed
        .subscribe(
            "t",
            None,
            "m",
            Some(spool::broker::Position::Offset(1)),
            100,
        )
        .await
        .expect("subscribe");
    let poll = {
        let polling = std::sync::Arc::clone(&polling);
        tokio::spawn(async move {
            polling
                .fetch(
                    "t",
                    spool::client::FetchOptions {
                        from: Some(spool::broker::Position::Offset(1)),
                        wait_ms: 20_000,
                        ..Default::default()
                    },
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(&path, writer_entry).expect("rewrite without the reader");
    let status = Command::new("kill")
        .args(["-HUP", &broker.child.id().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success());
    // The new message comes once the reader's token is gone (the broker
    // logs the reload after putting it in force).
    eventually("the auth file is reloaded", || async {
        broker.log_count("auth file reloaded") >= 1
    })
    .await;
    producer
        .produce("t", vec![NewMessage::from_value("later")])
        .await
        .expect("produce");
    let polled = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .expect("the long-poll is answered")
        .expect("task");
    let e = polled.expect_err("refused");
    assert_eq!(code(&e), Some(pb::Code::Unauthenticated), "{e}");
    let ended = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("the subscription ends");
    let e = ended.expect("an item").expect_err("refused");
    assert_eq!(code(&e), Some(pb::Code::Unauthenticated), "{e}");
    // Closed by the server, with no further request from the client
    // (the next request would close it anyway).
    for (what, client) in [("long-poll", &*polling), ("subscription", &subscribed)] {
        // Before the client's own keep-alive ping (at most 10 s after it
        // last sent), a request that would close it anyway.
        tokio::time::timeout(Duration::from_secs(5), async {
            while !client.is_closed() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the {what}'s connection is still open"));
        let e = client.ping(7).await.expect_err("closed");
        assert_eq!(code(&e), Some(pb::Code::Unauthenticated), "{what}: {e}");
    }
}

/// Starts `spool serve` on `0.0.0.0:0` (only that listener) with `extra`;
/// its first line on stdout, once it serves. It is killed on return.
fn serve_exposed(data: &Path, extra: &[&str]) -> String {
    let mut child = common::Killed(
        spool()
            .arg("serve")
            .arg("--data")
            .arg(data)
            .args(["--listen", "0.0.0.0:0", "--grpc", "off", "--metrics", "off"])
            .args(["--socketio", "off"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    let mut line = String::new();
    let stdout = child.0.stdout.take().expect("stdout");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).expect("read");
    line
}

/// A broker with auth, a queue topic "jobs" with group "g", and a gRPC
/// `Consume` stream on it by a token that may consume every topic.
struct ReaderStream {
    broker: Broker,
    boss: Client,
    auth: PathBuf,
    admin_entry: String,
    reader_entry: String,
    reader: String,
    requests: tokio::sync::mpsc::UnboundedSender<pb::ConsumeRequest>,
    responses: tonic::Streaming<pb::ConsumeResponse>,
}

impl ReaderStream {
    async fn open(dir: &Path, max_in_flight: u32) -> Self {
        let auth = dir.join("auth.toml");
        let (admin, admin_entry) = token_create(
            "admin",
            &["--produce", "*", "--consume", "*", "--admin", "*"],
        );
        let (reader, reader_entry) = token_create("reader", &["--consume", "*"]);
        std::fs::write(&auth, format!("{admin_entry}\n{reader_entry}")).expect("write");
        let broker = Broker::start(
            &dir.join("data"),
            &["--auth", auth.to_str().expect("utf-8")],
        );
        let boss = Client::connect_with(&broker.addr, &options(None, Some(&admin)))
            .await
            .expect("admin");
        boss.create_topic(
            "jobs",
            pb::TopicConfig {
                ack_timeout_ms: Some(60_000),
                ..Default::default()
            },
        )
        .await
        .expect("topic");
        boss.create_group("jobs", "g", spool::groups::GroupMode::Queue, None)
            .await
            .expect("group");

        let grpc = broker.grpc.as_deref().expect("gRPC listener");
        let mut g = SpoolClient::connect(format!("http://{grpc}"))
            .await
            .expect("connect");
        let (requests, queued) = tokio::sync::mpsc::unbounded_channel();
        let outbound = futures_util::stream::unfold(queued, |mut q| async move {
            let request = q.recv().await?;
            Some((request, q))
        });
        requests
            .send(pb::ConsumeRequest {
                kind: Some(pb::consume_request::Kind::Start(pb::ConsumeStart {
                    topic: "jobs".into(),
                    group: "g".into(),
                    member: "m1".into(),
                    max_in_flight,
                })),
            })
            .expect("open");
        let responses = g
            .consume(with_token(outbound, Some(&reader)))
            .await
            .expect("consume")
            .into_inner();
        ReaderStream {
            broker,
            boss,
            auth,
            admin_entry,
            reader_entry,
            reader,
            requests,
            responses,
        }
    }

    /// Reads the stream to its end (within 10 s), each response through
    /// `each`; the status it ended with (`None`: it ended OK).
    async fn end(&mut self, each: impl Fn(pb::ConsumeResponse)) -> Option<tonic::Status> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match self.responses.message().await {
                    Ok(Some(r)) => each(r),
                    Ok(None) => return None,
                    Err(status) => return Some(status),
                }
            }
        })
        .await
        .expect("the stream ends")
    }

    /// Narrows the reader to topic "other" by a reload; returns once a
    /// fetch of "jobs" by the reader is refused.
    async fn narrow(&self) {
        let narrowed = self
            .reader_entry
            .replace("consume = [\"*\"]", "consume = [\"other\"]");
        assert_ne!(narrowed, self.reader_entry);
        std::fs::write(&self.auth, format!("{}\n{narrowed}", self.admin_entry)).expect("rewrite");
        let status = Command::new("kill")
            .args(["-HUP", &self.broker.child.id().to_string()])
            .status()
            .expect("kill -HUP");
        assert!(status.success());
        let probe = Client::connect_with(&self.broker.addr, &options(None, Some(&self.reader)))
            .await
            .expect("reader");
        let deadline = Instant::now() + Duration::from_secs(10);
        while probe
            .fetch("jobs", spool::client::FetchOptions::default())
            .await
            .is_ok()
        {
            assert!(Instant::now() < deadline, "the reload takes effect");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A gRPC `Consume` stream that a reload refuses as it leases a message
/// gives that lease back at once: another member gets the message long
/// before the group's `ack_timeout_ms`.
#[tokio::test]
async fn a_consume_stream_refused_by_a_reload_gives_its_leases_back_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut reader = ReaderStream::open(dir.path(), 10).await;
    reader.narrow().await;
    reader
        .boss
        .produce("jobs", vec![NewMessage::from_value("job")])
        .await
        .expect("produce");
    assert_eq!(
        reader.end(|_| {}).await.map(|s| s.code()),
        Some(tonic::Code::PermissionDenied),
        "the stream ends refused"
    );
    // Another member gets the job at once, not after ack_timeout_ms.
    let started = Instant::now();
    let offsets = loop {
        let fetched = reader
            .boss
            .fetch(
                "jobs",
                spool::client::FetchOptions {
                    group: Some("g".into()),
                    member: "m2".into(),
                    wait_ms: 1000,
                    ..Default::default()
                },
            )
            .await
            .expect("fetch");
        if !fetched.messages.is_empty() {
            break fetched.messages;
        }
        // Well before the topic's ack_timeout_ms (60 s).
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the lease the refused stream held was not given back"
        );
    };
    assert_eq!(&offsets[0].message.value[..], b"job");
}

/// Queue reads a reload refuses once they have their messages (a
/// long-poll that waited, a native or gRPC subscription, a `Consume`
/// stream) send none of them and give them back at once, uncounted: the
/// next reader gets each with delivery 1, long before `ack_timeout_ms`.
#[tokio::test]
async fn queue_reads_a_reload_refuses_give_their_messages_back_uncounted() {
    use futures_util::StreamExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut reader = ReaderStream::open(dir.path(), 10).await;
    // Group "g" has the `Consume` stream; one group per other way to read.
    for group in ["poll", "native", "grpc"] {
        reader
            .boss
            .create_group("jobs", group, spool::groups::GroupMode::Queue, None)
            .await
            .expect("group");
    }
    let client = Client::connect_with(&reader.broker.addr, &options(None, Some(&reader.reader)))
        .await
        .expect("reader");
    let poller = Client::connect_with(&reader.broker.addr, &options(None, Some(&reader.reader)))
        .await
        .expect("reader");
    let poll = {
        let client = poller;
        tokio::spawn(async move {
            let options = spool::client::FetchOptions {
                group: Some("poll".into()),
                member: "p".into(),
                wait_ms: 30_000,
                ..Default::default()
            };
            client.fetch("jobs", options).await
        })
    };
    let mut native = client
        .subscribe("jobs", Some("native"), "n", None, 10)
        .await
        .expect("subscribe");
    let grpc = reader.broker.grpc.as_deref().expect("gRPC listener");
    let mut g = SpoolClient::connect(format!("http://{grpc}"))
        .await
        .expect("connect");
    let request = pb::SubscribeRequest {
        topic: "jobs".into(),
        group: Some("grpc".into()),
        member: "s".into(),
        max_in_flight: 10,
        ..Default::default()
    };
    let mut pushed = g
        .subscribe(with_token(request, Some(&reader.reader)))
        .await
        .expect("gRPC subscribe")
        .into_inner();

    reader.narrow().await;
    reader
        .boss
        .produce("jobs", vec![NewMessage::from_value("job")])
        .await
        .expect("produce");

    let within = Duration::from_secs(10);
    let polled = tokio::time::timeout(within, poll)
        .await
        .expect("the long-poll ends")
        .expect("task");
    assert_eq!(
        polled.expect_err("refused").code(),
        Some(pb::Code::PermissionDenied)
    );
    let ended = tokio::time::timeout(within, native.next())
        .await
        .expect("the native subscription ends")
        .expect("an item");
    assert_eq!(
        ended.expect_err("refused").code(),
        Some(pb::Code::PermissionDenied)
    );
    let ended = tokio::time::timeout(within, pushed.next())
        .await
        .expect("the gRPC subscription ends")
        .expect("an item");
    assert_eq!(
        ended.expect_err("refused").code(),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        reader.end(|_| {}).await.map(|s| s.code()),
        Some(tonic::Code::PermissionDenied),
        "the Consume stream ends refused"
    );
    for group in ["g", "poll", "native", "grpc"] {
        let options = spool::client::FetchOptions {
            group: Some(group.into()),
            member: "next".into(),
            wait_ms: 5000,
            ..Default::default()
        };
        let fetched = reader.boss.fetch("jobs", options).await.expect("fetch");
        let got: Vec<(&[u8], u32)> = fetched
            .messages
            .iter()
            .map(|m| (&m.message.value[..], m.delivery))
            .collect();
        assert_eq!(
            got,
            [(&b"job"[..], 1)],
            "group {group}: given back at once, its delivery not counted"
        );
    }
}

/// An ack, nack or extend on a `Consume` stream after a reload narrowed
/// its token is refused and ends the stream, as any request of the token
/// would be: a lease already delivered cannot be extended (or acked) on
/// the old permission.
#[tokio::test]
async fn a_consume_stream_refuses_an_extend_after_a_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut reader = ReaderStream::open(dir.path(), 1).await;
    reader
        .boss
        .produce("jobs", vec![NewMessage::from_value("job")])
        .await
        .expect("produce");
    let delivered = tokio::time::timeout(Duration::from_secs(10), reader.responses.message())
        .await
        .expect("a delivery in time")
        .expect("a delivery")
        .expect("the stream is open");
    let offset = delivered.messages[0].offset;
    reader.narrow().await;

    reader
        .requests
        .send(pb::ConsumeRequest {
            kind: Some(pb::consume_request::Kind::Extend(pb::ConsumeExtend {
                offsets: vec![offset],
                ack_timeout_ms: Some(3_600_000),
            })),
        })
        .expect("extend");
    let end = reader
        .end(|r| assert!(r.extended.is_empty(), "extended after the reload: {r:?}"))
        .await;
    assert_eq!(
        end.map(|s| s.code()),
        Some(tonic::Code::PermissionDenied),
        "the extend is refused"
    );
}

/// `spool consume --group` needs only `consume` for a group that exists
/// (an admin made it): the command cannot create or describe it, so it
/// reads, and checks the group's mode on the messages instead.
#[tokio::test]
async fn the_cli_consumes_an_existing_group_with_a_consume_only_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("auth.toml");
    let (admin, admin_entry) = token_create(
        "admin",
        &["--produce", "*", "--consume", "*", "--admin", "*"],
    );
    let (reader, reader_entry) = token_create("reader", &["--consume", "orders"]);
    std::fs::write(&path, format!("{admin_entry}\n{reader_entry}")).expect("write");
    let broker = Broker::start(
        &dir.path().join("data"),
        &["--auth", path.to_str().expect("utf-8")],
    );
    let boss = Client::connect_with(&broker.addr, &options(None, Some(&admin)))
        .await
        .expect("admin");
    boss.produce(
        "orders",
        vec![NewMessage::from_value("o1"), NewMessage::from_value("o2")],
    )
    .await
    .expect("produce");
    boss.create_group("orders", "billing", spool::groups::GroupMode::Queue, None)
        .await
        .expect("group");
    let consume = |mode: &str| {
        cli(&[
            "consume",
            "orders",
            "--group",
            "billing",
            "--mode",
            mode,
            "--server",
            &broker.addr,
            "--token",
            &reader,
        ])
    };
    // The wrong mode: refused before anything is printed or acked.
    let (ok, out, err) = consume("stream");
    assert!(!ok, "{out}{err}");
    assert!(
        err.contains("is a queue group, not a stream group; read it with --mode queue"),
        "{err}"
    );
    assert!(out.is_empty(), "{out}");
    // What that run leased is back at once (nacked), and this run prints
    // and acks it.
    let (ok, out, err) = consume("queue");
    assert!(ok, "{err}");
    assert_eq!(out, "o1\no2\n");
    let info = boss
        .describe_group("orders", "billing")
        .await
        .expect("describe");
    assert_eq!((info.pending, info.lag), (0, 0), "{info:?}");
    // A missing group is NOT_FOUND, and the refused creation is named too.
    let (ok, _, err) = cli(&[
        "consume",
        "orders",
        "--group",
        "nobody",
        "--server",
        &broker.addr,
        "--token",
        &reader,
    ]);
    assert!(!ok);
    assert!(err.contains("NotFound"), "{err}");
    assert!(
        err.contains("creating it was refused: token reader may not"),
        "why the command could not create it: {err}"
    );
}

/// A connection refused on a TLS listener (over `max_connections_per_ip`)
/// that sends nothing holds its descriptor only briefly (before: up to twice
/// `frame_timeout_ms` each, without bound on how many), and the connection
/// admitted beside it is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_on_a_tls_listener_are_closed_soon() {
    use std::io::Read;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(dir.path(), "good");
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
    let broker = Broker::start(
        &dir.path().join("data"),
        &[
            "--tls-cert",
            &path(&pki.cert),
            "--tls-key",
            &path(&pki.key),
            "--max-connections-per-ip",
            "1",
        ],
    );
    let client = Client::connect_with(&broker.addr, &options(Some(&pki.ca), None))
        .await
        .expect("the one connection");
    // 100 refused connections that never send a byte.
    let silent: Vec<std::net::TcpStream> = (0..100)
        .map(|_| std::net::TcpStream::connect(&broker.addr).expect("connect"))
        .collect();
    let addr = broker.addr.clone();
    let closed = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        for mut s in silent {
            s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
                .expect("timeout");
            let mut buf = [0u8; 64];
            // EOF (or a reset) once the broker lets it go.
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        }
        (started.elapsed(), addr)
    })
    .await
    .expect("join");
    assert!(
        closed.0 < std::time::Duration::from_secs(15),
        "refused connections held for {:?} (frame_timeout_ms is 30 s)",
        closed.0
    );
    client
        .produce("t", vec![NewMessage::from_value("x")])
        .await
        .expect("the admitted connection is served");
}
