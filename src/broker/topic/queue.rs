//! Queue groups on a topic: leasing messages to members (redeliveries
//! that are due first, then new messages in offset order), dead-lettering
//! what was delivered too often or cannot fit a frame, and acks and nacks.
//! Delivery counts and acks are durable before they count (group commit).

use super::*;
use crate::storage::config::MAX_DURATION_MS;
use std::collections::VecDeque;

/// Most leases and redeliveries [`Topic::queue_is_idle`] looks through.
const IDLE_LOOK_TIMERS: usize = 1024;

/// Longest a message on its way to the dead-letter topic is held from
/// other reads when its hand-off neither completes nor fails it (see
/// [`Topic::retry_dead_letters`]).
const DEAD_LETTER_HOLD_MS: u64 = 10 * 60 * 1000;

impl Topic {
    /// Queue group: leases up to `max` messages to `member` — redeliveries that
    /// are due first, then new messages in offset order.
    pub fn fetch_queue(
        &self,
        group: &str,
        member: &str,
        max: usize,
        max_bytes: usize,
        now: u64,
    ) -> Result<QueueFetch> {
        self.fetch_queue_within(group, member, DeliveryLimits::new(max, max_bytes), now)
    }

    /// Whether a queue read of group `group` by `member` at `now` would find
    /// nothing to lease: no message past the group's cursor and nothing due
    /// again. Only when the group is free at once (`None` otherwise, or
    /// when the read must run to say why it fails: a group gone, replaced
    /// since `identity`, or not a queue group); marks `member` seen. Lets
    /// the waiting readers a produce wakes, all but the one that leases
    /// it, go back to waiting without a trip to the blocking pool.
    pub(crate) fn queue_is_idle(
        &self,
        group: &str,
        member: &str,
        identity: Option<&GroupIdentity>,
        now: u64,
    ) -> Option<bool> {
        let _pass = self.enter().ok()?;
        let groups = self.groups.try_read().ok()?;
        let handle = groups.get(group)?;
        if identity.is_some_and(|identity| !identity.is(handle)) {
            return None;
        }
        let mut g = handle.try_lock().ok()?;
        // A read-only journal: the full read answers why. Many leases or
        // redeliveries to look through: on the blocking pool, not here on
        // an async worker.
        if g.config().mode != GroupMode::Queue || g.is_read_only() || g.timers() > IDLE_LOOK_TIMERS
        {
            return None;
        }
        let idle = g.cursor() >= self.log.end().0 && !g.has_due(now);
        if idle {
            g.touch(member, now);
        }
        Some(idle)
    }

    /// [`Topic::fetch_queue`] for a delivery of at most `limits`. A message
    /// too large to deliver is dead-lettered at once (its delivery count is
    /// not raised) and does not count against `limits.messages`.
    pub fn fetch_queue_within(
        &self,
        group: &str,
        member: &str,
        limits: DeliveryLimits,
        now: u64,
    ) -> Result<QueueFetch> {
        let (fetched, durable, _) = self.lease_queue_within(group, member, limits, now, None)?;
        durable.map_or(Ok(()), SyncWait::wait)?;
        Ok(fetched)
    }

