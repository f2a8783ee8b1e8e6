//! CPU priority of the agent's background work.
//!
//! A client's write waits for the agent; shipping and resync wait for nobody. On a host whose
//! cores are busy they compete for the same cores, and with equal priority the shipper's hashing
//! and compression took half of what 1 MiB sequential writes through the tap needed. So
//! background threads run [`BACKGROUND_NICE`] nice levels below the agent's write path: under
//! contention the scheduler gives them about a tenth of the CPU the write path gets, and every
//! idle cycle otherwise. What shipping defers waits in the spool, which is bounded; when it is
//! full the dirty map takes over (see ARCHITECTURE.md, "Shipping yields the CPU to writes").

use std::io;

/// How many nice levels background threads run below the thread that starts them.
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority by [`BACKGROUND_NICE`] (on Linux a nice value
/// belongs to a thread). Raising a nice value needs no privilege; should it fail anyway, the
/// thread keeps its priority and a warning says so.
pub fn lower_this_thread() {
    // SAFETY: getpriority/setpriority with PRIO_PROCESS and 0 act on the calling thread and
    // take no pointers. getpriority returns -1 for a nice of -1 too, so errno tells an error.
    let result = unsafe {
        *libc::__errno_location() = 0;
        let current = libc::getpriority(libc::PRIO_PROCESS, 0);
        if current == -1 && *libc::__errno_location() != 0 {
            -1
        } else {
            libc::setpriority(libc::PRIO_PROCESS, 0, (current + BACKGROUND_NICE).min(19))
        }
    };
    if result != 0 {
        tracing::warn!(error = %io::Error::last_os_error(),
            "cannot lower the CPU priority of a background thread; it competes with client writes");
    }
}

/// A runtime whose threads, workers and blocking pool alike, run at background priority. It
/// shuts down without waiting when dropped, so it may be dropped on an async thread.
pub struct BackgroundRuntime(Option<tokio::runtime::Runtime>);

impl BackgroundRuntime {
    pub fn start(name: &str) -> io::Result<BackgroundRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .on_thread_start(lower_this_thread)
            .enable_all()
            .build()?;
        Ok(BackgroundRuntime(Some(runtime)))
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        match &self.0 {
            Some(runtime) => runtime.handle(),
            None => unreachable!("the runtime is taken only on drop"),
        }
    }
}

impl Drop for BackgroundRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice_of_this_thread() -> i32 {
        // SAFETY: as in lower_this_thread.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }

    #[test]
    fn a_lowered_thread_runs_nicer_than_the_thread_that_started_it() {
        let before = nice_of_this_thread();
        let after = std::thread::spawn(|| {
            lower_this_thread();
            nice_of_this_thread()
        })
        .join()
        .expect("thread ran");
        assert_eq!(after, (before + BACKGROUND_NICE).min(19));
        assert_eq!(
            nice_of_this_thread(),
            before,
            "only the calling thread changed"
        );
    }

    #[test]
    fn background_runtime_threads_run_nicer_and_it_drops_on_an_async_thread() {
        let before = nice_of_this_thread();
        let expected = (before + BACKGROUND_NICE).min(19);
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            let background = BackgroundRuntime::start("test-bg").expect("background runtime");
            let on_worker = background.handle().spawn(async { nice_of_this_thread() });
            let on_pool = background.handle().spawn_blocking(nice_of_this_thread);
            assert_eq!(on_worker.await.expect("worker task"), expected);
            assert_eq!(on_pool.await.expect("blocking task"), expected);
            drop(background);
        });
    }
}
