//! Who gets a connection: at most `max_connections` open in all, at most
//! `max_connections_per_ip` from one address; a ticket holds the slot until
//! the connection ends. Also the tally of connections turned away or closed
//! by a limit, logged as one line per interval rather than a line each (a
//! flood of 1000 refusals is one line, not 1000).

use crate::metrics::{ConnectionGuard, Metrics};
use crate::protocol::{pb, status};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How often the tally is logged (when it is not zero).
pub(crate) const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// A limit that turned a connection away or closed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// Refused: `max_connections` open.
    MaxConnections,
    /// Refused: `max_connections_per_ip` open from that address.
    PerIp,
    /// Closed: no frame for `idle_timeout_ms`.
    Idle,
    /// Closed: a frame (or the handshake) not completed within `frame_timeout_ms`.
    Frame,
    /// Closed: the peer took no bytes for `write_timeout_ms`.
    Write,
}

impl Limit {
    const ALL: [Limit; 5] = [
        Limit::MaxConnections,
        Limit::PerIp,
        Limit::Idle,
        Limit::Frame,
        Limit::Write,
    ];

    /// The setting behind the limit, as the log names it.
    fn setting(self) -> &'static str {
        match self {
            Limit::MaxConnections => "max_connections",
            Limit::PerIp => "max_connections_per_ip",
            Limit::Idle => "idle_timeout_ms",
            Limit::Frame => "frame_timeout_ms",
            Limit::Write => "write_timeout_ms",
        }
    }

    fn refusal(self) -> bool {
        matches!(self, Limit::MaxConnections | Limit::PerIp)
    }
}

type PerIp = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// The refusal of one more subscription on a connection that has `live`
/// open and a limit of `max` (`max_subscriptions`): one message for the
/// native `subscribe` and gRPC's `Subscribe` and `Consume`.
pub(crate) fn too_many_subscriptions(live: usize, max: u32) -> pb::Error {
    status::error(
        pb::Code::ResourceExhausted,
        format!("{live} subscriptions on this connection; the limit is {max} (max_subscriptions)"),
    )
}

/// Most refused connections being told why at once (over all listeners):
/// each holds a descriptor meanwhile (on TLS, through a handshake), so past
/// this many a refused connection is closed at once, without a word.
pub(crate) const MOST_REFUSING: usize = 64;

/// Longest a refused connection is kept to be told why.
pub(crate) const REFUSAL_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// The connection slots and the tally.
#[derive(Debug)]
pub(crate) struct Admission {
    slots: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    per_ip: Option<(usize, PerIp)>,
    counts: [AtomicU64; Limit::ALL.len()],
    metrics: Metrics,
}

/// A connection's slot, given back on drop.
#[derive(Debug)]
pub(crate) struct Ticket {
    _slot: OwnedSemaphorePermit,
    ip: Option<(IpAddr, PerIp)>,
    _open: ConnectionGuard,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some((ip, per_ip)) = &self.ip {
            release(per_ip, *ip);
        }
    }
}

/// Takes one connection of `ip` off the count.
fn release(per_ip: &PerIp, ip: IpAddr) {
    let mut open = per_ip.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = open.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            open.remove(&ip);
        }
    }
}

impl Admission {
    /// Slots for `max_connections`, and `max_connections_per_ip` from one address.
    pub(crate) fn new(
        max_connections: usize,
        max_connections_per_ip: Option<usize>,
        metrics: Metrics,
    ) -> Admission {
        Admission {
            slots: Arc::new(Semaphore::new(max_connections)),
            refusing: Arc::new(Semaphore::new(MOST_REFUSING)),
            per_ip: max_connections_per_ip.map(|n| (n, PerIp::default())),
            counts: Default::default(),
            metrics,
        }
    }

