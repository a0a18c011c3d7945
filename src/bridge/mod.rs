//! Bridges (`bridges/*.yaml`): declarative links from a readable channel to writable channels
//! (any protocol) or OpenAPI operations, with a filter, parameter / key / header mapping and
//! JSON ⇄ Avro conversion.
//!
//! Delivery is at-least-once by construction: a source acknowledges its broker once the message
//! is flushed to the source channel's log (as for every readable route), and each target of a
//! bridge is a *lane* that reads that log from a durable cursor, sends, and moves the cursor only
//! past what its target confirmed (or dead-lettered). So the log plus the cursor is the record
//! of pending deliveries: a crash or a target outage loses nothing, it delays (and may repeat).
//! Lanes are independent: a target that is down holds back only its own lane.
//!
//! ```yaml
//! bridges:
//!   telemetry-to-kafka:
//!     from: iot.telemetry
//!     filter: has(payload.temperature)      # CEL, see routing::filter
//!     on_target_down: block                 # block | drop_oldest | dead_letter
//!     start: latest                         # a new lane: earliest | latest (default)
//!     to:
//!       - channel: analytics.telemetryRaw
//!         params: {deviceId: '{deviceId}'}  # target parameter ← template over the source
//!         key: '{deviceId}'                 # Kafka record key
//!         headers: {source: '{address}'}
//!         format: avro                      # json | avro; default: the target message's
//!       - operation: readings-api.postReading   # `{api}.{operationId}`
//! ```

pub mod lane;
pub mod mapping;
pub mod running;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::routing::filter::Filter;
use crate::routing::{ChannelId, Route, RoutingTable, UpstreamBinding};
use crate::schema::{Encoding, PayloadSchema};
use crate::spec::error::type_name;
use crate::spec::{Location, SpecError, SpecErrorKind};
use mapping::{Conversion, Template};

/// What a lane does while its target cannot take messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Wait and retry, in order; the source log holds everything meanwhile.
    Block,
    /// Wait and retry, but keep at most `max_lag` undelivered messages: older ones are skipped.
    DropOldest,
    /// After `retries` attempts, put the message in the source channel's dead-letter log (with
    /// the bridge and target in its headers, so it can be replayed to that target) and go on.
    DeadLetter,
}

/// Where a lane sends.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Channel(ChannelId),
    Operation(String),
}

impl Target {
    pub fn label(&self) -> &str {
        match self {
            Target::Channel(c) => c,
            Target::Operation(o) => o,
        }
    }
}

/// One target of a bridge, with everything needed to send to it.
#[derive(Debug)]
pub struct Lane {
    pub bridge: String,
    pub source: ChannelId,
    pub target: Target,
    pub filter: Option<Filter>,
    /// Target address parameter ← template over the source message.
    pub params: Vec<(String, Template)>,
    pub key: Option<Template>,
    pub headers: Vec<(String, Template)>,
    pub conversion: Conversion,
    pub policy: Policy,
    pub retries: u32,
    pub max_in_flight: usize,
    pub max_lag: u64,
    pub retry_backoff: Duration,
    /// Where a lane without a cursor starts: the oldest message in the source log, or the next.
    pub start: Start,
}

/// Where a new lane starts reading its source log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// The oldest message the log still holds.
    Earliest,
    /// The next message (the default).
    Latest,
}

impl Lane {
    /// The key of this lane's cursor in the store.
    pub fn cursor_key(&self) -> String {
        format!("{}/{}", self.bridge, self.target.label())
    }
}

/// A compiled bridge.
#[derive(Debug)]
pub struct Bridge {
    pub name: String,
    pub file: PathBuf,
    pub source: ChannelId,
    pub lanes: Vec<Arc<Lane>>,
    /// The bridge as written (its mapping under `bridges:`): what a change is compared on, and
    /// what `GET /api/v1/bridges/{name}` returns.
    pub definition: Value,
}

