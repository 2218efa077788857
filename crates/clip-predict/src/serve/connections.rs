//! The open connections, bounded below the open-file limit: at the bound a new connection closes
//! the one idle longest (one without a request in flight).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::{MAX_CONNECTIONS, RESERVED_FILES};

/// The process's open-file limit (soft), if it has one.
pub(super) fn open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 && lim.rlim_cur != libc::RLIM_INFINITY {
            #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
            return Some(lim.rlim_cur as u64);
        }
    }
    None
}

/// The most connections held at once under an open-file limit: [`MAX_CONNECTIONS`], less when
/// the limit minus what is kept free ([`RESERVED_FILES`], or a quarter of a small limit) is
/// lower; at least 8.
pub(super) fn connection_bound(open_files: Option<u64>) -> usize {
    let Some(n) = open_files else {
        return MAX_CONNECTIONS;
    };
    let free = n.saturating_sub((n / 4).min(RESERVED_FILES));
    (free.min(MAX_CONNECTIONS as u64) as usize).max(8)
}

/// The open connections: whether each has a request in flight, since when it is idle, and how to
/// close it.
pub(super) struct Connections {
    bound: usize,
    table: Mutex<ConnectionTable>,
}

#[derive(Default)]
struct ConnectionTable {
    /// Counts admissions and ends of requests: orders connections by how long they are idle.
    tick: u64,
    open: HashMap<u64, Connection>,
}

struct Connection {
    /// Requests in flight (their answer not yet all handed to hyper).
    busy: usize,
    /// The tick at which it was admitted or its last request ended.
    idle_since: u64,
    /// Closes it (dropping the sender closes it too).
    close: oneshot::Sender<()>,
}

impl Connections {
    pub(super) fn new(bound: usize) -> Self {
        Connections {
            bound,
            table: Mutex::new(ConnectionTable::default()),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, ConnectionTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new connection: its id, what closes it, and whether another was closed to make
    /// room (at the bound, the connection idle longest); when none is idle, `None` (close the new
    /// one).
    pub(super) fn admit(&self) -> Option<(u64, oneshot::Receiver<()>, bool)> {
        let mut t = self.table();
        let full = t.open.len() >= self.bound;
        if full {
            let oldest = t
                .open
                .iter()
                .filter(|(_, c)| c.busy == 0)
                .min_by_key(|(_, c)| c.idle_since)
                .map(|(&id, _)| id)?;
            if let Some(c) = t.open.remove(&oldest) {
                let _ = c.close.send(());
            }
        }
        t.tick += 1;
        let id = t.tick;
        let (close, closed) = oneshot::channel();
        t.open.insert(
            id,
            Connection {
                busy: 0,
                idle_since: id,
                close,
            },
        );
        Some((id, closed, full))
    }

    /// Marks a request in flight on connection `id` until the guard is dropped.
    pub(super) fn busy(self: &Arc<Self>, id: u64) -> Busy {
        if let Some(c) = self.table().open.get_mut(&id) {
            c.busy += 1;
        }
        Busy {
            connections: self.clone(),
            id,
        }
    }

    fn remove(&self, id: u64) {
        self.table().open.remove(&id);
    }

    #[cfg(test)]
    fn ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.table().open.keys().copied().collect();
        ids.sort();
        ids
    }
}

/// A request in flight on a connection (which is then never closed to make room).
pub(super) struct Busy {
    connections: Arc<Connections>,
    id: u64,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut t = self.connections.table();
        t.tick += 1;
        let tick = t.tick;
        if let Some(c) = t.open.get_mut(&self.id) {
            c.busy -= 1;
            if c.busy == 0 {
                c.idle_since = tick;
            }
        }
    }
}

/// Removes a connection from the table when its task ends.
pub(super) struct Registered(pub(super) Arc<Connections>, pub(super) u64);

impl Drop for Registered {
    fn drop(&mut self) {
        self.0.remove(self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_bound_stays_below_the_open_file_limit() {
        assert_eq!(connection_bound(None), MAX_CONNECTIONS);
        assert_eq!(connection_bound(Some(1 << 20)), MAX_CONNECTIONS);
        assert_eq!(connection_bound(Some(1024)), 768);
        assert_eq!(connection_bound(Some(256)), 192);
        assert_eq!(connection_bound(Some(4)), 8);
        for n in [64, 256, 1000, 4096, 4352, 65536] {
            let b = connection_bound(Some(n)) as u64;
            assert!(b < n && b <= MAX_CONNECTIONS as u64, "{n}: {b}");
        }
    }

    #[test]
    fn at_the_bound_the_connection_idle_longest_is_closed_never_one_with_a_request() {
        let c = Arc::new(Connections::new(3));
        let (a, mut a_closed, _) = c.admit().unwrap();
        let (b, mut b_closed, _) = c.admit().unwrap();
        let (d, mut d_closed, made_room) = c.admit().unwrap();
        assert!(!made_room);
        // `a` has a request in flight: `b`, idle longest of the others, makes room.
        let busy_a = c.busy(a);
        let (e, _e_closed, made_room) = c.admit().unwrap();
        assert!(made_room);
        assert_eq!(c.ids(), vec![a, d, e]);
        assert!(!c.ids().contains(&b));
        assert!(b_closed.try_recv().is_ok());
        assert!(a_closed.try_recv().is_err() && d_closed.try_recv().is_err());
        // `d` is served a request and kept alive: now `e` is idle longest.
        drop(c.busy(d));
        let (f, _f_closed, _) = c.admit().unwrap();
        assert_eq!(c.ids(), vec![a, d, f]);
        // Every connection busy: the new one is refused, none is closed.
        let (_busy_d, _busy_f) = (c.busy(d), c.busy(f));
        assert!(c.admit().is_none());
        assert_eq!(c.ids(), vec![a, d, f]);
        assert!(a_closed.try_recv().is_err() && d_closed.try_recv().is_err());
        // `a`'s request answered: it can make room again.
        drop(busy_a);
        let (g, _, _) = c.admit().unwrap();
        assert_eq!(c.ids(), vec![d, f, g]);
        assert!(a_closed.try_recv().is_ok());
        // A connection whose task ended leaves the table.
        Registered(c.clone(), g);
        assert_eq!(c.ids(), vec![d, f]);
    }
}
