//! The HTTP server loop: accepts connections for the axum router and holds every one of
//! them to the limits in `[http]`.
//!
//! axum's own `serve` has no limit at all: a client that sends half a request line keeps
//! its connection (and a file descriptor) for ever. This loop serves each connection with
//! hyper's HTTP/1 server directly and adds:
//!
//! - a connection cap (`max_connections`): a semaphore permit per connection, held by the
//!   socket itself, so an upgraded WebSocket keeps counting; beyond the cap a connection
//!   is closed right after it is accepted, and counted;
//! - a watchdog per connection ([`ConnWatch`]): a new connection must deliver its first
//!   request head within `header_read_timeout`, so must every later head from its first
//!   byte, and a kept-alive connection may stay idle between requests for
//!   `keep_alive_timeout`;
//! - a deadline on request bodies ([`DeadlineBody`], `body_read_timeout` from the end of
//!   the head), for every handler, whatever extractor reads the body;
//! - a write timeout in the socket ([`TimedIo`]): a write that has made no progress for
//!   `write_timeout` fails, which ends the connection. The socket moves into an upgraded
//!   WebSocket, so the same rule drops a live stream (SSE or WebSocket) or an ingest
//!   WebSocket whose client stopped reading.
//!
//! On the HTTPS listener each connection first completes its TLS handshake in its own
//! task (within `http.tls.handshake_timeout`); with `http.tls.client_ca`, the names of
//! a verified client certificate travel with every request of the connection (a
//! [`PeerIdentity`] request extension) for device authentication.
//!
//! Every close by a limit is counted in `fluxgate_http_connections_closed_total`.
//! Shutdown is graceful as with axum: on the token the loop stops accepting, every
//! connection finishes its request in progress and closes, and the loop returns when all
//! have; the caller bounds that wait.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::ConnectInfo;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower_service::Service as _;

use crate::config::{CertIdentity, HttpConfig};
use crate::observe::{Event, HttpCloseReason, Metrics, TlsFailure, TlsListener};
use crate::tls::{PeerIdentity, ReloadableTls};

/// The HTTPS listener's TLS.
#[derive(Clone)]
pub struct ServerTls {
    /// The current server configuration (reloadable).
    pub config: Arc<ReloadableTls>,
    /// Which name of a client certificate is the device id.
    pub identity: CertIdentity,
    /// Time a new connection may take to complete its handshake.
    pub handshake_timeout: Duration,
}

/// The time limits every connection is held to (from `[http]`).
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    header: Duration,
    body: Duration,
    keep_alive: Duration,
    write: Duration,
}

