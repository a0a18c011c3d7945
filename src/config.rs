//! Daemon configuration: an optional YAML file, `STEPFLOW_*` environment variables and command
//! line flags. Flags override the environment, the environment overrides the file, the file
//! overrides the defaults. `${VAR}` in the file is replaced by the environment variable (secrets
//! stay out of the file); `$${` writes a literal `${`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::store::{Limit, RetentionPolicy, RetentionSetting};
use crate::telemetry::LogFormat;
use crate::upstream::ServerOverride;

/// Configuration problems.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("config file {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("config file {path}: environment variable {name} is not set")]
    MissingVariable { path: PathBuf, name: String },
    #[error("--server {value}: expected SERVER_ID=URL")]
    BadServerFlag { value: String },
    #[error(
        "routes.{route}.retention.max_total_bytes: the budget of all logs together is set at the top level only"
    )]
    TotalBudgetPerRoute { route: String },
    #[error("{0}")]
    Limits(String),
}

/// `stepflow run` flags; each also reads a `STEPFLOW_*` variable.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// Configuration file (YAML).
    #[arg(long, env = "STEPFLOW_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address the HTTP server listens on [default: 127.0.0.1:8080].
    #[arg(long, env = "STEPFLOW_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where the message log lives [default: ./data].
    #[arg(long, env = "STEPFLOW_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// API documents or directories of them [default: asyncapi-specs/].
    #[arg(long, env = "STEPFLOW_SPECS", num_args = 1.., value_delimiter = ',')]
    pub specs: Vec<PathBuf>,
    /// Directory of bridge definitions (`*.yaml`) [default: bridges/, with the default specs].
    #[arg(long, env = "STEPFLOW_BRIDGES")]
    pub bridges: Option<PathBuf>,
    /// Where a document's server points: `SERVER_ID=URL` (or `API/SERVER_ID=URL`), repeatable.
    #[arg(long = "server", env = "STEPFLOW_SERVERS", value_delimiter = ',')]
    pub servers: Vec<String>,
    /// Largest accepted payload in bytes [default: 1048576].
    #[arg(long, env = "STEPFLOW_MAX_PAYLOAD_BYTES")]
    pub max_payload_bytes: Option<usize>,
    /// Seconds to finish in-flight work on SIGTERM before exiting [default: 10].
    #[arg(long, env = "STEPFLOW_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout_seconds: Option<u64>,
    /// Log format.
    #[arg(long, env = "STEPFLOW_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// A server override as the file writes it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFileConfig {
    pub url: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub client_id: Option<String>,
    /// A PEM file of CA certificates to trust for this server's TLS.
    pub ca_file: Option<PathBuf>,
    /// AMQP prefetch (`basic.qos`), default 1000.
    pub prefetch: Option<u16>,
    /// The secret for the server's `httpApiKey` or HTTP bearer security scheme (WebSocket and
    /// SSE upstreams, OpenAPI `apiKey` and bearer).
    pub token: Option<String>,
    /// OAuth2 client credentials: `client_id` (above) and this secret.
    pub client_secret: Option<String>,
    /// How long an OpenAPI call to this server may take, retries included (default 10000).
    pub timeout_ms: Option<u64>,
    /// Whether `/readyz` waits for this server (`x-stepflow-optional` in a document says the
    /// same; this wins, for documents you do not edit).
    pub optional: Option<bool>,
}

/// Per-route settings as the file writes them (keyed by route id).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFileConfig {
    /// For WebSocket and SSE upstreams: one connection per entry, with these address
    /// parameters (default: one connection, with the parameters' defaults).
    #[serde(default)]
    pub connect: Vec<BTreeMap<String, String>>,
    /// For WebSocket upstreams: the frames sent after each connect, instead of the channel's
    /// `x-stepflow-subscribe` (for documents you do not edit). Strings are sent as they are,
    /// anything else as JSON.
    pub subscribe: Option<Vec<serde_json::Value>>,
    /// For readable routes: each message that arrives calls an operation, and the reply is
    /// published on another route.
    pub call: Option<TriggerConfig>,
    /// How much of this channel's logs to keep, over the top-level `retention`.
    pub retention: Option<RetentionSetting>,
}

