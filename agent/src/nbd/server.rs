//! The NBD server: listeners, per-connection threads, limits and shutdown.
//!
//! One [`NbdServer`] holds the exports and the limits; `serve_unix`/`serve_tcp` run an accept loop
//! until the caller's `shutdown` future resolves. Every connection gets a thread of its own,
//! running a single-threaded runtime, that first negotiates (see `handshake`) and then runs the
//! pipelined transmission loop (see `transmission`). Ordinary writes run on that thread between
//! reading the request and queuing the reply, so they cost no thread hop (the writes of one
//! connection are serialised anyway) and a write that waits, on the group lock or on the kernel's
//! dirty-page throttling, holds up only its own connection, never the runtime that ships the
//! journal. Requests that wait for the disk run on the accepting runtime's blocking pool.
//!
//! Everything a client can make the server hold is bounded: connections, option bytes and
//! count, handshake time, requests and payload bytes in flight per connection.
//! At a limit the server stops reading (backpressure) or, where the protocol leaves no way to
//! stay in sync, drops that one connection; it never grows without bound and never panics on
//! network bytes.
//!
//! Shutdown: the accept loop stops, connections still negotiating are dropped, connections in
//! transmission finish what is in flight while answering new requests with ESHUTDOWN, then close.
//! Connections that have not drained after [`NbdLimits::shutdown_grace`] are aborted.

use super::{handshake, transmission, BlockExport};
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::runtime::Handle;
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// How long to wait before accepting again after `accept` failed (e.g. EMFILE).
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// Every resource a client can make the server hold, with the behaviour at the limit.
#[derive(Debug, Clone)]
pub struct NbdLimits {
    /// Concurrent connections per listener; at the limit the server stops accepting.
    pub max_connections: usize,
    /// Largest option payload during the handshake; a larger one drops the connection.
    pub max_option_bytes: u32,
    /// Options per connection; one more drops the connection.
    pub max_options: u32,
    /// Time from accept to the end of option haggling; after it the connection is dropped.
    pub handshake_timeout: Duration,
    /// Largest READ/WRITE payload, advertised as the maximum block size. A longer READ gets
    /// EINVAL; a longer WRITE gets EINVAL and the connection is dropped (its payload cannot be
    /// skipped safely).
    pub max_payload_bytes: u32,
    /// Requests executing or waiting for their reply to be written, per connection. At the
    /// limit the server stops reading requests.
    pub max_in_flight_requests: u32,
    /// READ and WRITE payload bytes held per connection; at the limit the server stops reading.
    pub max_in_flight_bytes: u32,
    /// After shutdown, how long connections may take to drain before they are aborted.
    pub shutdown_grace: Duration,
}

