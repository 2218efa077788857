//! Ranks as threads of one process: the collectives through shared memory. For tests, and for
//! checking that a data-parallel step equals the one-process step without an MPI installation.

use std::sync::{Arc, Barrier, Mutex};

use anyhow::{bail, Result};

use super::Collective;

/// One rank of a world of threads ([`LocalWorld::new`]). Each rank must run on its own thread
/// (and its own compute pool: a rank blocks in a collective until every rank reaches it).
pub struct LocalWorld {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    slots: Mutex<Vec<Vec<f32>>>,
    barrier: Barrier,
}

impl LocalWorld {
    /// The `size` ranks of a new world, rank i at index i.
    pub fn new(size: usize) -> Vec<LocalWorld> {
        let shared = Arc::new(Shared {
            slots: Mutex::new(vec![vec![]; size]),
            barrier: Barrier::new(size),
        });
        (0..size)
            .map(|rank| LocalWorld {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Every rank's `mine`, in rank order.
    fn exchange(&self, mine: &[f32]) -> Result<Vec<Vec<f32>>> {
        let lock = || match self.shared.slots.lock() {
            Ok(g) => Ok(g),
            Err(_) => bail!("rank {}: another rank panicked during a collective", self.rank),
        };
        lock()?[self.rank] = mine.to_vec();
        self.shared.barrier.wait();
        let all = lock()?.clone();
        // No rank writes the next round's values before every rank has read these.
        self.shared.barrier.wait();
        Ok(all)
    }
}

impl Collective for LocalWorld {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.barrier_size()
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        Ok(self.exchange(local)?.concat())
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let all = self.exchange(buf)?;
        if all.iter().any(|v| v.len() != buf.len()) {
            bail!("rank {}: the ranks reduce buffers of different lengths", self.rank);
        }
        // In rank order on every rank: the same sums, bit for bit.
        buf.fill(0.0);
        for v in &all {
            for (b, x) in buf.iter_mut().zip(v) {
                *b += x;
            }
        }
        Ok(())
    }

    fn broadcast(&self, buf: &mut [f32]) -> Result<()> {
        let all = self.exchange(buf)?;
        if all[0].len() != buf.len() {
            bail!(
                "rank {}: rank 0 broadcast {} values, {} expected",
                self.rank,
                all[0].len(),
                buf.len()
            );
        }
        buf.copy_from_slice(&all[0]);
        Ok(())
    }
}

impl Shared {
    fn barrier_size(&self) -> usize {
        self.slots.lock().map(|s| s.len()).unwrap_or(0)
    }
}
