//! Who may do what: API keys (service tier: scripts, services, AI agents), JWTs from identity
//! providers (application tier), and the public tier (no credentials, read-only on the channels
//! the operator names), each with rate limits. Protocol-neutral: the HTTP layer
//! (`server::auth`) hands credentials in and turns [`Denied`] into 401/403/429.
//!
//! Secrets never leave this module: a key is kept as its SHA-256, a principal is named by its
//! key id or token subject, and no error or log line carries a credential.

pub mod config;
pub mod jwt;
pub mod limit;
pub mod scope;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

pub use config::{AuthFileConfig, AuthSetting, MetricsAccess, RateLimit, TlsFileConfig};
pub use limit::{Limited, LimiterStatus};
pub use scope::{Need, Scope, Scopes};

/// Rate limit for principals when the file names none.
pub const DEFAULT_RATE_LIMIT: &str = "1200/min";
/// Rate limit per client address for the public tier when the file names none.
pub const DEFAULT_PUBLIC_RATE_LIMIT: &str = "120/min";

/// Which tier a principal is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Public,
    /// A user with a JWT.
    Application,
    /// An API key or a client certificate.
    Service,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The key id, `jwt:<subject>`, or `public:<address>`. Safe to log.
    pub id: Arc<str>,
    pub tier: Tier,
    pub scopes: Arc<Scopes>,
    /// When the credential stops being valid: streams end there.
    pub expires_at: Option<SystemTime>,
    limit: Option<RateLimit>,
}

impl Principal {
    /// The principal of a gateway with `auth: none`: everything is allowed.
    pub fn unrestricted() -> Principal {
        Principal {
            id: "anonymous".into(),
            tier: Tier::Service,
            scopes: Arc::new(Scopes::new(vec![Scope::All])),
            expires_at: None,
            limit: None,
        }
    }

    /// The same principal with other scopes (what a narrower key of the same caller would get).
    pub fn with_scopes(mut self, scopes: Scopes) -> Principal {
        self.scopes = Arc::new(scopes);
        self
    }

    /// Whether the principal may do `need`. Scopes decide what a principal may do; being
    /// someone (`Need::Authenticated`) is a matter of tier.
    pub fn allows(&self, need: &Need) -> bool {
        match need {
            Need::Authenticated => self.tier != Tier::Public,
            _ => self.scopes.allows(need),
        }
    }

    /// How long until the credential expires; `None` when it does not.
    pub fn expires_in(&self) -> Option<Duration> {
        self.expires_at.map(|at| {
            at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        })
    }
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No usable credentials. `invalid_token`: a token was given and failed.
    Unauthorized {
        invalid_token: bool,
        reason: String,
    },
    Forbidden {
        need: String,
    },
    RateLimited {
        retry_after: Duration,
    },
}

impl Denied {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Denied::Unauthorized { .. } => "unauthorized",
            Denied::Forbidden { .. } => "forbidden",
            Denied::RateLimited { .. } => "rate_limited",
        }
    }
}

