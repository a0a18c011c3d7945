//! The one authentication layer in front of every route: credentials from the request, the
//! principal, its rate limit, and the scope the route needs — decided here, from the matched
//! route, so a handler cannot forget it. A route this table does not know is refused (fail
//! closed). Handlers that act per frame (`/ws/{id}` publishing, `/ws/operations` calls) check
//! the [`Principal`] this layer leaves in the request's extensions.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use axum::extract::{ConnectInfo, MatchedPath, RawPathParams, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics::counter;

use super::AppState;
use super::error::{ApiError, ErrorCode};
use crate::auth::{Auth, Credential, Denied, Need, Principal};
use crate::telemetry::AUTH_DENIED;

/// The client side of a connection: its address, and the subject CN of its certificate when
/// it presented one (mutual TLS).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub certificate_cn: Option<String>,
}

impl From<SocketAddr> for PeerInfo {
    fn from(addr: SocketAddr) -> Self {
        PeerInfo {
            addr,
            certificate_cn: None,
        }
    }
}

/// What a route needs, by its template and method. `None`: the route is not in this table.
pub fn route_need(
    auth: &Auth,
    method: &Method,
    template: &str,
    param: impl Fn(&str) -> Option<String>,
) -> Option<Need> {
    let id = || param("id").unwrap_or_default();
    let read_or_write = if method == Method::GET || method == Method::HEAD {
        Need::AdminRead
    } else {
        Need::AdminWrite
    };
    Some(match template {
        "/healthz"
        | "/readyz"
        | "/.well-known/oauth-protected-resource"
        | "/.well-known/oauth-protected-resource/mcp" => Need::Nothing,
        "/metrics" => auth.metrics_need(),
        "/api/v1/channels/{id}/messages" if method == Method::POST => Need::Publish(id()),
        "/api/v1/channels/{id}/messages" => Need::Subscribe(id()),
        "/ws/{id}" | "/sse/{id}" => Need::Subscribe(id()),
        "/api/v1/operations/{id}/call" => Need::Call(id()),
        // Each frame names its operation: the handler checks `call:` per frame.
        "/ws/operations" => Need::Authenticated,
        // Each tool call names its channel or operation: the MCP handler checks per call.
        "/mcp" => Need::Authenticated,
        // Lists what the caller's scopes allow: the handler filters.
        "/api/v1/asyncapi.json" => Need::Authenticated,
        "/api/v1/openapi.json" => Need::Authenticated,
        "/api/v1/channels"
        | "/api/v1/channels/{id}"
        | "/api/v1/channels/{id}/dead-letters"
        | "/api/v1/subscriptions"
        | "/api/v1/subscriptions/{name}"
        | "/api/v1/bridges"
        | "/api/v1/bridges/{name}"
        | "/api/v1/specs"
        | "/api/v1/specs/{id}"
        | "/api/v1/reloads"
        | "/api/v1/operations"
        | "/api/v1/operations/{id}/calls"
        | "/api/v1/connections"
        | "/api/v1/stats" => read_or_write,
        "/api/v1/channels/{id}/dead-letters/replay" => Need::AdminWrite,
        _ => return None,
    })
}

/// The credentials a request presents: `Authorization: Bearer`, `X-API-Key`, or — for
/// WebSocket and SSE, which browsers cannot give headers — `?access_token=`.
fn credential<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
    streaming: bool,
) -> Result<Option<Credential<'a>>, Denied> {
    let malformed = |reason: &str| Denied::Unauthorized {
        invalid_token: true,
        reason: reason.into(),
    };
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value
            .to_str()
            .map_err(|_| malformed("Authorization is not text"))?;
        let (scheme, token) = value
            .split_once(' ')
            .ok_or_else(|| malformed("Authorization is not 'Bearer <token>'"))?;
        if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
            return Err(malformed("Authorization is not 'Bearer <token>'"));
        }
        return Ok(Some(Credential::Bearer(token.trim())));
    }
    if let Some(value) = headers.get("x-api-key") {
        let key = value
            .to_str()
            .map_err(|_| malformed("X-API-Key is not text"))?;
        return Ok(Some(Credential::ApiKey(key.trim())));
    }
    if streaming && let Some(query) = query {
        for pair in query.split('&') {
            if let Some(token) = pair.strip_prefix("access_token=")
                && !token.is_empty()
            {
                return Ok(Some(Credential::Bearer(token)));
            }
        }
    }
    Ok(None)
}