impl Default for NbdLimits {
    fn default() -> Self {
        NbdLimits {
            max_connections: 256,
            max_option_bytes: 64 * 1024,
            max_options: 256,
            handshake_timeout: Duration::from_secs(30),
            max_payload_bytes: 32 * 1024 * 1024,
            max_in_flight_requests: 64,
            max_in_flight_bytes: 128 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

impl NbdLimits {
    /// The advertised preferred block size; `max_payload_bytes` may not be below it.
    pub const PREFERRED_BLOCK_BYTES: u32 = 4096;

    pub fn validate(&self) -> io::Result<()> {
        let invalid =
            |what: &str| Err(io::Error::new(io::ErrorKind::InvalidInput, what.to_owned()));
        if self.max_connections == 0 || self.max_options == 0 || self.max_in_flight_requests == 0 {
            return invalid("NBD limits: connection, option and request counts must be positive");
        }
        if self.max_payload_bytes < Self::PREFERRED_BLOCK_BYTES {
            return invalid("NBD limits: max_payload_bytes must be at least 4096");
        }
        if self.max_in_flight_bytes < self.max_payload_bytes {
            return invalid("NBD limits: max_in_flight_bytes must be at least max_payload_bytes");
        }
        if self.max_option_bytes < 1024 {
            return invalid("NBD limits: max_option_bytes must be at least 1024");
        }
        Ok(())
    }
}

/// Exports by name, shared by all connections.
pub(super) type Exports = BTreeMap<String, Arc<dyn BlockExport>>;

/// A fixed-newstyle NBD server over a set of named exports.
pub struct NbdServer {
    exports: Exports,
    limits: NbdLimits,
    next_connection_id: AtomicU64,
}

impl NbdServer {
    /// A server with [`NbdLimits::default`]. If a name appears twice the first export wins.
    pub fn new(exports: Vec<(String, Arc<dyn BlockExport>)>) -> NbdServer {
        NbdServer::build(exports, NbdLimits::default())
    }

    pub fn with_limits(
        exports: Vec<(String, Arc<dyn BlockExport>)>,
        limits: NbdLimits,
    ) -> io::Result<NbdServer> {
        limits.validate()?;
        Ok(NbdServer::build(exports, limits))
    }

    fn build(exports: Vec<(String, Arc<dyn BlockExport>)>, limits: NbdLimits) -> NbdServer {
        let mut map = Exports::new();
        for (name, export) in exports {
            if map.contains_key(&name) {
                tracing::warn!(export = %name, "duplicate NBD export name; keeping the first");
                continue;
            }
            map.insert(name, export);
        }
        NbdServer {
            exports: map,
            limits,
            next_connection_id: AtomicU64::new(1),
        }
    }

    pub fn limits(&self) -> &NbdLimits {
        &self.limits
    }

    /// Serves connections from `listener` until `shutdown` resolves; then stops accepting, lets
    /// in-flight requests finish (new ones get ESHUTDOWN), and returns. The socket file is left
    /// for the caller to remove.
    pub async fn serve_unix(
        self: Arc<Self>,
        listener: UnixListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        self.accept_loop(Listener::Unix(listener), shutdown).await
    }

    /// As [`NbdServer::serve_unix`], over TCP (with `TCP_NODELAY` on every connection).
    pub async fn serve_tcp(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        self.accept_loop(Listener::Tcp(listener), shutdown).await
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: Listener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let slots = Arc::new(Semaphore::new(self.limits.max_connections));
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            while let Some(done) = connections.try_join_next() {
                log_connection_end(done);
            }
            let slot = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok(stream) => {
                    let conn = self.next_connection_id.fetch_add(1, Ordering::Relaxed);
                    let task = self
                        .clone()
                        .run_connection(stream, conn, stop_rx.clone(), slot);
                    connections.spawn(task);
                }
                Err(err) => {
                    tracing::warn!(error = %err, "NBD accept failed; retrying");
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(ACCEPT_RETRY_DELAY) => {}
                    }
                }
            }
        }
        drop(listener);
        self.drain(connections, stop_tx).await;
        Ok(())
    }

    async fn drain(&self, mut connections: JoinSet<()>, stop_tx: watch::Sender<bool>) {
        tracing::info!(connections = connections.len(), "NBD server shutting down");
        stop_tx.send_replace(true);
        let all_done = async {
            while let Some(done) = connections.join_next().await {
                log_connection_end(done);
            }
        };
        if tokio::time::timeout(self.limits.shutdown_grace, all_done)
            .await
            .is_err()
        {
            tracing::warn!(
                grace = ?self.limits.shutdown_grace,
                "NBD connections did not drain in time; aborting them"
            );
            connections.shutdown().await;
        }
    }