    /// [`Topic::fetch_queue_within`], returning before the delivery counts
    /// are durable: the messages may be handed out only once the returned
    /// wait (if any) has returned. Waits of several callers share one sync.
    /// With `identity`, a group of that name other than the one it was
    /// taken from (deleted and created again) is `GroupNotFound`. Also
    /// answers the identity of the group it read, for the steps that
    /// follow (completing its dead letters, giving back what nobody took).
    pub(crate) fn lease_queue_within(
        &self,
        group: &str,
        member: &str,
        limits: DeliveryLimits,
        now: u64,
        identity: Option<&GroupIdentity>,
    ) -> Result<(QueueFetch, Option<SyncWait>, GroupIdentity)> {
        let DeliveryLimits {
            messages: max,
            bytes: max_bytes,
            ..
        } = limits;
        let _pass = self.enter()?;
        let groups = self.groups();
        let handle = self.group(&groups, group)?;
        if identity.is_some_and(|identity| !identity.is(&handle)) {
            return Err(self.group_replaced(group));
        }
        let read_from = GroupIdentity::of(&handle);
        let mut g = self.lock(&handle)?;
        self.check_queue(&g)?;
        let deletions = self.deletions();
        // Completions of deleted offsets below stand on the deletions, which
        // reach the disk before each such completion is made: the group's
        // journal may be synced before this fetch returns (by a snapshot, or
        // by another caller's sync of the same journal).
        let mut out = QueueFetch::default();
        g.touch(member, now);
        g.expire(now);
        g.snapshot_if_due()?;
        let mut candidates: VecDeque<Message> = VecDeque::new();
        // Too large for a delivery: dead-lettered, never leased.
        let mut too_large: VecDeque<(Message, usize)> = VecDeque::new();
        // Due redeliveries, lowest first, until `max` are found live (or too
        // large, which take their place here as they did): one deleted (or
        // gone) since it was due takes no place, so a fetch does not answer
        // empty, or new messages first, while a live one is due behind it.
        let end = self.log.end().0;
        let mut from = 0;
        while candidates.len() + too_large.len() < max {
            let asked = max - candidates.len() - too_large.len();
            let due = g.due_redeliveries(now, from, asked);
            let last_look = due.len() < asked;
            for offset in due {
                if offset < from {
                    // In a deleted run completed below.
                    continue;
                }
                from = offset + 1;
                if deletions.contains(offset) {
                    from = complete_deleted_run(&mut g, &deletions, offset, end)?;
                    continue;
                }
                let found = self.log.read(Offset(offset), 1, max_bytes)?;
                match found.into_iter().next() {
                    Some(m) if m.offset.0 == offset => match limits.excess(&m) {
                        Some(size) => too_large.push_back((m, size)),
                        None => candidates.push_back(m),
                    },
                    // Gone (retention, compaction): nothing left to deliver.
                    _ => {
                        deletions.wait_durable()?;
                        g.complete(offset, offset + 1)?;
                    }
                }
            }
            if last_look {
                // Every due one from `from` on was in this look.
                break;
            }
        }
        // The walk below moves the cursor past the messages it reads: if the
        // fetch fails before each is leased or deferred (a full disk, a
        // failed read), they are made due again at once, or no later fetch
        // would find them; so are those leased already, which no member gets.
        let handled = self.walk_and_lease(
            &mut g,
            &deletions,
            group,
            member,
            limits,
            now,
            &mut candidates,
            &mut too_large,
            &mut out,
        );
        // Redelivery counts reach the disk before the messages go out, so a
        // poison message cannot loop forever across broker crashes. The sync
        // runs outside the topic's lock, shared with other fetches and acks.
        let durable = handled.and_then(|()| (!g.is_synced()).then(|| g.sync_later()).transpose());
        match durable {
            Ok(durable) => Ok((out, durable, read_from)),
            Err(e) => {
                // Nobody gets the leased messages: due again at once, their
                // deliveries taken back (they never left the broker).
                for d in &out.deliveries {
                    g.defer(d.message.offset.0, now);
                    if let Err(e) = g.take_back(d.message.offset.0, d.delivery) {
                        tracing::warn!(topic = self.name(), group = g.name(), offset = d.message.offset.0, error = %e,
                            "could not take back the delivery of a fetch that failed; it counts toward max_deliveries");
                    }
                }
                // Dead letters held for a hand-off nobody makes, and what
                // the walk took but did not handle: due again at once.
                let held = out.dead_letters.iter().map(|d| d.offset.0);
                let unhandled = candidates.iter().chain(too_large.iter().map(|(m, _)| m));
                for o in held
                    .chain(unhandled.map(|m| m.offset.0))
                    .collect::<Vec<_>>()
                {
                    g.defer(o, now);
                }
                Err(e)
            }
        }
    }

