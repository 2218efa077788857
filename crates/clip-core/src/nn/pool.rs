//! Where a model's work runs: on a thread of rayon's global pool, where the kernels' parallel
//! loops run.
//!
//! A parallel loop started from a thread outside the pool (the program's main thread) hands its
//! work to a sleeping worker and blocks on a latch until it is done: a futex wake and a futex wait
//! for every op. A training step of `tiny` runs hundreds of ops, and those hand-overs took ~20 % of
//! its time (`perf`: `try_to_wake_up`, `LockLatch::wait_and_reset`). Started from a worker, the
//! same loop splits in place and the other workers steal from it. Measured with `bench train
//! --preset tiny` on 2 threads: 48 → 39 ms a step, the same losses.

/// Runs `f` on a worker of rayon's global pool (inline when already on one) and returns its
/// result. Wrap whole units of work — a training step, a batch's forward pass — not single ops.
pub fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
