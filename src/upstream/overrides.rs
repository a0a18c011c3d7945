//! What an operator says about a server, over what its document says (`--server ID=URL`, the
//! config's `servers:`): URL, credentials, TLS trust, client tuning. Secrets never reach `Debug`.

use std::time::Duration;

/// Operator overrides of a server (from `--server ID=URL` and the config file).
#[derive(Clone, Default, PartialEq)]
pub struct ServerOverride {
    pub url: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub client_id: Option<String>,
    /// PEM certificate(s) to trust for TLS, in addition to the system's.
    pub ca_pem: Option<Vec<u8>>,
    /// AMQP `basic.qos` prefetch: unacknowledged deliveries the broker may send at once.
    pub prefetch: Option<u16>,
    /// Secret for `httpApiKey` / HTTP bearer security schemes (WebSocket and SSE upstreams).
    pub token: Option<String>,
    /// OAuth2 client-credentials secret (with `client_id`), for OpenAPI operations.
    pub client_secret: Option<String>,
    /// How long an OpenAPI call may take, retries included.
    pub timeout: Option<Duration>,
    /// Overrides the document's `x-stepflow-optional`.
    pub optional: Option<bool>,
}

impl std::fmt::Debug for ServerOverride {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = |s: &Option<String>| s.as_ref().map(|_| "***");
        f.debug_struct("ServerOverride")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &secret(&self.password))
            .field("client_id", &self.client_id)
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .field("prefetch", &self.prefetch)
            .field("token", &secret(&self.token))
            .field("client_secret", &secret(&self.client_secret))
            .field("timeout", &self.timeout)
            .field("optional", &self.optional)
            .finish()
    }
}
