//! The `spool` command line against a real broker: the README's tour runs
//! as written, every client subcommand works and prints parseable JSON, and
//! bad input gets one line naming the problem and the documented exit code.

mod common;

use common::Broker;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A directory holding a `spool` symlink to the built binary, for `PATH`.
fn bin_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_spool"), dir.path().join("spool"))
        .expect("symlink");
    dir
}

fn shell(bin: &Path, server: &str, line: &str) -> Output {
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("bash")
        .args(["-c", line])
        .env("PATH", path)
        .env("SPOOL_SERVER", server)
        .stdin(Stdio::null())
        .output()
        .expect("run bash")
}

fn spool(server: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(args)
        .env("SPOOL_SERVER", server)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn spool");
    if let Some(input) = stdin {
        use std::io::Write;
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input.as_bytes()).expect("write stdin");
    }
    child.wait_with_output().expect("wait")
}

/// `spool ARGS` against `server`, running, with no stdin and its output
/// piped.
fn spawn_spool(server: &str, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(args)
        .env("SPOOL_SERVER", server)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn spool")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn the_readme_tour_runs_as_written() {
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .expect("README");
    let tour = readme
        .split("<!-- tour:start -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- tour:end -->").next())
        .expect("README has a tour section");
    let lines: Vec<&str> = tour
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("```"))
        .collect();
    assert!(lines.len() >= 8, "the tour has its steps");

    let tmp = tempfile::tempdir().expect("tempdir");
    let bin = bin_dir();
    let mut broker = Some(Broker::start(tmp.path(), &[]));
    for line in lines {
        if line.starts_with('#') {
            if line.contains("kill -9") {
                broker.take().expect("running").kill9();
                broker = Some(Broker::start(tmp.path(), &[]));
            }
            continue;
        }
        let (command, expect) = match line.split_once("# prints ") {
            Some((c, e)) => (c.trim(), Some(e.trim())),
            None => (line.trim(), None),
        };
        let addr = broker.as_ref().expect("running").addr.clone();
        let out = shell(bin.path(), &addr, command);
        assert!(out.status.success(), "`{command}` failed: {}", stderr(&out));
        if let Some(expect) = expect {
            let got: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
            let want: Vec<&str> = expect.split(", ").collect();
            assert_eq!(
                got.len(),
                want.len(),
                "`{command}` printed {got:?}, README says {want:?}"
            );
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    g.starts_with(w),
                    "`{command}` printed {g:?}, README says {w:?}"
                );
            }
        }
    }
}

#[test]
fn listing_commands_print_json_scripts_can_read() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let s = &broker.addr;
    let created = spool(
        s,
        &[
            "topic",
            "create",
            "jobs",
            "--fsync",
            "never",
            "--max-deliveries",
            "3",
            "--delete-when-consumed",
            "--compact-min-dirty-ratio",
            "0.5",
            "--format",
            "json",
        ],
        None,
    );
    assert!(created.status.success(), "{}", stderr(&created));
    let t: serde_json::Value = serde_json::from_str(&stdout(&created)).expect("json");
    assert_eq!(t["config"]["fsync"], "never");
    assert_eq!(t["config"]["max_deliveries"], 3);
    assert_eq!(t["config"]["delete_when_consumed"], true);
    assert_eq!(t["config"]["compact_min_dirty_ratio"], 0.5);

    let produced = spool(
        s,
        &["produce", "jobs", "--print-offsets"],
        Some("a\nb\nc\n"),
    );
    assert_eq!(stdout(&produced), "0\n1\n2\n");

    let listed = spool(s, &["topic", "list", "--format", "json"], None);
    let topics: serde_json::Value = serde_json::from_str(&stdout(&listed)).expect("json");
    assert_eq!(topics[0]["name"], "jobs");
    assert_eq!(topics[0]["end_offset"], 3);

    let described = spool(s, &["topic", "describe", "jobs", "--format", "json"], None);
    let t: serde_json::Value = serde_json::from_str(&stdout(&described)).expect("json");
    assert_eq!(t["start_offset"], 0);

    // A queue consumer that does not ack leaves the messages pending.
    let consumed = spool(
        s,
        &[
            "consume", "jobs", "--group", "w", "--mode", "queue", "--no-ack", "--format", "json",
        ],
        None,
    );
    let deliveries: Vec<serde_json::Value> = stdout(&consumed)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(deliveries.len(), 3);
    assert_eq!(deliveries[1]["value"], "b");
    assert_eq!(deliveries[1]["delivery"], 1);
    let groups = spool(s, &["group", "list", "jobs", "--format", "json"], None);
    let g: serde_json::Value = serde_json::from_str(&stdout(&groups)).expect("json");
    assert_eq!(
        (
            g[0]["name"].as_str(),
            g[0]["mode"].as_str(),
            g[0]["pending"].as_u64()
        ),
        (Some("w"), Some("queue"), Some(3))
    );

    let seek = spool(
        s,
        &[
            "group", "seek", "jobs", "w", "--to", "2", "--format", "json",
        ],
        None,
    );
    let o: serde_json::Value = serde_json::from_str(&stdout(&seek)).expect("json");
    assert_eq!(o["offset"], 2);
    let g = spool(
        s,
        &["group", "describe", "jobs", "w", "--format", "json"],
        None,
    );
    let g: serde_json::Value = serde_json::from_str(&stdout(&g)).expect("json");
    assert_eq!(
        (g["committed"].as_u64(), g["lag"].as_u64()),
        (Some(2), Some(1))
    );

    let deleted = spool(s, &["delete", "jobs", "2"], None);
    assert!(deleted.status.success(), "{}", stderr(&deleted));
    let replay = spool(s, &["consume", "jobs", "--format", "json"], None);
    // 0 and 1 were completed by the only group (delete_when_consumed), 2 is deleted.
    assert_eq!(stdout(&replay), "");

    let binary = spool(s, &["produce", "bin", "plain"], None);
    assert!(binary.status.success());
    // A deletion in JSON says what went, as every other command does.
    let dropped = spool(
        s,
        &["group", "delete", "jobs", "w", "--format", "json"],
        None,
    );
    assert!(dropped.status.success(), "{}", stderr(&dropped));
    let dropped: serde_json::Value = serde_json::from_str(&stdout(&dropped)).expect("json");
    assert_eq!(dropped["deleted"]["group"], "w");
    let gone = spool(s, &["topic", "delete", "jobs", "--format", "json"], None);
    assert!(gone.status.success(), "{}", stderr(&gone));
    let gone: serde_json::Value = serde_json::from_str(&stdout(&gone)).expect("json");
    assert_eq!(gone["deleted"]["topic"], "jobs");
    let listed = spool(s, &["topic", "list"], None);
    assert!(
        stdout(&listed).starts_with("TOPIC"),
        "aligned table with a header: {}",
        stdout(&listed)
    );
    assert!(!stdout(&listed).contains("jobs"));
}

