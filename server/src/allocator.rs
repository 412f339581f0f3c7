//! Giving freed memory back to the system: when ingest pauses, and whenever more than a
//! set amount is held.
//!
//! # What flows through it
//! The binary runs on jemalloc with page purging on free turned off (`dirty_decay_ms:-1`
//! in main.rs): the multi-megabyte buffers of one batch (the gRPC message, the decoded
//! columns, the encoded ClickHouse block) are then carved again from pages the process
//! already has. With jemalloc's eager purging every such buffer was handed back with
//! `madvise(MADV_DONTNEED)` and page-faulted in again by the next one; measured with
//! `bench/run.sh ch`, that was half of sluice's CPU time (0.6 against 0.3 CPU-seconds for
//! 2M rows). [`bound_freed_memory`] bounds what is kept instead: every [`CHECK`] it reads
//! how many freed pages jemalloc holds and purges them all once they pass `max_dirty`
//! (an eighth of `memory.budget`), and it purges once the WAL and every sink have stood
//! still for [`IDLE`], so resident memory falls back after a burst.

use std::time::Duration;

/// How often the freed-page count is read.
pub const CHECK: Duration = Duration::from_millis(50);
/// No new WAL record and no sink progress for this long counts as a pause (jemalloc's
/// own default keeps freed pages about as long).
pub const IDLE: Duration = Duration::from_secs(10);

/// Returns every arena's unused pages to the system (jemalloc `arena.<all>.purge`); a no-op
/// where the allocator is not jemalloc.
pub fn purge() {
    #[cfg(not(target_env = "msvc"))]
    {
        // MALLCTL_ARENAS_ALL: every arena.
        let name = c"arena.4096.purge";
        // SAFETY: a void mallctl with a NUL-terminated name and no in/out values.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        if rc != 0 {
            tracing::debug!(rc, "jemalloc purge refused");
        }
    }
}

/// Bytes of freed pages jemalloc holds for reuse (all arenas); 0 where it cannot tell.
pub fn freed_bytes() -> u64 {
    #[cfg(not(target_env = "msvc"))]
    {
        // SAFETY: documented mallctl names with the value types jemalloc gives them
        // (`epoch` u64 in and out; `arenas.page` and `pdirty` size_t out).
        unsafe {
            let mut epoch: u64 = 1;
            let mut len = std::mem::size_of::<u64>();
            tikv_jemalloc_sys::mallctl(
                c"epoch".as_ptr(),
                (&mut epoch as *mut u64).cast(),
                &mut len,
                (&mut epoch as *mut u64).cast(),
                len,
            );
            let read = |name: &std::ffi::CStr| {
                let mut v: usize = 0;
                let mut len = std::mem::size_of::<usize>();
                let rc = tikv_jemalloc_sys::mallctl(
                    name.as_ptr(),
                    (&mut v as *mut usize).cast(),
                    &mut len,
                    std::ptr::null_mut(),
                    0,
                );
                if rc == 0 {
                    v as u64
                } else {
                    0
                }
            };
            // The page size does not change: read it once.
            static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
            read(c"stats.arenas.4096.pdirty") * *PAGE.get_or_init(|| read(c"arenas.page"))
        }
    }
    #[cfg(target_env = "msvc")]
    0
}

/// Purges whenever jemalloc holds more than `max_dirty` bytes of freed pages, and once per
/// pause when `activity` (a number that moves whenever data is written or delivered) has
/// not moved for [`IDLE`]; until `stop`.
pub async fn bound_freed_memory(
    activity: impl Fn() -> u64 + Send + 'static,
    max_dirty: u64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = activity();
    let mut still_since = tokio::time::Instant::now();
    let mut idle_purged = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let now = activity();
        if now != last {
            last = now;
            still_since = tokio::time::Instant::now();
            idle_purged = false;
        }
        let idle = still_since.elapsed() >= IDLE;
        if (idle && !idle_purged) || freed_bytes() > max_dirty {
            // madvise of up to `max_dirty` bytes: off the runtime's worker threads.
            let _ = tokio::task::spawn_blocking(purge).await;
            idle_purged = idle;
        }
    }
}

#[cfg(all(test, not(target_env = "msvc")))]
mod tests {
    use super::*;

    #[test]
    fn purge_gives_freed_pages_back() {
        // Straight from jemalloc (the test binary's global allocator is the system's).
        // SAFETY: malloc/free pairs of jemalloc's own API; the memory is written in bounds.
        unsafe {
            for _ in 0..4 {
                let p = tikv_jemalloc_sys::malloc(4 << 20).cast::<u8>();
                assert!(!p.is_null());
                std::ptr::write_bytes(p, 1, 4 << 20);
                tikv_jemalloc_sys::free(p.cast());
            }
        }
        let before = freed_bytes();
        assert!(before >= 4 << 20, "freed pages are kept: {before} bytes");
        purge();
        assert!(
            freed_bytes() < before,
            "purge gave them back ({before} bytes before)"
        );
    }
}
