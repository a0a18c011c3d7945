//! Request-reply calls to HTTP APIs described by OpenAPI. Every operation is a channel
//! `{api}.{operationId}` that answers: a request `{path, query, headers, body}` is checked
//! against the operation's parameters and body schema (and refused before anything is sent when
//! it does not fit), sent with reqwest to the server's URL with the operation's credentials,
//! and the upstream's response (status, headers, body) is the reply. A response that does not
//! match its documented schema is logged and counted, not hidden. Idempotent methods are retried
//! with backoff after transport errors and 502/503/504, within the operation's timeout. Every
//! call is kept in the operation's call log.

pub mod replies;
pub mod triggers;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::credentials::Credentials;
use crate::routing::ChannelId;
use crate::routing::address::Params;
use crate::routing::envelope::{Envelope, Origin, Transport};
use crate::schema::{Encoding, PayloadSchema};
use crate::spec::{Api, HttpOperation, SchemaDef};
use crate::store::{LogId, Store};
use crate::telemetry;
use crate::upstream::ServerOverride;
use crate::upstream::{Backoff, describe_http_error, percent_encode};
use replies::{BrokerCalls, BrokerOperation};

/// Why a call did not produce an upstream response.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("no operation '{0}'")]
    NotFound(String),
    #[error("the request does not fit the operation")]
    Invalid(Vec<Problem>),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("upstream unreachable: {0}")]
    Unavailable(String),
}

impl CallError {
    pub fn label(&self) -> &'static str {
        match self {
            CallError::NotFound(_) => "not_found",
            CallError::Invalid(_) => "invalid",
            CallError::Timeout(_) => "timeout",
            CallError::Unavailable(_) => "unavailable",
        }
    }
}

/// One thing wrong with a request.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// `path.deviceId`, `query.limit`, `body/name`...
    pub at: String,
    pub reason: String,
}

/// A call's request, as clients send it.
#[derive(Debug, Clone, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CallRequest {
    pub path: Map<String, Value>,
    pub query: Map<String, Value>,
    pub headers: Map<String, Value>,
    pub body: Option<Value>,
}

/// The upstream's answer.
#[derive(Debug, Clone)]
pub struct CallResponse {
    pub status: u16,
    pub content_type: Option<String>,
    /// The end-to-end headers of the upstream's response (hop-by-hop ones and the framing
    /// headers left out: the gateway frames its own response).
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub latency: Duration,
}

struct Parameter {
    name: String,
    location: String,
    required: bool,
    schema: Option<Arc<PayloadSchema>>,
    /// The schema as JSON Schema, for describing the operation to clients.
    json_schema: Option<Value>,
}

/// An operation, ready to call.
pub struct Operation {
    pub id: ChannelId,
    pub method: reqwest::Method,
    pub path: String,
    pub base_url: String,
    /// What the document says of the operation (summary, description).
    pub description: Option<String>,
    parameters: Vec<Parameter>,
    body_required: bool,
    body_schema: Option<Arc<PayloadSchema>>,
    body_json_schema: Option<Value>,
    /// The JSON Schema of the first documented 2XX response body, when it has one.
    success_json_schema: Option<Value>,
    /// Status pattern (`200`, `4XX`, `default`) → JSON schema of the body.
    responses: Vec<(String, Option<Arc<PayloadSchema>>)>,
    credentials: Credentials,
    timeout: Duration,
    log: LogId,
}

/// Every request-reply operation: OpenAPI operations (over HTTP) and AsyncAPI `send`
/// operations with a reply (over the brokers).
pub struct Operations {
    /// Grows when a document is added at run time (`POST /api/v1/specs`).
    by_id: RwLock<HashMap<ChannelId, Arc<Operation>>>,
    brokers: Option<BrokerCalls>,
    client: reqwest::Client,
    store: Store,
    overrides: Overrides,
}

/// A server's config override, by document id and server id.
type Overrides = Box<dyn Fn(&str, &str) -> ServerOverride + Send + Sync>;

/// What a call id names.
enum Target {
    Http(Arc<Operation>),
    Broker(Arc<BrokerOperation>),
}

/// Time a call may take in all (its retries included) unless the server's config says.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

fn compile(def: &SchemaDef) -> Option<Arc<PayloadSchema>> {
    // The loader already rejected schemas that do not compile.
    PayloadSchema::compile(def).ok().map(Arc::new)
}