#[test]
fn bad_input_gets_one_line_and_the_documented_exit_code() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let s = &broker.addr;
    let cases: &[(&[&str], Option<&str>, i32, &str)] = &[
        (&["consume", "nosuch"], None, 1, "nosuch"),
        (&["consume", "t", "--from", "soon"], None, 2, "soon"),
        (
            &["consume", "t", "--from", "@yesterday"],
            None,
            2,
            "@yesterday",
        ),
        (
            &["produce", "t", "--header", "novalue", "x"],
            None,
            2,
            "novalue",
        ),
        (&["produce", "t"], Some(""), 1, "stdin was empty"),
        (&["produce", "bad/name", "x"], None, 1, "bad/name"),
        (&["group", "describe", "t", "nosuch"], None, 1, "nosuch"),
        (&["delete", "t"], None, 2, "OFFSETS"),
        (
            &["topic", "create", "t2", "--fsync", "sometimes"],
            None,
            2,
            "sometimes",
        ),
        (
            &["topic", "create", "t3", "--compact-min-dirty-ratio", "2"],
            None,
            1,
            "compact_min_dirty_ratio",
        ),
        (&["frobnicate"], None, 2, "frobnicate"),
        (&["consume", "t", "--no-ack"], None, 2, "--group"),
        (
            &["consume", "t", "--group", "g", "--no-ack"],
            None,
            2,
            "queue groups only",
        ),
    ];
    let made = spool(s, &["produce", "t", "x"], None);
    assert!(made.status.success(), "{}", stderr(&made));
    for (args, stdin, code, needle) in cases {
        let out = spool(s, args, *stdin);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(*code), "spool {args:?}: {err}");
        assert!(
            err.contains(needle),
            "spool {args:?} should name {needle:?}: {err}"
        );
        assert!(
            !err.contains("panicked") && !err.contains("backtrace"),
            "spool {args:?}: {err}"
        );
        if *code == 1 {
            assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        }
    }
    // An exported but empty SPOOL_TLS_CA is named as such, for the client
    // commands and for bench.
    for args in [&["topic", "list"][..], &["bench", "produce", "--server", s]] {
        let out = Command::new(env!("CARGO_BIN_EXE_spool"))
            .args(args)
            .env("SPOOL_SERVER", s)
            .env("SPOOL_TLS_CA", "")
            .output()
            .expect("run spool");
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains(
                "the file name is empty (an empty SPOOL_TLS_CA in the environment counts too"
            ),
            "{err}"
        );
    }
    let unreachable = spool("127.0.0.1:1", &["topic", "list"], None);
    assert_eq!(unreachable.status.code(), Some(1));
    let err = stderr(&unreachable);
    assert!(
        err.contains("127.0.0.1:1") && err.contains("SPOOL_SERVER"),
        "{err}"
    );
}

