//! Signals: SIGTERM and SIGINT cancel the root token (graceful shutdown);
//! SIGHUP asks for a config reload.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Listens for signals in a background task. SIGTERM/SIGINT cancel `cancel`;
/// every SIGHUP sends one message on the returned channel.
pub fn listen(cancel: CancellationToken) -> std::io::Result<mpsc::Receiver<()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    // One pending reload is enough: several SIGHUPs in a row mean "re-read".
    let (reload_tx, reload_rx) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup.recv() => {
                    tracing::info!(signal = "SIGHUP", "reloading config");
                    let _ = reload_tx.try_send(());
                    continue;
                }
                () = cancel.cancelled() => return,
            };
            tracing::info!(signal = name, "signal received, stopping");
            cancel.cancel();
            return;
        }
    });
    Ok(reload_rx)
}
