//! A world that measures its own traffic: how many bytes the collectives move and how long
//! ranks spend in them (waiting for the slowest rank included), for stage 4's report.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;

use super::Collective;

/// [`Collective`] over another one, counting as it goes.
pub struct Metered {
    inner: Arc<dyn Collective>,
    calls: AtomicU64,
    bytes: AtomicU64,
    nanos: AtomicU64,
}

/// What the collectives have done so far on this rank.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Traffic {
    pub calls: u64,
    /// The collectives' payloads: an all-gather's result, an all-reduced or broadcast buffer.
    pub bytes: u64,
    /// Time spent inside them.
    pub seconds: f64,
}

impl Metered {
    pub fn new(inner: Arc<dyn Collective>) -> Self {
        Self {
            inner,
            calls: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            nanos: AtomicU64::new(0),
        }
    }

    pub fn traffic(&self) -> Traffic {
        Traffic {
            calls: self.calls.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            seconds: self.nanos.load(Ordering::Relaxed) as f64 * 1e-9,
        }
    }

    fn count<R>(&self, values: usize, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let started = Instant::now();
        let r = f();
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add((values * 4) as u64, Ordering::Relaxed);
        self.nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }
}

impl Collective for Metered {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        self.count(local.len() * self.size(), || self.inner.all_gather(local))
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let n = buf.len();
        self.count(n, || self.inner.all_reduce_sum(buf))
    }
    fn broadcast(&self, buf: &mut [f32]) -> Result<()> {
        let n = buf.len();
        self.count(n, || self.inner.broadcast(buf))
    }
    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }
    fn abort(&self, code: i32) -> ! {
        self.inner.abort(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::Solo;

    #[test]
    fn it_counts_payloads_and_calls() {
        let m = Metered::new(Arc::new(Solo));
        m.all_gather(&[1.0, 2.0]).unwrap();
        m.all_reduce_sum(&mut [0.0; 5]).unwrap();
        m.broadcast(&mut [0.0; 3]).unwrap();
        let t = m.traffic();
        assert_eq!((t.calls, t.bytes), (3, (2 + 5 + 3) * 4));
        assert!(t.seconds >= 0.0);
    }
}