/// `spool produce` reading stdin keeps its connection open through a quiet
/// spell longer than the idle timeout, sends what it read after a pause,
/// and splits lines into requests the server takes.
#[test]
fn produce_from_stdin_survives_quiet_input_and_splits_large_input() {
    use std::io::Write;
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("spool.toml");
    std::fs::write(&config, "max_frame_bytes = 1048576\n").expect("config");
    let broker = Broker::start(
        &tmp.path().join("data"),
        &[
            "--idle-timeout-ms",
            "1000",
            "--config",
            config.to_str().expect("utf-8"),
        ],
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["produce", "slow"])
        .env("SPOOL_SERVER", &broker.addr)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn spool");
    let mut pipe = child.stdin.take().expect("stdin");
    pipe.write_all(b"a\n").expect("write");
    pipe.flush().expect("flush");
    // A pause sends what was read.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let early = spool(&broker.addr, &["consume", "slow"], None);
        if stdout(&early) == "a\n" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a pause sends what was read: {}",
            stdout(&early)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Three idle timeouts of quiet input.
    std::thread::sleep(std::time::Duration::from_millis(3000));
    pipe.write_all(b"b\n").expect("write");
    drop(pipe);
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", stderr(&out));
    let read = spool(&broker.addr, &["consume", "slow"], None);
    assert_eq!(stdout(&read), "a\nb\n");

    // 200 lines of 20 000 bytes: 4 MB, past one 1 MiB frame.
    let line = "x".repeat(20_000);
    let input: String = (0..200).map(|_| format!("{line}\n")).collect();
    let out = spool(&broker.addr, &["produce", "big"], Some(&input));
    assert!(out.status.success(), "{}", stderr(&out));
    let read = spool(&broker.addr, &["consume", "big", "--count", "1000"], None);
    assert_eq!(stdout(&read).lines().count(), 200);
}

/// An offline command pointed at a path that is no data directory says so
/// and exits 1, creating nothing there.
#[test]
fn verify_and_compact_refuse_a_path_that_is_no_data_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("nope");
    let path = missing.to_str().expect("utf-8");
    for args in [
        vec!["verify", "--data", path],
        vec!["compact", "--data", path],
    ] {
        let out = spool("127.0.0.1:1", &args, None);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("not a spool data directory"),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(!missing.exists(), "{args:?} created {path}");
    }
    // A data directory out of reach (unreadable; here a topics/ that
    // cannot be resolved) is named as such, with the reason.
    let looped = tmp.path().join("looped");
    std::fs::create_dir(&looped).expect("mkdir");
    std::os::unix::fs::symlink("topics", looped.join("topics")).expect("symlink");
    let path = looped.to_str().expect("utf-8");
    for args in [
        vec!["verify", "--data", path],
        vec!["compact", "--data", path],
    ] {
        let out = spool("127.0.0.1:1", &args, None);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("cannot read data directory") && err.contains("symbolic links"),
            "{args:?}: {err}"
        );
    }
}

/// Runs `spool ARGS` against `server` with its stdout a pipe closed before
/// it writes anything.
fn with_closed_stdout(server: &str, args: &[&str]) -> Output {
    let mut child = spawn_spool(server, args);
    drop(child.stdout.take());
    child.wait_with_output().expect("wait")
}

/// A command whose stdout is closed (`| head`) ends with exit 1 and one
/// line on stderr, not a panic.
#[test]
fn a_closed_stdout_is_an_error_not_a_panic() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let made = spool(&broker.addr, &["produce", "t", "x"], None);
    assert!(made.status.success(), "{}", stderr(&made));
    let out = with_closed_stdout(&broker.addr, &["topic", "list"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    assert!(stderr(&out).contains("writing stdout"), "{}", stderr(&out));
    // `2>&1 | head`: stderr closed as well, or alone on a failing command.
    for (args, closed_stdout) in [
        (&["topic", "list"][..], true),
        (&["consume", "t"][..], true),
        (&["consume", "nosuch"][..], false),
    ] {
        let mut child = spawn_spool(&broker.addr, args);
        if closed_stdout {
            drop(child.stdout.take());
        }
        drop(child.stderr.take());
        let status = child.wait().expect("wait");
        assert_eq!(status.code(), Some(1), "spool {args:?} with stderr closed");
    }
}

/// `--from` with a group that exists moves nothing: the group reads on
/// from where it is, and says so on stderr, so a reader does not take the
/// output for a replay.
#[test]
fn from_with_an_existing_group_says_the_group_reads_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let made = spool(&broker.addr, &["produce", "t"], Some("a\nb\nc\n"));
    assert!(made.status.success(), "{}", stderr(&made));
    let first = spool(
        &broker.addr,
        &["consume", "t", "--group", "s", "--count", "2"],
        None,
    );
    assert_eq!(stdout(&first), "a\nb\n", "{}", stderr(&first));
    let again = spool(
        &broker.addr,
        &["consume", "t", "--group", "s", "--from", "0"],
        None,
    );
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(stdout(&again), "c\n");
    let said = stderr(&again);
    assert!(
        said.contains("group s exists") && said.contains("committed offset 2"),
        "{said}"
    );
    // A replay from past the end prints nothing, exits 0, and says why.
    let past = spool(&broker.addr, &["consume", "t", "--from", "100"], None);
    assert!(past.status.success(), "{}", stderr(&past));
    assert_eq!(stdout(&past), "");
    assert!(
        stderr(&past).contains("--from 100 is past the end of topic t (its next offset is 3)"),
        "{}",
        stderr(&past)
    );
}

