//! Ctrl-C and SIGTERM for the long-running lab programs (the demo, the benchmarks): the
//! handler only raises a flag; the work checks it between steps with [`check`] and returns
//! an error, so every namespace, link, pin and process guard is dropped on the way out.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Routes SIGINT and SIGTERM to the flag [`check`] reads.
pub fn install() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// An error once SIGINT or SIGTERM has arrived.
pub fn check() -> anyhow::Result<()> {
    if STOP.load(Ordering::SeqCst) {
        anyhow::bail!("interrupted; cleaning up");
    }
    Ok(())
}
