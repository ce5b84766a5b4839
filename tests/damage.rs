//! Damage is never taken for a torn write: through the real binary, a byte
//! flipped in synced data, a journal cut short, or a file that went missing
//! makes `spool verify` exit 1 and `spool serve` refuse to open the topic, naming the
//! file, and `--recovery skip-damaged` starts without ever handing out an
//! offset twice or undoing a confirmed ack or commit.

mod common;

use common::Broker;
use spool::broker::topic::Position;
use spool::client::Client;
use spool::groups::GroupMode;
use spool::protocol::pb;
use spool::storage::NewMessage;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TOPIC: &str = "t";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A value of 1.5 KB, whose record holds whole 512-byte sectors.
fn big_value(i: u64) -> String {
    format!("message-{i:03}-{}", "w".repeat(1500))
}

fn value(i: u64) -> String {
    format!("message-{i:03}-{}", "v".repeat(40))
}

/// Produces `count` messages (fsync=always) to a topic of `segment_bytes`
/// (0: the default), lets stream group `s` commit and queue group `q` ack
/// all of them, then stops the broker with SIGTERM.
fn fill(data: &Path, segment_bytes: u64, count: u64) {
    let broker = Broker::start(data, &[]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "fill")
            .await
            .expect("connect");
        if segment_bytes > 0 {
            client
                .create_topic(
                    TOPIC,
                    spool::protocol::pb::TopicConfig {
                        segment_bytes: Some(segment_bytes),
                        ..Default::default()
                    },
                )
                .await
                .expect("create topic");
        }
        for i in 0..count {
            client
                .produce(TOPIC, vec![NewMessage::from_value(value(i))])
                .await
                .expect("produce");
        }
        client
            .create_group(TOPIC, "s", GroupMode::Stream, Some(Position::Earliest))
            .await
            .expect("stream group");
        client
            .create_group(TOPIC, "q", GroupMode::Queue, Some(Position::Earliest))
            .await
            .expect("queue group");
        client.commit(TOPIC, "s", count).await.expect("commit");
        let mut acked = 0;
        while acked < count {
            let offsets = common::queue_fetch(&client, TOPIC, "q", 1000).await;
            assert!(!offsets.is_empty(), "queue group gets every message");
            client.ack(TOPIC, "q", &offsets, None).await.expect("ack");
            acked += offsets.len() as u64;
        }
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "clean stop: {logs}");
}

fn topic_dir(data: &Path) -> PathBuf {
    data.join("topics").join(TOPIC)
}

fn files_with(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    files
}

fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).expect("read");
    bytes[at] ^= 0x20;
    std::fs::write(path, bytes).expect("write");
}

/// Position of `needle` in `path`.
fn find(path: &Path, needle: &str) -> usize {
    let bytes = std::fs::read(path).expect("read");
    bytes
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .unwrap_or_else(|| panic!("{needle} in {}", path.display()))
}

fn spool(args: &[&str], data: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(args)
        .arg("--data")
        .arg(data)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run spool")
}

fn verify(data: &Path) -> (Option<i32>, serde_json::Value) {
    let out = spool(&["verify", "--format", "json"], data);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify prints JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), report)
}

/// `spool serve` on `data` starts (damage in one topic never keeps the
/// others from being served), and the damaged topic is refused when it is
/// opened: a request to it answers `DATA_LOSS` naming `needle` and the flag
/// that opens it anyway, and the log says the same.
fn serve_refuses(data: &Path, needle: &str) {
    let broker = Broker::start(data, &[]);
    let error = rt().block_on(async {
        let client = Client::connect(&broker.addr, "damage")
            .await
            .expect("the broker serves");
        match client.describe_topic(TOPIC).await {
            Ok(info) => {
                panic!("a damaged topic was opened (wanted a refusal naming {needle}): {info:?}")
            }
            Err(e) => e,
        }
    });
    let message = error.to_string();
    assert_eq!(
        error.code(),
        Some(spool::protocol::pb::Code::DataLoss),
        "{message}"
    );
    assert!(
        message.contains(needle),
        "the error names {needle}: {message}"
    );
    assert!(
        message.contains("skip-damaged"),
        "the error names the flag that opens it anyway: {message}"
    );
    let (_, logs) = broker.terminate();
    assert!(logs.contains(needle), "the log names {needle}: {logs}");
}

fn damage_files(report: &serde_json::Value) -> Vec<String> {
    report["damage"]
        .as_array()
        .expect("damage list")
        .iter()
        .filter_map(|d| d["file"].as_str().map(str::to_owned))
        .collect()
}

/// Creates the topic under fsync policy `fsync`.
async fn create_with_fsync(client: &Client, fsync: &str) {
    client
        .create_topic(
            TOPIC,
            pb::TopicConfig {
                fsync: Some(fsync.into()),
                ..Default::default()
            },
        )
        .await
        .expect("create topic");
}

async fn describe(client: &Client, group: &str) -> spool::protocol::pb::GroupInfo {
    client.describe_group(TOPIC, group).await.expect("describe")
}

#[test]
fn a_flipped_byte_in_the_last_record_after_a_clean_stop_is_damage() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path();
    fill(data, 0, 10);
    let active = files_with(&topic_dir(data), "log")
        .pop()
        .expect("a segment");
    flip(&active, find(&active, &value(9)) + 20);

    let (code, report) = verify(data);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report["torn_tails"]
            .as_array()
            .is_some_and(|t| t.is_empty())
    );
    let damage = &report["damage"][0];
    assert!(damage["file"].as_str().is_some_and(|f| f.ends_with(".log")));
    assert_eq!(damage["offsets"]["start"].as_u64(), Some(9), "{report}");
    serve_refuses(data, "00000000000000000000.log");

    // Skip-damaged quarantines offset 9 and never hands it out again; the
    // groups keep what they confirmed.
    let broker = Broker::start(data, &["--recovery", "skip-damaged"]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "after")
            .await
            .expect("connect");
        let produced = client
            .produce(TOPIC, vec![NewMessage::from_value("new")])
            .await
            .expect("produce");
        assert!(
            produced.first_offset >= 10,
            "offset {} reused",
            produced.first_offset
        );
        assert_eq!(describe(&client, "s").await.committed, 10);
        assert_eq!(describe(&client, "q").await.committed, 10);
        let all = common::replay_all(&client, TOPIC).await;
        assert!(
            all.iter().all(|m| m.message.offset.0 != 9),
            "the damaged record is not served"
        );
        assert_eq!(all.len(), 10, "0..9 and the new message");
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
}

