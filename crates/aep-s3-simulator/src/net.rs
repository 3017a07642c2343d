//! Listeners and connections: four axum servers on `127.0.0.1:0`, with a
//! per-connection kill switch for resets and "service down".
//!
//! A *reset* is made by flagging the connection's [`SimStream`]: the handler
//! sets the flag and returns a placeholder response; hyper's attempt to
//! write it fails, the socket (set to zero linger) is dropped, and the
//! client sees a connection reset with no HTTP response at all. A service
//! that is *down* resets every new connection as soon as it is accepted, and
//! every request arriving on a connection that was already open.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::Connected;
use axum::response::Response;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::state::Shared;
use super::{SimConfig, SimService, flow, ims, s3, sts};

/// Binds the three listeners, builds the shared state and spawns the
/// servers. The guard stops them when dropped.
pub(super) async fn start(config: SimConfig) -> io::Result<(Arc<Shared>, DropGuard)> {
    let bind = || TcpListener::bind((Ipv4Addr::LOCALHOST, 0));
    let (ims_listener, flow_listener, sts_listener, s3_listener) =
        (bind().await?, bind().await?, bind().await?, bind().await?);
    let addrs = [
        ims_listener.local_addr()?,
        flow_listener.local_addr()?,
        sts_listener.local_addr()?,
        s3_listener.local_addr()?,
    ];
    let shutdown = CancellationToken::new();
    let shared = Arc::new(Shared::new(config, addrs, shutdown.clone()));
    for (listener, service, router) in [
        (ims_listener, SimService::Ims, ims::router(shared.clone())),
        (
            flow_listener,
            SimService::Flow,
            flow::router(shared.clone()),
        ),
        (sts_listener, SimService::Sts, sts::router(shared.clone())),
        (s3_listener, SimService::S3, s3::router(shared.clone())),
    ] {
        let listener = SimListener {
            inner: listener,
            shared: shared.clone(),
            service,
        };
        let app = router.into_make_service_with_connect_info::<ConnCtl>();
        let signal = shutdown.clone().cancelled_owned();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(signal)
                .await
            {
                tracing::warn!(?service, error = %e, "simulator: server stopped");
            }
        });
    }
    tracing::debug!(ims = %addrs[0], flow = %addrs[1], sts = %addrs[2], s3 = %addrs[3], "simulator listening");
    Ok((shared, shutdown.drop_guard()))
}

/// A TCP listener that resets connections at once while its service is down.
pub(super) struct SimListener {
    inner: TcpListener,
    shared: Arc<Shared>,
    service: SimService,
}

impl Listener for SimListener {
    type Io = SimStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (SimStream, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    if self.shared.refuses(self.service) {
                        // Zero linger: the close is a RST, like a dead peer.
                        let _ = stream.set_zero_linger();
                        drop(stream);
                        continue;
                    }
                    // Small request/response exchanges: do not wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    return (
                        SimStream {
                            inner: stream,
                            kill: Arc::new(AtomicBool::new(false)),
                        },
                        addr,
                    );
                }
                Err(e) => {
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::ConnectionRefused
                    ) {
                        // Out of file descriptors or similar: back off
                        // briefly instead of spinning.
                        tracing::warn!(error = %e, "simulator: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accepted TCP stream with a kill switch: once flagged, every read and
/// write fails, so hyper drops the connection without answering.
pub(super) struct SimStream {
    inner: TcpStream,
    kill: Arc<AtomicBool>,
}

impl SimStream {
    /// Whether the connection was killed; arms a RST on close if so.
    fn killed(&self) -> bool {
        let killed = self.kill.load(Ordering::Relaxed);
        if killed {
            let _ = self.inner.set_zero_linger();
        }
        killed
    }
}

fn reset_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "simulated connection reset")
}

impl AsyncRead for SimStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.killed() {
            return Poll::Ready(Err(reset_error()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.killed() {
            return Poll::Ready(Err(reset_error()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.killed() {
            return Poll::Ready(Err(reset_error()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.killed() {
            return Poll::Ready(Err(reset_error()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.killed() {
            return Poll::Ready(Err(reset_error()));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Per-connection control handed to handlers (as axum connect info).
#[derive(Clone)]
pub(super) struct ConnCtl {
    kill: Arc<AtomicBool>,
}

impl ConnCtl {
    /// Resets the connection: the returned response is never written.
    pub fn reset(&self) -> Response {
        self.kill.store(true, Ordering::Relaxed);
        Response::new(Body::empty())
    }

    /// Whether [`ConnCtl::reset`] was called (its response is never sent).
    pub fn was_reset(&self) -> bool {
        self.kill.load(Ordering::Relaxed)
    }
}

impl Connected<IncomingStream<'_, SimListener>> for ConnCtl {
    fn connect_info(stream: IncomingStream<'_, SimListener>) -> Self {
        ConnCtl {
            kill: stream.io().kill.clone(),
        }
    }
}
