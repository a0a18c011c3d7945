//! Credentials for the servers the gateway calls (OpenAPI operations) or connects to as a client
//! (WebSocket and SSE upstreams), from their security schemes and the secrets in the config: API
//! keys (header, query, cookie), HTTP bearer and basic, and OAuth2 client credentials with the
//! token cached until shortly before it expires (calls only).

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::Mutex;

use crate::spec::SecurityScheme;
use crate::upstream::ServerOverride;
use crate::upstream::percent_encode;

/// A token is renewed this long before the server said it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(30);

enum Scheme {
    Header(String, String),
    Query(String, String),
    Bearer(String),
    Basic(String, String),
    ClientCredentials {
        token_url: String,
        client_id: String,
        client_secret: String,
        scopes: Vec<String>,
        cached: Mutex<Option<(String, Instant)>>,
    },
}

/// An OAuth2 token could not be had.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TokenError(String);

/// The fixed part of a server's credentials.
pub struct FixedCredentials {
    pub headers: Vec<(String, String)>,
    pub query: Vec<(String, String)>,
    /// OAuth2 schemes were left out (they need a token request).
    pub oauth2_left_out: bool,
}

/// What a request to a server must carry.
pub struct Credentials {
    schemes: Vec<Scheme>,
}

impl Credentials {
    /// The schemes of an operation; those whose secret is not configured are returned by
    /// name (the call goes out without them and the upstream decides).
    /// A relative `tokenUrl` is resolved against `base_url` (OpenAPI 3.1 relative references).
    pub fn build(
        schemes: &[SecurityScheme],
        overrides: &ServerOverride,
        base_url: &str,
    ) -> (Credentials, Vec<String>) {
        let mut out = Vec::new();
        let mut missing = Vec::new();
        for scheme in schemes {
            let d = &scheme.details;
            let field = |name: &str| {
                d.get(name)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            let token = overrides.token.clone();
            match (
                scheme.scheme_type.as_str(),
                field("scheme").to_lowercase().as_str(),
            ) {
                ("apiKey" | "httpApiKey", _) => match token {
                    Some(t) => out.push(match field("in").as_str() {
                        "query" => Scheme::Query(field("name"), t),
                        "cookie" => {
                            Scheme::Header("cookie".into(), format!("{}={t}", field("name")))
                        }
                        _ => Scheme::Header(field("name"), t),
                    }),
                    None => missing.push(format!("{} (token)", scheme.name)),
                },
                ("http", "bearer") => match token {
                    Some(t) => out.push(Scheme::Bearer(t)),
                    None => missing.push(format!("{} (token)", scheme.name)),
                },
                ("http", "basic") => match &overrides.username {
                    Some(u) => out.push(Scheme::Basic(
                        u.clone(),
                        overrides.password.clone().unwrap_or_default(),
                    )),
                    None => missing.push(format!("{} (username, password)", scheme.name)),
                },
                ("oauth2", _) => {
                    let flow = d.pointer("/flows/clientCredentials");
                    let token_url = flow.and_then(|f| f.get("tokenUrl")).and_then(Value::as_str);
                    match (token_url, &overrides.client_id, &overrides.client_secret) {
                        (Some(url), Some(id), Some(secret)) => {
                            out.push(Scheme::ClientCredentials {
                                token_url: resolve(base_url, url),
                                client_id: id.clone(),
                                client_secret: secret.clone(),
                                scopes: flow
                                    .and_then(|f| f.get("scopes"))
                                    .and_then(Value::as_object)
                                    .map(|s| s.keys().cloned().collect())
                                    .unwrap_or_default(),
                                cached: Mutex::new(None),
                            })
                        }
                        (None, _, _) => missing.push(format!(
                            "{} (only the clientCredentials flow is supported)",
                            scheme.name
                        )),
                        _ => missing.push(format!("{} (client_id, client_secret)", scheme.name)),
                    }
                }
                _ => missing.push(format!(
                    "{} (type {} not supported)",
                    scheme.name, scheme.scheme_type
                )),
            }
        }
        (Credentials { schemes: out }, missing)
    }

    /// The credentials that are fixed values — everything but OAuth2 tokens — for connections
    /// that are not reqwest requests (WebSocket upgrades).
    pub fn fixed(&self) -> FixedCredentials {
        use base64::Engine;
        let (mut headers, mut query, mut left_out) = (Vec::new(), Vec::new(), false);
        for scheme in &self.schemes {
            match scheme {
                Scheme::Header(name, value) => headers.push((name.clone(), value.clone())),
                Scheme::Query(name, value) => query.push((name.clone(), value.clone())),
                Scheme::Bearer(token) => {
                    headers.push(("authorization".into(), format!("Bearer {token}")));
                }
                Scheme::Basic(user, password) => {
                    let pair = base64::engine::general_purpose::STANDARD
                        .encode(format!("{user}:{password}"));
                    headers.push(("authorization".into(), format!("Basic {pair}")));
                }
                Scheme::ClientCredentials { .. } => left_out = true,
            }
        }
        FixedCredentials {
            headers,
            query,
            oauth2_left_out: left_out,
        }
    }

    /// Adds the credentials to a request (fetching an OAuth2 token when none is cached).
    pub async fn apply(
        &self,
        client: &reqwest::Client,
        mut request: reqwest::RequestBuilder,
        query: &mut Vec<(String, String)>,
    ) -> Result<reqwest::RequestBuilder, TokenError> {
        for scheme in &self.schemes {
            request = match scheme {
                Scheme::Header(name, value) => request.header(name.as_str(), value.as_str()),
                Scheme::Query(name, value) => {
                    query.push((name.clone(), value.clone()));
                    request
                }
                Scheme::Bearer(token) => request.bearer_auth(token),
                Scheme::Basic(user, password) => request.basic_auth(user, Some(password)),
                Scheme::ClientCredentials {
                    token_url,
                    client_id,
                    client_secret,
                    scopes,
                    cached,
                } => {
                    let mut slot = cached.lock().await;
                    let token = match slot.as_ref() {
                        Some((token, until)) if Instant::now() < *until => token.clone(),
                        _ => {
                            let (token, lifetime) =
                                fetch_token(client, token_url, client_id, client_secret, scopes)
                                    .await?;
                            *slot = Some((
                                token.clone(),
                                Instant::now() + lifetime.saturating_sub(TOKEN_MARGIN),
                            ));
                            token
                        }
                    };
                    request.bearer_auth(token)
                }
            };
        }
        Ok(request)
    }

    /// Forgets cached tokens (after the upstream refused one).
    pub async fn forget_tokens(&self) {
        for scheme in &self.schemes {
            if let Scheme::ClientCredentials { cached, .. } = scheme {
                *cached.lock().await = None;
            }
        }
    }
}

fn resolve(base_url: &str, url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(absolute) => absolute.to_string(),
        Err(_) => reqwest::Url::parse(&format!("{base_url}/"))
            .and_then(|base| base.join(url))
            .map_or_else(|_| url.to_owned(), |u| u.to_string()),
    }
}