/// Under `fsync=never` nothing of the active segment past its recovery
/// point was promised to survive a power cut, and a disk may write a later
/// page and lose an earlier one: bad bytes there with valid records after
/// them are set aside by a plain start (not refused as damage), the records
/// after them kept and no offset handed out twice; `verify` calls it a note.
#[test]
fn a_hole_in_the_unsynced_tail_is_set_aside_by_a_plain_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path();
    let broker = Broker::start(data, &[]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "fill")
            .await
            .expect("connect");
        create_with_fsync(&client, "never").await;
        // Records of 1.5 KB: one holds whole 512-byte sectors.
        for i in 0..20 {
            client
                .produce(TOPIC, vec![NewMessage::from_value(big_value(i))])
                .await
                .expect("produce");
        }
        for i in 20..60 {
            client
                .produce(TOPIC, vec![NewMessage::from_value(value(i))])
                .await
                .expect("produce");
        }
        // Sixty commits: a journal of a few sectors.
        client
            .create_group(TOPIC, "s", GroupMode::Stream, Some(Position::Earliest))
            .await
            .expect("stream group");
        for to in 1..=60 {
            client.commit(TOPIC, "s", to).await.expect("commit");
        }
    });
    broker.kill9();
    // What a power cut that kept later pages and lost an earlier one
    // leaves (`kill -9` alone keeps the page cache; a block the disk never
    // wrote reads as zeros): a sector of offset 5's record, and the
    // journal's second sector, with entries after it.
    let lose_sector = |path: &Path, from: usize| {
        let mut bytes = std::fs::read(path).expect("read");
        let from = from.div_ceil(512) * 512;
        assert!(
            bytes.len() >= from + 1024,
            "test setup: bytes after the sector"
        );
        bytes[from..from + 512].fill(0);
        std::fs::write(path, bytes).expect("write");
    };
    let active = files_with(&topic_dir(data), "log")
        .pop()
        .expect("a segment");
    lose_sector(&active, find(&active, &big_value(5)[..12]));
    lose_sector(&topic_dir(data).join("groups/s.journal"), 512);

    let (code, report) = verify(data);
    assert_eq!(code, Some(0), "{report}");
    assert!(
        report["damage"].as_array().is_some_and(|d| d.is_empty()),
        "{report}"
    );
    let note = report["notes"]
        .as_array()
        .and_then(|n| {
            n.iter()
                .find(|n| n["file"].as_str().is_some_and(|f| f.ends_with(".log")))
        })
        .unwrap_or_else(|| panic!("a note on the segment: {report}"));
    assert_eq!(note["offsets"]["start"].as_u64(), Some(5), "{report}");
    assert!(
        note["detail"]
            .as_str()
            .is_some_and(|d| d.contains("out of order")),
        "{report}"
    );
    assert!(
        report["notes"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| {
                n["file"].as_str().is_some_and(|f| f.ends_with("s.journal"))
                    && n["detail"]
                        .as_str()
                        .is_some_and(|d| d.contains("out of order"))
            })),
        "a note on the journal: {report}"
    );

    let broker = Broker::start(data, &[]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "after")
            .await
            .expect("connect");
        let all = common::replay_all(&client, TOPIC).await;
        let offsets: Vec<u64> = all.iter().map(|m| m.message.offset.0).collect();
        let want: Vec<u64> = (0..60).filter(|&o| o != 5).collect();
        assert_eq!(offsets, want, "every record but the one in the hole");
        assert_eq!(
            describe(&client, "s").await.committed,
            60,
            "the entries after the lost sector kept"
        );
        let produced = client
            .produce(TOPIC, vec![NewMessage::from_value("new")])
            .await
            .expect("produce");
        assert_eq!(produced.first_offset, 60, "no offset reused");
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
    assert!(
        logs.contains("set aside a hole in the unsynced tail of the active segment")
            && logs.contains("set aside a hole in the unsynced tail of a journal"),
        "logged: {logs}"
    );
    let quarantined = std::fs::read_dir(topic_dir(data).join("quarantine"))
        .expect("a quarantine folder")
        .count();
    assert_eq!(quarantined, 1, "the hole's bytes are kept");
    let quarantined = std::fs::read_dir(topic_dir(data).join("groups/quarantine"))
        .expect("a quarantine folder for the group")
        .count();
    assert_eq!(quarantined, 1, "the bad entry's bytes are kept");
    let (code, report) = verify(data);
    assert_eq!(code, Some(0), "clean after the start: {report}");
}

