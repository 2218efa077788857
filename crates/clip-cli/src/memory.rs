//! How clipmine's programs ask the C allocator to keep the memory a step frees for the next step.
//!
//! A forward or backward pass allocates and frees the same large buffers (activations, column
//! matrices, gradients) step after step. glibc's `malloc` serves each one above its mmap
//! threshold (128 KiB, rising to at most 32 MiB as big blocks are freed) with a fresh `mmap`,
//! and hands freed memory at the heap's top back to the kernel past its trim threshold; either way
//! the next step's buffer arrives as untouched pages, and the kernel faults in and zeroes every 4
//! KiB of it again. `perf` on RN50 inference: page faults, page clearing and their locks were ~8 %
//! of the time. With the mmap threshold fixed at its maximum, a trim threshold of 1 GiB and a
//! 256 MiB top pad, freed blocks are reused: RN50 images 16.4 → 19.2/s, training 3.66 → 3.88
//! pairs/s (one run each). The cost is memory: blocks kept for reuse do not always fit the next
//! request, so the peak can rise — RN50 inference 967 MB before, 1,075–1,219 MB over later runs
//! (still 0.72–0.82× open_clip's); RN50 training 5.34 → 5.39 GB; `simple-clip` unchanged — and a
//! long-running program (`serve`) keeps its high-water mark instead of returning it between
//! requests.
//!
//! PyTorch keeps memory the same way on the GPU (its caching allocator); these settings do it for
//! the CPU. The programs call [`keep_freed_memory`] first thing; it overrides glibc's `MALLOC_*_`
//! environment variables.

/// Sets glibc's allocator to reuse freed memory (see the module doc). Does nothing elsewhere
/// (macOS, musl, Windows), where the system allocators behave differently.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes the allocator's thresholds; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}
