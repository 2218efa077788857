//! The operands of a bf16 GEMM as its tasks share them: sources read in place through their
//! strides, and the destination each task writes its own rectangle of.

/// A matrix operand read in place: element (i, j) at `ptr[i·rs + j·cs]` — row-major, column-major
/// (a transpose read in place) or any other strides.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatRef {
    pub(super) ptr: *const f32,
    pub(super) rs: usize,
    pub(super) cs: usize,
}

// SAFETY: a read-only view; the callers of `gemm_bf16_into` keep the data alive and unchanged
// for the call, across whichever threads it uses.
unsafe impl Send for MatRef {}
unsafe impl Sync for MatRef {}

impl MatRef {
    pub(crate) fn new(ptr: *const f32, rs: usize, cs: usize) -> Self {
        Self { ptr, rs, cs }
    }

    /// Element (i, j).
    ///
    /// # Safety
    /// (i, j) lies within the operand.
    #[inline(always)]
    pub(super) unsafe fn at(self, i: usize, j: usize) -> f32 {
        // SAFETY: the caller's contract.
        unsafe { *self.ptr.add(i * self.rs + j * self.cs) }
    }
}

/// The destination of `gemm_bf16_into`, shared by its tasks, each writing its own rectangle.
#[derive(Clone, Copy)]
pub(super) struct Dst(pub(super) *mut f32);
// SAFETY: the tasks write disjoint rectangles (one row panel × one column group each).
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

impl Dst {
    /// The element `offset` values in (a method, so a closure captures the whole `Dst`).
    ///
    /// # Safety
    /// `offset` lies within the destination.
    #[inline(always)]
    pub(super) unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: the caller's contract.
        unsafe { self.0.add(offset) }
    }
}