/// Serve `app` on `listener` until `shutdown` is cancelled and every connection has
/// finished (see the module documentation for the limits).
///
/// With `tls`, every connection first completes a TLS handshake (within its
/// `handshake_timeout`) with the certificate current at that moment.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: &HttpConfig,
    tls: Option<ServerTls>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let timeouts = Timeouts {
        header: config.header_read_timeout,
        body: config.body_read_timeout,
        keep_alive: config.keep_alive_timeout,
        write: config.write_timeout,
    };
    let slots = Arc::new(Semaphore::new(
        config.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            // Reap finished connection tasks so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, or a connection reset before it was accepted:
                // pause briefly instead of spinning, then go on.
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Over the cap: closing at once frees the descriptor; the client sees the
            // connection end without an answer.
            metrics.emit(Event::HttpConnectionRefused);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let watch = Arc::new(ConnWatch::new());
        let io = TimedIo::new(stream, slot, timeouts.write, metrics.clone(), watch.clone());
        let conn = Conn {
            peer,
            app: app.clone(),
            timeouts,
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
            watch,
            peer_identity: None,
        };
        match &tls {
            None => connections.spawn(conn.serve(io)),
            Some(tls) => connections.spawn(conn.handshake(tls.clone(), io)),
        };
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// One accepted connection and what serving it needs.
struct Conn {
    peer: SocketAddr,
    app: Router,
    timeouts: Timeouts,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    watch: Arc<ConnWatch>,
    /// The names of the client certificate the handshake verified, if any.
    peer_identity: Option<PeerIdentity>,
}

impl Conn {
    /// Complete the TLS handshake, bounded by the handshake timeout (a client that
    /// opens a connection and stalls must not hold it), then serve HTTP over it.
    async fn handshake(mut self, tls: ServerTls, io: TimedIo) {
        let acceptor: TlsAcceptor = tls.config.acceptor();
        let accepted = tokio::select! {
            accepted = tokio::time::timeout(tls.handshake_timeout, acceptor.accept(io)) => accepted,
            () = self.shutdown.cancelled() => return,
        };
        let (reason, detail) = match accepted {
            Ok(Ok(stream)) => {
                self.peer_identity = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(|leaf| PeerIdentity::of(leaf, tls.identity));
                return self.serve(stream).await;
            }
            Ok(Err(e)) => (crate::tls::classify(&e), e.to_string()),
            Err(_) => (
                TlsFailure::Timeout,
                "no handshake within http.tls.handshake_timeout".to_owned(),
            ),
        };
        self.metrics.emit(Event::TlsHandshakeFailed {
            listener: TlsListener::Https,
            reason,
            detail: &detail,
        });
    }

    /// Serve one connection until it ends, is upgraded (the upgraded socket then lives on
    /// in its handler) or overstays a time limit.
    async fn serve<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            peer,
            app,
            timeouts,
            metrics,
            shutdown,
            watch,
            peer_identity,
        } = self;
        let service = {
            let (watch, metrics) = (watch.clone(), metrics.clone());
            hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let guard = watch.begin();
                let deadline = Instant::now() + timeouts.body;
                let mut request =
                    request.map(|body| DeadlineBody::new(body, deadline, metrics.clone()));
                // What axum's `into_make_service_with_connect_info` would add: handlers read
                // the client address (the auth failure throttle keys on it).
                request.extensions_mut().insert(ConnectInfo(peer));
                if let Some(identity) = &peer_identity {
                    request.extensions_mut().insert(identity.clone());
                }
                let mut app = app.clone();
                async move {
                    let response = app.call(request).await;
                    // The request counts as in progress until its answer is fully written,
                    // so a long live stream is never taken for an idle connection.
                    response.map(|r| {
                        r.map(|body| GuardedBody {
                            inner: body,
                            _guard: guard,
                        })
                    })
                }
            })
        };
        let mut builder = hyper::server::conn::http1::Builder::new();
        // The watchdog enforces the head timeouts; hyper's own would also cut idle
        // kept-alive connections at the header timeout.
        builder.timer(TokioTimer::new()).header_read_timeout(None);
        let conn = builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        tokio::pin!(conn);
        let mut draining = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::trace!(error = %e, "HTTP connection ended with an error");
                    }
                    return;
                }
                reason = watch.expired(timeouts) => {
                    metrics.emit(Event::HttpConnectionClosed { reason });
                    return;
                }
                () = shutdown.cancelled(), if !draining => {
                    // Finish the request in progress, then close; idle connections close now.
                    conn.as_mut().graceful_shutdown();
                    draining = true;
                }
            }
        }
    }
}

/// What the watchdog of one connection knows: whether a request is in progress, and
/// since when the connection has waited for the next one.
struct ConnWatch {
    state: Mutex<WatchState>,
    /// Set while no request is in progress and no byte of the next head has arrived,
    /// so that the socket's reads take the lock only for the first byte of a head.
    awaiting_head: AtomicBool,
    changed: Notify,
}

struct WatchState {
    /// Requests whose answer has not been fully written.
    busy: usize,
    /// Requests started on this connection.
    served: u64,
    /// When the connection was accepted or its last answer was written.
    idle_since: Instant,
    /// When the first byte of the next head arrived, if it has.
    head_started: Option<Instant>,
}

impl ConnWatch {
    fn new() -> Self {
        Self {
            state: Mutex::new(WatchState {
                busy: 0,
                served: 0,
                idle_since: Instant::now(),
                head_started: None,
            }),
            awaiting_head: AtomicBool::new(true),
            changed: Notify::new(),
        }
    }

    /// A request's head has arrived; the guard marks it finished when dropped.
    fn begin(self: &Arc<Self>) -> RequestGuard {
        self.awaiting_head.store(false, Ordering::Relaxed);
        if let Ok(mut s) = self.state.lock() {
            s.busy += 1;
            s.served += 1;
            s.head_started = None;
        }
        self.changed.notify_one();
        RequestGuard(self.clone())
    }

    /// The socket read some bytes.
    fn bytes_read(&self) {
        if !self.awaiting_head.swap(false, Ordering::Relaxed) {
            return;
        }
        if let Ok(mut s) = self.state.lock()
            && s.busy == 0
            && s.head_started.is_none()
        {
            s.head_started = Some(Instant::now());
        }
        self.changed.notify_one();
    }