impl Operation {
    fn build(
        api: &Api,
        op: &crate::spec::Operation,
        http: &HttpOperation,
        overrides: &ServerOverride,
    ) -> Option<Operation> {
        let server = api.servers.first();
        let base_url = overrides
            .url
            .clone()
            .or_else(|| server.map(|s| s.url()))?
            .trim_end_matches('/')
            .to_owned();
        let (credentials, missing) = Credentials::build(&op.security, overrides, &base_url);
        for scheme in missing {
            tracing::warn!(operation = %op.id, scheme = %scheme, "security scheme without its secret in the config; calls go out without it");
        }
        let json_def = |content: &[(String, Option<SchemaDef>)]| {
            content
                .iter()
                .find(|(media, _)| media == "application/json" || media.ends_with("+json"))
                .or_else(|| content.first())
                .and_then(|(_, s)| s.clone())
        };
        let json_schema =
            |content: &[(String, Option<SchemaDef>)]| json_def(content).as_ref().and_then(compile);
        let body_def = http
            .request_body
            .as_ref()
            .and_then(|b| json_def(&b.content));
        let success_def = http
            .responses
            .iter()
            .filter(|r| r.status.starts_with('2'))
            .find_map(|r| json_def(&r.content));
        Some(Operation {
            id: format!("{}.{}", api.id, op.channel).into(),
            method: reqwest::Method::from_bytes(http.method.to_uppercase().as_bytes()).ok()?,
            path: http.path.clone(),
            base_url,
            description: op.description.clone(),
            parameters: http
                .parameters
                .iter()
                .map(|p| Parameter {
                    name: p.name.clone(),
                    location: p.location.clone(),
                    required: p.required || p.location == "path",
                    schema: p.schema.as_ref().and_then(compile),
                    json_schema: p.schema.as_ref().and_then(crate::schema::as_json_schema),
                })
                .collect(),
            body_required: http.request_body.as_ref().is_some_and(|b| b.required),
            body_schema: http
                .request_body
                .as_ref()
                .and_then(|b| json_schema(&b.content)),
            body_json_schema: body_def.as_ref().and_then(crate::schema::as_json_schema),
            success_json_schema: success_def.as_ref().and_then(crate::schema::as_json_schema),
            responses: http
                .responses
                .iter()
                .map(|r| (r.status.clone(), json_schema(&r.content)))
                .collect(),
            credentials,
            timeout: overrides.timeout.unwrap_or(DEFAULT_TIMEOUT),
            log: LogId::calls(format!("{}.{}", api.id, op.channel).into()),
        })
    }

    /// The JSON Schema of a call request `{path, query, headers, body}` for this operation:
    /// each parameter under its location, the body's schema, and what is required.
    pub fn request_schema(&self) -> Value {
        let mut properties = Map::new();
        let mut required_sections = Vec::new();
        for location in ["path", "query", "header"] {
            let mut fields = Map::new();
            let mut required = Vec::new();
            for p in self.parameters.iter().filter(|p| p.location == location) {
                fields.insert(
                    p.name.clone(),
                    p.json_schema.clone().unwrap_or_else(|| json!({})),
                );
                if p.required {
                    required.push(json!(p.name));
                }
            }
            if fields.is_empty() {
                continue;
            }
            let section = if location == "header" {
                "headers"
            } else {
                location
            };
            if !required.is_empty() {
                required_sections.push(json!(section));
            }
            properties.insert(
                section.into(),
                json!({"type": "object", "properties": fields, "required": required}),
            );
        }
        if self.body_required || self.body_json_schema.is_some() {
            properties.insert(
                "body".into(),
                self.body_json_schema.clone().unwrap_or_else(|| json!({})),
            );
            if self.body_required {
                required_sections.push(json!("body"));
            }
        }
        json!({
            "type": "object",
            "properties": properties,
            "required": required_sections,
            "additionalProperties": false,
        })
    }

    /// The JSON Schema of a successful (2XX) response body, when the document gives one.
    pub fn success_schema(&self) -> Option<&Value> {
        self.success_json_schema.as_ref()
    }

    fn idempotent(&self) -> bool {
        use reqwest::Method;
        [
            Method::GET,
            Method::HEAD,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ]
        .contains(&self.method)
    }

