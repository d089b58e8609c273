//! What the fuzz targets share: [`alloc`], an allocator that counts live
//! and peak heap bytes, so a target can assert that a case allocated no
//! more than its input justifies (libFuzzer's `-rss_limit_mb` only sees a
//! whole process that has already grown).

pub mod alloc {
    //! A counting wrapper around the system allocator. A target installs
    //! it with `#[global_allocator]`, calls [`reset_peak`] before a case
    //! and reads [`peak`] after it.

    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Heap bytes allocated and not yet freed.
    static LIVE: AtomicUsize = AtomicUsize::new(0);
    /// The highest [`LIVE`] since the last [`reset_peak`].
    static PEAK: AtomicUsize = AtomicUsize::new(0);

    /// The system allocator, counting.
    pub struct Counting;

    fn grew(by: usize) {
        let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }

    fn shrank(by: usize) {
        LIVE.fetch_sub(by, Ordering::Relaxed);
    }

    // SAFETY: every call is forwarded to `System` with the caller's
    // arguments unchanged; the wrapper only counts sizes.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                grew(layout.size());
            }
            p
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            // SAFETY: forwarded unchanged; the caller upholds `alloc_zeroed`'s contract.
            let p = unsafe { System.alloc_zeroed(layout) };
            if !p.is_null() {
                grew(layout.size());
            }
            p
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: forwarded unchanged; `ptr` came from this allocator
            // (hence from `System`) with `layout`.
            unsafe { System.dealloc(ptr, layout) };
            shrank(layout.size());
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: forwarded unchanged; the caller upholds `realloc`'s contract.
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                grew(new_size);
                shrank(layout.size());
            }
            p
        }
    }

    /// Heap bytes live now.
    pub fn live() -> usize {
        LIVE.load(Ordering::Relaxed)
    }

    /// Starts a new peak at the bytes live now, and returns them.
    pub fn reset_peak() -> usize {
        let now = live();
        PEAK.store(now, Ordering::Relaxed);
        now
    }

    /// The most heap bytes live at once since the last [`reset_peak`].
    pub fn peak() -> usize {
        PEAK.load(Ordering::Relaxed)
    }
}