/// Headers a dead letter of a bridge carries, so a replay knows where it was going.
pub const BRIDGE_HEADER: &str = "x-stepflow-bridge";
/// Every bridged message carries its place in the source log (`{channel}/{offset}`): the same
/// value on every resend of it, so a consumer that keeps the ids it saw drops the copies a crash
/// or a lost confirmation makes (at-least-once delivery, exactly-once effect).
pub const MESSAGE_ID_HEADER: &str = "x-stepflow-message-id";
pub const TARGET_HEADER: &str = "x-stepflow-target";

/// Loads every `*.yaml`, `*.yml` and `*.json` file of `dir` (sorted by name) and compiles the
/// bridges against the routing table; `has_operation` says whether an operation id exists.
/// Blocking (reads files): call from a blocking context.
pub fn load(
    dir: &Path,
    table: &RoutingTable,
    has_operation: &dyn Fn(&str) -> bool,
) -> Result<Vec<Bridge>, Vec<SpecError>> {
    let files = read_dir(dir).map_err(|e| vec![e])?;
    compile(&files, table, has_operation)
}

/// The bridge files of `dir` with their text, sorted by name. Blocking.
pub fn read_dir(dir: &Path) -> Result<Vec<(PathBuf, String)>, SpecError> {
    let unreadable = |at: &Path, e: std::io::Error| {
        SpecError::new(
            Location::new(at, ""),
            SpecErrorKind::Unreadable {
                reason: e.to_string(),
            },
        )
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| unreadable(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_bridge_file(p))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| match std::fs::read_to_string(&path) {
            Ok(text) => Ok((path, text)),
            Err(e) => Err(unreadable(&path, e)),
        })
        .collect()
}

/// Whether `path` names a bridge file (`.yaml`, `.yml`, `.json`).
pub fn is_bridge_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
}

/// Compiles the bridges of `files` (path and text, in order) against the routing table; every
/// problem of every file is collected, and a name defined twice is one of them.
pub fn compile(
    files: &[(PathBuf, String)],
    table: &RoutingTable,
    has_operation: &dyn Fn(&str) -> bool,
) -> Result<Vec<Bridge>, Vec<SpecError>> {
    let mut errors = Vec::new();
    let mut bridges: Vec<Bridge> = Vec::new();
    for (file, text) in files {
        let mut compiler = Compiler {
            table,
            has_operation,
            errors: &mut errors,
        };
        for bridge in compiler.file(file, text) {
            if let Some(first) = bridges.iter().find(|b| b.name == bridge.name) {
                errors.push(SpecError::new(
                    Location::new(&bridge.file, format!("/bridges/{}", bridge.name)),
                    SpecErrorKind::DuplicateId {
                        what: "bridge",
                        id: bridge.name.clone(),
                        first: first.file.display().to_string(),
                    },
                ));
            } else {
                bridges.push(bridge);
            }
        }
    }
    if errors.is_empty() {
        Ok(bridges)
    } else {
        Err(errors)
    }
}

struct Compiler<'a> {
    table: &'a RoutingTable,
    has_operation: &'a dyn Fn(&str) -> bool,
    errors: &'a mut Vec<SpecError>,
}

const BRIDGE_FIELDS: [&str; 9] = [
    "from",
    "start",
    "to",
    "filter",
    "on_target_down",
    "retries",
    "max_in_flight",
    "max_lag",
    "description",
];
const TARGET_FIELDS: [&str; 8] = [
    "channel",
    "operation",
    "params",
    "key",
    "headers",
    "format",
    "on_target_down",
    "retries",
];

