//! How the gateway presents itself to a server it connects to as a client (WebSocket and SSE
//! upstreams): credentials from the server's security schemes, query parameters and headers
//! from the channel binding's schemas, and the concrete addresses it opens.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use crate::config::RouteFileConfig;
use crate::credentials::Credentials;
use crate::routing::Route;
use crate::routing::address::{Params, ProtocolAddress};
use crate::spec::Server;
use crate::upstream::ServerOverride;
use crate::upstream::{ServerKey, percent_encode};

/// A server the gateway connects to as a client, as its connector needs it.
#[derive(Clone)]
pub struct ClientSide {
    pub key: ServerKey,
    /// `scheme://host[:port][/pathname]` (the override URL wins), without a trailing slash:
    /// channel addresses start with one.
    pub base_url: String,
    pub access: Access,
    pub optional: bool,
}

impl ClientSide {
    /// A security scheme whose secret is not configured is reported here, once.
    pub fn new(key: ServerKey, server: &Server, overrides: &ServerOverride) -> ClientSide {
        let url = overrides.url.clone().unwrap_or_else(|| server.url());
        let (access, missing) = Access::for_server(server, overrides);
        for scheme in missing {
            tracing::warn!(server = %key, scheme = %scheme, "security scheme without its secret in the config; connecting without it");
        }
        ClientSide {
            base_url: url.trim_end_matches('/').to_owned(),
            key,
            access,
            optional: server.optional,
        }
    }

    /// The concrete addresses `route` is opened at ([`concrete_addresses`] with the route's
    /// configuration); `None`, with a warning, when a parameter has no value.
    pub fn addresses(
        &self,
        route: &Route,
        path: &ProtocolAddress,
        routes_config: &BTreeMap<String, RouteFileConfig>,
    ) -> Option<Vec<(String, Params)>> {
        let configured = routes_config
            .get(route.id.as_ref())
            .map(|c| c.connect.as_slice())
            .unwrap_or_default();
        match concrete_addresses(route, path, configured) {
            Ok(a) => Some(a),
            Err(reason) => {
                tracing::warn!(channel = %route.id, server = %self.key, reason = %reason, "no upstream connection for this route");
                None
            }
        }
    }
}

/// What a request to the server carries besides its path.
#[derive(Clone, Default, PartialEq)]
pub struct Access {
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
}

impl std::fmt::Debug for Access {
    /// Values may be secrets: only the names are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field(
                "query",
                &self.query.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Access {
    /// Credentials for `server` from its security schemes ([`Credentials`]: `httpApiKey` in a
    /// header, query or cookie and HTTP bearer take the override's `token`, HTTP basic its
    /// username and password). A scheme without its secret configured is reported, not guessed;
    /// OAuth2 is for calls only, and reported too.
    pub fn for_server(server: &Server, overrides: &ServerOverride) -> (Access, Vec<String>) {
        let (credentials, mut missing) =
            Credentials::build(&server.security, overrides, &server.url());
        let fixed = credentials.fixed();
        if fixed.oauth2_left_out {
            missing.push("oauth2 (not for WebSocket or SSE connections)".into());
        }
        let access = Access {
            query: fixed.query,
            headers: fixed.headers,
        };
        (access, missing)
    }

    /// Adds the fixed values a binding's `query` / `headers` schema pins.
    pub fn with_binding(mut self, query: Option<&Value>, headers: Option<&Value>) -> Access {
        self.query.extend(pinned_values(query));
        self.headers.extend(pinned_values(headers));
        self
    }

    /// `path?query` with the values percent-encoded.
    pub fn path_and_query(&self, path: &str) -> String {
        if self.query.is_empty() {
            return path.to_owned();
        }
        let query: Vec<String> = self
            .query
            .iter()
            .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
            .collect();
        let separator = if path.contains('?') { '&' } else { '?' };
        format!("{path}{separator}{}", query.join("&"))
    }
}

/// The properties of an object schema that pin one value: `const`, `default`, or an `enum` of
/// one. Others have no value the gateway could choose.
fn pinned_values(schema: Option<&Value>) -> Vec<(String, String)> {
    let Some(properties) = schema
        .and_then(|s| s.get("properties"))
        .and_then(Value::as_object)
    else {
        return Vec::new();
    };
    properties
        .iter()
        .filter_map(|(name, p)| {
            let value = p.get("const").or_else(|| p.get("default")).or_else(|| {
                match p.get("enum").and_then(Value::as_array) {
                    Some(values) if values.len() == 1 => values.first(),
                    _ => None,
                }
            })?;
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Null => return None,
                other => other.to_string(),
            };
            Some((name.clone(), text))
        })
        .collect()
}

