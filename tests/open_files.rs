//! Running out of file descriptors is an answer a client can act on: a
//! broker under a low open-files limit (set with `prlimit` for the test),
//! told it may keep more files open than that (`--max-open-files`), with
//! every topic in use (a subscription keeps each open), answers
//! `RESOURCE_EXHAUSTED` naming the limit and how to raise it, never
//! `INTERNAL`, and the topics it already has keep working; the setting
//! above the limit is warned about at start, new connections get the
//! descriptors of topics nobody holds, and a stop with every descriptor
//! in use is still clean. (Topics nobody
//! holds are closed to make room instead: tests/many_topics.rs.)

mod common;

use common::Broker;
use spool::client::Client;
use spool::protocol::pb;
use spool::storage::NewMessage;
use std::process::Command;
use std::time::Duration;

/// File descriptors the broker may hold: enough to start and serve a few
/// topics, too few for many.
const LIMIT: &str = "--nofile=64:64";

/// True (and says so) when `prlimit` is not installed: the test skips.
fn no_prlimit() -> bool {
    let missing = Command::new("prlimit").arg("--version").output().is_err();
    if missing {
        eprintln!("prlimit is not installed; skipping");
    }
    missing
}

/// `spool serve` on `data` with `extra`, under the resource limit `limit`
/// (a `prlimit` option such as `--nofile=64:64`).
fn start_limited(limit: &str, data: &std::path::Path, extra: &[&str]) -> Broker {
    let mut wrapper = Command::new("prlimit");
    wrapper.args([limit, env!("CARGO_BIN_EXE_spool")]);
    Broker::start_with(wrapper, data, extra)
}

