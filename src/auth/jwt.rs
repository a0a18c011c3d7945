//! JWTs from identity providers: RS256/384/512, ES256/384 and HS256, with `exp`, `nbf`, `iss`
//! and `aud` checked (jsonwebtoken). Keys come from PEM files, a shared secret, or a JWKS URL
//! that is fetched at start, cached, fetched again every [`JWKS_REFRESH_EVERY`], and at once when
//! a token names a key id the cache does not have — at most once every [`JWKS_REFETCH_EVERY`],
//! so a flood of tokens with made-up key ids cannot hammer the issuer. Keys rotate without a
//! restart, and a removed key stops verifying new tokens within the refresh period.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::Value;
use tokio::sync::Mutex;

use super::config::JwtIssuerConfig;
use super::scope::Scopes;

/// Clock skew tolerated on `exp` and `nbf` when a token is checked. A stream still ends at
/// `exp` itself.
pub const LEEWAY: Duration = Duration::from_secs(5);
pub const JWKS_REFETCH_EVERY: Duration = Duration::from_secs(10);
/// Key sets are fetched again this often even when every token names a known key.
pub const JWKS_REFRESH_EVERY: Duration = Duration::from_secs(300);
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);

/// A token that was not accepted; the reason is safe to show (it never holds the token).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

/// A token that was accepted.
#[derive(Debug, Clone)]
pub struct Verified {
    /// `jwt:<subject>`: the principal's id, formatted once per token.
    pub principal_id: Arc<str>,
    pub issuer: String,
    pub scopes: Arc<Scopes>,
    /// When the token stops being valid (`exp`); streams end there.
    pub expires_at: Option<SystemTime>,
}

/// One configured issuer.
pub struct Issuer {
    issuer: String,
    audience: Option<String>,
    scopes_claim: String,
    /// PEM keys and the HS256 secret: tried in order when the token names no known key id.
    fixed: Vec<Arc<DecodingKey>>,
    jwks: Option<Jwks>,
}

struct Jwks {
    url: String,
    client: reqwest::Client,
    state: Mutex<JwksState>,
}

#[derive(Default)]
struct JwksState {
    keys: HashMap<String, Arc<DecodingKey>>,
    fetched_at: Option<Instant>,
}

impl Issuer {
    pub fn build(config: &JwtIssuerConfig) -> Result<Issuer, String> {
        let mut fixed = Vec::new();
        for key in &config.keys {
            let pem = std::fs::read(&key.pem_file)
                .map_err(|e| format!("{}: {e}", key.pem_file.display()))?;
            let decoding = DecodingKey::from_rsa_pem(&pem)
                .or_else(|_| DecodingKey::from_ec_pem(&pem))
                .or_else(|_| DecodingKey::from_ed_pem(&pem))
                .map_err(|e| {
                    format!(
                        "{}: not an RSA, EC or Ed25519 public key in PEM: {e}",
                        key.pem_file.display()
                    )
                })?;
            fixed.push(Arc::new(decoding));
        }
        if let Some(secret) = &config.hs256_secret {
            fixed.push(Arc::new(
                DecodingKey::from_secret(secret.as_bytes())
                    .map_err(|e| format!("hs256_secret: {e}"))?,
            ));
        }
        let jwks = match &config.jwks_url {
            Some(url) => Some(Jwks {
                url: url.clone(),
                client: reqwest::Client::builder()
                    .timeout(JWKS_TIMEOUT)
                    .build()
                    .map_err(|e| format!("JWKS client: {e}"))?,
                state: Mutex::new(JwksState::default()),
            }),
            None => None,
        };
        if fixed.is_empty() && jwks.is_none() {
            return Err(format!(
                "issuer {}: give jwks_url, keys or hs256_secret",
                config.issuer
            ));
        }
        Ok(Issuer {
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            scopes_claim: config.scopes_claim.clone(),
            fixed,
            jwks,
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Fetches the JWKS once (at start); a failure is reported, not fatal: tokens are checked
    /// against a fresh fetch when they arrive.
    pub async fn prefetch(&self) -> Result<usize, String> {
        match &self.jwks {
            Some(jwks) => jwks.refresh(true).await,
            None => Ok(0),
        }
    }

    /// Verifies `token` against this issuer.
    pub async fn verify(&self, token: &str) -> Result<Verified, Rejected> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| Rejected(format!("malformed token: {e}")))?;
        let keys: Vec<Arc<DecodingKey>> = match (&header.kid, &self.jwks) {
            (Some(kid), Some(jwks)) => match jwks.key(kid).await {
                Some(key) => vec![key],
                None if self.fixed.is_empty() => {
                    return Err(Rejected(format!("unknown key id '{kid}'")));
                }
                None => self.fixed.clone(),
            },
            _ => self.fixed.clone(),
        };
        if keys.is_empty() {
            return Err(Rejected("the token names no key id".into()));
        }
        let mut last = Rejected("no key verifies the token".into());
        for key in keys {
            // The algorithms a key may verify follow from the key itself, never from the
            // token: an HS256 token "signed" with an RSA public key finds no HMAC key here.
            let mut validation = Validation::new_for_family(key.family());
            validation.algorithms = algorithms(key.family());
            validation.leeway = LEEWAY.as_secs();
            validation.validate_nbf = true;
            validation.set_issuer(&[&self.issuer]);
            validation.set_required_spec_claims(&["exp", "iss"]);
            match &self.audience {
                Some(aud) => {
                    validation.set_audience(&[aud]);
                    validation.required_spec_claims.insert("aud".into());
                }
                None => validation.validate_aud = false,
            }
            match jsonwebtoken::decode::<Value>(token, &key, &validation) {
                Ok(data) => return Ok(self.verified(data.claims)),
                Err(e) => last = Rejected(describe(&e)),
            }
        }
        Err(last)
    }

    fn verified(&self, claims: Value) -> Verified {
        let scopes = match claims.get(&self.scopes_claim) {
            Some(Value::String(s)) => Scopes::parse_lenient(s.split_whitespace()),
            Some(Value::Array(items)) => {
                Scopes::parse_lenient(items.iter().filter_map(Value::as_str))
            }
            _ => Scopes::default(),
        };
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or("unknown");
        Verified {
            principal_id: format!("jwt:{subject}").into(),
            issuer: self.issuer.clone(),
            scopes: Arc::new(scopes),
            expires_at: claims
                .get("exp")
                .and_then(Value::as_u64)
                .map(|exp| UNIX_EPOCH + Duration::from_secs(exp)),
        }
    }
}

impl Jwks {
    async fn key(&self, kid: &str) -> Option<Arc<DecodingKey>> {
        if let Some(key) = self.state.lock().await.keys.get(kid) {
            return Some(key.clone());
        }
        if let Err(e) = self.refresh(false).await {
            tracing::warn!(url = %self.url, error = %e, "JWKS fetch failed");
        }
        self.state.lock().await.keys.get(kid).cloned()
    }