/// The middleware: authenticate, rate-limit, authorize; the principal goes on to the handler.
pub async fn guard(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let auth = state.auth.clone();
    // `MatchedPath` holds an `Arc<str>`: cloning it costs no allocation per request.
    let template = request.extensions().get::<MatchedPath>().cloned();
    let route = template.as_ref().map_or("unmatched", |t| t.as_str());
    let method = request.method().clone();
    // Whether the route has a rule does not depend on its parameters: fail closed first.
    if let Some(t) = &template
        && route_need(&auth, &method, t.as_str(), |_| None).is_none()
    {
        tracing::error!(route = %route, "a route has no authorization rule: refused");
        return deny(
            &Denied::Forbidden {
                need: "a rule for this endpoint".into(),
            },
            None,
            route,
        );
    }
    if !auth.is_enabled() {
        request.extensions_mut().insert(auth.unrestricted());
        return next.run(request).await;
    }
    let need = match &template {
        // Only templates with parameters need them extracted.
        Some(t) if t.as_str().contains('{') => {
            let (mut parts, body) = request.into_parts();
            let params = axum::RequestPartsExt::extract::<RawPathParams>(&mut parts)
                .await
                .ok();
            request = Request::from_parts(parts, body);
            let param = |name: &str| {
                params.as_ref().and_then(|p| {
                    p.iter()
                        .find(|(k, _)| *k == name)
                        .map(|(_, v)| v.to_owned())
                })
            };
            route_need(&auth, &method, t.as_str(), param)
        }
        Some(t) => route_need(&auth, &method, t.as_str(), |_| None),
        // No route: say 404 to those with credentials only.
        None => Some(Need::Authenticated),
    }
    .expect("checked above: the route has a rule");
    if need == Need::Nothing {
        return next.run(request).await;
    }

    // Plain TCP gives the socket address; the TLS listener gives its certificate too.
    let peer = request
        .extensions()
        .get::<ConnectInfo<PeerInfo>>()
        .map(|c| c.0.clone())
        .or_else(|| {
            request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| PeerInfo::from(c.0))
        });
    let client = peer
        .as_ref()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.addr.ip());
    let streaming = route.starts_with("/ws/") || route.starts_with("/sse/");
    let principal = match peer.as_ref().and_then(|p| p.certificate_cn.as_deref()) {
        Some(cn) => auth.certificate(cn),
        None => match credential(request.headers(), request.uri().query(), streaming) {
            Ok(c) => auth.authenticate(c, client).await,
            Err(denied) => Err(denied),
        },
    };
    // MCP clients find the authorization server from the 401's `resource_metadata`.
    let metadata = (route == "/mcp" && !auth.issuer_urls().is_empty())
        .then(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(|host| state.mcp.metadata_url(host))
        })
        .flatten();
    let refuse = |denied: &Denied, principal: Option<&Principal>| {
        let mut response = deny(denied, principal, route);
        if let Some(url) = &metadata
            && response.status() == StatusCode::UNAUTHORIZED
            && let Some(challenge) = response
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
            && let Ok(value) =
                HeaderValue::from_str(&format!(r#"{challenge}, resource_metadata="{url}""#))
        {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        response
    };
    let principal = match principal {
        Ok(p) => p,
        Err(denied) => return refuse(&denied, None),
    };
    if let Err(denied) = auth.admit(&principal).await {
        return refuse(&denied, Some(&principal));
    }
    if let Err(denied) = auth.authorize(&principal, &need) {
        return refuse(&denied, Some(&principal));
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// The refusal: counted, logged with the principal (never its secret), answered.
pub fn deny(denied: &Denied, principal: Option<&Principal>, route: &str) -> Response {
    counter!(AUTH_DENIED, "reason" => denied.reason()).increment(1);
    let who = principal.map_or("-", |p| &p.id);
    match denied {
        Denied::RateLimited { .. } => {
            tracing::debug!(principal = %who, route = %route, "rate limited")
        }
        Denied::Unauthorized { reason, .. } => {
            tracing::info!(principal = %who, route = %route, reason = %reason, "request denied: unauthorized")
        }
        Denied::Forbidden { need } => {
            tracing::info!(principal = %who, route = %route, missing = %need, "request denied: forbidden")
        }
    }
    denial_response(denied)
}

fn denial_response(denied: &Denied) -> Response {
    match denied {
        Denied::Unauthorized {
            invalid_token,
            reason,
        } => {
            let challenge = if *invalid_token {
                r#"Bearer realm="stepflow", error="invalid_token""#
            } else {
                r#"Bearer realm="stepflow""#
            };
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                format!("authentication required: {reason}"),
            )
            .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
            response
        }
        Denied::Forbidden { need } => ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!("missing scope '{need}'"),
        )
        .with_details(serde_json::json!({ "scope": need }))
        .into_response(),
        Denied::RateLimited { retry_after } => {
            let seconds = retry_after_seconds(*retry_after);
            let mut response = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::RateLimited,
                format!("rate limit reached; retry in {seconds} s"),
            )
            .with_details(serde_json::json!({ "retryAfterSeconds": seconds }))
            .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            response
        }
    }
}

/// Whole seconds, rounded up, at least 1 (`Retry-After: 0` invites a tight loop).
fn retry_after_seconds(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// Counts a denial that happens inside a handler (a frame, an expired token).
pub fn count_denial(reason: &'static str) {
    counter!(AUTH_DENIED, "reason" => reason).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_seconds(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_seconds(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
    }

    #[test]
    fn every_route_of_the_router_has_a_rule() {
        // The described handlers are the API's routes; the few others (`.route(` and
        // `.route_service(` in the router's source) are read from it. A route added without a
        // rule here fails this test (and is refused at run time).
        let auth = Auth::disabled();
        let document = super::super::described_routes().into_openapi();
        let mut seen = 0;
        for (template, item) in &document.paths.paths {
            let item = serde_json::to_value(item).unwrap();
            for method in item.as_object().unwrap().keys() {
                let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                seen += 1;
                assert!(
                    route_need(&auth, &method, template, |_| Some("x".into())).is_some(),
                    "{method} {template} has no authorization rule"
                );
            }
        }
        let source = include_str!("mod.rs");
        for piece in source
            .split(".route(")
            .skip(1)
            .chain(source.split(".route_service(").skip(1))
        {
            let start = piece.find('"').unwrap() + 1;
            let template = &piece[start..start + piece[start..].find('"').unwrap()];
            seen += 1;
            for method in [Method::GET, Method::POST, Method::DELETE] {
                assert!(
                    route_need(&auth, &method, template, |_| Some("x".into())).is_some(),
                    "{method} {template} has no authorization rule"
                );
            }
        }
        assert!(seen >= 30, "routes found: {seen}");
    }

    #[test]
    fn credentials_come_from_the_header_then_the_query_for_streams() {
        let mut headers = HeaderMap::new();
        assert!(matches!(
            credential(&headers, Some("access_token=abc"), true),
            Ok(Some(Credential::Bearer("abc")))
        ));
        assert!(matches!(
            credential(&headers, Some("access_token=abc"), false),
            Ok(None)
        ));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic dXNlcg=="),
        );
        assert!(credential(&headers, None, false).is_err());
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer k1"));
        assert!(matches!(
            credential(&headers, None, false),
            Ok(Some(Credential::Bearer("k1")))
        ));
    }
}
