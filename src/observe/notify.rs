//! systemd notify protocol (`sd_notify(3)`): readiness, `STATUS=` lines, the
//! watchdog, reload and stop notifications.
//!
//! Messages are formatted by the `sd-notify` crate and sent by this module to
//! the socket chosen at construction, so tests can point a notifier at their
//! own socket without touching the process environment. A notification is
//! advice to the service manager: every failure is logged at `debug` and
//! swallowed, never allowed to disturb the daemon.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

use sd_notify::NotifyState;

/// Sends `READY=1`, `STATUS=`, `WATCHDOG=1`, `STOPPING=1`, `RELOADING=1`
/// to `$NOTIFY_SOCKET`; a no-op when not started by systemd.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    /// `$NOTIFY_SOCKET`: a path, or `@name` for the Linux abstract namespace.
    /// `None`: every call is a no-op.
    socket: Option<OsString>,
    /// `$WATCHDOG_USEC`, when the watchdog is on for this process.
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC` from the environment.
    ///
    /// `WATCHDOG_USEC` counts only when `WATCHDOG_PID` is unset or is our
    /// pid, and only with a socket to send `WATCHDOG=1` to. The variables are
    /// left in place (unsetting them is unsafe once threads run).
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty());
        let watchdog = socket
            .as_ref()
            .and(sd_notify::watchdog_enabled())
            .filter(|d| !d.is_zero());
        Self { socket, watchdog }
    }

    /// A notifier sending to `path` with the given watchdog timeout
    /// (`WATCHDOG_USEC`, not the ping interval); for tests and embedding.
    pub fn with_socket(path: PathBuf, watchdog: Option<Duration>) -> Self {
        Self {
            socket: Some(path.into_os_string()),
            watchdog: watchdog.filter(|d| !d.is_zero()),
        }
    }

    /// Whether notifications go anywhere (started by systemd with `Type=notify`).
    pub fn is_enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// How often to send `WATCHDOG=1` (half of `WATCHDOG_USEC`), if the watchdog is on.
    ///
    /// Half, as `sd_watchdog_enabled(3)` recommends: one late ping must not
    /// be enough for systemd to kill a healthy daemon.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// `READY=1` (with a `STATUS=`).
    pub fn ready(&self, status: &str) {
        let status = one_line(status);
        self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
    }

    /// `STATUS=...`
    pub fn status(&self, status: &str) {
        let status = one_line(status);
        self.send(&[NotifyState::Status(&status)]);
    }

    /// `WATCHDOG=1`
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// `WATCHDOG=1` with `EXTEND_TIMEOUT_USEC=`: while the first pass is
    /// still making progress, systemd's start timeout (`TimeoutStartSec`,
    /// 90 s by default) is pushed to at least `by` from now, so a large first
    /// pass is not killed for being slow; a wedged one stops asking.
    pub fn watchdog_extending_start(&self, by: Duration) {
        let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
        self.send(&[NotifyState::Watchdog, NotifyState::ExtendTimeoutUsec(usec)]);
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=`.
    ///
    /// systemd 253+ requires the timestamp with `RELOADING=1` (it matches
    /// the reload to the request); older versions ignore it.
    pub fn reloading(&self) {
        if self.socket.is_none() {
            return;
        }
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the monotonic clock for RELOADING=1");
                self.send(&[NotifyState::Reloading]);
            }
        }
    }

    /// `READY=1` after a reload.
    pub fn reloaded(&self, status: &str) {
        self.ready(status);
    }

    /// `STOPPING=1`
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }

    /// Sends one datagram with `states`, one per line; failures are logged.
    fn send(&self, states: &[NotifyState<'_>]) {
        let Some(socket) = &self.socket else {
            return;
        };
        let mut message = String::new();
        for state in states {
            // Writing to a String cannot fail.
            let _ = writeln!(message, "{state}");
        }
        if let Err(e) = send_datagram(socket, message.as_bytes()) {
            tracing::debug!(
                error = %e,
                socket = %socket.to_string_lossy(),
                message = message.trim_end(),
                "systemd notification not delivered"
            );
        }
    }
}