#[test]
fn a_damaged_or_cut_group_journal_tail_is_damage_not_a_torn_write() {
    for how in ["flip", "cut", "zero"] {
        let cut = how == "cut";
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path();
        fill(data, 0, 150);
        let journal = topic_dir(data).join("groups/s.journal");
        let len = std::fs::metadata(&journal).expect("journal").len();
        match how {
            "cut" => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&journal)
                    .expect("open");
                file.set_len(len - 5).expect("cut");
            }
            "flip" => flip(&journal, len as usize - 3),
            _ => {
                // The last entry zeroed in place, the length kept.
                let mut bytes = std::fs::read(&journal).expect("read");
                let (mut pos, mut last) = (0, 0);
                while let Ok(spool::storage::record::Frame::Record(r)) =
                    spool::storage::record::decode(&bytes[pos..], u32::MAX)
                {
                    last = pos;
                    pos += r.len as usize;
                }
                bytes[last..].fill(0);
                std::fs::write(&journal, bytes).expect("write");
            }
        }
        let (code, report) = verify(data);
        assert_eq!(code, Some(1), "cut={cut}: {report}");
        assert!(
            damage_files(&report)
                .iter()
                .any(|f| f.ends_with("s.journal")),
            "{report}"
        );
        serve_refuses(data, "s.journal");

        // Skip-damaged gives up the last entry: the commit may go back (a
        // redelivery is allowed), the broker starts, the other group is intact.
        let broker = Broker::start(data, &["--recovery", "skip-damaged"]);
        rt().block_on(async {
            let client = Client::connect(&broker.addr, "after")
                .await
                .expect("connect");
            assert_eq!(describe(&client, "q").await.committed, 150);
            let produced = client
                .produce(TOPIC, vec![NewMessage::from_value("new")])
                .await
                .expect("produce");
            assert_eq!(produced.first_offset, 150);
        });
        let (ok, logs) = broker.terminate();
        assert!(ok, "{logs}");
        let (code, report) = verify(data);
        assert_eq!(
            code,
            Some(0),
            "after skip-damaged the directory verifies: {report}"
        );
    }
}

#[test]
fn skip_damaged_keeps_the_valid_entries_around_a_damaged_journal_entry() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path();
    fill(data, 0, 20);
    let journal = topic_dir(data).join("groups/q.journal");
    let len = std::fs::metadata(&journal).expect("journal").len() as usize;
    // An entry in the middle: the creation entries come first, acks after.
    flip(&journal, len / 2);
    let (code, report) = verify(data);
    assert_eq!(code, Some(1), "{report}");
    serve_refuses(data, "q.journal");
    let broker = Broker::start(data, &["--recovery", "skip-damaged"]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "after")
            .await
            .expect("connect");
        let q = describe(&client, "q").await;
        assert_eq!(
            q.mode,
            spool::protocol::pb::GroupMode::Queue as i32,
            "still a queue group"
        );
        assert!(q.lag <= 20, "{q:?}");
        assert_eq!(describe(&client, "s").await.committed, 20);
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
    assert!(
        logs.contains("quarantined"),
        "the log says what was skipped: {logs}"
    );
    assert!(
        topic_dir(data).join("groups/quarantine").is_dir(),
        "the damaged entry is kept aside"
    );
}

/// A copy whose group journals were taken after its segments (a live
/// directory copied file by file) speaks of offsets its log does not hold:
/// verify reports it as the broker refuses it, not as clean.
#[test]
fn group_state_past_the_log_s_end_is_damage_to_verify_as_to_serve() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("live");
    fill(&data, 0, 20);
    let copy = tmp.path().join("copy");
    let cp = |from: &Path, to: &Path| {
        let done = Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .expect("run cp");
        assert!(done.success());
    };
    cp(&data, &copy);
    let broker = Broker::start(&data, &[]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "more")
            .await
            .expect("connect");
        let more = (20..30).map(|i| NewMessage::from_value(value(i))).collect();
        client.produce(TOPIC, more).await.expect("produce");
        client.commit(TOPIC, "s", 30).await.expect("commit");
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
    // The later group journals over the earlier segments.
    let groups = topic_dir(&copy).join("groups");
    std::fs::remove_dir_all(&groups).expect("remove groups");
    cp(&topic_dir(&data).join("groups"), &groups);

    let (code, report) = verify(&copy);
    assert_eq!(code, Some(1), "{report}");
    let text = report["damage"].to_string();
    assert!(
        text.contains("the log ends at offset 20, but offsets up to 30 were handed out"),
        "{report}"
    );
    serve_refuses(&copy, "were handed out");
    // The live directory itself verifies clean.
    let (code, report) = verify(&data);
    assert_eq!(code, Some(0), "{report}");
}

/// A topic refused in the default mode stays refused: the refusal must not
/// take the clean stop away, or the next request would judge the same
/// files by the rules of an unclean stop (under `interval`, offsets handed
/// out past the log's end are then taken for a power cut's loss) and open
/// the topic, giving the range up without `--recovery skip-damaged`.
#[test]
fn a_refused_topic_stays_refused_request_after_request() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path();
    let broker = Broker::start(data, &[]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "fill")
            .await
            .expect("connect");
        create_with_fsync(&client, "interval:50").await;
        let ten = (0..10).map(|i| NewMessage::from_value(value(i))).collect();
        client.produce(TOPIC, ten).await.expect("produce");
        client.delete(TOPIC, &[2]).await.expect("delete");
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
    // The last deletion made to speak of offset 10, past the log's end.
    garble_last_entry(&topic_dir(data).join("deletes.journal"), |_| {
        [10u64.to_le_bytes(), 11u64.to_le_bytes()].concat()
    });
    let (code, report) = verify(data);
    assert_eq!(code, Some(1), "{report}");

    let broker = Broker::start(data, &[]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "again")
            .await
            .expect("connect");
        for attempt in 0..3 {
            let refused = client
                .describe_topic(TOPIC)
                .await
                .expect_err("the damaged topic is refused");
            assert_eq!(
                refused.code(),
                Some(pb::Code::DataLoss),
                "attempt {attempt}: {refused}"
            );
        }
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
    let (code, report) = verify(data);
    assert_eq!(code, Some(1), "still damage after the refusals: {report}");
}

/// Makes a bad payload of a good one.
type Garble = fn(&[u8]) -> Vec<u8>;