    /// Every problem of `request`, or the concrete path, query and headers.
    fn check(&self, request: &CallRequest) -> Result<Prepared, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut prepared = Prepared {
            path: self.path.clone(),
            query: Vec::new(),
            headers: Vec::new(),
        };
        for p in &self.parameters {
            let given = match p.location.as_str() {
                "path" => request.path.get(&p.name),
                "query" => request.query.get(&p.name),
                "header" => request.headers.get(&p.name),
                _ => None,
            };
            let at = format!("{}.{}", p.location, p.name);
            let Some(value) = given else {
                if p.required {
                    problems.push(Problem {
                        at,
                        reason: "required".into(),
                    });
                }
                continue;
            };
            if let Some(schema) = &p.schema
                && let Err(reason) = check_parameter(schema, value)
            {
                problems.push(Problem { at, reason });
                continue;
            }
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            match p.location.as_str() {
                "path" => {
                    prepared.path = prepared
                        .path
                        .replace(&format!("{{{}}}", p.name), &percent_encode(&text));
                }
                "query" => prepared.query.push((p.name.clone(), text)),
                _ => prepared.headers.push((p.name.clone(), text)),
            }
        }
        match (&request.body, &self.body_schema) {
            (None, _) if self.body_required => problems.push(Problem {
                at: "body".into(),
                reason: "required".into(),
            }),
            (Some(body), Some(schema)) => {
                if let Err(e) = schema.validate_json(body) {
                    problems.push(Problem {
                        at: format!("body{}", e.instance_path),
                        reason: e.reason,
                    });
                }
            }
            _ => {}
        }
        if problems.is_empty() {
            Ok(prepared)
        } else {
            Err(problems)
        }
    }

    /// The documented schema of a response with `status`: exact, then `NXX`, then `default`.
    fn response_schema(&self, status: u16) -> Option<&Arc<PayloadSchema>> {
        let exact = status.to_string();
        let class = format!("{}XX", status / 100);
        [exact.as_str(), class.as_str(), "default"]
            .iter()
            .find_map(|pattern| {
                self.responses
                    .iter()
                    .find(|(s, _)| s.eq_ignore_ascii_case(pattern))
            })
            .and_then(|(_, schema)| schema.as_ref())
    }
}

/// Counts a call in `calls_pending` for as long as it lives, however it ends.
struct PendingCall;

impl PendingCall {
    fn start() -> PendingCall {
        metrics::gauge!(telemetry::CALLS_PENDING).increment(1.0);
        PendingCall
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        metrics::gauge!(telemetry::CALLS_PENDING).decrement(1.0);
    }
}

/// Path, query and header values of a checked request.
struct Prepared {
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
}

