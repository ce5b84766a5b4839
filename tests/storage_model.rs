//! Why this exists: a log must behave exactly like a `Vec` of the messages
//! appended to it, whatever mix of batches, reads, segment rolls, reopens,
//! retention and time lookups it sees. Proptest drives random op sequences
//! against that in-memory model on the simulated disk and compares every
//! answer byte for byte.

use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::Index;
use spool::storage::io::SimDisk;
use spool::storage::record::encoded_len;
use spool::storage::{
    FsyncPolicy, Header, Log, LogConfig, Message, NewMessage, Offset, RecoveryMode,
};
use std::sync::Arc;

/// Directory of the log on the simulated disk.
const DIR: &str = "/topics/model";

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<NewMessage>),
    Read {
        from: Index,
        max_messages: usize,
        max_bytes: usize,
    },
    /// Reopen after `close` (clean) or after dropping the log as a killed
    /// process would (the page cache, i.e. the live image, survives).
    Reopen {
        clean: bool,
    },
    Retention,
    TimeLookup {
        at: Index,
        delta: u64,
    },
}

/// What the model keeps per appended message.
#[derive(Debug, Clone)]
struct Stored {
    msg: NewMessage,
    /// The stored timestamp (the broker's clock when the message had none).
    timestamp_ms: u64,
    /// Bytes the record takes in a segment.
    len: usize,
}

#[derive(Debug, Default)]
struct Model {
    /// Every message ever appended, indexed by offset.
    messages: Vec<Stored>,
    /// First offset retention has not dropped.
    start: u64,
}

impl Model {
    fn end(&self) -> u64 {
        self.messages.len() as u64
    }

    /// What `Log::read` must return: from the first stored offset ≥ `from`,
    /// whole messages while the byte budget lasts, but always at least one.
    fn read(&self, from: u64, max_messages: usize, max_bytes: usize) -> &[Stored] {
        let first = from.max(self.start) as usize;
        let mut bytes = 0usize;
        let mut n = 0usize;
        for s in self.messages.iter().skip(first) {
            if n >= max_messages || (n > 0 && bytes + s.len > max_bytes) {
                break;
            }
            bytes += s.len;
            n += 1;
        }
        &self.messages[first.min(self.messages.len())..][..n]
    }

    /// What `Log::offset_for_timestamp` must return.
    fn offset_for_timestamp(&self, ts: u64) -> u64 {
        (self.start..self.end())
            .find(|&o| self.messages[o as usize].timestamp_ms >= ts)
            .unwrap_or(self.end())
    }
}

fn arb_message() -> impl Strategy<Value = NewMessage> {
    (
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        proptest::collection::vec(
            ("[a-z-]{0,8}", proptest::collection::vec(any::<u8>(), 0..20)),
            0..3,
        ),
        prop_oneof![
            4 => proptest::collection::vec(any::<u8>(), 0..120),
            1 => proptest::collection::vec(any::<u8>(), 120..700),
        ],
        proptest::option::weighted(0.3, 1u64..10_000),
    )
        .prop_map(|(key, headers, value, timestamp_ms)| NewMessage {
            timestamp_ms,
            key: key.map(Bytes::from),
            headers: headers
                .into_iter()
                .map(|(n, v)| Header::new(n, v))
                .collect(),
            value: Bytes::from(value),
        })
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => proptest::collection::vec(arb_message(), 1..20).prop_map(Op::Append),
        6 => (
            any::<Index>(),
            0usize..30,
            prop_oneof![Just(usize::MAX), 0usize..4000],
        )
            .prop_map(|(from, max_messages, max_bytes)| Op::Read {
                from,
                max_messages,
                max_bytes,
            }),
        1 => any::<bool>().prop_map(|clean| Op::Reopen { clean }),
        1 => Just(Op::Retention),
        2 => (any::<Index>(), 0u64..2).prop_map(|(at, delta)| Op::TimeLookup { at, delta }),
    ]
}

fn arb_config() -> impl Strategy<Value = LogConfig> {
    (
        1024u64..=8192,
        64u32..=1024,
        prop_oneof![
            Just(FsyncPolicy::Always),
            Just(FsyncPolicy::Never),
            Just(FsyncPolicy::Interval(1))
        ],
        proptest::option::weighted(0.3, 4096u64..32768),
    )
        .prop_map(
            |(segment_bytes, index_interval_bytes, fsync, retention_bytes)| LogConfig {
                segment_bytes,
                index_interval_bytes,
                fsync,
                // Retention drops whole segments: it allows at least one.
                retention_bytes: retention_bytes.map(|r| r.max(segment_bytes)),
                ..LogConfig::default()
            },
        )
}

fn open(disk: &Arc<SimDisk>, config: &LogConfig) -> Log {
    Log::open(
        Arc::clone(disk) as _,
        DIR,
        config.clone(),
        RecoveryMode::default(),
    )
    .expect("opening the log on a healthy disk")
}

fn check_same(got: &[Message], want: &[Stored], first: u64) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len(), "number of messages read");
    for (i, (m, s)) in got.iter().zip(want).enumerate() {
        prop_assert_eq!(m.offset, Offset(first + i as u64));
        prop_assert_eq!(m.timestamp_ms, s.timestamp_ms, "timestamp of {}", m.offset);
        prop_assert_eq!(&m.key, &s.msg.key, "key of {}", m.offset);
        prop_assert_eq!(&m.headers, &s.msg.headers, "headers of {}", m.offset);
        prop_assert_eq!(&m.value, &s.msg.value, "value of {}", m.offset);
    }
    Ok(())
}

