//! The connection audit stream (`WatchConnections`): the kernel's connection events, with the
//! process, cgroup, container and service each belongs to; and subscriptions to it and to the
//! breakers' events.
//!
//! The programs write events only while someone watches (`Kernel::set_audit`), so the stream
//! costs nothing when unused; counts never depend on it.

use std::{net::IpAddr, sync::Arc, time::UNIX_EPOCH};

use breakwater_common::{conn_event, counter, fail_reason, ConnEvent};
use futures::Stream;
use tokio::sync::broadcast;

use super::{breakers::BreakerEvent, features::Feature, policy::errno_name, service, Core, Kernel};
use crate::{cgroup, error::Result};

/// What happened to a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionEventKind {
    /// A kind this agent does not know.
    Unspecified,
    Opened,
    Closed,
    Failed,
    /// Refused by an open breaker, before any SYN.
    Rejected,
}

/// One connection event, as the kernel reported it and the agent resolved it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionEvent {
    pub kind: ConnectionEventKind,
    /// Failed: refused, timeout or other; rejected: the errno's name.
    pub reason: String,
    /// `breakwater_common::direction`
    pub direction: u8,
    /// None when the kernel reported none (a rejected connect has no local end yet).
    pub local_address: Option<IpAddr>,
    pub local_port: u16,
    pub remote_address: IpAddr,
    pub remote_port: u16,
    pub netns: u32,
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    /// Under the cgroup2 mount; empty if unknown.
    pub cgroup: String,
    pub container_id: String,
    /// Empty if none.
    pub service: String,
    pub time_unix_ms: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_us: u64,
    /// Events the kernel had no room for just before this one.
    pub lost: u64,
}

/// An event that belongs to a service (or to none: "").
pub trait OfService {
    fn service(&self) -> &str;
    /// Events the kernel lost just before this one, of any service.
    fn lost(&self) -> u64 {
        0
    }
}

impl OfService for ConnectionEvent {
    fn service(&self) -> &str {
        &self.service
    }

    fn lost(&self) -> u64 {
        self.lost
    }
}

impl<E: OfService> OfService for Arc<E> {
    fn service(&self) -> &str {
        E::service(self)
    }

    fn lost(&self) -> u64 {
        E::lost(self)
    }
}

impl OfService for BreakerEvent {
    fn service(&self) -> &str {
        &self.service
    }
}

/// A subscriber's events: every one from when it subscribed, only one service's unless that is
/// empty.
pub struct Subscription<E> {
    rx: broadcast::Receiver<E>,
    service: String,
}

impl<E: OfService + Clone + Send + 'static> Subscription<E> {
    pub fn new(rx: broadcast::Receiver<E>, service: &str) -> Self {
        Self {
            rx,
            service: service.to_owned(),
        }
    }

    /// The events as they come, each with the number this subscriber lost just before it (a
    /// slow subscriber loses the oldest); ends when the agent stops.
    pub fn stream(self) -> impl Stream<Item = (E, u64)> + Send + 'static {
        use broadcast::error::RecvError;
        futures::stream::unfold(self, |mut sub| async move {
            let mut lost = 0;
            loop {
                match sub.rx.recv().await {
                    Ok(e) if sub.service.is_empty() || e.service() == sub.service => {
                        return Some(((e, lost), sub));
                    }
                    // What the kernel lost before another service's event may have been this
                    // subscriber's: it is told, with its next event.
                    Ok(e) => lost += e.lost(),
                    // Lost events may have been any service's: count them all.
                    Err(RecvError::Lagged(n)) => lost += n,
                    Err(RecvError::Closed) => return None,
                }
            }
        })
    }
}

fn comm(bytes: &[u8; 16]) -> String {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..len]).into_owned()
}

impl<K: Kernel + ?Sized> Core<K> {
    /// The connection events from now on, only `service`'s unless it is empty. Needs the
    /// audit stream; NotFound for an unknown service.
    pub fn watch_connections(
        &mut self,
        service: &str,
    ) -> Result<Subscription<Arc<ConnectionEvent>>> {
        self.kernel.features().require(Feature::AuditStream)?;
        self.require_known(service)?;
        self.kernel.set_audit(true)?;
        Ok(Subscription::new(self.audit.subscribe(), service))
    }

    /// Turns the audit programs on while anyone watches, off when the last one has gone.
    pub fn update_audit(&mut self) {
        let watched = self.audit.receiver_count() > 0;
        if let Err(e) = self.kernel.set_audit(watched) {
            tracing::warn!(error = %e, "cannot switch the audit stream");
        }
    }