/// Replaces the payload of the last entry of the journal at `path` with
/// what `garble` makes of it, the entry's checksum made to match; returns
/// the entry's byte range as rewritten.
fn garble_last_entry(path: &Path, garble: Garble) -> std::ops::Range<u64> {
    use spool::storage::record::{self, Frame};
    let bytes = std::fs::read(path).expect("read journal");
    let (mut pos, mut last) = (0, None);
    while let Ok(Frame::Record(r)) = record::decode(&bytes[pos..], u32::MAX) {
        last = Some((pos, r.offset, r.value.to_vec()));
        pos += r.len as usize;
    }
    let (at, seq, payload) = last.expect("the journal holds an entry");
    let mut out = bytes[..at].to_vec();
    record::encode(&mut out, seq, 0, &NewMessage::from_value(garble(&payload)));
    let end = out.len() as u64;
    out.extend_from_slice(&bytes[pos..]);
    std::fs::write(path, out).expect("write journal");
    at as u64..end
}

/// An entry whose checksum holds but whose content does not parse (an
/// unknown tag, deletions that are not whole pairs) is damage where it
/// lies, like one whose checksum fails: verify names its bytes, serve
/// refuses the topic naming them, and skip-damaged sets just that entry
/// aside and keeps the others.
#[test]
fn a_journal_entry_that_passes_its_checksum_but_does_not_parse_is_damage() {
    let cases: [(&str, Garble); 2] = [
        ("groups/q.journal", |p| {
            let mut p = p.to_vec();
            p[0] = 9;
            p
        }),
        ("deletes.journal", |p| {
            let mut p = p.to_vec();
            p.push(0);
            p
        }),
    ];
    for (file, garble) in cases {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path();
        fill(data, 0, 20);
        let broker = Broker::start(data, &[]);
        rt().block_on(async {
            let client = Client::connect(&broker.addr, "delete")
                .await
                .expect("connect");
            client.delete(TOPIC, &[3]).await.expect("delete");
            client.delete(TOPIC, &[5]).await.expect("delete");
        });
        let (ok, logs) = broker.terminate();
        assert!(ok, "{logs}");
        let journal = topic_dir(data).join(file);
        let bytes = garble_last_entry(&journal, garble);

        let (code, report) = verify(data);
        assert_eq!(code, Some(1), "{file}: {report}");
        let found = report["damage"]
            .as_array()
            .expect("damage list")
            .iter()
            .find(|d| d["file"].as_str().is_some_and(|f| f.ends_with(file)))
            .unwrap_or_else(|| panic!("{file} reported: {report}"));
        assert!(
            found["detail"]
                .as_str()
                .is_some_and(|d| d.contains("passed its checksum but does not parse")),
            "{found}"
        );
        assert_eq!(
            (
                found["bytes"]["start"].as_u64(),
                found["bytes"]["end"].as_u64()
            ),
            (Some(bytes.start), Some(bytes.end)),
            "{found}"
        );
        serve_refuses(data, &format!("bytes {}..{}", bytes.start, bytes.end));

        let broker = Broker::start(data, &["--recovery", "skip-damaged"]);
        rt().block_on(async {
            let client = Client::connect(&broker.addr, "after")
                .await
                .expect("connect");
            let q = describe(&client, "q").await;
            assert_eq!(q.mode, pb::GroupMode::Queue as i32, "{file}: {q:?}");
            assert_eq!(describe(&client, "s").await.committed, 20, "{file}");
            let replay = common::replay_all(&client, TOPIC).await;
            let offsets: Vec<u64> = replay.iter().map(|m| m.message.offset.0).collect();
            assert!(!offsets.contains(&3), "{file}: the first deletion is kept");
        });
        let (ok, logs) = broker.terminate();
        assert!(ok, "{logs}");
        assert!(logs.contains("quarantined"), "{file}: {logs}");
        let (code, report) = verify(data);
        assert_eq!(code, Some(0), "{file}, after skip-damaged: {report}");
    }
}

/// Breaks one file of a topic's folder.
type Damage = fn(&Path);

/// Each file a topic owns, removed or garbled, is reported by verify and
/// refused by serve; skip-damaged starts and never reuses an offset.
#[test]
fn missing_and_malformed_files_are_seen_by_verify_and_serve() {
    let cases: [(&str, Damage); 5] = [
        ("topic.toml", |dir| {
            std::fs::write(dir.join("topic.toml"), "this is = = not toml").expect("garble")
        }),
        ("topic.toml", |dir| {
            std::fs::remove_file(dir.join("topic.toml")).expect("remove")
        }),
        ("s.journal", |dir| {
            std::fs::remove_file(dir.join("groups/s.journal")).expect("remove")
        }),
        ("00000000000000000000.log", |dir| {
            std::fs::remove_file(files_with(dir, "log")[0].clone()).expect("remove sealed")
        }),
        (".log", |dir| {
            std::fs::remove_file(files_with(dir, "log").pop().expect("active"))
                .expect("remove active")
        }),
    ];
    for (i, (needle, damage)) in cases.into_iter().enumerate() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path();
        fill(data, 2048, 60);
        assert!(
            files_with(&topic_dir(data), "log").len() >= 3,
            "several segments"
        );
        damage(&topic_dir(data));
        let (code, report) = verify(data);
        assert_eq!(code, Some(1), "case {i}: {report}");
        assert!(
            damage_files(&report).iter().any(|f| f.ends_with(needle)),
            "case {i} names {needle}: {report}"
        );
        if i == 0 {
            // A config that does not parse keeps the topic closed in any
            // mode; the broker serves the rest.
            for mode in ["tolerate-torn-tail", "skip-damaged"] {
                let broker = Broker::start(data, &["--recovery", mode]);
                let error = rt().block_on(async {
                    let client = Client::connect(&broker.addr, "t").await.expect("connect");
                    client
                        .describe_topic(TOPIC)
                        .await
                        .expect_err("a topic with a broken config does not open")
                });
                assert!(error.to_string().contains("topic.toml"), "{error}");
            }
            // A topic that cannot be opened can still be deleted.
            let broker = Broker::start(data, &[]);
            rt().block_on(async {
                let client = Client::connect(&broker.addr, "t").await.expect("connect");
                client
                    .delete_topic(TOPIC)
                    .await
                    .expect("a damaged topic is deleted");
                let gone = client.describe_topic(TOPIC).await.expect_err("deleted");
                assert_eq!(
                    gone.code(),
                    Some(spool::protocol::pb::Code::NotFound),
                    "{gone}"
                );
            });
            assert!(!topic_dir(data).exists(), "its folder is gone");
            continue;
        }
        serve_refuses(data, needle);
        let broker = Broker::start(data, &["--recovery", "skip-damaged"]);
        rt().block_on(async {
            let client = Client::connect(&broker.addr, "after")
                .await
                .expect("connect");
            let produced = client
                .produce(TOPIC, vec![NewMessage::from_value("new")])
                .await
                .expect("produce");
            assert!(
                produced.first_offset >= 60,
                "case {i}: offset {} handed out again",
                produced.first_offset
            );
        });
        let (ok, logs) = broker.terminate();
        assert!(ok, "case {i}: {logs}");
    }
}

