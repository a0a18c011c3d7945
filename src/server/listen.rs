//! Serving the router on accepted connections (plain TCP or TLS) under the connection limits,
//! with hyper's header read timeout, and a graceful shutdown that finishes in-flight requests.
//!
//! `axum::serve` would do the serving, but it neither takes a connection limit nor exposes
//! hyper's `header_read_timeout`: without one, a client sending a header a byte a minute holds
//! its connection (and its slot) for ever.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::{Layer, ServiceExt};

use super::auth::PeerInfo;
use super::limits::{Admission, Admitted, Limits, count_refusal};

/// A connection that passed the limits (and its TLS handshake, if any).
pub struct Accepted<Io> {
    pub io: Io,
    pub peer: PeerInfo,
    /// Counts the connection as open until the connection ends.
    pub admitted: Admitted,
}

/// Connections accepted but not yet being served.
const ACCEPTED_BACKLOG: usize = 64;

/// The next TCP connection that passes the connection limits (with `TCP_NODELAY` set), or
/// `None` once nobody takes accepted connections any more. Refused ones are answered here.
pub(super) async fn next_admitted<T>(
    tcp: &TcpListener,
    admission: &Arc<Admission>,
    ready: &mpsc::Sender<T>,
) -> Option<(TcpStream, std::net::SocketAddr, Admitted)> {
    loop {
        let (stream, addr) = tokio::select! {
            _ = ready.closed() => return None,
            accepted = tcp.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on the error.
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admitted = match admission.admit(addr.ip()) {
            Ok(a) => a,
            Err(refusal) => {
                admission.refuse(stream, refusal);
                continue;
            }
        };
        // Live frames are small and latency-sensitive: do not let Nagle hold them back.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        return Some((stream, addr, admitted));
    }
}

/// Accepts plain TCP connections under the connection limits.
async fn accept_loop(
    tcp: TcpListener,
    admission: Arc<Admission>,
    ready: mpsc::Sender<Accepted<TcpStream>>,
) {
    while let Some((stream, addr, admitted)) = next_admitted(&tcp, &admission, &ready).await {
        let accepted = Accepted {
            io: stream,
            peer: PeerInfo::from(addr),
            admitted,
        };
        if ready.send(accepted).await.is_err() {
            return;
        }
    }
}

/// Serves `router` until `shutdown` is cancelled, then finishes in-flight requests; over TLS
/// when an acceptor is given.
pub async fn run(
    listener: TcpListener,
    tls: Option<Arc<openssl::ssl::SslAcceptor>>,
    router: Router,
    limits: &Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let admission = Admission::new(limits);
    match tls {
        Some(acceptor) => {
            let (tx, rx) = mpsc::channel(ACCEPTED_BACKLOG);
            tokio::spawn(super::tls::accept_loop(listener, acceptor, admission, tx));
            serve(rx, router, limits, shutdown).await
        }
        None => {
            let (tx, rx) = mpsc::channel(ACCEPTED_BACKLOG);
            tokio::spawn(accept_loop(listener, admission, tx));
            serve(rx, router, limits, shutdown).await
        }
    }
}

async fn serve<Io>(
    mut accepted: mpsc::Receiver<Accepted<Io>>,
    router: Router,
    limits: &Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()>
where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        // WebSockets over HTTP/2 (RFC 8441), as axum::serve allows them.
        .enable_connect_protocol();
    let builder = Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let header_timeout = limits.header_read_timeout;
    loop {
        let connection = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = accepted.recv() => match c {
                Some(c) => c,
                None => break,
            },
        };
        let Accepted { io, peer, admitted } = connection;
        let service = axum::Extension(ConnectInfo(peer))
            .layer(router.clone())
            .map_request(|request: hyper::Request<Incoming>| request.map(axum::body::Body::new));
        let serving = builder
            .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service))
            .into_owned();
        let serving = graceful.watch(serving);
        tokio::spawn(async move {
            let _admitted = admitted;
            let started = tokio::time::Instant::now();
            if let Err(e) = serving.await {
                // hyper reports a header that did not arrive in time as a timeout error.
                let timed_out =
                    std::iter::successors(Some(&*e as &(dyn std::error::Error + 'static)), |e| {
                        e.source()
                    })
                    .any(|e| {
                        e.downcast_ref::<hyper::Error>()
                            .is_some_and(hyper::Error::is_timeout)
                    });
                if timed_out && started.elapsed() >= header_timeout {
                    count_refusal("header_timeout");
                }
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(accepted);
    graceful.shutdown().await;
    Ok(())
}
