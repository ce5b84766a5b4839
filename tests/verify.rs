//! `spool verify` must find every injected damage in synced data, name the
//! file and byte range, stay quiet on a clean directory, and refuse a
//! directory a broker is using.

mod common;

use spool::storage::io::OsStorage;
use spool::storage::verify::verify;
use spool::storage::{DataDir, FsyncPolicy, LogConfig, NewMessage, RecoveryMode};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn fill(root: &Path) {
    let data = DataDir::open(Arc::new(OsStorage), root).expect("open");
    let config = LogConfig {
        segment_bytes: 2048,
        index_interval_bytes: 128,
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    };
    let log = data
        .open_log("t", config, RecoveryMode::default())
        .expect("log");
    for i in 0..150u32 {
        let msg = NewMessage::from_value(format!("value {i} {}", "x".repeat((i % 40) as usize)))
            .with_key(format!("k{i}"));
        log.append(&[msg]).expect("append");
    }
    log.close().expect("close");
}

fn check(root: &Path) -> spool::storage::verify::VerifyReport {
    let data = DataDir::open(Arc::new(OsStorage), root).expect("open");
    verify(&data, &mut |_| {}).expect("verify runs")
}

#[test]
fn every_single_byte_flip_in_synced_segments_is_found_with_its_position() {
    let tmp = tempfile::tempdir().expect("tempdir");
    fill(tmp.path());
    assert!(
        check(tmp.path()).is_clean(),
        "a clean directory verifies clean"
    );
    let dir = tmp.path().join("topics/t");
    let mut logs: Vec<_> = std::fs::read_dir(&dir)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    assert!(logs.len() >= 3, "several segments");
    let mut flips = 0;
    for log in &logs[..logs.len() - 1] {
        let original = std::fs::read(log).expect("read");
        // Every 7th byte of every sealed segment: headers, keys and values alike.
        for pos in (0..original.len()).step_by(7) {
            let mut damaged = original.clone();
            damaged[pos] ^= 0x10;
            std::fs::write(log, &damaged).expect("damage");
            let report = check(tmp.path());
            let found = report.damage.iter().any(|d| {
                d.file == *log
                    && d.bytes.start <= pos as u64
                    && (pos as u64) < d.bytes.end.max(d.bytes.start + 1)
            });
            assert!(
                found,
                "flip at {} byte {pos} not found: {:?}",
                log.display(),
                report.damage
            );
            flips += 1;
        }
        std::fs::write(log, &original).expect("restore");
    }
    assert!(flips > 500, "{flips} flips checked");
    assert!(check(tmp.path()).is_clean());
}

#[test]
fn a_stale_index_is_a_note_the_next_start_repairs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    fill(tmp.path());
    let dir = tmp.path().join("topics/t");
    let idx = dir.join("00000000000000000000.idx");
    let mut bytes = std::fs::read(&idx).expect("idx");
    assert!(bytes.len() >= 16);
    bytes[12] ^= 0x01; // the second entry's position
    std::fs::write(&idx, &bytes).expect("damage idx");
    let report = check(tmp.path());
    assert!(report.is_clean(), "{:?}", report.damage);
    assert!(
        report.notes.iter().any(|d| d.file == idx),
        "{:?}",
        report.notes
    );
    // The next open rebuilds it: afterwards verify has nothing to note.
    {
        let data = DataDir::open(Arc::new(OsStorage), tmp.path()).expect("open");
        let log = data
            .open_log("t", LogConfig::default(), RecoveryMode::default())
            .expect("log");
        log.close().expect("close");
    }
    let report = check(tmp.path());
    assert!(report.notes.is_empty(), "{:?}", report.notes);
    assert!(report.is_clean(), "{:?}", report.damage);
}