/// One datagram to `socket` (a path, or `@name` for an abstract socket).
fn send_datagram(socket: &OsString, message: &[u8]) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    // A full socket buffer (systemd busy or gone) must not block a tokio
    // worker; the notification is then dropped and the next one retries.
    sock.set_nonblocking(true)?;
    let bytes = socket.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        send_abstract(&sock, name, message)?;
    } else {
        let sent = sock.send_to(message, socket)?;
        if sent != message.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
        }
    }
    Ok(())
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_abstract(sock: &UnixDatagram, name: &[u8], message: &[u8]) -> io::Result<()> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    let sent = sock.send_to_addr(message, &addr)?;
    if sent != message.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
    }
    Ok(())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &[u8]) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets exist only on Linux",
    ))
}

/// `STATUS=` ends at the first newline; keep the whole text on one line.
fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound() -> (tempfile::TempDir, PathBuf, UnixDatagram) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (dir, path, listener)
    }

    fn recv(listener: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = listener.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_each_notification() {
        let (_dir, path, listener) = bound();
        let notifier = Notifier::with_socket(path, None);
        assert!(notifier.is_enabled());

        notifier.ready("3 connections, 3 fresh");
        assert_eq!(recv(&listener), "READY=1\nSTATUS=3 connections, 3 fresh\n");

        notifier.status("rotating\nnow");
        assert_eq!(recv(&listener), "STATUS=rotating now\n");

        notifier.watchdog();
        assert_eq!(recv(&listener), "WATCHDOG=1\n");

        notifier.reloading();
        let message = recv(&listener);
        let usec = message
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .and_then(|rest| rest.strip_suffix('\n'))
            .unwrap_or_else(|| panic!("unexpected {message:?}"));
        assert!(usec.parse::<u64>().unwrap() > 0, "{message:?}");

        notifier.reloaded("reloaded");
        assert_eq!(recv(&listener), "READY=1\nSTATUS=reloaded\n");

        notifier.stopping();
        assert_eq!(recv(&listener), "STOPPING=1\n");
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout() {
        let notifier =
            Notifier::with_socket(PathBuf::from("/nonexistent"), Some(Duration::from_secs(60)));
        assert_eq!(notifier.watchdog_interval(), Some(Duration::from_secs(30)));
        let notifier = Notifier::with_socket(PathBuf::from("/nonexistent"), None);
        assert_eq!(notifier.watchdog_interval(), None);
        let notifier = Notifier::with_socket(PathBuf::from("/nonexistent"), Some(Duration::ZERO));
        assert_eq!(notifier.watchdog_interval(), None);
    }

    #[test]
    fn default_is_a_silent_no_op() {
        let notifier = Notifier::default();
        assert!(!notifier.is_enabled());
        assert_eq!(notifier.watchdog_interval(), None);
        notifier.ready("x");
        notifier.status("x");
        notifier.watchdog();
        notifier.reloading();
        notifier.reloaded("x");
        notifier.stopping();
    }

    #[test]
    fn unreachable_socket_is_swallowed() {
        let dir = tempfile::tempdir().unwrap();
        let notifier = Notifier::with_socket(dir.path().join("nobody-listens"), None);
        notifier.ready("x");
        notifier.stopping();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("aep-s3-rotator-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let notifier = Notifier::with_socket(PathBuf::from(format!("@{name}")), None);
        notifier.watchdog();
        assert_eq!(recv(&listener), "WATCHDOG=1\n");
    }

    #[test]
    fn from_env_without_socket_is_disabled() {
        // Tests share the environment, so only assert what holds either way:
        // without NOTIFY_SOCKET there is no watchdog.
        let notifier = Notifier::from_env();
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            assert!(!notifier.is_enabled());
            assert_eq!(notifier.watchdog_interval(), None);
        }
    }
}
