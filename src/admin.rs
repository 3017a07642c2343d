//! Admin HTTP endpoint and the `status` client. INTERFACE STUB (operations work).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Telemetry;

/// Serves `/healthz`, `/readyz`, `/metrics`, `/status` until `cancel`.
pub async fn serve(
    listener: TcpListener,
    telemetry: Arc<Telemetry>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let _ = (listener, telemetry, cancel);
    todo!()
}

/// `aep-s3-rotator status`: reads `/status` from `addr` and renders the table
/// printed on stdout. The error is one line an operator can act on.
pub async fn status_report(addr: SocketAddr) -> Result<String, String> {
    let _ = addr;
    todo!()
}
