//! The allocator of the no-panic test binaries (`no_panic.rs`, `no_panic_index.rs`): the system
//! allocator, refusing any single allocation above 1 GB, so an input that would ask for more
//! aborts the test process naming the size instead of passing unnoticed (or swapping).

use std::alloc::{GlobalAlloc, Layout, System};

/// The largest single allocation any input may cause.
const ONE_GB: usize = 1 << 30;

/// The system allocator, refusing any allocation above [`ONE_GB`].
struct AtMostOneGb;

fn refuse(size: usize) -> *mut u8 {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "an allocation of {size} bytes (above 1 GB) was refused"
    );
    std::ptr::null_mut()
}

// SAFETY: every call is passed on to `System` unchanged, or refused with a null pointer, which
// the `GlobalAlloc` contract allows.
unsafe impl GlobalAlloc for AtMostOneGb {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ONE_GB {
            return refuse(layout.size());
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ONE_GB {
            return refuse(layout.size());
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ONE_GB {
            return refuse(new_size);
        }
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: AtMostOneGb = AtMostOneGb;
