//! A counting allocator for tests: how much heap one closure takes at its
//! peak, counting only this thread's allocations (tests run in parallel).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Probe;

#[global_allocator]
static PROBE: Probe = Probe;

thread_local! {
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    static CURRENT: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn record(delta: isize) {
    if ACTIVE.with(Cell::get) {
        let current = CURRENT.with(|c| {
            c.set(c.get() + delta);
            c.get()
        });
        PEAK.with(|p| p.set(p.get().max(current)));
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for Probe {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        record(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Counted as a move: old and new blocks alive together.
        record(new_size as isize);
        record(-(layout.size() as isize));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f`; returns its result and the peak of the heap it took.
pub(crate) fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    CURRENT.with(|c| c.set(0));
    PEAK.with(|p| p.set(0));
    ACTIVE.with(|a| a.set(true));
    let result = f();
    ACTIVE.with(|a| a.set(false));
    (result, PEAK.with(Cell::get).max(0) as usize)
}
