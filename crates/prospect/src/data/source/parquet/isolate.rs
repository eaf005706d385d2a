//! The boundary around the parquet crate: its code runs on a worker thread, inside `catch_unwind`,
//! with its panic messages kept off stderr, and with a deadline.
//!
//! - Panics: parquet 57 panics on some corrupt files (`rle.rs:468` index out of bounds,
//!   `triplet.rs:253`, capacity overflow, `unwrap()` on `None` in its Thrift decoder). A panic becomes
//!   [`Outcome::Panicked`] with its message; the user sees an error naming the file, never a
//!   "panicked at" line.
//! - The panic hook is process-wide, so it is swapped for this section only, under a mutex (so two
//!   sections never interleave their swaps), and the replacement stays silent only on the worker thread
//!   (a thread-local flag): a panic anywhere else in the meantime is reported as before.
//! - Deadline: the checks in `mod.rs` bound the work from outside, so the deadline is a last resort for
//!   a spin inside the decoder that they miss. A thread cannot be stopped, so on expiry it is abandoned:
//!   it keeps its CPU until the process exits (the CLI exits on the error; its result is dropped).

use std::any::Any;
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe, PanicHookInfo};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;

/// How the isolated work ended.
#[derive(Debug)]
pub(super) enum Outcome<T> {
    Done(T),
    /// The panic's message.
    Panicked(String),
    /// Still running at the deadline (the thread is abandoned).
    TimedOut,
    /// The worker thread could not be started.
    NoThread(String),
}

type Hook = Box<dyn Fn(&PanicHookInfo<'_>) + Sync + Send + 'static>;

static HOOK_SWAP: Mutex<()> = Mutex::new(());

thread_local! {
    /// Set on the worker thread: its panics are caught and reported as values, not printed.
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

fn message(payload: &(dyn Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => (*s).to_string(),
        (_, Some(s)) => s.clone(),
        _ => "a panic without a message".to_string(),
    }
}

/// Run `work` on its own thread, caught and silenced, waiting at most `deadline`.
pub(super) fn run<T: Send + 'static>(deadline: Duration, work: impl FnOnce() -> T + Send + 'static) -> Outcome<T> {
    let _swap = HOOK_SWAP.lock().unwrap_or_else(PoisonError::into_inner);
    let previous: Arc<Hook> = Arc::new(panic::take_hook());
    let chained = Arc::clone(&previous);
    panic::set_hook(Box::new(move |info| {
        if !QUIET.get() {
            chained(info)
        }
    }));
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new().name("parquet-decode".into()).spawn(move || {
        QUIET.set(true);
        let out = panic::catch_unwind(AssertUnwindSafe(work));
        // The receiver is gone only after a timeout; the result is then dropped on purpose.
        let _ = tx.send(out.map_err(|p| message(p.as_ref())));
    });
    let outcome = match spawned {
        Err(e) => Outcome::NoThread(e.to_string()),
        Ok(_) => match rx.recv_timeout(deadline) {
            Ok(Ok(value)) => Outcome::Done(value),
            Ok(Err(panic)) => Outcome::Panicked(panic),
            Err(_) => Outcome::TimedOut,
        },
    };
    drop(panic::take_hook()); // the silencing wrapper, and with it `chained`
    match Arc::try_unwrap(previous) {
        Ok(hook) => panic::set_hook(hook),
        // Unreachable while the wrapper above was the only other owner; keep the old hook working anyway.
        Err(shared) => panic::set_hook(Box::new(move |info| shared(info))),
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_a_value_and_a_spin_a_timeout() {
        match run(Duration::from_secs(5), || -> u32 { panic!("index out of bounds: the len is 3") }) {
            Outcome::Panicked(m) => assert_eq!(m, "index out of bounds: the len is 3"),
            other => panic!("expected a caught panic, got {other:?}"),
        }
        match run(Duration::from_secs(5), || 7) {
            Outcome::Done(v) => assert_eq!(v, 7),
            other => panic!("expected 7, got {other:?}"),
        }
        let start = std::time::Instant::now();
        let spin = run(Duration::from_millis(200), || std::thread::sleep(Duration::from_secs(3)));
        assert!(matches!(spin, Outcome::TimedOut), "{spin:?}");
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    }
}