    /// Connection events the kernel wrote (from its ring buffer), fanned out to the
    /// subscribers; the first carries what the kernel lost since the last batch.
    pub fn on_connection_events(&mut self, batch: &[ConnEvent]) {
        let lost_now = self.kernel.counter(counter::AUDIT_LOST);
        let mut lost = lost_now.saturating_sub(self.audit_lost);
        self.audit_lost = lost_now;
        let mono_now = self.kernel.now_ns();
        let wall_now = UNIX_EPOCH.elapsed().unwrap_or_default().as_millis() as u64;
        for e in batch {
            let ago_ms = mono_now.saturating_sub(e.time_ns) / 1_000_000;
            let mut ev = self.connection_event(e, wall_now.saturating_sub(ago_ms));
            ev.lost = std::mem::take(&mut lost);
            // No subscribers (the last one just left) is no error.
            let _ = self.audit.send(Arc::new(ev));
        }
    }

    /// One kernel event with its names resolved.
    fn connection_event(&mut self, e: &ConnEvent, time_unix_ms: u64) -> ConnectionEvent {
        let (kind, reason) = match e.kind {
            conn_event::OPENED => (ConnectionEventKind::Opened, String::new()),
            conn_event::CLOSED => (ConnectionEventKind::Closed, String::new()),
            conn_event::FAILED => (
                ConnectionEventKind::Failed,
                match e.reason {
                    fail_reason::REFUSED => "refused",
                    fail_reason::TIMEOUT => "timeout",
                    _ => "other",
                }
                .to_owned(),
            ),
            conn_event::REJECTED => (ConnectionEventKind::Rejected, errno_name(e.errno)),
            _ => (ConnectionEventKind::Unspecified, String::new()),
        };
        let service = match self.services.name_of(e.svc) {
            Some(name) if e.svc != 0 => name.to_owned(),
            _ => String::new(),
        };
        let cgroup = self.cgroups.path_of(e.cgroup_id).unwrap_or_default();
        ConnectionEvent {
            kind,
            reason,
            direction: e.direction,
            local_address: (e.saddr != [0; 16]).then(|| service::display_addr(&e.saddr)),
            local_port: e.sport,
            remote_address: service::display_addr(&e.daddr),
            remote_port: e.dport,
            netns: e.netns,
            pid: e.pid,
            comm: comm(&e.comm),
            cgroup_id: e.cgroup_id,
            container_id: cgroup::container_id(&cgroup).unwrap_or_default(),
            cgroup,
            service,
            time_unix_ms,
            bytes_sent: e.bytes_sent,
            bytes_received: e.bytes_received,
            duration_us: e.duration_us,
            lost: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn breaker_event_streams_filter_and_count_what_was_lost() {
        use futures::StreamExt as _;
        let event = |service: &str, cause: u32| BreakerEvent {
            service: service.into(),
            transition: breakwater_common::breaker::Transition {
                from: 0,
                to: 1,
                cause,
                requests: 0,
                failures: 0,
                consecutive_failures: 0,
            },
            time: std::time::SystemTime::now(),
            destination: None,
            reason: String::new(),
        };
        let (tx, rx) = broadcast::channel(2);
        let stream = Subscription::new(rx, "db").stream();
        for (i, s) in ["db", "web", "db", "db"].iter().enumerate() {
            tx.send(event(s, i as u32 + 1)).unwrap();
        }
        drop(tx);
        // Capacity 2: the first two were overwritten; the web one is filtered out.
        let got: Vec<_> = stream.collect().await;
        assert_eq!(
            got.iter()
                .map(|(e, lost)| (e.transition.cause, *lost))
                .collect::<Vec<_>>(),
            vec![(3, 2), (4, 0)]
        );
    }

    /// The kernel's losses ride on the next event it reports, whatever its service: a
    /// subscriber to one service hears of them with its own next event.
    #[tokio::test]
    async fn kernel_losses_reach_subscribers_of_every_service() {
        use futures::StreamExt as _;
        let event = |service: &str, lost: u64| ConnectionEvent {
            kind: ConnectionEventKind::Opened,
            reason: String::new(),
            direction: 0,
            local_address: None,
            local_port: 0,
            remote_address: IpAddr::from([127, 0, 0, 1]),
            remote_port: 80,
            netns: 0,
            pid: 0,
            comm: String::new(),
            cgroup_id: 0,
            cgroup: String::new(),
            container_id: String::new(),
            service: service.into(),
            time_unix_ms: 0,
            bytes_sent: 0,
            bytes_received: 0,
            duration_us: 0,
            lost,
        };
        let (tx, rx) = broadcast::channel(16);
        let db = Subscription::new(rx, "db").stream();
        for (s, lost) in [("web", 5), ("db", 0), ("web", 2), ("web", 0), ("db", 1)] {
            tx.send(event(s, lost)).unwrap();
        }
        drop(tx);
        let got: Vec<_> = db.collect().await;
        assert_eq!(
            got.iter()
                .map(|(e, lost)| e.lost + lost)
                .collect::<Vec<_>>(),
            vec![5, 3]
        );
    }
}