/// A server setting out of its range, in the config file or a flag, is
/// refused at start as a usage error (exit 2), naming it.
#[test]
fn serve_refuses_limits_out_of_range() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (setting, line) in [
        ("max_frame_bytes", "max_frame_bytes = 1000"),
        ("max_message_bytes", "max_message_bytes = 0"),
        ("max_batch_messages", "max_batch_messages = 0"),
        ("max_connections", "max_connections = 0"),
        ("max_subscriptions", "max_subscriptions = 0"),
        // Past what the setting's type holds: its own range, not the type's.
        (
            "max_message_bytes 5000000000 is out of range: 1 to 1073741824",
            "max_message_bytes = 5000000000",
        ),
        // Not TOML, and a key that is no setting: where, in one line.
        ("line 1, column 10", "listen = "),
        (
            "line 2, column 1: unknown field `bogus`",
            "fsync = \"always\"\nbogus = 3",
        ),
    ] {
        let config = tmp.path().join("spool.toml");
        std::fs::write(&config, format!("{line}\n")).expect("config");
        let out = Command::new(env!("CARGO_BIN_EXE_spool"))
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .arg("--data")
            .arg(tmp.path().join("data"))
            .stdin(Stdio::null())
            .output()
            .expect("run spool serve");
        assert_eq!(out.status.code(), Some(2), "{line}: {}", stderr(&out));
        assert!(stderr(&out).contains(setting), "{line}: {}", stderr(&out));
        assert_eq!(
            stderr(&out).trim_end().lines().count(),
            1,
            "one line: {}",
            stderr(&out)
        );
        assert!(
            stdout(&out).is_empty(),
            "{line}: it listened: {}",
            stdout(&out)
        );
    }
    for (setting, flags) in [
        (
            "listen: \"127.0.0.1\" is not HOST:PORT",
            ["--listen", "127.0.0.1"],
        ),
        (
            "grpc: \"localhost\" is not HOST:PORT",
            ["--grpc", "localhost"],
        ),
        ("max_open_files 3 is below 16", ["--max-open-files", "3"]),
        ("topic_idle_close_ms", ["--topic-idle-close-ms", "0"]),
        ("max_connections_per_ip", ["--max-connections-per-ip", "0"]),
    ] {
        let listen: &[&str] = if flags[0] == "--listen" {
            &[]
        } else {
            &["--listen", "127.0.0.1:0"]
        };
        let out = Command::new(env!("CARGO_BIN_EXE_spool"))
            .arg("serve")
            .args(listen.iter().chain(flags.iter()))
            .arg("--data")
            .arg(tmp.path().join("data"))
            .stdin(Stdio::null())
            .output()
            .expect("run spool serve");
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(setting),
            "{flags:?}: {}",
            stderr(&out)
        );
        assert!(stdout(&out).is_empty(), "{flags:?}: it listened");
    }
}

/// `spool serve ARGS` run in `cwd`, which must end by itself (within 30 s)
/// without listening: its output.
fn serve_that_refuses(args: &[&std::ffi::OsStr], cwd: &Path, code: i32) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--grpc",
            "off",
            "--metrics",
            "off",
        ])
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run spool serve");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("spool serve {args:?} started (or hung)");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
    assert!(stdout(&out).is_empty(), "it listened: {}", stdout(&out));
    out
}

