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

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{Tensor, TensorId};

/// What one [`no_grad`] scope shares: weights prepared once for the whole scope (a linear
/// layer's transposed weight). Within a scope the weights cannot change — nothing trains inside
/// one — and the scope's end drops them, so they never go stale.
#[derive(Default)]
pub(crate) struct Prepared {
    weights: Mutex<HashMap<TensorId, Tensor>>,
    /// Under `--precision bf16`: each linear layer's weight packed to bf16 for the AMX GEMM once
    /// for the scope (half the bytes of the f32 weight), not on every batch.
    packed: Mutex<HashMap<TensorId, Option<Arc<super::bf16::PackedB>>>>,
}

impl Prepared {
    /// The weight prepared for `id`, made by `make` the first time.
    pub(crate) fn get_or(
        &self,
        id: TensorId,
        make: impl FnOnce() -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let lock = || self.weights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = lock().get(&id) {
            return Ok(t.clone());
        }
        // Made without the lock held: `make` runs parallel work, and a rayon worker waiting on
        // it may pick up another layer's forward that asks for its own prepared weight.
        let t = make()?;
        Ok(lock().entry(id).or_insert(t).clone())
    }

    /// The bf16-packed weight for `id`, made by `make` the first time (`None` is kept too: a
    /// weight that cannot be packed is not tried again).
    pub(crate) fn packed_or(
        &self,
        id: TensorId,
        make: impl FnOnce() -> Option<super::bf16::PackedB>,
    ) -> Option<Arc<super::bf16::PackedB>> {
        let lock = || self.packed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = lock().get(&id) {
            return p.clone();
        }
        // Made without the lock held, as in `get_or`.
        let p = make().map(Arc::new);
        lock().entry(id).or_insert(p).clone()
    }
}

thread_local! {
    /// `Some` inside [`no_grad`].
    static SCOPE: RefCell<Option<Arc<Prepared>>> = const { RefCell::new(None) };
}

/// Restores the calling thread's scope when dropped (also on a panic).
struct Restore(Option<Arc<Prepared>>);

impl Drop for Restore {
    fn drop(&mut self) {
        let previous = self.0.take();
        SCOPE.with(|s| *s.borrow_mut() = previous);
    }
}

fn in_scope<R>(scope: Option<Arc<Prepared>>, f: impl FnOnce() -> R) -> R {
    let _restore = Restore(SCOPE.with(|s| std::mem::replace(&mut *s.borrow_mut(), scope)));
    f()
}

fn current() -> Option<Arc<Prepared>> {
    SCOPE.with(|s| s.borrow().clone())
}

/// Whether the layers record a graph for a backward pass here (true unless inside [`no_grad`]).
pub fn grad_enabled() -> bool {
    SCOPE.with(|s| s.borrow().is_none())
}

/// Runs `f` with the layers' weights detached: its outputs have no graph and cannot be
/// differentiated, and its activations are freed as it goes. For inference only. Wrap a whole
/// loop over batches in one scope: what the layers prepare from their weights is kept for it.
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    match current() {
        Some(_) => f(),
        None => in_scope(Some(Arc::default()), f),
    }
}

/// The weights prepared in the current [`no_grad`] scope (`None` outside one).
pub(crate) fn prepared() -> Option<Arc<Prepared>> {
    current()
}

/// A layer's parameter as its forward pass uses it: itself, or detached inside [`no_grad`].
pub fn param(t: &Tensor) -> Tensor {
    if grad_enabled() {
        t.clone()
    } else {
        t.detach()
    }
}

/// Runs `f` on a worker of rayon's global pool (inline when already on one), in the calling
/// thread's [`no_grad`] scope, and returns its result. Wrap whole units of work — a training
/// step, a batch's forward pass — not single ops.
pub fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // The scope is per thread, so it travels with the work; re-establishing it also keeps
    // another thread's job, stolen by this worker while it waits, from seeing it.
    let scope = current();
    rayon::scope(|_| in_scope(scope, f))
}