#[test]
fn the_cli_refuses_a_running_broker_and_exits_1_on_damage() {
    let tmp = tempfile::tempdir().expect("tempdir");
    fill(tmp.path());
    let broker = common::Broker::start(tmp.path(), &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["verify", "--data"])
        .arg(tmp.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("locked by pid"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, _) = broker.terminate();
    assert!(ok);

    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["verify", "--data"])
        .arg(tmp.path())
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let log = tmp.path().join("topics/t/00000000000000000000.log");
    let mut bytes = std::fs::read(&log).expect("read");
    bytes[100] ^= 0xff;
    std::fs::write(&log, &bytes).expect("damage");
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["verify", "--format", "json", "--data"])
        .arg(tmp.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    let damage = &report["damage"][0];
    assert!(
        damage["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("00000000000000000000.log"))
    );
    assert!(damage["bytes"]["start"].as_u64().is_some_and(|s| s <= 100));
    assert!(damage["offsets"]["start"].is_u64());
}

/// The progress `verify` reports ends at the total its bar starts from
/// ([`bytes_to_check`]): every file of a topic the broker wrote (segments,
/// indexes, journals, snapshots, checkpoint, settings) is read and counted,
/// and the copies in `quarantine/`, which it does not read, are in neither.
#[test]
fn progress_ends_at_the_total_it_started_from() {
    use spool::broker::topic::Position;
    use spool::groups::GroupMode;
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = common::Broker::start(tmp.path(), &[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = spool::client::Client::connect(&broker.addr, "t")
            .await
            .expect("connect");
        let batch: Vec<NewMessage> = (0..20)
            .map(|i| NewMessage::from_value(format!("m{i}")))
            .collect();
        client.produce("t", batch).await.expect("produce");
        client
            .create_group("t", "s", GroupMode::Stream, Some(Position::Earliest))
            .await
            .expect("stream group");
        client.commit("t", "s", 5).await.expect("commit");
        client
            .create_group("t", "q", GroupMode::Queue, Some(Position::Earliest))
            .await
            .expect("queue group");
        client.delete("t", &[3]).await.expect("delete");
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
    let quarantine = tmp.path().join("topics/t/quarantine");
    std::fs::create_dir_all(&quarantine).expect("quarantine");
    std::fs::write(quarantine.join("00.log.0-10"), [1u8; 10]).expect("a copy set aside");

    let total = spool::storage::verify::bytes_to_check(&OsStorage, tmp.path());
    let data = DataDir::open(Arc::new(OsStorage), tmp.path()).expect("open");
    let mut last = 0;
    let report = verify(&data, &mut |done| last = done).expect("verify runs");
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.bytes, total, "{report:?}");
    assert_eq!(last, total, "the last progress is the total");
}

/// `spool verify` checks a read-only copy (a snapshot, a read-only mount):
/// it opens every file for reading only and takes the lock without writing
/// it, and a broker running on the same files through another mount still
/// keeps it out. Needs root for the bind mount (skipped otherwise).
#[test]
fn verify_checks_a_read_only_mount_and_still_sees_a_running_broker() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("not root: no bind mount; skipping");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let ro = tmp.path().join("ro");
    std::fs::create_dir(&ro).expect("mount point");
    fill(&data);
    let mount = |args: &[&str]| {
        let status = Command::new("mount").args(args).status().expect("mount");
        status.success()
    };
    let (data_s, ro_s) = (data.to_str().expect("utf-8"), ro.to_str().expect("utf-8"));
    if !mount(&["--bind", data_s, ro_s]) {
        eprintln!("bind mounts are not allowed here; skipping");
        return;
    }
    struct Unmount<'a>(&'a str);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(ro_s);
    assert!(mount(&["-o", "remount,ro,bind", ro_s]), "remount read-only");
    let verify_ro = || {
        Command::new(env!("CARGO_BIN_EXE_spool"))
            .args(["verify", "--data", ro_s])
            .output()
            .expect("run")
    };
    let out = verify_ro();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("150 offsets"));

    let broker = common::Broker::start(&data, &[]);
    let out = verify_ro();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("locked by pid"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
}

/// `spool verify` reads files it may not write: segments and the `LOCK`
/// made read-only (mode 0444, as a backup tool may leave them) are checked,
/// not reported as damage or refused. Run as `nobody` when the tests run as root (root
/// writes any file).
#[test]
fn verify_reads_files_it_may_not_write() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let data = root.join("data");
    fill(&data);
    let as_root = rustix::process::geteuid().is_root();
    let mut program = if as_root {
        // Its own copy, which `nobody` can reach wherever the build is.
        let bin = root.join("spool");
        std::fs::copy(env!("CARGO_BIN_EXE_spool"), &bin).expect("copy the binary");
        let status = Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(&data)
            .status()
            .expect("chown");
        assert!(status.success());
        let mut program = Command::new("setpriv");
        program
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin);
        program
    } else {
        Command::new(env!("CARGO_BIN_EXE_spool"))
    };
    let topic = data.join("topics").join("t");
    for entry in std::fs::read_dir(&topic).expect("topic dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "log") {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444))
                .expect("chmod 0444");
        }
    }
    // The LOCK too: verify takes the lock through a descriptor for reading.
    std::fs::set_permissions(data.join("LOCK"), std::fs::Permissions::from_mode(0o444))
        .expect("chmod 0444");
    let out = program
        .args(["verify", "--format", "json", "--data"])
        .arg(&data)
        .output()
        .expect("run verify");
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("\"offsets\":150"), "{report}");
}

/// A `topic.toml` holding a setting this version refuses (one an older
/// spool took at create, say) is reported with the setting and what to do:
/// the topic stays closed until the file is mended.
#[test]
fn a_topic_config_with_a_refused_setting_says_what_to_mend() {
    let tmp = tempfile::tempdir().expect("tempdir");
    fill(tmp.path());
    let config = tmp.path().join("topics/t/topic.toml");
    std::fs::write(&config, "retention_ms = 0\n").expect("write topic.toml");
    let report = check(tmp.path());
    let found = report
        .damage
        .iter()
        .find(|d| d.file == config)
        .unwrap_or_else(|| panic!("{:?}", report.damage));
    let says = &found.detail;
    assert!(
        says.contains("retention_ms")
            && says.contains("the topic stays closed until the file is mended"),
        "{says}"
    );
}