/// A config file's `data = ""` is refused (it put the data into the
/// working directory, and every second start failed on it), and a config
/// path that names no config file (`/dev/zero`, a FIFO) is refused at once
/// instead of being read until memory runs out or waiting for a writer. A
/// `socketio.key` that is no key stops the start before any listener is
/// announced (it was announced, then never served).
#[test]
fn serve_refuses_an_empty_data_path_and_settings_files_that_are_none() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("spool.toml");
    std::fs::write(&config, "data = \"\"\n").expect("config");
    let fifo = tmp.path().join("fifo.toml");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir(&cwd).expect("cwd");
    // A setting that cannot be is a usage error; a file that cannot be
    // read, a runtime one.
    for (config, said, code) in [
        (config.as_path(), "data is an empty path", 2),
        (Path::new("/dev/zero"), "not a regular file", 1),
        (fifo.as_path(), "not a regular file", 1),
    ] {
        let out = serve_that_refuses(&["--config".as_ref(), config.as_os_str()], &cwd, code);
        let err = stderr(&out);
        assert!(err.contains(said), "{}: {err}", config.display());
    }
    assert_eq!(
        std::fs::read_dir(&cwd).expect("cwd").count(),
        0,
        "nothing written into the working directory"
    );

    let data = tmp.path().join("data");
    std::fs::create_dir(&data).expect("data");
    std::fs::write(data.join("socketio.key"), [7u8; 100]).expect("key");
    let out = serve_that_refuses(
        &[
            "--data".as_ref(),
            data.as_os_str(),
            "--socketio".as_ref(),
            "127.0.0.1:0".as_ref(),
        ],
        &cwd,
        1,
    );
    let err = stderr(&out);
    assert!(err.contains("socketio.key has 100 bytes"), "{err}");

    // A link at LOCK is refused, not written through.
    std::fs::remove_file(data.join("socketio.key")).expect("remove the key");
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, "not spool's").expect("victim");
    let _ = std::fs::remove_file(data.join("LOCK"));
    std::os::unix::fs::symlink(&victim, data.join("LOCK")).expect("link");
    let out = serve_that_refuses(&["--data".as_ref(), data.as_os_str()], &cwd, 1);
    assert!(
        stderr(&out).contains("a link stands there"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "not spool's"
    );
}

/// The group's state as `spool group describe --format json` prints it.
fn group_json(server: &str, topic: &str, group: &str) -> serde_json::Value {
    let out = spool(
        server,
        &["group", "describe", topic, group, "--format", "json"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("json")
}

/// A consumer whose stdout is not read for longer than the broker's idle
/// timeout keeps its connection (its pings go on while it waits to write),
/// prints everything, and acks it: nothing is delivered twice.
#[test]
fn consume_into_a_stalled_pipe_keeps_its_connection() {
    use std::io::Read;
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &["--idle-timeout-ms", "1000"]);
    // 3000 lines of 90 bytes: far more than a pipe holds.
    let input: String = (0..3000)
        .map(|i| format!("{i:05}{}\n", "p".repeat(85)))
        .collect();
    let made = spool(&broker.addr, &["produce", "big"], Some(&input));
    assert!(made.status.success(), "{}", stderr(&made));
    for group in [None, Some("q")] {
        let mut args = vec!["consume", "big"];
        if let Some(g) = group {
            args.extend(["--group", g, "--mode", "queue"]);
        }
        let mut child = spawn_spool(&broker.addr, &args);
        // Stalled for three idle timeouts.
        std::thread::sleep(std::time::Duration::from_millis(3000));
        let mut printed = String::new();
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut printed)
            .expect("read");
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success(), "{group:?}: {}", stderr(&out));
        assert_eq!(printed.lines().count(), 3000, "{group:?}");
    }
    let q = group_json(&broker.addr, "big", "q");
    assert_eq!(q["lag"], 0, "{q}");
    assert_eq!(q["pending"], 0, "{q}");
}

/// Lines of stdin are bytes: one that is not UTF-8 is a message like any
/// other, and every line is stored.
#[test]
fn produce_takes_lines_that_are_not_utf8() {
    use std::io::Write;
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let mut input = Vec::new();
    for i in 0..1500 {
        writeln!(input, "line {i}").expect("write");
    }
    input.extend_from_slice(b"\xff\xfe\n");
    for i in 0..10 {
        writeln!(input, "after {i}").expect("write");
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["produce", "bin", "--print-offsets"])
        .env("SPOOL_SERVER", &broker.addr)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn spool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&input)
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().last(), Some("1510"));
    let read = spool(
        &broker.addr,
        &[
            "consume", "bin", "--from", "1500", "--count", "1", "--format", "json",
        ],
        None,
    );
    let m: serde_json::Value = serde_json::from_slice(&read.stdout).expect("json");
    assert_eq!(m["value_base64"], "//4=", "{m}");
}