/// Topics `room-0`, `room-1`, ... each made and held open by a
/// subscription, until one is refused (at most 100): the subscriptions,
/// and the refusal.
async fn hold_topics_until_refused(
    client: &Client,
) -> (
    Vec<spool::client::Subscription>,
    Option<spool::client::ClientError>,
) {
    let mut held = Vec::new();
    for i in 0..100 {
        let room = format!("room-{i}");
        if let Err(e) = client
            .produce(&room, vec![NewMessage::from_value("hi")])
            .await
        {
            return (held, Some(e));
        }
        match client.subscribe(&room, None, "holder", None, 10).await {
            Ok(sub) => held.push(sub),
            Err(e) => return (held, Some(e)),
        }
    }
    (held, None)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn running_out_of_files_is_resource_exhausted_naming_the_limit() {
    if no_prlimit() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start_limited(LIMIT, tmp.path(), &["--max-open-files", "1000"]);
    let rt = rt();
    rt.block_on(async {
        let client = Client::connect(&broker.addr, "t").await.expect("connect");
        let (held, refused) = hold_topics_until_refused(&client).await;
        let error = refused.expect("64 descriptors run out before 100 topics");
        eprintln!("{} topics fit; then: {error}", held.len());
        assert!(!held.is_empty(), "some topics fit");
        assert_eq!(error.code(), Some(pb::Code::ResourceExhausted), "{error}");
        let text = error.to_string();
        assert!(text.contains("file descriptors"), "{text}");
        assert!(
            text.contains("at most 64 open files"),
            "names the limit: {text}"
        );
        assert!(text.contains("ulimit -n"), "says how to raise it: {text}");
        // The topics that were made keep taking messages.
        client
            .produce("room-0", vec![NewMessage::from_value("again")])
            .await
            .expect("an existing topic still works");
        // The topics let go but still open (not idle long enough to
        // close): new connections need the descriptors they hold, and get
        // them at once.
        drop(held);
        let mut more = Vec::new();
        for i in 0..12 {
            let connected =
                tokio::time::timeout(Duration::from_secs(10), Client::connect(&broker.addr, "t"))
                    .await
                    .unwrap_or_else(|_| panic!("connection {i} waits for the open topics"));
            more.push(connected.expect("connect"));
        }
        for client in &more {
            client
                .produce("room-0", vec![NewMessage::from_value("more")])
                .await
                .expect("each new connection is served");
        }
    });
    let (stopped, logs) = broker.terminate();
    assert!(
        logs.contains("open files"),
        "the limit is logged at start: {logs}"
    );
    assert!(
        logs.contains("max_open_files is above the process's open-files limit")
            && logs.contains("max_open_files=1000")
            && logs.contains("limit=64"),
        "a max_open_files above the limit is warned about at start, naming both: {logs}"
    );
    // Every topic open and no descriptor spare: the final checkpoints
    // that found none at once get theirs once the others are done.
    assert!(
        stopped && !logs.contains("clean checkpoint failed"),
        "the stop is clean with every descriptor in use: {logs}"
    );
    let restarted = Broker::start(tmp.path(), &[]);
    let (_, logs) = restarted.terminate();
    assert!(
        logs.contains("clean_start=true"),
        "the next start knows the stop was clean: {logs}"
    );
}

/// Each open topic maps its active segment (128 MiB of address space by
/// default), so an address-space limit runs out after a couple of dozen
/// topics: opening the next one closes unused topics and tries again, and
/// no client sees the error.
#[test]
fn running_out_of_address_space_closes_unused_topics_transparently() {
    if no_prlimit() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start_limited("--as=3000000000", tmp.path(), &[]);
    let rt = rt();
    rt.block_on(async {
        let client = Client::connect(&broker.addr, "t").await.expect("connect");
        for i in 0..100 {
            client
                .produce(
                    &format!("room-{i}"),
                    vec![NewMessage::from_value(format!("{i}"))],
                )
                .await
                .unwrap_or_else(|e| panic!("room-{i}: {e}"));
        }
        for i in 0..100 {
            let got = common::replay_all(&client, &format!("room-{i}")).await;
            assert_eq!(got.len(), 1, "room-{i}");
            assert_eq!(got[0].message.value, format!("{i}").as_bytes(), "room-{i}");
        }
    });
    let (_, logs) = broker.terminate();
    assert!(
        logs.contains("closing unused topics"),
        "the address space ran out and topics were closed: {logs}"
    );
}

/// A file-size limit (`ulimit -f`) does not end the broker: SIGXFSZ is
/// caught, so a produce that would grow a segment past the limit answers
/// `RESOURCE_EXHAUSTED` naming the limit and how to raise it, as a full disk
/// does; what was acknowledged stays readable, smaller produces go on, and
/// the limit is warned about at start.
#[test]
fn a_file_size_limit_is_answered_as_a_full_disk_not_a_dead_broker() {
    if no_prlimit() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start_limited("--fsize=4000000", tmp.path(), &[]);
    let rt = rt();
    let big = || NewMessage::from_value(vec![b'x'; 500_000]);
    rt.block_on(async {
        let client = Client::connect(&broker.addr, "t").await.expect("connect");
        let mut acked = 0;
        let error = loop {
            match client.produce("big", vec![big()]).await {
                Ok(_) => acked += 1,
                Err(e) => break e,
            }
            assert!(acked < 20, "4 MB hold fewer than 20 messages of 500 KB");
        };
        assert!(acked >= 2, "some fit: {acked}");
        assert_eq!(error.code(), Some(pb::Code::ResourceExhausted), "{error}");
        let text = error.to_string();
        assert!(
            text.contains("file size limit") && text.contains("ulimit -f"),
            "names the limit and how to raise it: {text}"
        );
        client
            .produce("big", vec![NewMessage::from_value("small")])
            .await
            .expect("a produce that fits is taken");
        let all = common::replay_all(&client, "big").await;
        assert_eq!(all.len(), acked + 1, "every acknowledged message is there");
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "a clean stop: {logs}");
    assert!(logs.contains("ulimit -f"), "warned at start: {logs}");
}

/// A thread limit too low for the broker's threads (`ulimit -u`) is named
/// at start, in one line and exit 1, not met as a panic of the runtime's
/// thread pool. Run as an unused user id when the tests run as root (the limit does
/// not bind root).
#[test]
fn a_thread_limit_too_low_to_start_is_named_at_start() {
    if no_prlimit() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut program = Command::new("prlimit");
    program.arg("--nproc=3:3");
    // As root, a user id no process runs as (the limit counts the
    // user's processes, and root is not bound by it), with a copy of the
    // binary that user can reach wherever the build is.
    let bin = if rustix::process::geteuid().is_root() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let bin = tmp.path().join("spool");
        std::fs::copy(env!("CARGO_BIN_EXE_spool"), &bin).expect("copy the binary");
        program.args([
            "setpriv",
            "--reuid=65533",
            "--regid=65533",
            "--clear-groups",
        ]);
        bin
    } else {
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_spool"))
    };
    let mut child = program
        .arg(bin)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(["--grpc", "off", "--metrics", "off", "--socketio", "off"])
        .arg("--data")
        .arg(tmp.path().join("data"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run spool serve");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("spool serve started under a limit of 3 threads");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let said: Vec<&str> = err.lines().filter(|l| l.starts_with("spool: ")).collect();
    assert_eq!(said.len(), 1, "one line: {err}");
    assert!(
        said[0].contains("threads") && said[0].contains("ulimit -u"),
        "{err}"
    );
}

/// A produce whose new segment finds no address space for its map (all
/// of it held by topics nobody uses any more, not yet closed for
/// idleness) answers `RESOURCE_EXHAUSTED` with nothing stored, and closes
/// unused topics at once: its retry is taken. Before, retries failed until
/// the idle topics closed by themselves (`topic_idle_close_ms`, 30 s).
#[test]
fn a_segment_roll_out_of_address_space_makes_room_for_the_retry() {
    if no_prlimit() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start_limited("--as=1500000000", tmp.path(), &[]);
    let rt = rt();
    rt.block_on(async {
        let client = Client::connect(&broker.addr, "t").await.expect("connect");
        // Every produce a millisecond after the last starts a new segment,
        // mapped whole (128 MiB by default).
        client
            .create_topic(
                "roll",
                pb::TopicConfig {
                    segment_ms: Some(1),
                    ..Default::default()
                },
            )
            .await
            .expect("create");
        let _keep = client.subscribe("roll", None, "holder", None, 10).await;
        let (held, refused) = hold_topics_until_refused(&client).await;
        assert!(refused.is_some(), "the address space runs out");
        drop(held);
        let mut refused = 0;
        for i in 0..6 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let m = || vec![NewMessage::from_value(format!("m{i}"))];
            if let Err(e) = client.produce("roll", m()).await {
                assert_eq!(e.code(), Some(pb::Code::ResourceExhausted), "{e}");
                refused += 1;
                client
                    .produce("roll", m())
                    .await
                    .unwrap_or_else(|e| panic!("message {i}: the retry is refused too: {e}"));
            }
        }
        assert!(refused > 0, "test setup: a roll found no address space");
        let all = common::replay_all(&client, "roll").await;
        assert_eq!(all.len(), 6, "each message stored once");
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
}

/// Connections beyond what the open-files limit leaves after the topics'
/// share are refused with the reason (`max_connections`, lowered to fit at
/// start and logged), not left waiting unaccepted while the accept path
/// closes the topics clients already use.
#[test]
fn connections_past_the_open_files_limit_are_refused_by_their_slot() {
    if no_prlimit() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = start_limited(LIMIT, tmp.path(), &[]);
    let rt = rt();
    rt.block_on(async {
        let first = Client::connect(&broker.addr, "first")
            .await
            .expect("connect");
        first
            .produce("t", vec![NewMessage::from_value("before")])
            .await
            .expect("produce");
        let mut more = Vec::new();
        let mut refused = None;
        for i in 0..60 {
            match tokio::time::timeout(
                Duration::from_secs(5),
                Client::connect(&broker.addr, "more"),
            )
            .await
            {
                Ok(Ok(client)) => more.push(client),
                Ok(Err(e)) => {
                    refused = Some(e);
                    break;
                }
                Err(_) => panic!("connection {i} waits unanswered"),
            }
        }
        let error = refused.expect("60 connections do not fit 64 descriptors");
        assert_eq!(error.code(), Some(pb::Code::ResourceExhausted), "{error}");
        assert!(
            error.to_string().contains("too many connections"),
            "{error}"
        );
        first
            .produce("t", vec![NewMessage::from_value("after")])
            .await
            .expect("the first client's topic still works");
        for client in &more {
            client
                .produce("t", vec![NewMessage::from_value("more")])
                .await
                .expect("each admitted connection is served");
        }
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
    assert!(logs.contains("max_connections lowered"), "{logs}");
}

/// Offline compaction under a file-size limit its copy would pass is not
/// killed by SIGXFSZ: as on a full disk, it leaves each run it cannot copy
/// as it was, saying why in words that name the limit, and every message
/// stays readable.
#[test]
fn offline_compaction_under_a_file_size_limit_leaves_runs_as_on_a_full_disk() {
    if no_prlimit() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let rt = rt();
    rt.block_on(async {
        let client = Client::connect(&broker.addr, "t").await.expect("connect");
        client
            .create_topic(
                "t",
                pb::TopicConfig {
                    segment_bytes: Some(64 * 1024),
                    ..Default::default()
                },
            )
            .await
            .expect("create");
        let batch: Vec<NewMessage> = (0..200)
            .map(|i| NewMessage::from_value(format!("{i:04}{}", "v".repeat(1000))))
            .collect();
        client.produce("t", batch).await.expect("produce");
        let odd: Vec<u64> = (0..200).filter(|o| o % 2 == 1).collect();
        client.delete("t", &odd).await.expect("delete");
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
    let out = Command::new("prlimit")
        .args([
            "--fsize=20000",
            env!("CARGO_BIN_EXE_spool"),
            "compact",
            "--data",
        ])
        .arg(tmp.path())
        .output()
        .expect("run compact");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("leaves it as it was")
            && err.contains("file size limit")
            && err.contains("ulimit -f"),
        "{err}"
    );
    let broker = Broker::start(tmp.path(), &[]);
    rt.block_on(async {
        let client = Client::connect(&broker.addr, "t").await.expect("connect");
        let all = common::replay_all(&client, "t").await;
        let offsets: Vec<u64> = all.iter().map(|m| m.message.offset.0).collect();
        let even: Vec<u64> = (0..200).filter(|o| o % 2 == 0).collect();
        assert_eq!(offsets, even, "every message not deleted");
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
}

/// `spool bench` under a file-size limit its disk probe passes ends with
/// one line naming the limit and how to raise it (exit 1), not killed by
/// SIGXFSZ and not in the system's bare words.
#[test]
fn bench_under_a_file_size_limit_names_it() {
    if no_prlimit() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = Command::new("prlimit")
        .args([
            "--fsize=2000000",
            env!("CARGO_BIN_EXE_spool"),
            "bench",
            "disk",
        ])
        .arg("--data")
        .arg(tmp.path())
        .output()
        .expect("run bench");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("file size limit") && err.contains("ulimit -f"),
        "{err}"
    );
}