/// RFC 6749 §4.4: the client authenticates with HTTP basic; the answer's `expires_in` (default
/// an hour) bounds the cache.
async fn fetch_token(
    client: &reqwest::Client,
    token_url: &str,
    client_id: &str,
    client_secret: &str,
    scopes: &[String],
) -> Result<(String, Duration), TokenError> {
    let mut form = "grant_type=client_credentials".to_owned();
    if !scopes.is_empty() {
        form.push_str(&format!("&scope={}", percent_encode(&scopes.join(" "))));
    }
    let response = client
        .post(token_url)
        .basic_auth(client_id, Some(client_secret))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .map_err(|e| TokenError(format!("OAuth2 token endpoint: {e}")))?;
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .map_err(|e| TokenError(format!("OAuth2 token endpoint answered {status}: {e}")))?;
    let token = body
        .get("access_token")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            TokenError(format!(
                "OAuth2 token endpoint answered {status} without an access_token"
            ))
        })?;
    let lifetime = body
        .get("expires_in")
        .and_then(Value::as_u64)
        .map_or(Duration::from_secs(3600), Duration::from_secs);
    Ok((token.to_owned(), lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scheme(t: &str, details: Value) -> SecurityScheme {
        SecurityScheme {
            name: format!("{t}-scheme"),
            scheme_type: t.into(),
            details,
        }
    }

    #[tokio::test]
    async fn api_keys_bearer_and_basic_go_where_their_schemes_say() {
        let overrides = ServerOverride {
            token: Some("t0k".into()),
            username: Some("gw".into()),
            password: Some("pw".into()),
            ..ServerOverride::default()
        };
        let (credentials, missing) = Credentials::build(
            &[
                scheme("apiKey", json!({"in": "query", "name": "key"})),
                scheme("apiKey", json!({"in": "cookie", "name": "session"})),
                scheme("http", json!({"scheme": "basic"})),
                scheme("openIdConnect", json!({})),
            ],
            &overrides,
            "https://api.example.com/v1",
        );
        assert_eq!(
            missing,
            vec!["openIdConnect-scheme (type openIdConnect not supported)"]
        );
        let client = reqwest::Client::new();
        let mut query = Vec::new();
        let request = credentials
            .apply(
                &client,
                client.get("https://api.example.com/v1/x"),
                &mut query,
            )
            .await
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(query, vec![("key".to_owned(), "t0k".to_owned())]);
        assert_eq!(request.headers()["cookie"], "session=t0k");
        assert_eq!(request.headers()["authorization"], "Basic Z3c6cHc=");
    }

    #[test]
    fn relative_token_urls_resolve_against_the_server() {
        assert_eq!(
            resolve("https://api.example.com/v1", "/oauth/token"),
            "https://api.example.com/oauth/token"
        );
        assert_eq!(
            resolve("https://api.example.com/v1", "oauth/token"),
            "https://api.example.com/v1/oauth/token"
        );
        assert_eq!(
            resolve("https://api.example.com", "https://login.example.com/token"),
            "https://login.example.com/token"
        );
    }
}