/// A call triggered by the messages of a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerConfig {
    /// The operation (`{api}.{operationId}`).
    pub operation: String,
    /// The writable route the reply is published on.
    pub reply: String,
}

/// Message log tuning as the file writes it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFileConfig {
    pub max_batch: Option<usize>,
    pub max_flush_delay_ms: Option<u64>,
    pub cache_bytes: Option<u64>,
}

/// The config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub specs: Option<Vec<PathBuf>>,
    pub bridges: Option<PathBuf>,
    #[serde(default)]
    pub servers: BTreeMap<String, ServerFileConfig>,
    #[serde(default)]
    pub routes: BTreeMap<String, RouteFileConfig>,
    /// How much of each log to keep (default: 7 days and 1 GiB per log, 10 GiB in all).
    #[serde(default)]
    pub retention: RetentionSetting,
    pub max_payload_bytes: Option<usize>,
    #[serde(default)]
    pub log: LogFileConfig,
    pub shutdown_timeout_seconds: Option<u64>,
    pub live_buffer: Option<usize>,
    /// Who may use the gateway (`none`, or api_keys / jwt / public / rate limits).
    #[serde(default)]
    pub auth: crate::auth::AuthSetting,
    /// HTTPS for the listener; with a client CA, mutual TLS.
    pub tls: Option<crate::auth::TlsFileConfig>,
    /// The MCP endpoint for AI agents (`/mcp`).
    #[serde(default)]
    pub mcp: crate::server::mcp::McpFileConfig,
    /// Reloading the specs directories when their files change.
    #[serde(default)]
    pub watch: crate::registry::watch::WatchConfig,
    /// What a hostile client meets: connection limits, read timeouts, WebSocket sizes.
    #[serde(default)]
    pub limits: crate::server::limits::LimitsFileConfig,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub specs: Vec<PathBuf>,
    pub bridges: Option<PathBuf>,
    /// Keyed by `SERVER_ID` or `API/SERVER_ID`.
    pub servers: BTreeMap<String, ServerOverride>,
    /// Keyed by route id.
    pub routes: BTreeMap<String, RouteFileConfig>,
    pub retention: RetentionPolicy,
    pub max_payload_bytes: usize,
    pub log_max_batch: usize,
    pub log_max_flush_delay: Duration,
    pub log_cache_bytes: u64,
    pub shutdown_timeout: Duration,
    pub live_buffer: usize,
    pub log_format: LogFormat,
    pub auth: crate::auth::AuthSetting,
    pub tls: Option<crate::auth::TlsFileConfig>,
    pub mcp: crate::server::mcp::McpFileConfig,
    pub watch: crate::registry::watch::WatchConfig,
    pub limits: crate::server::limits::Limits,
}

