//! HTTPS for the listener (OpenSSL, which native-tls already links), and mutual TLS: with a
//! client CA, a connection without a certificate that CA signed is refused in the handshake,
//! and the certificate's subject CN names the `api_keys` entry the client acts as.
//!
//! Handshakes run in their own tasks, at most [`MAX_HANDSHAKES`] at a time and each within
//! [`HANDSHAKE_TIMEOUT`]: a client that opens a connection and says nothing holds a slot for
//! seconds, not the accept loop.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openssl::nid::Nid;
use openssl::ssl::{Ssl, SslAcceptor, SslFiletype, SslMethod, SslVerifyMode};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_openssl::SslStream;

use super::auth::PeerInfo;
use super::limits::Admission;
use super::listen::Accepted;
use crate::auth::TlsFileConfig;

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_HANDSHAKES: usize = 256;

/// Builds the acceptor from the files; the error names the file and never holds key material.
pub fn acceptor(config: &TlsFileConfig) -> Result<Arc<SslAcceptor>, String> {
    let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())
        .map_err(|e| format!("TLS: {e}"))?;
    builder
        .set_certificate_chain_file(&config.cert_file)
        .map_err(|e| format!("tls.cert_file {}: {e}", config.cert_file.display()))?;
    builder
        .set_private_key_file(&config.key_file, SslFiletype::PEM)
        .map_err(|_| {
            format!(
                "tls.key_file {}: not a PEM private key",
                config.key_file.display()
            )
        })?;
    builder
        .check_private_key()
        .map_err(|_| "tls: the private key does not match the certificate".to_owned())?;
    if let Some(ca) = &config.client_ca_file {
        builder
            .set_ca_file(ca)
            .map_err(|e| format!("tls.client_ca_file {}: {e}", ca.display()))?;
        builder.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    }
    Ok(Arc::new(builder.build()))
}

/// Accepts TLS connections: each is admitted under the connection limits first (a refused
/// one gets its 503 in clear text and no handshake), then handshakes in a task of its own;
/// those that complete go to `ready`.
pub async fn accept_loop(
    tcp: TcpListener,
    acceptor: Arc<SslAcceptor>,
    admission: Arc<Admission>,
    ready: mpsc::Sender<Accepted<SslStream<TcpStream>>>,
) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some((stream, addr, admitted)) =
            super::listen::next_admitted(&tcp, &admission, &ready).await
        else {
            return;
        };
        let acceptor = acceptor.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&acceptor, stream)).await {
                Ok(Ok(tls)) => {
                    let certificate_cn = common_name(&tls);
                    let _ = ready
                        .send(Accepted {
                            io: tls,
                            peer: PeerInfo {
                                addr,
                                certificate_cn,
                            },
                            admitted,
                        })
                        .await;
                }
                Ok(Err(e)) => tracing::debug!(client = %addr, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(client = %addr, "TLS handshake timed out"),
            }
        });
    }
}

async fn handshake(
    acceptor: &SslAcceptor,
    stream: TcpStream,
) -> Result<SslStream<TcpStream>, String> {
    let ssl = Ssl::new(acceptor.context()).map_err(|e| e.to_string())?;
    let mut tls = SslStream::new(ssl, stream).map_err(|e| e.to_string())?;
    Pin::new(&mut tls)
        .accept()
        .await
        .map_err(|e| e.to_string())?;
    Ok(tls)
}

fn common_name(tls: &SslStream<TcpStream>) -> Option<String> {
    let certificate = tls.ssl().peer_certificate()?;
    let entry = certificate
        .subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .next()?;
    entry.data().to_string().ok()
}