/// A second `spool serve` on a data directory in use is told so, naming
/// the pid that holds it, even when it would also collide on the first
/// broker's addresses (as two brokers started with the defaults do).
#[test]
fn a_second_broker_on_the_same_data_directory_names_the_lock_holder() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let first = Broker::start(
        &data,
        &["--grpc", "off", "--metrics", "off", "--socketio", "off"],
    );
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["serve", "--listen", &first.addr])
        .args(["--grpc", "off", "--metrics", "off", "--socketio", "off"])
        .arg("--data")
        .arg(&data)
        .stdin(Stdio::null())
        .output()
        .expect("run spool serve");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let pid = first.child.id().to_string();
    assert!(
        stderr(&out).contains(&format!("locked by pid {pid}")),
        "{}",
        stderr(&out)
    );
    // The first broker goes on serving.
    let listed = spool(&first.addr, &["topic", "list"], None);
    assert!(listed.status.success(), "{}", stderr(&listed));
}

/// `consume --group` into a pipe that closes acknowledges or commits
/// exactly what the pipe took, gives a queue group the rest back at once,
/// and says so. Before, the first failed write ended the command with the
/// whole batch leased for `ack_timeout_ms` (or the stream group's commit
/// left behind what was printed), and the message named nothing done.
#[test]
fn consume_into_a_closed_pipe_settles_exactly_what_it_took() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let made = spool(&broker.addr, &["produce", "t"], Some("a\nb\nc\nd\ne\n"));
    assert!(made.status.success(), "{}", stderr(&made));
    // A pipe closed before the first line: nothing taken.
    for (mode, said) in [
        ("queue", "acknowledged the 0 message(s)"),
        ("stream", "left where it was"),
    ] {
        let out = with_closed_stdout(
            &broker.addr,
            &["consume", "t", "--group", mode, "--mode", mode],
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("Broken pipe") && err.contains(said),
            "{mode}: {err}"
        );
        let group = group_json(&broker.addr, "t", mode);
        assert_eq!(group["committed"], 0, "{mode}: {group}");
        assert_eq!(group["pending"], 0, "{mode}: nothing left leased: {group}");
    }
    // `| head -1`: the pipe takes at least the first line; whatever it took
    // is acknowledged, the rest is not leased.
    let bin = bin_dir();
    let out = shell(
        bin.path(),
        &broker.addr,
        "spool consume t --group q --mode queue | head -1",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a\n");
    let group = group_json(&broker.addr, "t", "q");
    let committed = group["committed"].as_u64().expect("committed");
    assert!(committed >= 1, "{group}");
    assert_eq!(group["pending"], 0, "{group}");
    assert_eq!(group["lag"].as_u64(), Some(5 - committed), "{group}");
    // A pipe that closes after several batches: the message counts what the
    // whole run settled, not only its last batch.
    let lines: String = (0..3000).map(|i| format!("m{i}\n")).collect();
    let made = spool(&broker.addr, &["produce", "many"], Some(&lines));
    assert!(made.status.success(), "{}", stderr(&made));
    for (mode, says) in [("queue", "acknowledged the "), ("stream", "at offset ")] {
        let out = shell(
            bin.path(),
            &broker.addr,
            &format!(
                "spool consume many --group g{mode} --mode {mode} | head -n 1500 >/dev/null; exit ${{PIPESTATUS[0]}}"
            ),
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{mode}: {err}");
        let group = group_json(&broker.addr, "many", &format!("g{mode}"));
        let committed = group["committed"].as_u64().expect("committed");
        assert!(committed >= 1500, "{mode}: {group}");
        let said: u64 = err
            .split(says)
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{mode}: {err}"));
        assert_eq!(said, committed, "{mode}: {err}");
    }
}

/// Lines that come steadily on stdin are sent while it stays open, each
/// within about 100 ms of being read, not held until 1000 have piled up.
#[test]
fn produce_sends_a_steady_trickle_of_lines_as_it_comes() {
    use std::io::Write;
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["produce", "t", "--server", &broker.addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn produce");
    let mut stdin = child.stdin.take().expect("stdin");
    // A line every 20 ms, never a pause of 100 ms, until told to stop (or
    // for at most 20 s), from a thread of its own so the checks below do
    // not pause it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writing = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            for i in 0..1000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                writeln!(stdin, "line {i}").expect("write a line");
                stdin.flush().expect("flush");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        })
    };
    let end = || {
        let out = spool(
            &broker.addr,
            &["topic", "describe", "t", "--format", "json"],
            None,
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v["end_offset"].as_u64())
            .unwrap_or(0)
    };
    let mut stored_while_open = 0;
    while !writing.is_finished() {
        std::thread::sleep(std::time::Duration::from_millis(200));
        stored_while_open = end();
        if stored_while_open > 0 {
            break;
        }
    }
    let still_writing = !writing.is_finished();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writing.join().expect("writer");
    assert!(
        stored_while_open > 0 && still_writing,
        "nothing stored while lines kept coming"
    );
    let done = child.wait_with_output().expect("produce exits");
    assert!(done.status.success(), "{}", stderr(&done));
}