impl Compiler<'_> {
    fn error(&mut self, at: &Location, reason: impl Into<String>) {
        self.errors.push(SpecError::new(
            at.clone(),
            SpecErrorKind::Invalid(reason.into()),
        ));
    }

    fn file(&mut self, file: &Path, text: &str) -> Vec<Bridge> {
        let root = Location::new(file, "");
        let value: Value = match crate::yaml::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                let reason = e.to_string();
                let reason = reason.lines().next().unwrap_or("").to_owned();
                self.errors
                    .push(SpecError::new(root, SpecErrorKind::Syntax { reason }));
                return Vec::new();
            }
        };
        let Some(doc) = value.as_object() else {
            self.errors.push(SpecError::new(
                root,
                SpecErrorKind::RootNotAMapping {
                    found: type_name(&value),
                },
            ));
            return Vec::new();
        };
        self.check_fields(doc, &root, &["bridges"]);
        let at = root.join("bridges");
        let Some(bridges) = doc.get("bridges") else {
            self.errors.push(SpecError::new(
                root,
                SpecErrorKind::MissingField { field: "bridges" },
            ));
            return Vec::new();
        };
        let Some(bridges) = self.mapping(bridges, &at) else {
            return Vec::new();
        };
        bridges
            .iter()
            .filter_map(|(name, def)| self.bridge(file, name, def, &at.join(name)))
            .collect()
    }

    fn mapping<'v>(&mut self, value: &'v Value, at: &Location) -> Option<&'v Map<String, Value>> {
        match value.as_object() {
            Some(m) => Some(m),
            None => {
                self.errors.push(SpecError::new(
                    at.clone(),
                    SpecErrorKind::WrongType {
                        expected: "a mapping",
                        found: type_name(value),
                    },
                ));
                None
            }
        }
    }

    fn check_fields(&mut self, map: &Map<String, Value>, at: &Location, allowed: &[&str]) {
        for key in map.keys() {
            if !allowed.contains(&key.as_str()) && !key.starts_with("x-") {
                self.errors.push(SpecError::new(
                    at.join(key),
                    SpecErrorKind::UnknownField {
                        field: key.clone(),
                        allowed: allowed.join(", "),
                    },
                ));
            }
        }
    }

    fn string(&mut self, map: &Map<String, Value>, key: &str, at: &Location) -> Option<String> {
        match map.get(key)? {
            Value::String(s) => Some(s.clone()),
            other => {
                self.errors.push(SpecError::new(
                    at.join(key),
                    SpecErrorKind::WrongType {
                        expected: "a string",
                        found: type_name(other),
                    },
                ));
                None
            }
        }
    }

    fn number(&mut self, map: &Map<String, Value>, key: &str, at: &Location) -> Option<u64> {
        let value = map.get(key)?;
        match value.as_u64() {
            Some(n) => Some(n),
            None => {
                self.errors.push(SpecError::new(
                    at.join(key),
                    SpecErrorKind::WrongType {
                        expected: "a non-negative integer",
                        found: type_name(value),
                    },
                ));
                None
            }
        }
    }

    fn policy(&mut self, map: &Map<String, Value>, at: &Location) -> Option<Policy> {
        let raw = self.string(map, "on_target_down", at)?;
        match raw.as_str() {
            "block" => Some(Policy::Block),
            "drop_oldest" => Some(Policy::DropOldest),
            "dead_letter" => Some(Policy::DeadLetter),
            other => {
                self.error(
                    &at.join("on_target_down"),
                    format!("'{other}' is not a policy: block, drop_oldest or dead_letter"),
                );
                None
            }
        }
    }

    fn bridge(&mut self, file: &Path, name: &str, def: &Value, at: &Location) -> Option<Bridge> {
        let def = self.mapping(def, at)?;
        self.check_fields(def, at, &BRIDGE_FIELDS);
        let errors_before = self.errors.len();
        let source = match self.string(def, "from", at) {
            Some(id) => match self.table.get(&id) {
                Some(route) if route.direction.readable => Some(route.clone()),
                Some(_) => {
                    self.error(
                        &at.join("from"),
                        format!(
                            "channel '{id}' is not readable: the gateway does not receive on it, so there is nothing to bridge from"
                        ),
                    );
                    None
                }
                None => {
                    self.error(&at.join("from"), self.unknown_channel(&id));
                    None
                }
            },
            None => {
                if !def.contains_key("from") {
                    self.errors.push(SpecError::new(
                        at.clone(),
                        SpecErrorKind::MissingField { field: "from" },
                    ));
                }
                None
            }
        };
        let filter = self
            .string(def, "filter", at)
            .and_then(|f| match Filter::compile(&f) {
                Ok(f) => Some(f),
                Err(e) => {
                    self.error(&at.join("filter"), e);
                    None
                }
            });
        let policy = self.policy(def, at).unwrap_or(Policy::Block);
        let start = match self.string(def, "start", at).as_deref() {
            None | Some("latest") => Start::Latest,
            Some("earliest") => Start::Earliest,
            Some(other) => {
                self.error(
                    &at.join("start"),
                    format!("'{other}' is not a start: earliest or latest"),
                );
                Start::Latest
            }
        };
        let retries = self.number(def, "retries", at).unwrap_or(3) as u32;
        let max_in_flight = self
            .number(def, "max_in_flight", at)
            .unwrap_or(256)
            .clamp(1, 65_536) as usize;
        let max_lag = self.number(def, "max_lag", at).unwrap_or(100_000).max(1);
        let targets = match def.get("to") {
            Some(Value::Array(items)) if !items.is_empty() => items.clone(),
            Some(Value::Array(_)) => {
                self.error(&at.join("to"), "a bridge needs at least one target");
                Vec::new()
            }
            Some(other) => {
                self.errors.push(SpecError::new(
                    at.join("to"),
                    SpecErrorKind::WrongType {
                        expected: "a list of targets",
                        found: type_name(other),
                    },
                ));
                Vec::new()
            }
            None => {
                self.errors.push(SpecError::new(
                    at.clone(),
                    SpecErrorKind::MissingField { field: "to" },
                ));
                Vec::new()
            }
        };
        let source = source?;
        let mut lanes = Vec::new();
        let mut seen = HashSet::new();
        for (i, target) in targets.iter().enumerate() {
            let at = at.join("to").join(i);
            let Some(target) = self.mapping(target, &at) else {
                continue;
            };
            let lane_policy = self.policy(target, &at).unwrap_or(policy);
            let lane_retries = self
                .number(target, "retries", &at)
                .map_or(retries, |n| n as u32);
            if let Some(mut lane) = self.lane(name, &source, target, &at) {
                if !seen.insert(lane.target.clone()) {
                    self.error(
                        &at,
                        format!(
                            "'{}' is already a target of this bridge",
                            lane.target.label()
                        ),
                    );
                    continue;
                }
                lane.filter = filter.clone();
                lane.policy = lane_policy;
                lane.retries = lane_retries;
                lane.max_in_flight = max_in_flight;
                lane.max_lag = max_lag;
                lane.start = start;
                lanes.push(Arc::new(lane));
            }
        }
        if self.errors.len() > errors_before {
            return None;
        }
        Some(Bridge {
            name: name.to_owned(),
            file: file.to_path_buf(),
            source: source.id.clone(),
            lanes,
            definition: Value::Object(def.clone()),
        })
    }

    fn unknown_channel(&self, id: &str) -> String {
        // A table of a thousand routes would make a thousand-name message: name a few.
        const SHOWN: usize = 20;
        let routes = self.table.routes();
        let mut known: Vec<&str> = routes.iter().take(SHOWN).map(|r| r.id.as_ref()).collect();
        let more = routes.len().saturating_sub(SHOWN);
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        known.sort_unstable();
        format!(
            "no channel '{id}' (channels are `{{api}}.{{channel}}`: {}{more})",
            known.join(", ")
        )
    }

    fn lane(
        &mut self,
        bridge: &str,
        source: &Route,
        def: &Map<String, Value>,
        at: &Location,
    ) -> Option<Lane> {
        self.check_fields(def, at, &TARGET_FIELDS);
        let source_params: Vec<String> = source.parameters.iter().map(|p| p.name.clone()).collect();
        let channel = self.string(def, "channel", at);
        let operation = self.string(def, "operation", at);
        let (target, target_route) = match (channel, operation) {
            (Some(id), None) => match self.table.get(&id) {
                Some(route) if is_writable_target(route) => {
                    (Target::Channel(id.into()), Some(route.clone()))
                }
                Some(route) if !route.direction.writable => {
                    self.error(
                        &at.join("channel"),
                        format!(
                            "channel '{id}' is not writable: the gateway does not send on it (its document's operations `receive` it)"
                        ),
                    );
                    return None;
                }
                Some(_) => {
                    self.error(
                        &at.join("channel"),
                        format!("channel '{id}' has no upstream the gateway can publish to"),
                    );
                    return None;
                }
                None => {
                    let reason = self.unknown_channel(&id);
                    self.error(&at.join("channel"), reason);
                    return None;
                }
            },
            (None, Some(op)) => {
                if !(self.has_operation)(&op) {
                    self.error(
                        &at.join("operation"),
                        format!("no request-reply operation '{op}'"),
                    );
                    return None;
                }
                (Target::Operation(op), None)
            }
            _ => {
                self.error(
                    at,
                    "a target is either `channel: <id>` or `operation: <id>`",
                );
                return None;
            }
        };
        if let Target::Channel(id) = &target
            && *id == source.id
        {
            self.error(&at.join("channel"), "a bridge cannot target its own source");
            return None;
        }

        let templates = |field: &str, this: &mut Self| -> Vec<(String, Template)> {
            let Some(value) = def.get(field) else {
                return Vec::new();
            };
            let at = at.join(field);
            let Some(map) = this.mapping(value, &at) else {
                return Vec::new();
            };
            let mut out = Vec::new();
            for (name, raw) in map {
                let raw = match raw {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    other => {
                        this.errors.push(SpecError::new(
                            at.join(name),
                            SpecErrorKind::WrongType {
                                expected: "a string template",
                                found: type_name(other),
                            },
                        ));
                        continue;
                    }
                };
                match Template::parse(&raw, &source_params) {
                    Ok(t) => out.push((name.clone(), t)),
                    Err(e) => this.error(&at.join(name), e),
                }
            }
            out
        };
        let mut params = templates("params", self);
        let headers = templates("headers", self);
        let key =
            self.string(def, "key", at)
                .and_then(|k| match Template::parse(&k, &source_params) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        self.error(&at.join("key"), e);
                        None
                    }
                });

        if let Some(route) = &target_route {
            // Every parameter of the target's address needs a value: mapped, copied from a
            // same-named source parameter, or the parameter's default.
            let target_params: Vec<&str> = route
                .template
                .as_ref()
                .map(|t| t.params().collect())
                .unwrap_or_default();
            for (name, _) in &params {
                if !target_params.contains(&name.as_str()) {
                    self.error(
                        &at.join("params").join(name),
                        format!(
                            "'{}' has no address parameter '{name}' (it has: {})",
                            route.id,
                            if target_params.is_empty() {
                                "none".to_owned()
                            } else {
                                target_params.join(", ")
                            }
                        ),
                    );
                }
            }
            for name in target_params {
                if params.iter().any(|(n, _)| n == name) {
                    continue;
                }
                if source_params.iter().any(|p| p == name) {
                    params.push((name.to_owned(), Template::param(name)));
                    continue;
                }
                let has_default = route
                    .parameters
                    .iter()
                    .any(|p| p.name == name && p.default.is_some());
                if !has_default {
                    self.error(
                        &at.join("params"),
                        format!(
                            "impossible mapping: '{}' needs address parameter '{name}', which '{}' does not have; map it, e.g. `params: {{{name}: '{{payload.{name}}}'}}`",
                            route.id, source.id
                        ),
                    );
                }
            }
            if key.is_some()
                && route
                    .upstream(crate::routing::envelope::Transport::Kafka)
                    .is_none()
            {
                self.error(
                    &at.join("key"),
                    format!(
                        "'{}' has no Kafka upstream: `key` sets a Kafka record key",
                        route.id
                    ),
                );
            }
        }

        let format = self.string(def, "format", at);
        let conversion = self.conversion(source, target_route.as_deref(), format.as_deref(), at)?;
        Some(Lane {
            bridge: bridge.to_owned(),
            source: source.id.clone(),
            target,
            filter: None,
            params,
            key,
            headers,
            conversion,
            policy: Policy::Block,
            retries: 3,
            max_in_flight: 256,
            max_lag: 100_000,
            retry_backoff: Duration::from_millis(100),
            start: Start::Latest,
        })
    }

    /// The payload conversion a lane needs: from what the source carries to what the target
    /// expects (`format` overrides the target's own encoding).
    fn conversion(
        &mut self,
        source: &Route,
        target: Option<&Route>,
        format: Option<&str>,
        at: &Location,
    ) -> Option<Conversion> {
        let avro_of = |route: &Route| -> Option<Arc<PayloadSchema>> {
            route.messages.iter().find_map(|m| {
                m.payload
                    .as_ref()
                    .filter(|p| matches!(p.as_ref(), PayloadSchema::Avro(_)))
                    .cloned()
            })
        };
        let encoding_of = |route: &Route| {
            route
                .messages
                .iter()
                .find(|m| m.payload.as_ref().is_some_and(|p| p.is_enforced()))
                .map_or(Encoding::Json, |m| m.encoding)
        };
        let source_encoding = encoding_of(source);
        let wanted = match format {
            None => target.map_or(Encoding::Json, encoding_of),
            Some("json") => Encoding::Json,
            Some("avro") => Encoding::AvroBinary,
            Some(other) => {
                self.error(
                    &at.join("format"),
                    format!("'{other}' is not a format: json or avro"),
                );
                return None;
            }
        };
        match (source_encoding, wanted) {
            (a, b) if a == b => Some(Conversion::None),
            (Encoding::Json, Encoding::AvroBinary) => match target.and_then(avro_of) {
                Some(schema) => Some(Conversion::JsonToAvro(schema)),
                None => {
                    self.error(
                            &at.join("format"),
                            "Avro output needs an Avro schema on the target's message (schemaFormat application/vnd.apache.avro)",
                        );
                    None
                }
            },
            (Encoding::AvroBinary, Encoding::Json) => match avro_of(source) {
                Some(schema) => Some(Conversion::AvroToJson(schema)),
                None => {
                    self.error(at, "the source carries Avro without a schema to decode it");
                    None
                }
            },
            _ => Some(Conversion::None),
        }
    }
}

/// A channel a bridge can deliver to: writable, with an upstream to publish on.
fn is_writable_target(route: &Route) -> bool {
    route.direction.writable
        && route.upstreams.iter().any(|u| {
            !matches!(
                u.binding,
                UpstreamBinding::NoConnector | UpstreamBinding::DynamicAddress
            )
        })
}

/// What `/api/v1/bridges` shows of a bridge.
pub fn describe(bridge: &Bridge) -> Value {
    serde_json::json!({
        "name": bridge.name,
        "file": bridge.file.file_name().map(|n| n.to_string_lossy()),
        "from": bridge.source,
        "targets": bridge.lanes.iter().map(|l| serde_json::json!({
            "target": l.target,
            "policy": l.policy,
            "start": l.start,
            "retries": l.retries,
            "maxInFlight": l.max_in_flight,
            "filter": l.filter.as_ref().map(|f| f.source()),
            "conversion": l.conversion.label(),
        })).collect::<Vec<_>>(),
    })
}