impl Config {
    /// Resolves flags, environment (already merged into `args` by clap) and the file.
    pub fn load(args: &RunArgs) -> Result<Config, Error> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let mut servers: BTreeMap<String, ServerOverride> = BTreeMap::new();
        for (id, v) in file.servers {
            let ca_pem = match &v.ca_file {
                Some(path) => Some(std::fs::read(path).map_err(|e| Error::Read {
                    path: path.clone(),
                    reason: e.to_string(),
                })?),
                None => None,
            };
            servers.insert(
                id,
                ServerOverride {
                    url: v.url,
                    username: v.username,
                    password: v.password,
                    client_id: v.client_id,
                    ca_pem,
                    prefetch: v.prefetch,
                    token: v.token,
                    client_secret: v.client_secret,
                    timeout: v.timeout_ms.map(Duration::from_millis),
                    optional: v.optional,
                },
            );
        }
        for flag in &args.servers {
            let (id, url) = flag.split_once('=').ok_or_else(|| Error::BadServerFlag {
                value: flag.clone(),
            })?;
            if id.is_empty() || url.is_empty() {
                return Err(Error::BadServerFlag {
                    value: flag.clone(),
                });
            }
            servers.entry(id.to_owned()).or_default().url = Some(url.to_owned());
        }
        let specs_given = !args.specs.is_empty() || file.specs.is_some();
        let specs = if !args.specs.is_empty() {
            args.specs.clone()
        } else {
            file.specs
                .unwrap_or_else(|| vec![PathBuf::from("asyncapi-specs")])
        };
        // The shipped bridges link the shipped documents: they load by default only with them.
        let bridges = args.bridges.clone().or(file.bridges).or_else(|| {
            let shipped = PathBuf::from("bridges");
            (!specs_given && shipped.is_dir()).then_some(shipped)
        });
        Ok(Config {
            listen: args
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("data")),
            specs,
            bridges,
            servers,
            retention: retention_policy(&file.retention, &file.routes)?,
            routes: file.routes,
            max_payload_bytes: args
                .max_payload_bytes
                .or(file.max_payload_bytes)
                .unwrap_or(1024 * 1024),
            log_max_batch: file.log.max_batch.unwrap_or(1000).max(1),
            log_max_flush_delay: Duration::from_millis(file.log.max_flush_delay_ms.unwrap_or(5)),
            log_cache_bytes: file.log.cache_bytes.unwrap_or(8 * 1024 * 1024),
            shutdown_timeout: Duration::from_secs(
                args.shutdown_timeout_seconds
                    .or(file.shutdown_timeout_seconds)
                    .unwrap_or(10),
            ),
            live_buffer: file.live_buffer.unwrap_or(1024).max(16),
            log_format: args.log_format.unwrap_or_default(),
            auth: file.auth,
            tls: file.tls,
            mcp: file.mcp,
            watch: file.watch,
            limits: crate::server::limits::Limits::from_file(&file.limits)
                .map_err(Error::Limits)?,
        })
    }

    /// The override for server `server` of document `api`: `api/server`, else `server`, else
    /// `api` (OpenAPI servers have no names of their own).
    pub fn server_override(&self, api: &str, server: &str) -> ServerOverride {
        self.servers
            .get(&format!("{api}/{server}"))
            .or_else(|| self.servers.get(server))
            .or_else(|| self.servers.get(api))
            .cloned()
            .unwrap_or_default()
    }
}

/// The top-level retention over the defaults, and each route's over that.
fn retention_policy(
    top: &RetentionSetting,
    routes: &BTreeMap<String, RouteFileConfig>,
) -> Result<RetentionPolicy, Error> {
    let defaults = RetentionPolicy::default();
    let default = top.over(&defaults.default);
    let mut channels = std::collections::HashMap::new();
    for (id, route) in routes {
        if let Some(setting) = &route.retention {
            if setting.max_total_bytes.is_some() {
                return Err(Error::TotalBudgetPerRoute { route: id.clone() });
            }
            channels.insert(id.clone(), setting.over(&default));
        }
    }
    let max_total_bytes = match top.max_total_bytes {
        None => defaults.max_total_bytes,
        Some(Limit::Unlimited) => None,
        Some(Limit::At(n)) => Some(n),
    };
    Ok(RetentionPolicy {
        default,
        channels,
        max_total_bytes,
    })
}

fn read_file(path: &Path) -> Result<FileConfig, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let text = interpolate(&text, |name| std::env::var(name).ok()).map_err(|name| {
        Error::MissingVariable {
            path: path.to_path_buf(),
            name,
        }
    })?;
    crate::yaml::from_str(&text).map_err(|e| Error::Parse {
        path: path.to_path_buf(),
        reason: e.to_string().lines().next().unwrap_or("").to_owned(),
    })
}