    /// Resolves with the limit the connection overstayed; pending while a request is in
    /// progress.
    async fn expired(&self, t: Timeouts) -> HttpCloseReason {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let deadline = self.state.lock().ok().and_then(|s| {
                if s.busy > 0 {
                    None
                } else if let Some(started) = s.head_started {
                    Some((started + t.header, HttpCloseReason::HeaderTimeout))
                } else if s.served == 0 {
                    // A new connection that has not sent a whole head: the header
                    // timeout runs from the accept.
                    Some((s.idle_since + t.header, HttpCloseReason::HeaderTimeout))
                } else {
                    Some((s.idle_since + t.keep_alive, HttpCloseReason::IdleTimeout))
                }
            });
            match deadline {
                None => changed.await,
                Some((at, reason)) => {
                    tokio::select! {
                        () = changed => {}
                        () = tokio::time::sleep_until(at) => return reason,
                    }
                }
            }
        }
    }
}

/// Marks a request finished when dropped (when hyper has written its answer's body).
struct RequestGuard(Arc<ConnWatch>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let watch = &self.0;
        if let Ok(mut s) = watch.state.lock() {
            s.busy = s.busy.saturating_sub(1);
            if s.busy == 0 {
                s.idle_since = Instant::now();
                s.head_started = None;
                watch.awaiting_head.store(true, Ordering::Relaxed);
            }
        }
        watch.changed.notify_one();
    }
}

/// An answer's body that keeps its request counted as in progress until it is dropped.
struct GuardedBody {
    inner: axum::body::Body,
    _guard: RequestGuard,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body could not be read within `http.body_read_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within http.body_read_timeout")]
struct BodyTimeout;

/// A request body that fails once its deadline has passed.
struct DeadlineBody {
    inner: Incoming,
    deadline: Instant,
    /// Created the first time the body has to wait, so requests without a body (or with
    /// one already buffered) never arm a timer.
    sleep: Option<Pin<Box<Sleep>>>,
    expired: bool,
    metrics: Arc<Metrics>,
}

impl DeadlineBody {
    fn new(inner: Incoming, deadline: Instant, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            deadline,
            sleep: None,
            expired: false,
            metrics,
        }
    }
}

impl Body for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.expired {
            return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
        }
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = self.deadline;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.expired = true;
        self.metrics.emit(Event::HttpConnectionClosed {
            reason: HttpCloseReason::BodyTimeout,
        });
        // The handler answers with an error; hyper closes the connection because the
        // body was not read to its end.
        Poll::Ready(Some(Err(Box::new(BodyTimeout))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's socket: holds its slot under `max_connections` and the open
/// connections gauge for as long as it lives (upgraded or not), tells the watchdog about
/// reads, and fails writes that made no progress for the write timeout.
struct TimedIo {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    write_timeout: Duration,
    /// Armed when a write could not proceed; cleared by any progress.
    stall: Option<Pin<Box<Sleep>>>,
    timed_out: bool,
    metrics: Arc<Metrics>,
    watch: Arc<ConnWatch>,
}

impl TimedIo {
    fn new(
        stream: TcpStream,
        slot: OwnedSemaphorePermit,
        write_timeout: Duration,
        metrics: Arc<Metrics>,
        watch: Arc<ConnWatch>,
    ) -> Self {
        metrics.add_http_connections(1);
        Self {
            stream,
            _slot: slot,
            write_timeout,
            stall: None,
            timed_out: false,
            metrics,
            watch,
        }
    }

    /// After a write returned `result`: clear the stall timer on progress, or arm and
    /// poll it while the client does not read.
    fn after_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if self.timed_out {
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        if result.is_ready() {
            self.stall = None;
            return result;
        }
        let timeout = self.write_timeout;
        let stall = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if stall.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.timed_out = true;
        self.metrics.emit(Event::HttpConnectionClosed {
            reason: HttpCloseReason::WriteTimeout,
        });
        Poll::Ready(Err(io::ErrorKind::TimedOut.into()))
    }
}

impl Drop for TimedIo {
    fn drop(&mut self) {
        self.metrics.add_http_connections(-1);
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.watch.bytes_read();
        }
        result
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.after_write(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.after_write(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.stream).poll_flush(cx);
        self.after_write(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