/// A batch printed whose acknowledgement or commit is then refused (here:
/// the group deleted while stdout held the batch; a broker stopping is
/// another) ends the run naming what was settled and what comes again.
#[test]
fn a_refused_settle_says_what_was_printed_and_comes_again() {
    use std::io::{BufRead, Read};
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    // 200 KB in one batch: more than a pipe holds unread.
    let lines: String = (0..100)
        .map(|i| format!("{i:03}{}\n", "x".repeat(2000)))
        .collect();
    let made = spool(&broker.addr, &["produce", "t"], Some(&lines));
    assert!(made.status.success(), "{}", stderr(&made));
    for (mode, says) in [
        (
            "queue",
            "acknowledged the 0 message(s) printed before; the last 100 printed (the first at offset 0, the last at 99) are not acknowledged: the group, if it still exists, delivers them again",
        ),
        (
            "stream",
            "group gstream was not committed: the group, if it still exists, gives what was printed again",
        ),
    ] {
        let group = format!("g{mode}");
        let mut child = Command::new(env!("CARGO_BIN_EXE_spool"))
            .args(["consume", "t", "--group", &group, "--mode", mode])
            .args(["--server", &broker.addr])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn consume");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        // Its first line: the batch is fetched and being printed, into a
        // pipe now full.
        let mut first = String::new();
        out.read_line(&mut first).expect("first line");
        assert!(first.starts_with("000"), "{first}");
        let gone = spool(&broker.addr, &["group", "delete", "t", &group], None);
        assert!(gone.status.success(), "{}", stderr(&gone));
        let mut rest = String::new();
        out.read_to_string(&mut rest).expect("the rest");
        assert_eq!(rest.lines().count(), 99, "the whole batch printed");
        let done = child.wait_with_output().expect("consume exits");
        let err = stderr(&done);
        assert_eq!(done.status.code(), Some(1), "{mode}: {err}");
        assert!(err.contains(says), "{mode}: {err}");
    }
}

/// `spool token create` with a bad name or pattern is a usage error
/// (exit 2, as clap's own are), naming what is wrong.
#[test]
fn token_create_with_bad_arguments_is_a_usage_error() {
    for (args, says) in [
        (&["token", "create", ""][..], "name is empty"),
        (&["token", "create", "t", "--produce", "a*b"][..], "a*b"),
    ] {
        let out = spool("127.0.0.1:1", args, None);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
}

/// A `--server` (or `SPOOL_SERVER`) that is not `HOST:PORT` is a usage
/// error naming the form, not a broker that cannot be reached.
/// A follower whose broker is killed names the broker and what happened
/// (a reset, or a close without a reason), never a bare "connection
/// closed".
#[test]
fn a_follower_whose_broker_is_killed_says_so() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let out = spool(&broker.addr, &["produce", "t"], Some("one\n"));
    assert!(out.status.success(), "{}", stderr(&out));
    let mut follower = spawn_spool(&broker.addr, &["consume", "t", "--follow"]);
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(follower.stdout.take().expect("stdout")),
        &mut first,
    )
    .expect("a first line");
    assert!(first.contains("one"), "{first}");
    let addr = broker.addr.clone();
    broker.kill9();
    let out = follower.wait_with_output().expect("the follower ends");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(
        said.contains(&format!("the broker at {addr} closed the connection"))
            || said.contains(&format!("the connection to the broker at {addr} broke")),
        "{said}"
    );
}

