//! Where a model's work runs (a worker of rayon's global pool), and whether it builds a graph for
//! a backward pass.
//!
//! **The pool.** A parallel loop started from a thread outside the pool (the program's main
//! thread) hands its work to a sleeping worker and blocks on a latch until it is done: a futex wake
//! and a futex wait for every op. A training step of `tiny` runs hundreds of ops, and those
//! hand-overs took ~20 % of its time (`perf`: `try_to_wake_up`, `LockLatch::wait_and_reset`).
//! Started from a worker, the same loop splits in place and the other workers steal from it.
//! Measured with `bench train --preset tiny` on 2 threads: 48 → 39 ms a step, the same losses.
//!
//! **Inference without a graph.** The weights are `Var`s, so every op on them records its inputs
//! for a backward pass, and a forward pass keeps all its activations alive until its output is
//! dropped — even in evaluation mode, where nothing calls `backward`. Inside [`no_grad`] the
//! layers use their weights detached ([`param`]), nothing is recorded, and each activation is
//! freed as soon as the next layer has read it (PyTorch's `inference_mode`).

use std::cell::Cell;

use candle_core::Tensor;

thread_local! {
    static NO_GRAD: Cell<bool> = const { Cell::new(false) };
}

/// Restores the calling thread's setting when dropped (also on a panic).
struct Restore(bool);

impl Drop for Restore {
    fn drop(&mut self) {
        NO_GRAD.set(self.0);
    }
}

fn with_no_grad<R>(on: bool, f: impl FnOnce() -> R) -> R {
    let _restore = Restore(NO_GRAD.replace(on));
    f()
}

/// Whether the layers record a graph for a backward pass here (true unless inside [`no_grad`]).
pub fn grad_enabled() -> bool {
    !NO_GRAD.get()
}

/// Runs `f` with the layers' weights detached: its outputs have no graph and cannot be
/// differentiated, and its activations are freed as it goes. For inference only.
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    with_no_grad(true, f)
}

/// A layer's parameter as its forward pass uses it: itself, or detached inside [`no_grad`].
pub fn param(t: &Tensor) -> Tensor {
    if grad_enabled() {
        t.clone()
    } else {
        t.detach()
    }
}

/// Runs `f` on a worker of rayon's global pool (inline when already on one), under the calling
/// thread's [`no_grad`] setting, and returns its result. Wrap whole units of work — a training
/// step, a batch's forward pass — not single ops.
pub fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // The setting is per thread, so it travels with the work; re-establishing it also keeps
    // another thread's job, stolen by this worker while it waits, from seeing it.
    let no = !grad_enabled();
    rayon::scope(|_| with_no_grad(no, f))
}