/// Files spool did not write, dropped into a data directory after a clean
/// stop: a journal in a topic's `groups/` is no group (the clean stop's
/// checkpoint lists every group), and a file among the topic folders is no
/// topic, nor is a folder there holding nothing a topic writes. Before, the
/// journal became a group `zz`, the file stopped `verify` and `compact
/// --data` with "Not a directory", and each folder became a topic with the
/// default config.
#[test]
fn stray_files_are_neither_groups_nor_topics() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path();
    fill(data, 0, 20);
    let stray = topic_dir(data).join("groups/zz.journal");
    std::fs::write(&stray, [0x5a; 100]).expect("stray journal");
    std::fs::write(data.join("topics/notes.txt"), "not a topic").expect("stray file");
    // Folders no topic wrote: an empty one, and one holding other files.
    std::fs::create_dir(data.join("topics/empty")).expect("empty folder");
    std::fs::create_dir(data.join("topics/backup")).expect("foreign folder");
    std::fs::write(data.join("topics/backup/README"), "old files").expect("foreign file");

    let (code, report) = verify(data);
    assert_eq!(code, Some(0), "strays are notes: {report}");
    let notes: Vec<String> = report["notes"]
        .as_array()
        .expect("notes")
        .iter()
        .filter_map(|n| n["file"].as_str().map(str::to_owned))
        .collect();
    assert!(notes.iter().any(|f| Path::new(f) == stray), "{report}");
    assert_eq!(report["topics"], 1, "{report}");
    let compact = spool(&["compact"], data);
    assert!(
        compact.status.success(),
        "compact --data: {}",
        String::from_utf8_lossy(&compact.stderr)
    );

    // Twice: the second start follows a kill -9, whose checkpoint lists
    // no groups to go by, so the journal must be out of the way by then.
    for round in 0..2 {
        let broker = Broker::start(data, &[]);
        rt().block_on(async {
            let client = Client::connect(&broker.addr, "t").await.expect("connect");
            let groups: Vec<String> = client
                .list_groups(TOPIC)
                .await
                .expect("list groups")
                .into_iter()
                .map(|g| g.name)
                .collect();
            assert_eq!(
                groups,
                ["q", "s"],
                "round {round}: no group from the stray journal"
            );
            let topics: Vec<String> = client
                .list_topics()
                .await
                .expect("list topics")
                .into_iter()
                .map(|t| t.name)
                .collect();
            assert_eq!(topics, [TOPIC], "no topic from the stray file or folders");
            if round == 1 {
                let refused = client
                    .create_topic("backup", pb::TopicConfig::default())
                    .await
                    .expect_err("a foreign folder is in the way");
                assert!(refused.to_string().contains("backup"), "{refused}");
                client
                    .create_topic("empty", pb::TopicConfig::default())
                    .await
                    .expect("an empty folder makes way");
            }
        });
        let logs = broker.kill9();
        assert!(!logs.contains("panicked"), "{logs}");
    }
    assert!(!stray.exists(), "moved out of groups/");
    assert!(
        !data.join("topics/backup/topic.toml").exists(),
        "nothing written into a folder no topic wrote"
    );
    assert!(data.join("topics/backup/README").exists());
    let quarantined: Vec<String> = std::fs::read_dir(topic_dir(data).join("quarantine"))
        .expect("a quarantine folder")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    assert!(
        quarantined
            .iter()
            .any(|n| n.starts_with("group-zz.") && n.ends_with(".journal")),
        "into quarantine/: {quarantined:?}"
    );
}

/// An offline `spool compact` that fails (a topic that does not exist)
/// changes nothing, and keeps the record of the last clean stop: before,
/// it took the `clean-stop` marker away, so the next start scanned every
/// topic as after a crash.
#[test]
fn a_failed_offline_compaction_keeps_the_clean_stop_marker() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path();
    fill(data, 0, 10);
    assert!(data.join("clean-stop").exists(), "the stop was clean");
    let out = spool(&["compact", "nosuch"], data);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nosuch"),
        "{out:?}"
    );
    assert!(data.join("clean-stop").exists(), "still recorded as clean");
}