/// Pointed at one of the broker's other listeners, the CLI says what
/// answered there, not that the broker cannot be reached or that a frame
/// has flags it does not support.
#[test]
fn another_listeners_address_is_named_as_such() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    for (addr, answered) in [
        (
            broker.socketio.clone().expect("socket.io"),
            "answered in HTTP/1",
        ),
        (
            broker.metrics.clone().expect("metrics"),
            "answered in HTTP/1",
        ),
        (broker.grpc.clone().expect("gRPC"), "answered in HTTP/2"),
    ] {
        let out = spool(&addr, &["topic", "list"], None);
        assert_eq!(out.status.code(), Some(1), "{addr}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(answered) && stderr(&out).contains("native listener"),
            "{addr}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn a_server_that_is_not_host_and_port_is_a_usage_error() {
    for server in ["127.0.0.1", "localhost", "", "::1"] {
        let out = spool(server, &["topic", "list"], None);
        assert_eq!(out.status.code(), Some(2), "{server:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("is not HOST:PORT"),
            "{server:?}: {}",
            stderr(&out)
        );
    }
    let out = spool(
        "127.0.0.1:1",
        &["bench", "produce", "--server", "127.0.0.1"],
        None,
    );
    assert_eq!(out.status.code(), Some(2), "bench: {}", stderr(&out));
    assert!(
        stderr(&out).contains("is not HOST:PORT"),
        "{}",
        stderr(&out)
    );
}

/// A line of stdin too large for the broker is named by its line number;
/// the lines before it are stored and counted.
#[test]
fn a_line_too_large_is_named_by_its_line() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(tmp.path(), &[]);
    let input = format!("a\nb\n{}\nc\n", "x".repeat(2_000_000));
    let out = spool(&broker.addr, &["produce", "big"], Some(&input));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("line 3 of stdin has 2000000 bytes")
            && err.contains("2 messages were acknowledged before it"),
        "{err}"
    );
    // Too large for a topic's own segments (a limit only the broker
    // knows): the broker names the message, the CLI its line.
    let made = spool(
        &broker.addr,
        &["topic", "create", "small", "--segment-bytes", "1024"],
        None,
    );
    assert!(made.status.success(), "{}", stderr(&made));
    let input = format!("a\nb\n{}\nc\n", "x".repeat(2000));
    let out = spool(&broker.addr, &["produce", "small"], Some(&input));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("topic small takes at most")
            && err.contains("that is line 3 of stdin; the request it was in, lines 1 to 4, was refused whole: none of them was stored")
            && err.contains("no message was acknowledged before it"),
        "{err}"
    );
    let described = spool(&broker.addr, &["topic", "describe", "small"], None);
    let described = String::from_utf8_lossy(&described.stdout);
    assert!(
        described.contains("offsets                    0..0 "),
        "nothing stored: {described}"
    );
    // Past the first batch of a run: counted from the lines before it.
    let lines: String = (0..1500).map(|i| format!("m{i}\n")).collect();
    let input = format!("{lines}{}\n", "x".repeat(2000));
    let out = spool(&broker.addr, &["produce", "small"], Some(&input));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("that is line 1501 of stdin"), "{err}");
}

/// A stored message larger than the broker's frames now carry (stored
/// under a larger `max_frame_bytes`): a follower, replay or stream group,
/// says it skipped it and goes on with the messages after it, as a
/// subscription does; a single read stops there, saying how to go past it.
#[test]
fn a_follower_goes_past_a_message_no_frame_can_carry() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let broker = Broker::start(&data, &[]);
    let big = "b".repeat(200 * 1024);
    let out = spool(
        &broker.addr,
        &["produce", "t"],
        Some(&format!("before\n{big}\nafter\n")),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let (ok, log) = broker.terminate();
    assert!(ok, "clean stop: {log}");
    let config = tmp.path().join("spool.toml");
    std::fs::write(&config, "max_frame_bytes = 65536\n").expect("config");
    let broker = Broker::start(&data, &["--config", config.to_str().expect("utf-8 path")]);

    let once = spool(&broker.addr, &["consume", "t"], None);
    assert_eq!(once.status.code(), Some(1), "{}", stderr(&once));
    assert_eq!(stdout(&once).lines().collect::<Vec<_>>(), ["before"]);
    let said = stderr(&once);
    assert!(
        said.contains("offset 1") && said.contains("--from 2"),
        "{said}"
    );
    let grouped = spool(&broker.addr, &["consume", "t", "--group", "once"], None);
    assert_eq!(grouped.status.code(), Some(1), "{}", stderr(&grouped));
    assert!(
        stderr(&grouped).contains("spool group seek t once --to 2"),
        "{}",
        stderr(&grouped)
    );

    // Each follower prints what is there, then waits for one more.
    let mut expected = vec!["before".to_owned(), "after".to_owned()];
    for (i, group) in [None, Some("readers")].into_iter().enumerate() {
        let count = (expected.len() + 1).to_string();
        let mut args = vec!["consume", "t", "--follow", "--count", &count];
        if let Some(g) = group {
            args.extend(["--group", g]);
        }
        let mut follower = spawn_spool(&broker.addr, &args);
        let mut lines = std::io::BufReader::new(follower.stdout.take().expect("stdout")).lines();
        for want in &expected {
            let line = lines.next().expect("a line").expect("read");
            assert_eq!(&line, want, "{group:?}");
        }
        let later = format!("later-{i}");
        let out = spool(&broker.addr, &["produce", "t", &later], None);
        assert!(out.status.success(), "{}", stderr(&out));
        let line = lines.next().expect("a line").expect("read");
        assert_eq!(line, later, "{group:?}: still following");
        expected.push(later);
        let out = follower.wait_with_output().expect("the follower ends");
        let said = stderr(&out);
        assert!(out.status.success(), "{group:?}: {said}");
        assert!(
            said.contains("skipped") && said.contains("offset 1"),
            "{said}"
        );
    }
    // The stream group committed what its follower printed, past the skip.
    let readers = group_json(&broker.addr, "t", "readers");
    assert_eq!(readers["committed"], 5, "{readers}");
}