fn run(config: LogConfig, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let disk = Arc::new(SimDisk::new());
    let mut log = open(&disk, &config);
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Append(batch) => {
                let appended = log.append(&batch).expect("append on a healthy disk");
                prop_assert_eq!(appended.first, Offset(model.end()));
                prop_assert_eq!(appended.last, Offset(model.end() + batch.len() as u64 - 1));
                // Learn the broker-assigned timestamps, and check the batch reads back.
                let back = log
                    .read(appended.first, batch.len(), usize::MAX)
                    .expect("read back");
                prop_assert_eq!(back.len(), batch.len());
                for (msg, m) in batch.into_iter().zip(&back) {
                    if let Some(ts) = msg.timestamp_ms {
                        prop_assert_eq!(m.timestamp_ms, ts);
                    }
                    let len = encoded_len(&msg).expect("generated messages fit the format");
                    model.messages.push(Stored {
                        msg,
                        timestamp_ms: m.timestamp_ms,
                        len,
                    });
                }
                check_same(
                    &back,
                    &model.messages[appended.first.0 as usize..],
                    appended.first.0,
                )?;
            }
            Op::Read {
                from,
                max_messages,
                max_bytes,
            } => {
                let from = from.index(model.end() as usize + 3) as u64;
                let got = log
                    .read(Offset(from), max_messages, max_bytes)
                    .expect("read");
                let want = model.read(from, max_messages, max_bytes);
                check_same(&got, want, from.max(model.start))?;
            }
            Op::Reopen { clean } => {
                if clean {
                    log.close().expect("close");
                } else {
                    drop(log);
                }
                log = open(&disk, &config);
                if clean {
                    prop_assert!(
                        log.recovery_report().is_clean(),
                        "a cleanly closed log needs no repair: {:?}",
                        log.recovery_report()
                    );
                }
            }
            Op::Retention => {
                let before = log.stats();
                let dropped = log.enforce_retention(0).expect("retention");
                let after = log.stats();
                if config.retention_bytes.is_none() {
                    prop_assert!(dropped.is_empty());
                }
                prop_assert_eq!(dropped.is_empty(), after.start == before.start);
                prop_assert!(after.start >= before.start && after.start <= after.end);
                if let Some(max) = config.retention_bytes {
                    // Whole sealed segments go while the rest still holds
                    // `max` bytes, and no more than that.
                    if !dropped.is_empty() {
                        prop_assert!(after.bytes >= max, "dropped below the limit: {after:?}");
                    }
                    let segments = log.segments();
                    if segments.len() > 1 {
                        prop_assert!(
                            after.bytes - segments[0].size() < max,
                            "kept a droppable segment: {after:?}"
                        );
                    }
                }
                if let Some(last_dropped) = dropped.last() {
                    prop_assert!(last_dropped.0 < after.start.0);
                }
                model.start = after.start.0;
            }
            Op::TimeLookup { at, delta } => {
                let ts = if model.messages.is_empty() {
                    delta
                } else {
                    model.messages[at.index(model.messages.len())].timestamp_ms + delta
                };
                let got = log.offset_for_timestamp(ts).expect("time lookup");
                prop_assert_eq!(got, Offset(model.offset_for_timestamp(ts)), "ts {}", ts);
            }
        }
        let stats = log.stats();
        prop_assert_eq!(log.end(), Offset(model.end()));
        prop_assert_eq!(stats.end, Offset(model.end()));
        let start = if model.start < model.end() {
            model.start
        } else {
            model.end()
        };
        prop_assert_eq!(log.start(), Offset(start));
    }
    // Finally, everything still stored reads back in one pass.
    let all = log
        .read(Offset(0), usize::MAX, usize::MAX)
        .expect("full read");
    check_same(&all, &model.messages[model.start as usize..], model.start)?;
    log.close().expect("close");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Why: every public answer of the log (reads under both limits, ends,
    /// start after retention, time lookups) must match the model after any
    /// history of appends, rolls and reopens.
    #[test]
    fn log_behaves_like_a_vec_of_messages(
        config in arb_config(),
        ops in proptest::collection::vec(arb_op(), 1..60),
    ) {
        run(config, ops)?;
    }
}

/// The case the model first found: a read whose byte budget ends before the
/// last record of a segment must stop there, not go on with a smaller record
/// of the next segment (the consumer would never see the skipped one).
#[test]
fn a_read_never_skips_a_record_that_did_not_fit() {
    let disk = Arc::new(SimDisk::new());
    let config = LogConfig {
        segment_bytes: 1024,
        index_interval_bytes: 64,
        ..LogConfig::default()
    };
    let log = open(&disk, &config);
    // Segment 0: records of 132, 132 and 532 bytes; segment 1: 132-byte records.
    let big = NewMessage::from_value(vec![2u8; 500]);
    let small = NewMessage::from_value(vec![1u8; 100]);
    log.append(&[small.clone(), small.clone(), big])
        .expect("append");
    log.append(&[small.clone(), small.clone(), small.clone()])
        .expect("append");
    log.append(&[small.clone(), small.clone(), small])
        .expect("append");
    assert!(log.stats().segments >= 2, "{:?}", log.stats());
    let got = log.read(Offset(0), 100, 400).expect("read");
    let offsets: Vec<u64> = got.iter().map(|m| m.offset.0).collect();
    assert_eq!(
        offsets,
        vec![0, 1],
        "stops before the record that does not fit"
    );
}