#[test]
fn indexes_are_notes_the_next_start_rebuilds_and_tix_damage_names_the_tix() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path();
    fill(data, 0, 600);
    let dir = topic_dir(data);
    let idx = files_with(&dir, "idx")[0].clone();
    let tix = files_with(&dir, "tix")[0].clone();
    let idx_len = std::fs::metadata(&idx).expect("idx").len();
    assert!(idx_len >= 16, "an index with entries");
    // The second offset entry's position.
    flip(&idx, 12);
    // A time index of odd length is malformed.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&tix)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &[1, 2, 3]))
        .expect("garble tix");

    let (code, report) = verify(data);
    assert_eq!(code, Some(0), "notes do not fail verify: {report}");
    let notes: Vec<String> = report["notes"]
        .as_array()
        .expect("notes")
        .iter()
        .filter_map(|n| n["file"].as_str().map(str::to_owned))
        .collect();
    assert!(notes.iter().any(|f| Path::new(f) == idx), "{report}");
    assert!(
        notes.iter().any(|f| Path::new(f) == tix),
        "tix named: {report}"
    );
    let strict = spool(&["verify", "--strict"], data);
    assert_eq!(strict.status.code(), Some(1), "--strict fails on notes");

    // Opening the topic (its first use after a start) rebuilds both.
    let broker = Broker::start(data, &[]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "t").await.expect("connect");
        client.describe_topic(TOPIC).await.expect("the topic opens");
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
    assert!(
        logs.lines()
            .any(|l| l.contains("index malformed") && l.contains(&*tix.to_string_lossy())),
        "the malformed file is the one named: {logs}"
    );
    let strict = spool(&["verify", "--strict"], data);
    assert_eq!(
        strict.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&strict.stdout)
    );

    // The active segment's index files gone (they are made with it): notes
    // too, which the next start rebuilds.
    std::fs::remove_file(&idx).expect("remove idx");
    std::fs::remove_file(&tix).expect("remove tix");
    let (code, report) = verify(data);
    assert_eq!(code, Some(0), "{report}");
    let notes = report["notes"].to_string();
    for file in [&idx, &tix] {
        assert!(
            notes.contains(&*file.to_string_lossy()),
            "{} named: {report}",
            file.display()
        );
    }
}

/// A sealed segment zeroed in place (whole, or from a record boundary on)
/// is damage, not the zeros a seal cut short leaves: verify says so, serve
/// refuses the topic naming the file, and skip-damaged opens it without the
/// zeroed offsets and never hands them out again.
#[test]
fn a_sealed_segment_zeroed_in_place_is_damage() {
    for whole in [true, false] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path();
        fill(data, 1024, 40);
        let segments = files_with(&topic_dir(data), "log");
        assert!(segments.len() >= 3, "{segments:?}");
        let first = &segments[0];
        let mut bytes = std::fs::read(first).expect("read");
        // From the start, or from the record of message 3 on.
        let from = if whole {
            0
        } else {
            find(first, &value(3)) - 32
        };
        bytes[from..].fill(0);
        std::fs::write(first, bytes).expect("write");

        let (code, report) = verify(data);
        assert_eq!(code, Some(1), "{report}");
        assert_eq!(
            damage_files(&report),
            [first.display().to_string()],
            "{report}"
        );
        let next_base: u64 = segments[1]
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse().ok())
            .expect("a segment named by its base");
        serve_refuses(data, "00000000000000000000.log");

        let broker = Broker::start(data, &["--recovery", "skip-damaged"]);
        rt().block_on(async {
            let client = Client::connect(&broker.addr, "after")
                .await
                .expect("connect");
            let all = common::replay_all(&client, TOPIC).await;
            let lost = if whole { 0 } else { 3 };
            assert!(
                all.iter()
                    .all(|m| m.message.offset.0 < lost || m.message.offset.0 >= next_base),
                "the zeroed records are not served"
            );
            assert_eq!(all.len() as u64, lost + 40 - next_base, "the others are");
            let produced = client
                .produce(TOPIC, vec![NewMessage::from_value("new")])
                .await
                .expect("produce");
            assert_eq!(produced.first_offset, 40, "no offset is reused");
        });
        let (ok, logs) = broker.terminate();
        assert!(ok, "{logs}");
    }
}

/// `spool serve --recovery skip-damaged` on `data` opens the 50 messages of
/// [`fill`] with the damaged `what` given up, and stops cleanly.
fn every_message_under_skip_damaged(data: &Path, what: &str) {
    let broker = Broker::start(data, &["--recovery", "skip-damaged"]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "t").await.expect("connect");
        let all = common::replay_all(&client, TOPIC).await;
        assert_eq!(all.len(), 50, "every message, the {what} given up");
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
}

/// A file far larger than its kind ever is (a sparse 1 TiB file where an
/// index or a checkpoint belongs) is refused by its size, never read into
/// memory: the broker stays up, an oversized index is a note for `verify`
/// and is rebuilt when the topic opens, an oversized checkpoint is damage
/// that names the file.
#[test]
fn a_huge_file_where_a_small_one_belongs_is_refused_by_its_size() {
    const TIB: u64 = 1 << 40;
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path();
    fill(data, 0, 50);
    let dir = topic_dir(data);
    let grow = |path: &Path| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(TIB))
            .unwrap_or_else(|e| panic!("a sparse 1 TiB {}: {e}", path.display()));
    };
    let idx = files_with(&dir, "idx")[0].clone();
    grow(&idx);
    let (code, report) = verify(data);
    assert_eq!(code, Some(0), "an index is a hint, a note: {report}");
    assert!(
        report["notes"]
            .as_array()
            .expect("notes")
            .iter()
            .any(|n| n["file"].as_str().is_some_and(|f| Path::new(f) == idx)
                && n["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("larger than its segment allows"))),
        "{report}"
    );
    let broker = Broker::start(data, &[]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "t").await.expect("connect");
        let all = common::replay_all(&client, TOPIC).await;
        assert_eq!(
            all.len(),
            50,
            "every message, read through the rebuilt index"
        );
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
    let len = std::fs::metadata(&idx).expect("idx").len();
    assert!(len < 4096, "the index was written again: {len} bytes");

    let checkpoint = dir.join("checkpoint");
    grow(&checkpoint);
    serve_refuses(data, "checkpoint");
    every_message_under_skip_damaged(data, "checkpoint");
    let len = std::fs::metadata(&checkpoint).expect("checkpoint").len();
    assert!(len < 4096, "the checkpoint was written anew: {len} bytes");

    // A group journal: damage for verify and serve; skip-damaged sets it
    // aside and the topic opens with every message.
    let journal = dir.join("groups").join("q.journal");
    grow(&journal);
    let (code, report) = verify(data);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        damage_files(&report)
            .iter()
            .any(|f| Path::new(f) == journal),
        "{report}"
    );
    serve_refuses(data, "q.journal");
    every_message_under_skip_damaged(data, "journal");
    assert!(!journal.exists() || std::fs::metadata(&journal).expect("journal").len() < TIB);
    let (code, report) = verify(data);
    assert_eq!(code, Some(0), "{report}");
}

