//! The live connection listing (`ListConnections`, `StreamConnections`, `breakwater conns`).
//!
//! A node may track 100k sockets. The listing copies what it shows of each out of the kernel's
//! walk, compactly (no strings: about 100 bytes a socket), under the core's lock; the answer's
//! messages are built from that copy a chunk at a time after the lock is let go. The order is
//! one function ([`ConnRow::order`]), so every RPC lists the same rows in the same order.

use std::{cmp::Reverse, collections::HashMap};

use breakwater_common::{direction, ConnRecord};

use super::{Core, Kernel};
use crate::error::Result;

/// What the listing shows of one tracked live connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRow {
    pub cookie: u64,
    /// Since the agent first saw the socket, as of the listing.
    pub age_ms: u64,
    pub cgroup_id: u64,
    /// IPv4-mapped for IPv4.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// The process's name, NUL-padded.
    pub comm: [u8; 16],
    pub netns: u32,
    pub pid: u32,
    /// The id of the service its endpoint belongs to now; 0 if none.
    pub service: u32,
    pub sport: u16,
    pub dport: u16,
    /// `tcp_state`.
    pub state: u8,
    pub direction: u8,
}

// What the module's "about 100 bytes a socket" counts on.
const _: () = assert!(std::mem::size_of::<ConnRow>() == 96);

impl ConnRow {
    fn of(r: &ConnRecord, service: u32, now_ns: u64) -> Self {
        let c = &r.info;
        Self {
            cookie: r.cookie,
            age_ms: now_ns.saturating_sub(c.start_ns) / 1_000_000,
            cgroup_id: c.cgroup_id,
            saddr: c.saddr,
            daddr: c.daddr,
            comm: c.comm,
            netns: c.netns,
            pid: c.pid,
            service,
            sport: c.sport,
            dport: c.dport,
            state: r.state as u8,
            direction: c.direction,
        }
    }

    /// The listing's order: oldest first, then by socket cookie (unique, so the order is total
    /// and no two rows tie).
    pub fn order(&self) -> (Reverse<u64>, u64) {
        (Reverse(self.age_ms), self.cookie)
    }
}

/// A tracked live connection as listed: its row and its service's name (empty if none).
pub struct Connection<'a> {
    pub row: &'a ConnRow,
    pub service: &'a str,
}

/// The connections a listing answers, in its order; owns its rows, so that it outlives the
/// core's lock.
#[derive(Debug, Default)]
pub struct ConnectionList {
    rows: Vec<ConnRow>,
    /// The services' names by id, as of the listing.
    names: HashMap<u32, String>,
}

impl ConnectionList {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The `i`th connection in the listing's order.
    pub fn get(&self, i: usize) -> Option<Connection<'_>> {
        self.rows.get(i).map(|row| self.connection(row))
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = Connection<'_>> {
        self.rows.iter().map(|row| self.connection(row))
    }

    fn connection<'a>(&'a self, row: &'a ConnRow) -> Connection<'a> {
        Connection {
            row,
            service: self.names.get(&row.service).map_or("", String::as_str),
        }
    }
}

/// The first `limit` rows (0: all) of those pushed, in the listing's order.
struct FirstRows {
    rows: Vec<ConnRow>,
    limit: usize,
}

impl FirstRows {
    /// Rows kept at least before those behind the first `limit` are dropped: fewer would
    /// select too often.
    const PRUNE_MIN: usize = 1024;

    fn new(limit: u32) -> Self {
        Self {
            rows: Vec::new(),
            limit: limit as usize,
        }
    }

    fn push(&mut self, row: ConnRow) {
        self.rows.push(row);
        // With a limit, what is kept is bounded by it, not by the node's sockets: what falls
        // behind the first `limit` is dropped now and then (linear time over the walk).
        if self.limit > 0 && self.rows.len() >= self.limit.saturating_mul(2).max(Self::PRUNE_MIN) {
            self.prune();
        }
    }

    fn prune(&mut self) {
        if self.limit > 0 && self.rows.len() > self.limit {
            self.rows
                .select_nth_unstable_by_key(self.limit, ConnRow::order);
            self.rows.truncate(self.limit);
        }
    }

    fn sorted(mut self) -> Vec<ConnRow> {
        self.prune();
        self.rows.sort_unstable_by_key(ConnRow::order);
        self.rows
    }
}

impl<K: Kernel + ?Sized> Core<K> {
    /// The tracked live connections (only `service`'s unless it is empty; NotFound for an
    /// unknown one), in the listing's order ([`ConnRow::order`]), at most `limit` (0: all).
    pub fn connections(&mut self, service: &str, limit: u32) -> Result<ConnectionList> {
        let only = match service {
            "" => None,
            name => Some(self.services.require(name)?.id),
        };
        let now = self.kernel.now_ns();
        let services = &self.services;
        let mut first = FirstRows::new(limit);
        self.kernel.for_each_connection(&mut |r| {
            let c = &r.info;
            let (addr, port) = if c.direction == direction::INBOUND {
                (&c.saddr, c.sport)
            } else {
                (&c.daddr, c.dport)
            };
            let of = services.match_endpoint(addr, port).map_or(0, |s| s.id);
            if only.is_none_or(|id| id == of) {
                first.push(ConnRow::of(r, of, now));
            }
        })?;
        let rows = first.sorted();
        let names = services.iter().map(|s| (s.id, s.name.clone())).collect();
        Ok(ConnectionList { rows, names })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(age_ms: u64, cookie: u64) -> ConnRow {
        ConnRow {
            cookie,
            age_ms,
            cgroup_id: 0,
            saddr: [0; 16],
            daddr: [0; 16],
            comm: [0; 16],
            netns: 0,
            pid: 0,
            service: 0,
            sport: 0,
            dport: 0,
            state: 0,
            direction: 0,
        }
    }

    /// Pruning as rows come keeps exactly the rows, in the order, of sorting them all and
    /// taking the first `limit`.
    #[test]
    fn a_limit_keeps_the_first_rows_of_the_whole_order() {
        // A pseudo-random order with many equal ages (the cookie breaks the tie).
        let all: Vec<ConnRow> = (0..5000u64)
            .map(|i| row(i * 7919 % 613, i * 104_729 % 5003))
            .collect();
        let mut sorted = all.clone();
        sorted.sort_by_key(ConnRow::order);
        for limit in [0, 1, 7, 1000, 2500, 4999, 5000, 6000] {
            let mut first = FirstRows::new(limit);
            for r in &all {
                first.push(*r);
            }
            let want = if limit == 0 {
                5000
            } else {
                (limit as usize).min(5000)
            };
            assert_eq!(first.sorted(), sorted[..want], "limit {limit}");
        }
    }
}