/// What a request presents.
#[derive(Debug, Clone, Copy)]
pub enum Credential<'a> {
    /// `Authorization: Bearer …` or `?access_token=…`: an API key or a JWT.
    Bearer(&'a str),
    /// `X-API-Key: …`.
    ApiKey(&'a str),
}

struct KeyEntry {
    id: Arc<str>,
    scopes: Arc<Scopes>,
    limit: RateLimit,
}

/// The configured authentication and authorization.
pub struct Auth {
    enabled: bool,
    keys: HashMap<[u8; 32], Arc<KeyEntry>>,
    by_id: HashMap<String, Arc<KeyEntry>>,
    issuers: Vec<jwt::Issuer>,
    public: Arc<Scopes>,
    public_limit: RateLimit,
    default_limit: RateLimit,
    limiter: limit::Limiter,
    metrics: MetricsAccess,
    verified_tokens: jwt::TokenCache,
    /// The principal of every request when authentication is off, built once.
    unrestricted: Principal,
}

impl Auth {
    /// An open gateway (`auth: none`, or no `auth` on a loopback listener).
    pub fn disabled() -> Auth {
        Auth {
            enabled: false,
            keys: HashMap::new(),
            by_id: HashMap::new(),
            issuers: Vec::new(),
            public: Arc::new(Scopes::default()),
            public_limit: RateLimit::parse(DEFAULT_PUBLIC_RATE_LIMIT).expect("valid"),
            default_limit: RateLimit::parse(DEFAULT_RATE_LIMIT).expect("valid"),
            limiter: limit::Limiter::new([], None).expect("no redis"),
            metrics: MetricsAccess::Public,
            verified_tokens: jwt::TokenCache::new(),
            unrestricted: Principal::unrestricted(),
        }
    }

    /// Builds from the file's section; every problem is named (never a secret).
    pub fn build(config: &AuthFileConfig) -> Result<Auth, String> {
        let default_limit = config
            .rate_limit
            .unwrap_or_else(|| RateLimit::parse(DEFAULT_RATE_LIMIT).expect("valid"));
        let public_limit = config
            .public
            .rate_limit
            .unwrap_or_else(|| RateLimit::parse(DEFAULT_PUBLIC_RATE_LIMIT).expect("valid"));
        let mut keys = HashMap::new();
        let mut by_id = HashMap::new();
        for key in &config.api_keys {
            let at = format!("auth.api_keys '{}'", key.id);
            if key.id.is_empty() {
                return Err("auth.api_keys: an entry has an empty id".into());
            }
            let hash = match (&key.key_sha256, &key.key) {
                (Some(hex), None) => hex::decode(hex.trim())
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| format!("{at}: key_sha256 is not 64 hex digits"))?,
                (None, Some(plain)) if plain.len() >= 16 => sha256(plain),
                (None, Some(_)) => {
                    return Err(format!("{at}: a key must be at least 16 characters"));
                }
                _ => return Err(format!("{at}: give exactly one of key_sha256 or key")),
            };
            let scopes = Scopes::parse(key.scopes.iter().map(String::as_str))
                .map_err(|e| format!("{at}: {e}"))?;
            let entry = Arc::new(KeyEntry {
                id: key.id.as_str().into(),
                scopes: Arc::new(scopes),
                limit: key.rate_limit.unwrap_or(default_limit),
            });
            if keys.insert(hash, entry.clone()).is_some() {
                return Err(format!("{at}: the same key is configured twice"));
            }
            if by_id.insert(key.id.clone(), entry).is_some() {
                return Err(format!("{at}: the id is used twice"));
            }
        }
        let issuers = config
            .jwt
            .iter()
            .map(|c| jwt::Issuer::build(c).map_err(|e| format!("auth.jwt: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let public = config
            .public
            .channels
            .iter()
            .map(|glob| Scope::parse(&format!("subscribe:{glob}")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("auth.public.channels: {e}"))?;
        let quotas: Vec<RateLimit> = [default_limit, public_limit]
            .into_iter()
            .chain(by_id.values().map(|k| k.limit))
            .collect();
        let limiter = limit::Limiter::new(quotas, config.redis_url.as_deref())
            .map_err(|e| format!("auth.{e}"))?;
        Ok(Auth {
            enabled: true,
            keys,
            by_id,
            issuers,
            public: Arc::new(Scopes::new(public)),
            public_limit,
            default_limit,
            limiter,
            metrics: config.metrics,
            verified_tokens: jwt::TokenCache::new(),
            unrestricted: Principal::unrestricted(),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The principal of a request when authentication is off (reference-counted copies).
    pub fn unrestricted(&self) -> Principal {
        self.unrestricted.clone()
    }

    /// The JWT issuers accepted (their `iss`), for OAuth protected-resource metadata.
    pub fn issuer_urls(&self) -> Vec<String> {
        self.issuers
            .iter()
            .map(|i| i.issuer().to_string())
            .collect()
    }

    /// Fetches every issuer's JWKS once; problems are logged (tokens retry the fetch).
    pub async fn prefetch_keys(&self) {
        for issuer in &self.issuers {
            match issuer.prefetch().await {
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(issuer = %issuer.issuer(), error = %e, "JWKS not loaded yet")
                }
            }
        }
    }

    /// Who presents `credential` from `client`; without one, the public tier.
    pub async fn authenticate(
        &self,
        credential: Option<Credential<'_>>,
        client: IpAddr,
    ) -> Result<Principal, Denied> {
        if !self.enabled {
            return Ok(self.unrestricted());
        }
        match credential {
            None => Ok(Principal {
                id: format!("public:{client}").into(),
                tier: Tier::Public,
                scopes: self.public.clone(),
                expires_at: None,
                limit: Some(self.public_limit),
            }),
            Some(Credential::Bearer(token)) if jwt::looks_like_jwt(token) => self.jwt(token).await,
            Some(Credential::Bearer(key)) | Some(Credential::ApiKey(key)) => self.api_key(key),
        }
    }

    fn api_key(&self, key: &str) -> Result<Principal, Denied> {
        match self.keys.get(&sha256(key)) {
            Some(entry) => Ok(self.key_principal(entry)),
            None => Err(Denied::Unauthorized {
                invalid_token: true,
                reason: "unknown API key".into(),
            }),
        }
    }

    fn key_principal(&self, entry: &KeyEntry) -> Principal {
        Principal {
            id: entry.id.clone(),
            tier: Tier::Service,
            scopes: entry.scopes.clone(),
            expires_at: None,
            limit: Some(entry.limit),
        }
    }

    /// The principal of a client certificate whose subject CN is `common_name` (mutual TLS):
    /// the `api_keys` entry with that id.
    pub fn certificate(&self, common_name: &str) -> Result<Principal, Denied> {
        match self.by_id.get(common_name) {
            Some(entry) => Ok(self.key_principal(entry)),
            None => Err(Denied::Unauthorized {
                invalid_token: false,
                reason: format!("no api_keys entry '{common_name}' for the client certificate"),
            }),
        }
    }

    async fn jwt(&self, token: &str) -> Result<Principal, Denied> {
        let invalid = |reason: String| Denied::Unauthorized {
            invalid_token: true,
            reason,
        };
        if self.issuers.is_empty() {
            return Err(invalid(
                "JWTs are not accepted here (no auth.jwt issuer)".into(),
            ));
        }
        let digest = sha256(token);
        if let Some(verified) = self.verified_tokens.get(&digest) {
            return Ok(self.jwt_principal(verified));
        }
        let claimed = jwt::unverified_issuer(token);
        let issuer = match claimed {
            Some(iss) => self
                .issuers
                .iter()
                .find(|i| i.issuer() == iss)
                .ok_or_else(|| invalid("wrong issuer".into()))?,
            None => return Err(invalid("the token has no issuer".into())),
        };
        let verified = issuer.verify(token).await.map_err(|e| invalid(e.0))?;
        self.verified_tokens.insert(digest, &verified);
        Ok(self.jwt_principal(verified))
    }

    fn jwt_principal(&self, verified: jwt::Verified) -> Principal {
        Principal {
            id: verified.principal_id,
            tier: Tier::Application,
            scopes: verified.scopes,
            expires_at: verified.expires_at,
            limit: Some(self.default_limit),
        }
    }

    /// Counts the request against the principal's budget (per client address for the
    /// public tier).
    pub async fn admit(&self, principal: &Principal) -> Result<(), Denied> {
        let Some(limit) = principal.limit else {
            return Ok(());
        };
        self.limiter
            .check(&principal.id, limit)
            .await
            .map_err(|l| Denied::RateLimited {
                retry_after: l.retry_after,
            })
    }

    /// Whether `principal` may do `need`; the refusal names the missing scope.
    pub fn authorize(&self, principal: &Principal, need: &Need) -> Result<(), Denied> {
        if principal.allows(need) {
            return Ok(());
        }
        if principal.tier == Tier::Public {
            return Err(Denied::Unauthorized {
                invalid_token: false,
                reason: format!("'{need}' needs credentials"),
            });
        }
        Err(Denied::Forbidden {
            need: need.to_string(),
        })
    }

    /// What reading `/metrics` needs.
    pub fn metrics_need(&self) -> Need {
        match self.metrics {
            MetricsAccess::Public => Need::Nothing,
            MetricsAccess::Protected => Need::AdminRead,
        }
    }

    pub fn limiter_status(&self) -> LimiterStatus {
        self.limiter.status()
    }

    /// Periodic upkeep: forget idle rate-limit keys.
    pub fn upkeep(&self) {
        self.limiter.retain_recent();
    }
}

pub fn sha256(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// A new random API key (32 bytes, base64url) and its SHA-256 in hex.
pub fn generate_key() -> Result<(String, String), String> {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    openssl::rand::rand_bytes(&mut bytes).map_err(|e| format!("no randomness: {e}"))?;
    let key = format!(
        "sfk_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let hash = hex::encode(sha256(&key));
    Ok((key, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(yaml: &str) -> Auth {
        let config: AuthFileConfig = crate::yaml::from_str(yaml).unwrap();
        Auth::build(&config).unwrap()
    }

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[tokio::test]
    async fn keys_are_found_by_their_hash_and_never_kept_in_clear() {
        let (key, hash) = generate_key().unwrap();
        let a = auth(&format!(
            "api_keys:\n  - id: ingest\n    key_sha256: {hash}\n    scopes: ['publish:iot.*']\n"
        ));
        let p = a
            .authenticate(Some(Credential::ApiKey(&key)), LOCAL)
            .await
            .unwrap();
        assert_eq!(&*p.id, "ingest");
        assert!(
            a.authorize(&p, &Need::Publish("iot.commands".into()))
                .is_ok()
        );
        assert_eq!(
            a.authorize(&p, &Need::Subscribe("iot.telemetry".into())),
            Err(Denied::Forbidden {
                need: "subscribe:iot.telemetry".into()
            })
        );
        let wrong = a
            .authenticate(Some(Credential::Bearer("not-the-key-at-all")), LOCAL)
            .await
            .unwrap_err();
        assert_eq!(wrong.reason(), "unauthorized");
    }

    #[tokio::test]
    async fn the_public_tier_reads_only_the_named_channels() {
        let a = auth("public:\n  channels: ['iot.telemetry']\n");
        let p = a.authenticate(None, LOCAL).await.unwrap();
        assert_eq!(p.tier, Tier::Public);
        assert!(
            a.authorize(&p, &Need::Subscribe("iot.telemetry".into()))
                .is_ok()
        );
        // Without credentials the answer is 401 (present some), not 403.
        assert!(matches!(
            a.authorize(&p, &Need::Publish("iot.telemetry".into())),
            Err(Denied::Unauthorized { .. })
        ));
    }

    #[test]
    fn bad_entries_are_named_without_their_secret() {
        let config: AuthFileConfig =
            crate::yaml::from_str("api_keys:\n  - id: a\n    key: short\n    scopes: []\n")
                .unwrap();
        let err = Auth::build(&config).err().unwrap();
        assert!(err.contains("'a'") && !err.contains("short"), "{err}");
        let config: AuthFileConfig = crate::yaml::from_str(
            "api_keys:\n  - id: a\n    key: 0123456789abcdef0123\n    scopes: ['write:x']\n",
        )
        .unwrap();
        assert!(Auth::build(&config).err().unwrap().contains("write:x"));
    }
}