/// Waits for the start-up scan's summary line and returns the log so far.
fn scan_summary(broker: &Broker) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while broker.log_count("start-up scan done") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the start-up scan ends"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    broker.log_so_far()
}

/// After a clean stop nothing needs recovery, but a damaged checkpoint or a
/// config that does not parse is found by the start-up scan and counted in
/// its summary, not first by a request hours later.
#[test]
fn damage_after_a_clean_stop_is_counted_by_the_start_up_scan() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path();
    fill(data, 0, 20);
    let checkpoint = topic_dir(data).join("checkpoint");
    let pristine = std::fs::read(&checkpoint).expect("checkpoint");
    flip(&checkpoint, pristine.len() / 2);

    let broker = Broker::start(data, &[]);
    let logs = scan_summary(&broker);
    assert!(
        logs.contains("failed=1") && logs.contains("some topics could not be recovered"),
        "{logs}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("recovering a topic") && l.contains("checkpoint")),
        "the scan names the file: {logs}"
    );
    drop(broker);

    // Under skip-damaged the scan gives the checkpoint up and recovers.
    let broker = Broker::start(data, &["--recovery", "skip-damaged"]);
    let logs = scan_summary(&broker);
    assert!(
        logs.contains("recovered=1") && logs.contains("failed=0"),
        "{logs}"
    );
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");

    // A config that does not parse, after a clean stop.
    std::fs::write(topic_dir(data).join("topic.toml"), "this is = = not toml").expect("garble");
    let broker = Broker::start(data, &[]);
    let logs = scan_summary(&broker);
    assert!(
        logs.contains("failed=1")
            && logs
                .lines()
                .any(|l| l.contains("reading the topic's config") && l.contains("topic.toml")),
        "{logs}"
    );
}

/// Things spool never writes, standing where its files belong: a sparse
/// 1 TiB sealed segment, a FIFO for a segment, a lost `topic.toml` beside
/// a damaged checkpoint, a link at a temp file's name. Each is refused
/// (by `verify`, which goes on to report the rest, and by the broker,
/// which keeps serving) or, for the link, never written through; nothing
/// is lost once the file is put right.
#[test]
fn files_spool_never_writes_are_refused_where_its_own_belong() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path();
    fill(data, 2048, 60);
    let dir = topic_dir(data);
    let sealed = files_with(&dir, "log")[1].clone();
    let name = sealed
        .file_name()
        .and_then(|n| n.to_str())
        .expect("name")
        .to_owned();
    let len = std::fs::metadata(&sealed).expect("segment").len();
    let resize = |to: u64| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&sealed)
            .and_then(|f| f.set_len(to))
            .expect("resize the segment");
    };
    // Also damage the checkpoint, which verify reports too: it goes on.
    let checkpoint = dir.join("checkpoint");
    let pristine = std::fs::read(&checkpoint).expect("checkpoint");
    let reported = |what: &str, needle: &str| {
        flip(&checkpoint, pristine.len() / 2);
        let (code, report) = verify(data);
        std::fs::write(&checkpoint, &pristine).expect("restore the checkpoint");
        assert_eq!(code, Some(1), "{what}: {report}");
        let damage = report["damage"].as_array().expect("damage");
        assert!(
            damage
                .iter()
                .any(|d| d["file"].as_str().is_some_and(|f| f.ends_with(&name))
                    && d["detail"].as_str().is_some_and(|t| t.contains(needle))),
            "{what}: {report}"
        );
        assert!(
            damage_files(&report)
                .iter()
                .any(|f| f.ends_with("checkpoint")),
            "{what}: verify went on past it: {report}"
        );
    };

    resize(1 << 40);
    reported("a 1 TiB segment", "more than a segment holds");
    serve_refuses(data, &name);
    resize(len);

    let aside = dir.join("aside");
    std::fs::rename(&sealed, &aside).expect("move the segment aside");
    let made = Command::new("mkfifo")
        .arg(&sealed)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    reported("a FIFO", "not a regular file");
    // A broker on `data` serves the other topics and keeps this one
    // closed, answering FAILED_PRECONDITION naming the segment and `said`.
    let keeps_it_closed = |what: &str| {
        let broker = Broker::start(data, &[]);
        let error = rt().block_on(async {
            let client = Client::connect(&broker.addr, "t").await.expect("connect");
            client
                .produce("other", vec![NewMessage::from_value("served")])
                .await
                .expect("the other topics are served");
            client.describe_topic(TOPIC).await.expect_err(what)
        });
        assert!(
            error.to_string().contains(&name)
                && error.to_string().contains("not a regular file")
                && error.to_string().contains("move it away"),
            "{what}: {error}"
        );
        assert_eq!(
            error.code(),
            Some(spool::protocol::pb::Code::FailedPrecondition),
            "{what}: {error}"
        );
    };
    keeps_it_closed("a FIFO for a segment keeps the topic closed");
    std::fs::remove_file(&sealed).expect("remove the FIFO");
    // A folder in its place: the same answer.
    std::fs::create_dir(&sealed).expect("a folder for the segment");
    keeps_it_closed("a folder for a segment keeps the topic closed");
    std::fs::remove_dir(&sealed).expect("remove the folder");
    std::fs::rename(&aside, &sealed).expect("put the segment back");

    // A FIFO for a group journal with synced entries: reported once, not
    // also as a journal shorter than its recovery point.
    let journal = dir.join("groups").join("q.journal");
    let journal_aside = dir.join("journal-aside");
    std::fs::rename(&journal, &journal_aside).expect("move the journal aside");
    let made = Command::new("mkfifo")
        .arg(&journal)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let (code, report) = verify(data);
    assert_eq!(code, Some(1), "{report}");
    let about: Vec<String> = damage_files(&report)
        .into_iter()
        .filter(|f| f.ends_with("q.journal"))
        .collect();
    assert_eq!(about.len(), 1, "{report}");
    std::fs::remove_file(&journal).expect("remove the FIFO");
    std::fs::rename(&journal_aside, &journal).expect("put the journal back");

    // A lost config beside a checkpoint that does not load: the checkpoint
    // was a topic's, so the defaults are no stand-in.
    let config = dir.join("topic.toml");
    let kept = std::fs::read(&config).expect("topic.toml");
    std::fs::remove_file(&config).expect("remove topic.toml");
    flip(&checkpoint, pristine.len() / 2);
    let (code, report) = verify(data);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        damage_files(&report)
            .iter()
            .any(|f| f.ends_with("topic.toml")),
        "{report}"
    );
    serve_refuses(data, "topic.toml");
    assert!(!config.exists(), "no default config written in its place");
    std::fs::write(&config, kept).expect("restore topic.toml");
    std::fs::write(&checkpoint, &pristine).expect("restore the checkpoint");

    // A link where the checkpoint's temp file is made.
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, "not spool's").expect("victim");
    std::os::unix::fs::symlink(&victim, dir.join("checkpoint.tmp")).expect("link");
    let broker = Broker::start(data, &[]);
    rt().block_on(async {
        let client = Client::connect(&broker.addr, "t").await.expect("connect");
        client
            .produce(TOPIC, vec![NewMessage::from_value("after")])
            .await
            .expect("produce");
        assert_eq!(common::replay_all(&client, TOPIC).await.len(), 61);
    });
    let (ok, logs) = broker.terminate();
    assert!(ok, "{logs}");
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "not spool's",
        "nothing written through the link"
    );
    let (code, report) = verify(data);
    assert_eq!(code, Some(0), "{report}");
}

