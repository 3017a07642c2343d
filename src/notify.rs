//! systemd notify protocol. INTERFACE STUB (operations work).

use std::time::Duration;

/// Sends `READY=1`, `STATUS=`, `WATCHDOG=1`, `STOPPING=1`, `RELOADING=1`
/// to `$NOTIFY_SOCKET`; a no-op when not started by systemd.
#[derive(Debug, Clone, Default)]
pub struct Notifier {}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC` from the environment.
    pub fn from_env() -> Self {
        todo!()
    }
    /// How often to send `WATCHDOG=1` (half of `WATCHDOG_USEC`), if the watchdog is on.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        todo!()
    }
    /// `READY=1` (with a `STATUS=`).
    pub fn ready(&self, status: &str) {
        let _ = status;
        todo!()
    }
    /// `STATUS=...`
    pub fn status(&self, status: &str) {
        let _ = status;
        todo!()
    }
    /// `WATCHDOG=1`
    pub fn watchdog(&self) {
        todo!()
    }
    /// `RELOADING=1` with `MONOTONIC_USEC=`.
    pub fn reloading(&self) {
        todo!()
    }
    /// `READY=1` after a reload.
    pub fn reloaded(&self, status: &str) {
        let _ = status;
        todo!()
    }
    /// `STOPPING=1`
    pub fn stopping(&self) {
        todo!()
    }
}