    /// A place to tell a refused connection why (for at most
    /// [`REFUSAL_TIME`]), or `None` when [`MOST_REFUSING`] are being told:
    /// then close it at once.
    fn refusing(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.refusing).try_acquire_owned().ok()
    }

    /// Runs `tell`, the refusal of a connection, within the bounds of
    /// [`Admission::refusing`]; closes the connection at once (drops it
    /// with `tell`) when too many are being told.
    pub(crate) async fn refuse_within(&self, tell: impl std::future::Future<Output = ()>) {
        let Some(_place) = self.refusing() else {
            return;
        };
        let _ = tokio::time::timeout(REFUSAL_TIME, tell).await;
    }

    /// `listener` (`native`, `grpc`, ...) takes connections: its series
    /// are there from now on.
    pub(crate) fn listening(&self, listener: &'static str) {
        self.metrics.listening(listener);
    }

    /// A slot for a connection from `ip` on `listener` (`native`, `grpc`,
    /// ...: the label of its connection metrics, counted open while the
    /// ticket lives), or the error that refuses it (the refusal is counted).
    pub(crate) fn admit(&self, listener: &'static str, ip: IpAddr) -> Result<Ticket, pb::Error> {
        // An IPv4 client reaching a dual-stack listener shows as
        // `::ffff:a.b.c.d`: one address, one count, on every listener.
        let ip = ip.to_canonical();
        let mut ticket_ip = None;
        if let Some((max, per_ip)) = &self.per_ip {
            let mut open = per_ip.lock().unwrap_or_else(|p| p.into_inner());
            let n = open.entry(ip).or_insert(0);
            if *n >= *max {
                drop(open);
                self.count(Limit::PerIp);
                return Err(status::error(
                    pb::Code::ResourceExhausted,
                    format!(
                        "too many connections from {ip}: max_connections_per_ip is {max}; try again later"
                    ),
                ));
            }
            *n += 1;
            ticket_ip = Some((ip, Arc::clone(per_ip)));
        }
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(slot) => Ok(Ticket {
                _slot: slot,
                ip: ticket_ip,
                _open: self.metrics.connection(listener),
            }),
            Err(_) => {
                if let Some((ip, per_ip)) = ticket_ip {
                    release(&per_ip, ip);
                }
                self.count(Limit::MaxConnections);
                Err(status::error(
                    pb::Code::ResourceExhausted,
                    "too many connections; try again later",
                ))
            }
        }
    }

    /// Counts a connection refused or closed by `limit`.
    pub(crate) fn count(&self, limit: Limit) {
        self.counts[limit as usize].fetch_add(1, Ordering::Relaxed);
        if limit.refusal() {
            self.metrics.refused(limit.setting());
        } else {
            self.metrics.closed_by_limit(limit.setting());
        }
    }

    /// Logs what was counted since the last call, in one line (nothing when
    /// nothing was): a warning when connections were refused.
    pub(crate) fn log_summary(&self) {
        let taken = Limit::ALL.map(|l| (l, self.counts[l as usize].swap(0, Ordering::Relaxed)));
        let part = |refused: bool| {
            let items: Vec<String> = taken
                .iter()
                .filter(|(l, n)| *n > 0 && l.refusal() == refused)
                .map(|(l, n)| format!("{n} by {}", l.setting()))
                .collect();
            items.join(", ")
        };
        let (refused, closed) = (part(true), part(false));
        match (refused.is_empty(), closed.is_empty()) {
            (true, true) => {}
            (false, true) => tracing::warn!("connections refused: {refused}"),
            (true, false) => tracing::info!("connections closed: {closed}"),
            (false, false) => {
                tracing::warn!("connections refused: {refused}; connections closed: {closed}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metrics make each limit's series at 0 from these lists, so they
    /// name exactly the settings the limits count under.
    #[test]
    fn every_limit_has_its_series_from_the_start() {
        for limit in Limit::ALL {
            let listed = if limit.refusal() {
                &crate::metrics::REFUSAL_REASONS[..]
            } else {
                &crate::metrics::CLOSE_REASONS[..]
            };
            assert!(listed.contains(&limit.setting()), "{limit:?}");
        }
        assert_eq!(
            crate::metrics::REFUSAL_REASONS.len() + crate::metrics::CLOSE_REASONS.len(),
            Limit::ALL.len()
        );
    }

    #[test]
    fn a_slot_and_an_address_count_come_back_with_the_ticket() {
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let admission = Admission::new(3, Some(2), Metrics::new());
        let t1 = admission.admit("native", a).expect("first from a");
        let t2 = admission.admit("native", a).expect("second from a");
        let err = admission.admit("native", a).expect_err("third from a");
        assert!(
            err.message.contains("max_connections_per_ip is 2"),
            "{err:?}"
        );
        let t3 = admission.admit("native", b).expect("b has its own count");
        let err = admission.admit("native", b).expect_err("no slot left");
        assert!(err.message.contains("too many connections;"), "{err:?}");
        drop(t1);
        let t4 = admission
            .admit("native", a)
            .expect("a slot and a's count came back");
        drop((t2, t3, t4));
        let open = admission
            .per_ip
            .as_ref()
            .map(|(_, m)| m.lock().map(|m| m.len()));
        assert!(matches!(open, Some(Ok(0))), "no address left behind");
        assert_eq!(
            admission.counts[Limit::PerIp as usize].load(Ordering::Relaxed),
            1
        );
        assert_eq!(
            admission.counts[Limit::MaxConnections as usize].load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn an_ipv4_address_mapped_into_ipv6_shares_its_count() {
        let v4: IpAddr = [10, 0, 0, 7].into();
        let mapped: IpAddr = std::net::Ipv4Addr::new(10, 0, 0, 7).to_ipv6_mapped().into();
        let admission = Admission::new(8, Some(1), Metrics::new());
        let _t = admission.admit("native", v4).expect("first");
        let err = admission
            .admit("grpc", mapped)
            .expect_err("the same address on a dual-stack listener");
        assert!(
            err.message.contains("too many connections from 10.0.0.7"),
            "{err:?}"
        );
    }
}