/// The concrete addresses of a route on a client-side upstream: one per configured parameter
/// set (`routes.<id>.connect`), else one from the parameters' defaults (or single allowed
/// value). `Err` names the parameters without a value.
pub fn concrete_addresses(
    route: &Route,
    path: &ProtocolAddress,
    configured: &[BTreeMap<String, String>],
) -> Result<Vec<(String, Params)>, String> {
    let defaults: BTreeMap<String, String> = route
        .parameters
        .iter()
        .filter_map(|p| {
            let value = p.default.clone().or_else(|| match &p.allowed {
                Some(values) if values.len() == 1 => values.first().cloned(),
                _ => None,
            })?;
            Some((p.name.clone(), value))
        })
        .collect();
    let sets = if configured.is_empty() {
        vec![defaults.clone()]
    } else {
        configured.to_vec()
    };
    let mut out = Vec::new();
    for set in sets {
        let value_of = |name: &str| set.get(name).or_else(|| defaults.get(name));
        let mut params = Params::default();
        for p in &route.parameters {
            let Some(value) = value_of(&p.name) else {
                return Err(format!(
                    "parameter '{}' has no value: set it in the config under routes.{}.connect",
                    p.name, route.id
                ));
            };
            p.check(value).map_err(|e| e.to_string())?;
            params.insert(Arc::from(p.name.as_str()), value.clone());
        }
        let concrete = path
            .fill(|name| value_of(name).map(String::as_str))
            .map_err(|e| e.to_string())?;
        out.push((concrete, params));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn binding_schemas_pin_const_default_and_single_enum_values() {
        let schema = json!({"type": "object", "properties": {
            "heartbeat": {"type": "boolean", "default": true},
            "format": {"const": "json"},
            "region": {"enum": ["eu"]},
            "free": {"type": "string"},
            "choice": {"enum": ["a", "b"]},
        }});
        assert_eq!(
            pinned_values(Some(&schema)),
            vec![
                ("heartbeat".to_owned(), "true".to_owned()),
                ("format".to_owned(), "json".to_owned()),
                ("region".to_owned(), "eu".to_owned()),
            ]
        );
    }

    fn server(schemes: &[(&str, Value)]) -> Server {
        Server {
            location: crate::spec::Location::new("", ""),
            protocol_name: String::new(),
            id: "s".into(),
            protocol: crate::spec::Protocol::Wss,
            protocol_version: None,
            host: "example.com".into(),
            pathname: None,
            security: schemes
                .iter()
                .map(|(t, d)| crate::spec::SecurityScheme {
                    name: format!("{t}-scheme"),
                    scheme_type: (*t).into(),
                    details: d.clone(),
                })
                .collect(),
            bindings: Default::default(),
            optional: false,
        }
    }

    #[test]
    fn security_schemes_become_headers_and_query_parameters() {
        let s = server(&[
            ("httpApiKey", json!({"name": "api_key", "in": "query"})),
            ("httpApiKey", json!({"name": "session", "in": "cookie"})),
            ("http", json!({"scheme": "Bearer"})),
        ]);
        let overrides = ServerOverride {
            token: Some("t0k".into()),
            ..ServerOverride::default()
        };
        let (access, missing) = Access::for_server(&s, &overrides);
        assert!(missing.is_empty());
        assert_eq!(access.query, vec![("api_key".to_owned(), "t0k".to_owned())]);
        assert_eq!(
            access.headers,
            vec![
                ("cookie".to_owned(), "session=t0k".to_owned()),
                ("authorization".to_owned(), "Bearer t0k".to_owned()),
            ]
        );
        assert!(!format!("{access:?}").contains("t0k"), "Debug hides values");

        let basic = server(&[("http", json!({"scheme": "basic"}))]);
        let overrides = ServerOverride {
            username: Some("gw".into()),
            password: Some("pw".into()),
            ..ServerOverride::default()
        };
        let (access, _) = Access::for_server(&basic, &overrides);
        assert_eq!(access.headers[0].1, "Basic Z3c6cHc=");
        let (_, missing) = Access::for_server(&basic, &ServerOverride::default());
        assert_eq!(missing, vec!["http-scheme (username, password)".to_owned()]);
    }

    #[test]
    fn query_values_are_encoded() {
        let access = Access {
            query: vec![("token".into(), "a b&c".into())],
            headers: Vec::new(),
        };
        assert_eq!(access.path_and_query("/feed"), "/feed?token=a%20b%26c");
        assert_eq!(
            access.path_and_query("/feed?x=1"),
            "/feed?x=1&token=a%20b%26c"
        );
    }
}