    /// Fetches the set unless it was fetched less than [`JWKS_REFETCH_EVERY`] ago (`force`
    /// skips that). One fetch at a time: concurrent callers wait for it.
    async fn refresh(&self, force: bool) -> Result<usize, String> {
        let mut state = self.state.lock().await;
        if !force
            && state
                .fetched_at
                .is_some_and(|t| t.elapsed() < JWKS_REFETCH_EVERY)
        {
            return Ok(state.keys.len());
        }
        state.fetched_at = Some(Instant::now());
        let set: JwkSet = self
            .client
            .get(&self.url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| e.without_url().to_string())?
            .json()
            .await
            .map_err(|e| format!("not a JWK set: {}", e.without_url()))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = &jwk.common.key_id else {
                continue;
            };
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => {
                    keys.insert(kid.clone(), Arc::new(key));
                }
                Err(e) => {
                    tracing::warn!(url = %self.url, kid = %kid, error = %e, "JWKS key skipped")
                }
            }
        }
        let count = keys.len();
        if count != state.keys.len() || keys.keys().any(|k| !state.keys.contains_key(k)) {
            tracing::info!(url = %self.url, keys = count, "JWKS loaded");
        }
        state.keys = keys;
        Ok(count)
    }
}

fn algorithms(family: AlgorithmFamily) -> Vec<Algorithm> {
    match family {
        AlgorithmFamily::Hmac => vec![Algorithm::HS256],
        AlgorithmFamily::Rsa => vec![Algorithm::RS256, Algorithm::RS384, Algorithm::RS512],
        AlgorithmFamily::Ec => vec![Algorithm::ES256, Algorithm::ES384],
        AlgorithmFamily::Ed => vec![Algorithm::EdDSA],
    }
}

fn describe(error: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::ExpiredSignature => "the token has expired".into(),
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::InvalidAlgorithm => "algorithm not allowed for this key".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("missing claim '{c}'"),
        other => format!("invalid token: {other:?}"),
    }
}

/// The `iss` claim of a token, read without verifying it — only to choose the issuer that
/// then verifies it.
pub fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("iss")?.as_str().map(str::to_owned)
}

/// Tokens already verified, so that a client sending the same token with every request pays
/// a SHA-256 and a lookup, not a signature check (78 µs for RS256, 186 µs for ES256 in the
/// `auth` bench). Entries live until the token's `exp`, at most [`TokenCache::TTL`] — a key
/// removed from the JWKS stops being honoured within that time — and the cache holds at most
/// [`TokenCache::CAPACITY`] tokens, the oldest leaving first.
pub struct TokenCache {
    inner: std::sync::Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    entries: HashMap<[u8; 32], (Verified, Instant)>,
    order: std::collections::VecDeque<[u8; 32]>,
}

impl TokenCache {
    pub const CAPACITY: usize = 10_000;
    pub const TTL: Duration = Duration::from_secs(300);

    pub fn new() -> TokenCache {
        TokenCache {
            inner: std::sync::Mutex::new(CacheInner::default()),
        }
    }

    pub fn get(&self, digest: &[u8; 32]) -> Option<Verified> {
        let inner = self.inner.lock().ok()?;
        let (verified, until) = inner.entries.get(digest)?;
        // As when it was verified: valid until `exp`, give or take the leeway.
        let still_valid = verified
            .expires_at
            .is_none_or(|exp| SystemTime::now() < exp + LEEWAY);
        (Instant::now() < *until && still_valid).then(|| verified.clone())
    }

    pub fn insert(&self, digest: [u8; 32], verified: &Verified) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let ttl = verified
            .expires_at
            .and_then(|exp| exp.duration_since(SystemTime::now()).ok())
            .map_or(Self::TTL, |left| left.min(Self::TTL));
        if inner
            .entries
            .insert(digest, (verified.clone(), Instant::now() + ttl))
            .is_none()
        {
            inner.order.push_back(digest);
        }
        while inner.order.len() > Self::CAPACITY {
            if let Some(oldest) = inner.order.pop_front() {
                inner.entries.remove(&oldest);
            }
        }
    }
}

impl Default for TokenCache {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether a credential looks like a JWT (three base64url parts, a JSON header).
pub fn looks_like_jwt(credential: &str) -> bool {
    credential.starts_with("eyJ") && credential.split('.').count() == 3
}