    /// The part of [`Topic::lease_queue_within`] that moves the cursor: walks
    /// new messages into `candidates`, then leases, defers or dead-letters
    /// each candidate into `out`, taking it out of its list as it goes, so
    /// on failure the lists hold exactly the messages not handled.
    #[allow(clippy::too_many_arguments)]
    fn walk_and_lease(
        &self,
        g: &mut Group,
        deletions: &Deletions,
        group: &str,
        member: &str,
        limits: DeliveryLimits,
        now: u64,
        candidates: &mut VecDeque<Message>,
        too_large: &mut VecDeque<(Message, usize)>,
        out: &mut QueueFetch,
    ) -> Result<()> {
        let DeliveryLimits {
            messages: max,
            bytes: max_bytes,
            ..
        } = limits;
        let mut bytes = 0usize;
        let mut cursor = g.cursor();
        let end = self.log.end().0;
        while candidates.len() < max && cursor < end {
            let batch = self
                .log
                .read(Offset(cursor), max - candidates.len(), max_bytes)?;
            let Some(last) = batch.last().map(|m| m.offset.0) else {
                break;
            };
            let mut next = cursor;
            for m in batch {
                let o = m.offset.0;
                if o < next {
                    // In a run of deleted offsets completed as one below.
                    continue;
                }
                if g.first_not_done(next) < o {
                    // No records from `next` up to `o`: compaction removed
                    // them (superseded or deleted; or a retention pass just
                    // dropped them, and the group, not told yet, will not
                    // count them as lost). Nothing to deliver: done, so they
                    // do not hold the low watermark back.
                    g.complete(next, o)?;
                }
                next = o + 1;
                if deletions.contains(o) {
                    // Nothing to deliver: completed (as a deleted redelivery
                    // is) so it does not hold the low watermark back.
                    next = complete_deleted_run(g, deletions, o, end)?;
                    g.advance_cursor(next);
                    continue;
                }
                if !g.is_done(o) && !g.is_leased(o) {
                    match limits.excess(&m) {
                        Some(size) => too_large.push_back((m, size)),
                        None => candidates.push_back(m),
                    }
                }
                // Past each record as it is handled: on a failure, what the
                // walk took is below the cursor (and due again), never read
                // a second time by the walk.
                g.advance_cursor(o + 1);
            }
            cursor = next.max(last + 1);
        }
        // Every candidate is one this group has not completed, so none is
        // consumed by every group.
        while let Some((m, size)) = too_large.pop_front() {
            let o = m.offset.0;
            let deliveries = g.deliveries(o);
            // As for max_deliveries below: pending until the hand-off completes it.
            g.defer(o, self.dead_letter_hold(now));
            let reason = format!(
                "too large for the frame limit: {size} bytes of key, headers and value; a delivery carries at most {} (max_frame_bytes)",
                limits.message_bytes
            );
            out.dead_letters.push(DeadLetter {
                offset: Offset(o),
                message: self.dead_letter(group, m, deliveries, &reason),
            });
        }
        while let Some(m) = candidates.pop_front() {
            let o = m.offset.0;
            // Counted as a replay counts it (the whole record), so a reply
            // of keys and headers fits its frame as one of values does.
            let size = record::stored_len(&m);
            if !out.deliveries.is_empty() && bytes + size > max_bytes {
                // Not in this read: it and every later candidate wait for
                // the next, due at once and taken lowest offset first, so
                // new messages go out in offset order (a smaller later one
                // must not pass it).
                g.defer(o, now);
                for rest in candidates.drain(..) {
                    g.defer(rest.offset.0, now);
                }
                break;
            }
            let decision = match g.deliver(o, member, now) {
                Ok(decision) => decision,
                Err(e) => {
                    candidates.push_front(m);
                    return Err(e);
                }
            };
            match decision {
                Decision::Deliver { delivery } => {
                    bytes += size;
                    out.deliveries.push(Delivery {
                        message: m,
                        delivery,
                    });
                }
                Decision::DeadLetter { deliveries } => {
                    // Held while the hand-off to the dead-letter topic runs,
                    // which completes it (or, failing, makes it due again
                    // after a lease time): a concurrent fetch must not
                    // dead-letter it a second time, however slow the hand-off.
                    g.defer(o, self.dead_letter_hold(now));
                    out.dead_letters.push(DeadLetter {
                        offset: Offset(o),
                        message: self.dead_letter(group, m, deliveries, "max_deliveries exceeded"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Until when a message on its way to the dead-letter topic is held
    /// from other reads: [`DEAD_LETTER_HOLD_MS`], or a lease time if
    /// longer. Only a hand-off that neither completes nor fails it (a read
    /// cut off by a crash) leaves it for that long.
    fn dead_letter_hold(&self, now: u64) -> u64 {
        now.saturating_add(self.config.ack_timeout_ms.max(DEAD_LETTER_HOLD_MS))
    }

    /// Queue group: dead letters whose hand-off failed (see
    /// [`Topic::complete_dead_letters`]) are due again after a lease time,
    /// and tried again then.
    pub fn retry_dead_letters(&self, group: &str, offsets: &[Offset], now: u64) -> Result<()> {
        self.retry_dead_letters_of(group, None, offsets, now)
    }

    /// [`Topic::retry_dead_letters`] of the group `identity` names, if given.
    pub(crate) fn retry_dead_letters_of(
        &self,
        group: &str,
        identity: Option<&GroupIdentity>,
        offsets: &[Offset],
        now: u64,
    ) -> Result<()> {
        let _pass = self.enter()?;
        self.with_group_as(group, identity, |g| {
            self.check_queue(g)?;
            for o in offsets {
                // One completed or leased meanwhile (a seek made it due, and
                // another read took it) is that read's.
                if !g.is_done(o.0) && g.lease(o.0).is_none() {
                    g.defer(o.0, now.saturating_add(self.config.ack_timeout_ms));
                }
            }
            Ok(())
        })
    }

    fn dead_letter(&self, group: &str, m: Message, deliveries: u32, reason: &str) -> NewMessage {
        let mut headers = m.headers;
        headers.push(Header::new(dlq_headers::TOPIC, self.name.clone()));
        headers.push(Header::new(dlq_headers::OFFSET, m.offset.0.to_string()));
        headers.push(Header::new(dlq_headers::GROUP, group.to_owned()));
        headers.push(Header::new(dlq_headers::DELIVERIES, deliveries.to_string()));
        headers.push(Header::new(dlq_headers::REASON, reason.to_owned()));
        NewMessage {
            timestamp_ms: Some(m.timestamp_ms),
            key: m.key,
            headers,
            value: m.value,
        }
    }

    /// Completes dead letters once the dead-letter topic holds them.
    pub fn complete_dead_letters(&self, group: &str, offsets: &[Offset]) -> Result<()> {
        self.complete_dead_letters_of(group, None, offsets)
    }

    /// [`Topic::complete_dead_letters`] in the group `identity` names, if
    /// given (a group created again under its name never read them).
    pub(crate) fn complete_dead_letters_of(
        &self,
        group: &str,
        identity: Option<&GroupIdentity>,
        offsets: &[Offset],
    ) -> Result<()> {
        let _pass = self.enter()?;
        let durable = self.with_group_as(group, identity, |g| {
            self.check_queue(g)?;
            for o in offsets {
                g.complete(o.0, o.0 + 1)?;
            }
            g.sync_later()
        })?;
        durable.wait()
    }

    /// Queue group: completes `offsets` for the group. Confirmed (returns)
    /// once durable under the fsync policy.
    pub fn ack(&self, group: &str, offsets: &[Offset]) -> Result<()> {
        self.ack_later(group, offsets)?
            .map_or(Ok(()), SyncWait::wait)
    }

    /// [`Topic::ack`], returning before the acks are durable: they are
    /// confirmed only once the returned wait (if any) has returned.
    pub fn ack_later(&self, group: &str, offsets: &[Offset]) -> Result<Option<SyncWait>> {
        self.ack_later_as(group, None, offsets)
    }

    /// [`Topic::ack_later`]; with `identity`, a group of that name other
    /// than the one it was taken from (deleted and created again) is
    /// [`Topic::group_replaced`], checked under the lock the ack takes.
    pub(crate) fn ack_later_as(
        &self,
        group: &str,
        identity: Option<&GroupIdentity>,
        offsets: &[Offset],
    ) -> Result<Option<SyncWait>> {
        let _pass = self.enter()?;
        self.check_offsets(offsets)?;
        let mut sorted: Vec<u64> = offsets.iter().map(|o| o.0).collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut ranges = Vec::new();
        let mut i = 0;
        while i < sorted.len() {
            let start = sorted[i];
            let mut end = start + 1;
            i += 1;
            while i < sorted.len() && sorted[i] == end {
                end += 1;
                i += 1;
            }
            ranges.push(start..end);
        }
        self.with_group_as(group, identity, |g| {
            self.check_queue(g)?;
            for r in &ranges {
                g.complete(r.start, r.end)?;
            }
            self.persist_group(g)
        })
    }

    /// Queue group: gives leased offsets back for redelivery after `delay_ms`.
    /// Returns how many were leased.
    pub fn nack(&self, group: &str, offsets: &[Offset], delay_ms: u64) -> Result<usize> {
        let _pass = self.enter()?;
        // The request's own field before the group (protocol.md §4).
        super::check_delay(delay_ms)?;
        let now = timer_ms();
        self.with_group(group, |g| {
            self.check_queue(g)?;
            Ok(offsets
                .iter()
                .filter(|o| g.nack(o.0, now, delay_ms))
                .count())
        })
    }

    /// Queue group: extends the leases `member` holds on `offsets` to
    /// `ack_timeout_ms` from now (the group's ack timeout when `None`).
    /// Returns the offsets extended; the others were not leased to
    /// `member`. Leases live in memory only, so nothing is synced.
    pub fn extend_leases(
        &self,
        group: &str,
        member: &str,
        offsets: &[Offset],
        ack_timeout_ms: Option<u64>,
    ) -> Result<Vec<Offset>> {
        self.extend_leases_of(group, None, member, offsets, ack_timeout_ms)
    }

    /// [`Topic::extend_leases`] in the group `identity` names, if given.
    pub(crate) fn extend_leases_of(
        &self,
        group: &str,
        identity: Option<&GroupIdentity>,
        member: &str,
        offsets: &[Offset],
        ack_timeout_ms: Option<u64>,
    ) -> Result<Vec<Offset>> {
        let _pass = self.enter()?;
        if let Some(ms) = ack_timeout_ms
            && !(1..=MAX_DURATION_MS).contains(&ms)
        {
            return Err(Error::InvalidArgument(format!(
                "ack_timeout_ms {ms} is outside 1..={MAX_DURATION_MS} (100 years)"
            )));
        }
        let now = timer_ms();
        self.with_group_as(group, identity, |g| {
            self.check_queue(g)?;
            let deadline = now.saturating_add(ack_timeout_ms.unwrap_or(g.config().ack_timeout_ms));
            Ok(offsets
                .iter()
                .copied()
                .filter(|o| g.extend(o.0, member, now, deadline))
                .collect())
        })
    }

    /// Queue group: gives back, due at once, the leases of deliveries
    /// `member` was handed (a consumer that leaves): each `(offset,
    /// delivery)` only while `member` holds that delivery's lease (one that
    /// expired and was leased again, to another member or under the same
    /// member name, stays with whoever has it now). Returns how many were
    /// given back.
    pub fn release_leases(
        &self,
        group: &str,
        member: &str,
        leased: &[(u64, u32)],
    ) -> Result<usize> {
        self.release_deliveries(group, None, member, leased, false)
    }

    /// Queue group: gives back, due at once, the leases of a read whose
    /// reader went away before it took them: each `(offset, delivery)`
    /// only while `member` holds that delivery's lease (one that ran out
    /// and was leased again, even to the same member name, is another
    /// read's). Nothing of them was sent, so those deliveries do not
    /// count toward `max_deliveries`. Returns how many.
    pub fn release_unread(
        &self,
        group: &str,
        member: &str,
        leased: &[(u64, u32)],
    ) -> Result<usize> {
        self.release_deliveries(group, None, member, leased, true)
    }

    /// [`Topic::release_where`] of the `(offset, delivery)` pairs `leased`:
    /// [`Topic::release_leases`] (or, `never_sent`, [`Topic::release_unread`])
    /// in the group `identity` names, if given (a group created again under
    /// its name never leased them).
    pub(crate) fn release_deliveries(
        &self,
        group: &str,
        identity: Option<&GroupIdentity>,
        member: &str,
        leased: &[(u64, u32)],
        never_sent: bool,
    ) -> Result<usize> {
        let which: Vec<(u64, Option<u32>)> = leased.iter().map(|&(o, d)| (o, Some(d))).collect();
        self.release_where(group, identity, member, Some(&which), never_sent)
    }

    /// Queue group: gives back, due at once, every lease `member` holds (a
    /// consumer gone, whatever it was handed). Returns how many.
    pub fn release_member(&self, group: &str, member: &str) -> Result<usize> {
        self.release_where(group, None, member, None, false)
    }

    /// Gives back the leases `member` holds on `which` (each offset, and
    /// the delivery its lease must be, if given), or all of them; with
    /// `never_sent`, those deliveries are taken back too (see
    /// [`Group::undeliver`]).
    fn release_where(
        &self,
        group: &str,
        identity: Option<&GroupIdentity>,
        member: &str,
        which: Option<&[(u64, Option<u32>)]>,
        never_sent: bool,
    ) -> Result<usize> {
        let _pass = self.enter()?;
        let now = timer_ms();
        self.with_group_as(group, identity, |g| {
            self.check_queue(g)?;
            let which = match which {
                Some(which) => which.to_vec(),
                None => g.leased_to(member).into_iter().map(|o| (o, None)).collect(),
            };
            let (mut released, mut uncounted) = (0, false);
            for (o, delivery) in which {
                let mine = g.lease(o).is_some_and(|l| {
                    l.member == member && delivery.is_none_or(|d| l.delivery == d)
                });
                if !mine || !g.nack(o, now, 0) {
                    continue;
                }
                released += 1;
                // An unread read's delivery never left the broker.
                if let Some(d) = delivery.filter(|_| never_sent) {
                    match g.undeliver(o, d) {
                        Ok(()) => uncounted = true,
                        Err(e) => tracing::warn!(topic = self.name(), group = g.name(), offset = o, error = %e,
                            "could not take back a delivery that was never sent; it counts toward max_deliveries"),
                    }
                }
            }
            // Durable, so that a crash does not count them after all.
            if uncounted && let Err(e) = g.sync() {
                tracing::warn!(topic = self.name(), group = g.name(), error = %e,
                    "could not sync deliveries taken back; after a crash they count toward max_deliveries");
            }
            Ok(released)
        })
    }
}

/// Completes for `g` the run of deleted offsets that starts at `offset`
/// (deleted, so below `end`), at once: a million deleted records are one
/// step under the group's lock, not a million. Its leased offsets are left
/// to their leases; the deletions are durable before any completion stands
/// on them. Returns where the run ends, always past `offset` (a reader
/// going back would complete live records).
fn complete_deleted_run(
    g: &mut Group,
    deletions: &Deletions,
    offset: u64,
    end: u64,
) -> Result<u64> {
    let run_end = deletions
        .set()
        .first_gap_from(offset)
        .min(end)
        .max(offset + 1);
    if g.first_not_done(offset) < run_end {
        deletions.wait_durable()?;
        g.complete_unleased(offset, run_end)?;
    }
    Ok(run_end)
}