/// The headers of a response worth passing on: not hop-by-hop (RFC 9110 §7.6.1), not framing,
/// not the content type (carried on its own).
fn end_to_end(headers: &reqwest::header::HeaderMap) -> Vec<(String, String)> {
    const SKIP: [&str; 10] = [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-type",
    ];
    headers
        .iter()
        .filter(|(name, _)| !SKIP.contains(&name.as_str()))
        .filter_map(|(name, value)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect()
}

/// Path, query and header values arrive as text: `"42"` fits an integer schema.
fn check_parameter(schema: &PayloadSchema, value: &Value) -> Result<(), String> {
    match schema.validate_json(value) {
        Ok(()) => Ok(()),
        Err(e) => match value {
            Value::String(s) => match serde_json::from_str::<Value>(s) {
                Ok(parsed) if schema.validate_json(&parsed).is_ok() => Ok(()),
                _ => Err(e.reason),
            },
            _ => Err(e.reason),
        },
    }
}

impl Operations {
    /// The operations of `apis` (OpenAPI documents); `overrides` gives each API's server URL,
    /// secrets and timeout.
    pub fn build(
        apis: &[Api],
        store: Store,
        overrides: impl Fn(&str, &str) -> ServerOverride + Send + Sync + 'static,
    ) -> Result<Operations, reqwest::Error> {
        let operations = Operations {
            by_id: RwLock::default(),
            brokers: None,
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()?,
            store,
            overrides: Box::new(overrides),
        };
        for api in apis {
            operations.add(api);
        }
        Ok(operations)
    }

    /// Adds the OpenAPI operations of `api`; their ids.
    pub fn add(&self, api: &Api) -> Vec<ChannelId> {
        let server_id = api
            .servers
            .first()
            .map(|s| s.id.as_str())
            .unwrap_or("default");
        let o = (self.overrides)(&api.id, server_id);
        let mut added = Vec::new();
        for op in &api.operations {
            let Some(http) = &op.http else { continue };
            match Operation::build(api, op, http, &o) {
                Some(operation) => {
                    added.push(operation.id.clone());
                    if let Ok(mut by_id) = self.by_id.write() {
                        by_id.insert(operation.id.clone(), Arc::new(operation));
                    }
                }
                None => {
                    tracing::warn!(api = %api.id, operation = %op.id, "no server URL for this operation (set servers.{server_id}.url); it cannot be called")
                }
            }
        }
        // Broker request-reply operations come from the document's routes, already in the hub.
        if let Some(brokers) = &self.brokers {
            added.extend(brokers.add_api(&api.id));
        }
        added
    }

    /// Forgets the operations of document `api` (its broker ones too); how many HTTP ones
    /// there were.
    pub fn remove_api(&self, api: &str) -> usize {
        if let Some(brokers) = &self.brokers {
            brokers.remove_api(api);
        }
        let prefix = format!("{api}.");
        let Ok(mut by_id) = self.by_id.write() else {
            return 0;
        };
        let before = by_id.len();
        by_id.retain(|id, _| !id.starts_with(&prefix));
        before - by_id.len()
    }

    /// How many operations of document `api` are known.
    pub fn count_api(&self, api: &str) -> usize {
        let prefix = format!("{api}.");
        self.by_id
            .read()
            .map(|m| m.keys().filter(|id| id.starts_with(&prefix)).count())
            .unwrap_or(0)
    }

    /// Whether an operation of document `api` is known.
    pub fn has_api(&self, api: &str) -> bool {
        self.count_api(api) > 0
    }

    pub fn get(&self, id: &str) -> Option<Arc<Operation>> {
        self.by_id.read().ok()?.get(id).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Operation>> {
        self.by_id
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Adds the broker request-reply operations (and starts their reply readers).
    pub fn with_brokers(
        mut self,
        brokers: BrokerCalls,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        brokers.start(shutdown);
        self.brokers = Some(brokers);
        self
    }

    /// The broker operations.
    pub fn broker_operations(&self) -> Vec<Arc<BrokerOperation>> {
        self.brokers.iter().flat_map(|b| b.list()).collect()
    }

    fn target(&self, id: &str) -> Option<Target> {
        if let Some(op) = self.get(id) {
            return Some(Target::Http(op));
        }
        self.brokers
            .as_ref()
            .and_then(|b| b.get(id))
            .map(Target::Broker)
    }

    /// The call log of operation `id`, if there is such an operation.
    pub fn log_of(&self, id: &str) -> Option<LogId> {
        self.target(id).map(|t| match t {
            Target::Http(op) => op.log.clone(),
            Target::Broker(op) => LogId::calls(op.id.clone()),
        })
    }

    /// Checks and sends `request`, records the call, and returns the reply.
    pub async fn call(&self, id: &str, request: CallRequest) -> Result<CallResponse, CallError> {
        let target = self
            .target(id)
            .ok_or_else(|| CallError::NotFound(id.to_owned()))?;
        let started = Instant::now();
        // A guard: the caller may go away (its HTTP request dropped) while the call waits.
        let pending = PendingCall::start();
        let (result, method, address, log) = match &target {
            Target::Http(op) => {
                let result = match op.check(&request) {
                    Ok(prepared) => self.send(op, prepared, &request).await,
                    Err(problems) => Err(CallError::Invalid(problems)),
                };
                (
                    result,
                    op.method.as_str().to_owned(),
                    op.path.clone(),
                    op.log.clone(),
                )
            }
            Target::Broker(op) => {
                let brokers = self
                    .brokers
                    .as_ref()
                    .expect("a broker target has its brokers");
                let result = brokers
                    .call(op, request.clone())
                    .await
                    .map(|frame| CallResponse {
                        status: 200,
                        content_type: Some("application/json".into()),
                        headers: Vec::new(),
                        body: frame,
                        latency: started.elapsed(),
                    });
                (
                    result,
                    "publish".to_owned(),
                    op.request.to_string(),
                    LogId::calls(op.id.clone()),
                )
            }
        };
        drop(pending);
        let latency = started.elapsed();
        let outcome = match &result {
            Ok(r) => format!("{}xx", r.status / 100),
            Err(e) => e.label().to_owned(),
        };
        metrics::counter!(telemetry::CALLS, "operation" => id.to_owned(), "outcome" => outcome)
            .increment(1);
        metrics::histogram!(telemetry::CALL_DURATION, "operation" => id.to_owned())
            .record(latency.as_secs_f64());
        let entry = json!({
            "operation": id,
            "method": method,
            "request": request,
            "status": result.as_ref().ok().map(|r| r.status),
            "latencyMs": latency.as_secs_f64() * 1000.0,
            "error": result.as_ref().err().map(|e| match e {
                CallError::Invalid(problems) => json!({"code": e.label(), "problems": problems}),
                other => json!({"code": other.label(), "message": other.to_string()}),
            }),
        });
        self.record(id, log, address, entry).await;
        result
    }

    async fn send(
        &self,
        op: &Operation,
        prepared: Prepared,
        request: &CallRequest,
    ) -> Result<CallResponse, CallError> {
        let started = Instant::now();
        let deadline = started + op.timeout;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        loop {
            let mut query = prepared.query.clone();
            let mut builder = self.client.request(op.method.clone(), "http://placeholder");
            for (name, value) in &prepared.headers {
                builder = builder.header(name.as_str(), value.as_str());
            }
            builder = op
                .credentials
                .apply(&self.client, builder, &mut query)
                .await
                .map_err(|e| CallError::Unavailable(e.to_string()))?;
            let mut url = format!("{}{}", op.base_url, prepared.path);
            if !query.is_empty() {
                let q: Vec<String> = query
                    .iter()
                    .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
                    .collect();
                url.push('?');
                url.push_str(&q.join("&"));
            }
            let url = reqwest::Url::parse(&url)
                .map_err(|e| CallError::Unavailable(format!("bad URL {url}: {e}")))?;
            let mut built = builder
                .build()
                .map_err(|e| CallError::Unavailable(e.to_string()))?;
            *built.url_mut() = url;
            if let Some(body) = &request.body {
                built.headers_mut().insert(
                    "content-type",
                    reqwest::header::HeaderValue::from_static("application/json"),
                );
                *built.body_mut() = Some(body.to_string().into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CallError::Timeout(op.timeout));
            }
            let attempt = tokio::time::timeout(left, async {
                let response = self.client.execute(built).await?;
                let status = response.status().as_u16();
                let content_type = response
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let headers = end_to_end(response.headers());
                let body = response.bytes().await?;
                Ok::<_, reqwest::Error>((status, content_type, headers, body))
            })
            .await;
            let retryable = match &attempt {
                Err(_) => return Err(CallError::Timeout(op.timeout)),
                Ok(Err(_)) => true,
                Ok(Ok((status, _, _, _))) => matches!(status, 502..=504),
            };
            let delay = backoff.next_delay();
            let may_retry = retryable
                && op.idempotent()
                && Instant::now() + delay < deadline
                && backoff.attempts() <= 3;
            match attempt {
                Ok(Ok((status, content_type, headers, body))) if !may_retry => {
                    if status == 401 {
                        op.credentials.forget_tokens().await;
                    }
                    self.check_response(op, status, content_type.as_deref(), &body);
                    return Ok(CallResponse {
                        status,
                        content_type,
                        headers,
                        body,
                        latency: started.elapsed(),
                    });
                }
                Ok(Err(e)) if !may_retry => {
                    return Err(CallError::Unavailable(describe_http_error(&e)));
                }
                _ => {
                    tracing::debug!(operation = %op.id, ?delay, "retrying an idempotent call");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// A response that does not match its documented schema is reported, and passed on as is.
    fn check_response(&self, op: &Operation, status: u16, content_type: Option<&str>, body: &[u8]) {
        let Some(schema) = op.response_schema(status) else {
            return;
        };
        let is_json = content_type.is_none_or(|c| c.contains("json"));
        if !is_json || body.is_empty() {
            return;
        }
        if let Err(e) = schema.validate(body, Encoding::Json) {
            tracing::warn!(operation = %op.id, status, path = %e.instance_path, reason = %e.reason, "upstream response does not match the documented schema");
            metrics::counter!(telemetry::CALL_RESPONSE_MISMATCHES, "operation" => op.id.to_string()).increment(1);
        }
    }

    /// Appends the call to the operation's call log (request, status, latency, error).
    async fn record(&self, id: &str, log: LogId, address: String, entry: Value) {
        let envelope = Envelope::new(
            id.into(),
            address,
            Params::default(),
            Bytes::from(entry.to_string()),
            Origin::client(Transport::Http, 0),
        );
        if let Err(e) = self.store.append(log, envelope, None, None).await {
            tracing::warn!(operation = %id, error = %e, "cannot record the call");
        }
    }

    /// The operation's call log from `from`, at most `limit` entries.
    pub async fn calls(
        &self,
        log: &LogId,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Value>, crate::store::Error> {
        let entries = self.store.read(log, from, limit).await?;
        Ok(entries
            .iter()
            .map(|d| {
                let mut entry: Value =
                    serde_json::from_slice(&d.envelope.payload).unwrap_or(Value::Null);
                if let Value::Object(map) = &mut entry {
                    map.insert("offset".into(), d.offset.into());
                }
                entry
            })
            .collect())
    }
}
