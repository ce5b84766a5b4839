//! Stream groups on a topic: reading from the group's committed offset
//! (or the reader's own position) and committing.

use super::*;

impl Topic {
    /// Stream group: up to `max` live messages from `from`, or from the
    /// group's committed offset when `from` is `None`. The reader keeps its
    /// own position (a subscription, or the client between fetches); the group
    /// keeps only the durable commit, so whatever a reader got but did not
    /// commit is read again by the next reader after it leaves.
    pub fn fetch_stream(
        &self,
        group: &str,
        member: &str,
        from: Option<Offset>,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Message>> {
        self.fetch_stream_within(group, member, from, DeliveryLimits::new(max, max_bytes))
            .map(|records| records.to_messages())
    }

    /// [`Topic::fetch_stream`] for a delivery of at most `limits` (see
    /// [`Topic::read_within`]).
    pub fn fetch_stream_within(
        &self,
        group: &str,
        member: &str,
        from: Option<Offset>,
        limits: DeliveryLimits,
    ) -> Result<Records> {
        let from = {
            let _pass = self.enter()?;
            self.with_group(group, |g| self.stream_reader_of(g, member, from))?
        };
        self.read_within(from, limits)
    }

    /// What a stream-group fetch does before it reads, without waiting:
    /// `None` when the topic's groups or this group are held by someone
    /// else (a group's lock may be held across a sync of its state).
    pub fn try_stream_reader(
        &self,
        group: &str,
        member: &str,
        from: Option<Offset>,
    ) -> Option<Result<Offset>> {
        self.try_with_group(group, |g| self.stream_reader_of(g, member, from))
    }

    /// What a stream-group fetch does before it reads: checks that `g` is
    /// a stream group, marks `member` alive, and returns where the read
    /// starts (`from`, or the group's committed offset).
    fn stream_reader_of(
        &self,
        g: &mut Group,
        member: &str,
        from: Option<Offset>,
    ) -> Result<Offset> {
        if g.config().mode != GroupMode::Stream {
            return Err(Error::InvalidArgument(format!(
                "group {} of topic {} is a queue group: fetch leases with it instead",
                g.name(),
                self.name
            )));
        }
        g.touch(member, timer_ms());
        Ok(from.unwrap_or_else(|| Offset(g.committed())))
    }

    /// Stream group: commits `offset` as the next to read after a restart.
    pub fn commit(&self, group: &str, offset: Offset) -> Result<()> {
        let _pass = self.enter()?;
        let offset = offset.0;
        let end = self.log.end().0;
        if offset > end {
            return Err(Error::InvalidArgument(format!(
                "commit offset {offset} of topic {} is past its end ({end})",
                self.name
            )));
        }
        let stream_only = |g: &Group| {
            if g.config().mode != GroupMode::Stream {
                return Err(Error::InvalidArgument(format!(
                    "group {group} of topic {} is a queue group: ack messages instead",
                    self.name
                )));
            }
            Ok(())
        };
        // Forward in one step; a move back checks and commits again under
        // the groups' write lock (see `move_group`).
        let forward = self.with_group(group, |g| {
            stream_only(g)?;
            if offset < g.committed() {
                return Ok(None);
            }
            g.commit(offset)?;
            self.persist_group(g).map(Some)
        })?;
        match forward {
            Some(durable) => durable.map_or(Ok(()), SyncWait::wait),
            None => self.move_group(group, |g| {
                stream_only(g)?;
                g.commit(offset)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::io::OsStorage;
    use std::time::Duration;

    fn topic(dir: &std::path::Path) -> Arc<Topic> {
        let t = Topic::open(
            Arc::new(OsStorage),
            dir,
            "t",
            TopicConfig::default(),
            RecoveryMode::default(),
        )
        .expect("open topic");
        t.produce(&[NewMessage::from_value("a"), NewMessage::from_value("b")])
            .expect("produce");
        t.create_group("s", GroupMode::Stream, Position::Earliest)
            .expect("group");
        t.commit("s", Offset(1)).expect("commit");
        Arc::new(t)
    }

    /// Runs `f` on `t` from another thread and returns its answer; fails
    /// (instead of hanging) if `f` waits for a lock this thread holds.
    fn elsewhere<T: Send + 'static>(
        t: &Arc<Topic>,
        f: impl FnOnce(&Topic) -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = Arc::clone(t);
        std::thread::spawn(move || {
            let _ = tx.send(f(&t));
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("answered without waiting for the lock held here")
    }

    /// A fetch resolves its group without waiting only while no one holds
    /// the group: held (as across a sync of its state), the answer is
    /// "ask where waiting is fine", never a wait.
    #[test]
    fn a_group_is_resolved_in_place_only_while_no_one_holds_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = topic(dir.path());
        match t.try_group_start("s") {
            Some(Ok((GroupMode::Stream, 1))) => {}
            other => panic!("free group: {other:?}"),
        }
        assert!(
            matches!(
                t.try_group_start("nope"),
                Some(Err(Error::GroupNotFound(_)))
            ),
            "a missing group is an answer too"
        );
        {
            let groups = t.groups();
            let group = t.group(&groups, "s").expect("group");
            let _held = t.lock(&group).expect("lock");
            assert!(
                elsewhere(&t, |t| t.try_group_start("s").is_none()),
                "held: ask elsewhere"
            );
            assert!(elsewhere(&t, |t| t
                .try_stream_reader("s", "m", None)
                .is_none()));
        }
        {
            let _changing = t.groups_mut();
            assert!(
                elsewhere(&t, |t| t.try_group_start("s").is_none()),
                "groups being changed"
            );
        }
        match t.try_stream_reader("s", "m", None) {
            Some(Ok(Offset(1))) => {}
            other => panic!("free group, no position: the committed offset, got {other:?}"),
        }
        let info = t.describe_group("s").expect("describe");
        assert!(info.members.contains_key("m"), "the reader is marked alive");
    }

    /// A read on an async worker gives up instead of waiting while the
    /// deletions are held (a deletion is made durable under their lock),
    /// and reads as before once they are free.
    #[test]
    fn a_read_that_must_not_wait_gives_up_while_deletions_are_held() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = topic(dir.path());
        let limits = DeliveryLimits::new(10, usize::MAX);
        {
            let _held = t.deletions_mut();
            assert!(
                elsewhere(&t, move |t| t.try_read_within(Offset(0), limits).is_none()),
                "held: read elsewhere"
            );
            let ahead = t.read_ahead(Offset(0), limits).expect("read ahead");
            assert!(
                elsewhere(&t, move |t| t
                    .read_within_ahead(Offset(0), limits, ahead)
                    .is_none()),
                "held: the read-ahead is not used"
            );
        }
        t.delete(&[Offset(0)]).expect("delete");
        match t.try_read_within(Offset(0), limits) {
            Some(Ok(records)) => assert_eq!(records.last_offset(), Some(Offset(1))),
            other => panic!("free: {other:?}"),
        }
        let read = t
            .try_read_within(Offset(0), limits)
            .expect("free")
            .expect("read")
            .to_messages();
        assert_eq!(read.len(), 1, "the deleted message stays out");
        assert_eq!(&read[0].value[..], b"b");
    }
}
