//! Gives the allocator's free memory back to the system. glibc's malloc keeps the pages of freed chunks
//! resident in its arenas: after a storm of connections the server stayed 50% above its resident baseline
//! (and higher after each storm) although it used less than before (tests/amqp/test_soak.py; SECURITY.md,
//! "Soak test"). A thread wakes every `INTERVAL` and calls `malloc_trim(0)`, which releases those pages.
//! Elsewhere (musl, other systems) it does nothing.

/// Starts the trimming thread (Linux with glibc; a no-op elsewhere).
pub fn spawn() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        /// How often free memory is released: RSS is back near its floor well within 30 s of a load.
        const INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
        let spawned = std::thread::Builder::new().name("mailroom-trim".into()).spawn(|| loop {
            std::thread::sleep(INTERVAL);
            let started = std::time::Instant::now();
            // SAFETY: malloc_trim takes no pointer and may be called from any thread at any time; it
            // locks each arena while it walks that arena's free chunks.
            let released = unsafe { libc::malloc_trim(0) } == 1;
            tracing::debug!(released, micros = started.elapsed().as_micros() as u64, "malloc_trim");
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the memory trimming thread");
        }
    }
}