/// Replaces `${NAME}` with `lookup(NAME)`; `$${` is a literal `${`. `Err` names a missing variable.
pub fn interpolate(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(literal) = after.strip_prefix("${") {
            out.push_str("${");
            rest = literal;
        } else if let Some(body) = after.strip_prefix('{') {
            let Some(end) = body.find('}') else {
                out.push('$');
                rest = after;
                continue;
            };
            let name = &body[..end];
            out.push_str(&lookup(name).ok_or_else(|| name.to_owned())?);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_replaces_escapes_and_reports_missing() {
        let lookup = |n: &str| (n == "PASS").then(|| "s3cret".to_owned());
        assert_eq!(interpolate("p: ${PASS}", lookup).unwrap(), "p: s3cret");
        assert_eq!(
            interpolate("a $${PASS} $5", lookup).unwrap(),
            "a ${PASS} $5"
        );
        assert_eq!(interpolate("x: ${NOPE}", lookup), Err("NOPE".to_owned()));
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stepflow.yaml");
        std::fs::write(
            &file,
            "listen: 127.0.0.1:9000\ndata_dir: /var/lib/stepflow\nservers:\n  mosquitto:\n    url: mqtt://broker:1883\n    password: ${STEPFLOW_TEST_UNSET_VARIABLE_X}\n",
        )
        .unwrap();
        let args = RunArgs {
            config: Some(file.clone()),
            ..RunArgs::default()
        };
        assert!(matches!(
            Config::load(&args),
            Err(Error::MissingVariable { .. })
        ));

        std::fs::write(
            &file,
            "listen: 127.0.0.1:9000\ndata_dir: /var/lib/stepflow\nservers:\n  mosquitto:\n    url: mqtt://broker:1883\nretention:\n  max_messages: 10\n",
        )
        .unwrap();
        let args = RunArgs {
            config: Some(file),
            listen: Some("127.0.0.1:9100".parse().unwrap()),
            servers: vec!["iot/mosquitto=mqtt://other:1884".into()],
            ..RunArgs::default()
        };
        let c = Config::load(&args).unwrap();
        assert_eq!(c.listen.port(), 9100);
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/stepflow"));
        assert_eq!(c.retention.default.max_messages, Some(10));
        assert_eq!(
            c.server_override("iot", "mosquitto").url.as_deref(),
            Some("mqtt://other:1884")
        );
        assert_eq!(
            c.server_override("lab", "mosquitto").url.as_deref(),
            Some("mqtt://broker:1883")
        );
        assert_eq!(c.specs, vec![PathBuf::from("asyncapi-specs")]);
    }

    fn load_text(text: &str) -> Result<Config, Error> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yaml");
        std::fs::write(&file, text).unwrap();
        Config::load(&RunArgs {
            config: Some(file),
            ..RunArgs::default()
        })
    }

    #[test]
    fn retention_defaults_apply_unless_overridden_globally_or_per_route() {
        let fresh = load_text("listen: 127.0.0.1:1\n").unwrap().retention;
        assert_eq!(
            fresh,
            RetentionPolicy::default(),
            "a fresh gateway bounds every log"
        );
        assert!(fresh.default.max_age.is_some() && fresh.default.max_bytes.is_some());
        let c = load_text(
            "retention: {max_bytes: 5000, max_total_bytes: unlimited}\nroutes:\n  iot.telemetry: {retention: {max_age_seconds: unlimited}}\n",
        )
        .unwrap()
        .retention;
        assert_eq!(c.default.max_bytes, Some(5000));
        assert_eq!(c.max_total_bytes, None);
        let telemetry = c.for_channel("iot.telemetry");
        assert_eq!(telemetry.max_age, None);
        assert_eq!(
            telemetry.max_bytes,
            Some(5000),
            "the rest comes from the top level"
        );
        assert_eq!(c.for_channel("other"), &c.default);
        let err = load_text("routes:\n  a: {retention: {max_total_bytes: 1}}\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("routes.a.retention.max_total_bytes"),
            "{err}"
        );
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yaml");
        std::fs::write(&file, "listn: 127.0.0.1:1\n").unwrap();
        let err = Config::load(&RunArgs {
            config: Some(file),
            ..RunArgs::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("listn"), "{err}");
    }
}