    /// Runs one connection on a thread of its own (see the module docs); returns once it is
    /// over. Dropping this future (the grace period ran out) makes the thread drop the
    /// connection.
    async fn run_connection(
        self: Arc<Self>,
        stream: Accepted,
        conn: u64,
        stop: watch::Receiver<bool>,
        _slot: OwnedSemaphorePermit,
    ) {
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(conn, error = %err, "cannot take over the NBD socket; dropping it");
                return;
            }
        };
        let blocking = Handle::current();
        let connection = async move { self.serve_stream(stream, conn, stop, blocking).await };
        let (done, abort) = match on_own_thread(conn, connection) {
            Ok(started) => started,
            Err(err) => {
                tracing::warn!(conn, error = %err, "no thread for an NBD connection; dropping it");
                return;
            }
        };
        // An error means the thread ended without saying so (it panicked): the connection is
        // over either way.
        let _ = done.await;
        drop(abort);
    }

    /// Runs on the connection's own thread and runtime.
    async fn serve_stream(
        &self,
        stream: StdStream,
        conn: u64,
        stop: watch::Receiver<bool>,
        blocking: Handle,
    ) {
        match stream {
            StdStream::Unix(stream) => {
                tracing::debug!(conn, "NBD connection accepted on Unix socket");
                let halves = tokio::net::UnixStream::from_std(stream).map(|s| s.into_split());
                self.negotiate_then_transmit(halves, conn, stop, blocking)
                    .await;
            }
            StdStream::Tcp(stream, peer) => {
                tracing::debug!(conn, %peer, "NBD connection accepted on TCP");
                let halves = tokio::net::TcpStream::from_std(stream).map(|s| s.into_split());
                self.negotiate_then_transmit(halves, conn, stop, blocking)
                    .await;
            }
        }
    }

    /// Serves a socket registered with the connection's runtime, or says why it could not be.
    async fn negotiate_then_transmit<R, W>(
        &self,
        halves: io::Result<(R, W)>,
        conn: u64,
        mut stop: watch::Receiver<bool>,
        blocking: Handle,
    ) where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (mut rd, mut wr) = match halves {
            Ok(halves) => halves,
            Err(err) => {
                tracing::warn!(conn, error = %err, "cannot register the NBD socket");
                return;
            }
        };
        let haggle = handshake::negotiate(&mut rd, &mut wr, &self.exports, &self.limits, conn);
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(self.limits.handshake_timeout, haggle) => outcome,
            _ = shutdown_requested(&mut stop) => {
                tracing::debug!(conn, "dropping NBD connection in handshake: server shutting down");
                return;
            }
        };
        let session = match outcome {
            Ok(Ok(Some(session))) => session,
            Ok(Ok(None)) => return,
            Ok(Err(err)) => {
                tracing::debug!(conn, error = %err, "NBD handshake ended");
                return;
            }
            Err(_) => {
                tracing::warn!(conn, "NBD handshake timed out; dropping connection");
                return;
            }
        };
        transmission::run(session, self.limits.clone(), conn, (rd, wr), blocking, stop).await;
    }
}

/// Runs `connection` on a new thread, on a single-threaded runtime of its own. The receiver
/// resolves once the connection is over; dropping the sender makes the thread drop it.
fn on_own_thread(
    conn: u64,
    connection: impl Future<Output = ()> + Send + 'static,
) -> io::Result<(oneshot::Receiver<()>, oneshot::Sender<()>)> {
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let (abort_tx, abort_rx) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(format!("nbd-{conn}"))
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    tracing::warn!(conn, error = %err, "no runtime for an NBD connection; dropping it");
                    return;
                }
            };
            runtime.block_on(async move {
                tokio::select! {
                    () = connection => {}
                    _ = abort_rx => tracing::debug!(conn, "NBD connection aborted"),
                }
            });
            let _ = done_tx.send(());
        })?;
    Ok((done_rx, abort_tx))
}

/// Resolves once the server is shutting down (or the server itself is gone).
pub(super) async fn shutdown_requested(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopping| *stopping).await;
}

fn log_connection_end(done: Result<(), tokio::task::JoinError>) {
    if let Err(err) = done {
        if err.is_panic() {
            tracing::error!(error = %err, "NBD connection task panicked");
        }
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

enum Accepted {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream, std::net::SocketAddr),
}

/// An accepted stream taken off the accepting runtime, to be registered with the connection's.
enum StdStream {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream, std::net::SocketAddr),
}

impl Accepted {
    fn into_std(self) -> io::Result<StdStream> {
        match self {
            Accepted::Unix(stream) => stream.into_std().map(StdStream::Unix),
            Accepted::Tcp(stream, peer) => {
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::warn!(%peer, error = %err, "cannot set TCP_NODELAY");
                }
                stream.into_std().map(|stream| StdStream::Tcp(stream, peer))
            }
        }
    }
}

impl Listener {
    async fn accept(&self) -> io::Result<Accepted> {
        match self {
            Listener::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
            Listener::Tcp(l) => l.accept().await.map(|(s, peer)| Accepted::Tcp(s, peer)),
        }
    }
}
