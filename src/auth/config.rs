//! The `auth` and `tls` sections of the config file, as written.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// `auth:` — absent, the keyword `none`, or the mapping.
#[derive(Debug, Clone, Default)]
pub enum AuthSetting {
    /// No `auth` section: the daemon only listens on loopback.
    #[default]
    Absent,
    /// `auth: none`: the operator chose an open gateway.
    Disabled,
    Enabled(Box<AuthFileConfig>),
}

impl<'de> Deserialize<'de> for AuthSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Through a JSON value rather than an untagged enum, so that a mistake inside the
        // mapping is reported as itself (an unknown field), not as "matches no variant".
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(k) if k == "none" => Ok(AuthSetting::Disabled),
            serde_json::Value::Object(map) => serde_json::from_value(map.into())
                .map(|c| AuthSetting::Enabled(Box::new(c)))
                .map_err(serde::de::Error::custom),
            other => Err(serde::de::Error::custom(format!(
                "auth: {other} is not 'none' or a mapping (api_keys, jwt, public, rate_limit, redis_url, metrics)"
            ))),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFileConfig {
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    #[serde(default)]
    pub jwt: Vec<JwtIssuerConfig>,
    #[serde(default)]
    pub public: PublicConfig,
    /// Per principal (key id or JWT subject), unless a key says otherwise.
    pub rate_limit: Option<RateLimit>,
    /// Limits counted in Redis, shared by every instance.
    pub redis_url: Option<String>,
    #[serde(default)]
    pub metrics: MetricsAccess,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub id: String,
    /// Hex SHA-256 of the key.
    pub key_sha256: Option<String>,
    /// The key itself (from `${VAR}`).
    pub key: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    pub rate_limit: Option<RateLimit>,
}

impl fmt::Debug for ApiKeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyConfig")
            .field("id", &self.id)
            .field("scopes", &self.scopes)
            .field("rate_limit", &self.rate_limit)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuerConfig {
    pub issuer: String,
    pub audience: Option<String>,
    pub jwks_url: Option<String>,
    #[serde(default)]
    pub keys: Vec<PemKeyConfig>,
    pub hs256_secret: Option<String>,
    /// The claim holding scopes: a space-separated string or an array.
    #[serde(default = "default_scopes_claim")]
    pub scopes_claim: String,
}

fn default_scopes_claim() -> String {
    "scope".into()
}

impl fmt::Debug for JwtIssuerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtIssuerConfig")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("jwks_url", &self.jwks_url)
            .field("keys", &self.keys.len())
            .field("hs256_secret", &self.hs256_secret.as_ref().map(|_| "<set>"))
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PemKeyConfig {
    pub pem_file: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicConfig {
    /// Channel globs readable without credentials.
    #[serde(default)]
    pub channels: Vec<String>,
    /// Per client address.
    pub rate_limit: Option<RateLimit>,
}

/// Who may read `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricsAccess {
    #[default]
    Public,
    /// `admin:read`.
    Protected,
}

/// `N/s`, `N/min` or `N/h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateLimit {
    pub count: u32,
    pub per: Duration,
}

impl RateLimit {
    pub fn parse(text: &str) -> Result<RateLimit, String> {
        let bad = || format!("rate limit '{text}' is not N/s, N/min or N/h (N > 0)");
        let (count, unit) = text.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        if count == 0 {
            return Err(bad());
        }
        Ok(RateLimit { count, per })
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "min",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl<'de> Deserialize<'de> for RateLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        RateLimit::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// `tls:` — the listener's certificate, and a client CA for mutual TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFileConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Client certificates signed by this CA are required; a certificate's subject CN names
    /// the `api_keys` entry whose scopes it gets.
    pub client_ca_file: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_parse_with_their_unit() {
        assert_eq!(
            RateLimit::parse("6000/min").unwrap(),
            RateLimit {
                count: 6000,
                per: Duration::from_secs(60)
            }
        );
        assert_eq!(RateLimit::parse("5/s").unwrap().per, Duration::from_secs(1));
        assert!(RateLimit::parse("0/min").is_err());
        assert!(RateLimit::parse("10").is_err());
        assert!(RateLimit::parse("10/day").is_err());
    }

    #[test]
    fn auth_is_none_or_a_mapping() {
        let none: AuthSetting = crate::yaml::from_str("none").unwrap();
        assert!(matches!(none, AuthSetting::Disabled));
        let on: AuthSetting =
            crate::yaml::from_str("api_keys:\n  - id: a\n    key: k\n    scopes: ['*']\n").unwrap();
        let AuthSetting::Enabled(c) = on else {
            panic!("a mapping")
        };
        assert_eq!(c.api_keys[0].id, "a");
        let err = crate::yaml::from_str::<AuthSetting>("off").unwrap_err();
        assert!(err.to_string().contains("not 'none'"), "{err}");
        let err = crate::yaml::from_str::<AuthSetting>("api_key: []\n").unwrap_err();
        assert!(err.to_string().contains("api_key"), "{err}");
    }
}