/// A topic folder the broker may not search (its mode changed by hand) is
/// an error naming `topic.toml` and what the system said, not a topic
/// whose config is lost (which tried to write the defaults in its place);
/// once the mode is put back, every message is there.
/// Run as `nobody` when the tests run as root (root searches any folder).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_folder_that_cannot_be_searched_is_refused_naming_its_config() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let data = root.join("data");
    std::fs::create_dir(&data).expect("data dir");
    let as_root = rustix::process::geteuid().is_root();
    let program = || {
        if !as_root {
            return Command::new(env!("CARGO_BIN_EXE_spool"));
        }
        // Its own copy, which `nobody` can reach wherever the build is.
        let bin = root.join("spool");
        if !bin.exists() {
            std::fs::copy(env!("CARGO_BIN_EXE_spool"), &bin).expect("copy the binary");
        }
        let mut program = Command::new("setpriv");
        program
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin);
        program
    };
    if as_root {
        std::os::unix::fs::chown(&data, Some(65534), Some(65534)).expect("chown");
    }
    let broker = Broker::start_with(program(), &data, &[]);
    let client = Client::connect(&broker.addr, "t").await.expect("connect");
    let batch: Vec<NewMessage> = (0..3)
        .map(|i| NewMessage::from_value(format!("m{i}")))
        .collect();
    client.produce("t", batch).await.expect("produce");
    drop(client);
    let (ok, log) = tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .expect("terminate");
    assert!(ok, "clean stop: {log}");

    let folder = data.join("topics").join("t");
    let mode = |m: u32| {
        std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(m)).expect("chmod");
    };
    mode(0o600);
    let broker = Broker::start_with(program(), &data, &[]);
    let client = Client::connect(&broker.addr, "t").await.expect("connect");
    let err = client
        .describe_topic("t")
        .await
        .expect_err("a folder that cannot be searched");
    // Read and refused, not taken for lost (which wrote the defaults).
    let text = err.to_string();
    assert!(
        text.contains("reading")
            && text.contains("topic.toml")
            && text.contains("ermission denied"),
        "{text}"
    );
    mode(0o755);
    let got = common::replay_all(&client, "t").await;
    assert_eq!(got.len(), 3, "every message is there once the mode is back");
    drop(client);
    let (ok, log) = tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .expect("terminate");
    assert!(ok, "clean stop: {log}");
}

/// A folder where the `clean-stop` marker belongs, or a file where
/// `staging/`, `trash/` or `topics/` belong, stops `spool serve` with one
/// line naming it and saying to move it away (exit 1).
#[test]
fn foreign_things_where_the_data_directorys_own_belong_are_named() {
    for (name, make_dir) in [
        ("clean-stop", true),
        ("staging", false),
        ("trash", false),
        ("topics", false),
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path();
        if name != "topics" {
            std::fs::create_dir(data.join("topics")).expect("topics");
        }
        let path = data.join(name);
        if make_dir {
            std::fs::create_dir(&path).expect("folder");
        } else {
            std::fs::write(&path, b"x").expect("file");
        }
        let out = Command::new(env!("CARGO_BIN_EXE_spool"))
            .args(["serve", "--listen", "127.0.0.1:0", "--grpc", "off"])
            .args(["--metrics", "off", "--socketio", "off", "--data"])
            .arg(data)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run spool serve");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(
            err.contains(&path.display().to_string()) && err.contains("move it away"),
            "{name}: {err}"
        );
    }
}
