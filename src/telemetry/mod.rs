//! Metric names, the Prometheus exporter, and tracing setup.
//!
//! Every metric name lives here once, under `stepflow_`. Labels take only values the code or the
//! documents list (channel id, server id, protocol, transport, reason enums): never a concrete
//! topic, a client address or an error's text (those go to the log).

pub mod events;
pub mod resources;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Messages that entered a route (after address matching), by channel and source protocol.
pub const MESSAGES_RECEIVED: &str = "stepflow_messages_received_total";
/// Messages handed to a subscriber or an upstream, by channel and transport.
pub const MESSAGES_DELIVERED: &str = "stepflow_messages_delivered_total";
/// Messages refused, by channel, protocol and reason.
pub const MESSAGES_REJECTED: &str = "stepflow_messages_rejected_total";
/// Messages from a broker subscription that matched no route's address template.
pub const MESSAGES_UNMATCHED: &str = "stepflow_messages_unmatched_total";
/// Messages written to a dead-letter log, by channel and reason.
pub const DEAD_LETTERS: &str = "stepflow_dead_letters_total";
/// Ingress → delivery latency, by channel and transport.
pub const DELIVERY_LATENCY: &str = "stepflow_delivery_latency_seconds";
/// Upstream connection state, 1 connected / 0 not, by server and protocol.
pub const UPSTREAM_CONNECTED: &str = "stepflow_upstream_connected";
/// Upstream connection losses, by server and protocol.
pub const UPSTREAM_DISCONNECTS: &str = "stepflow_upstream_disconnects_total";
/// Times an upstream's intake stopped making progress while connected, by server, protocol and
/// reason.
pub const UPSTREAM_STALLS: &str = "stepflow_upstream_stalls_total";
/// 1 while an upstream is stalled, by server and protocol.
pub const UPSTREAM_STALLED: &str = "stepflow_upstream_stalled";
/// Live subscribers, by channel and transport.
pub const SUBSCRIBERS: &str = "stepflow_subscribers";
/// Subscribers that fell behind the live stream and were resumed from the log.
pub const SUBSCRIBERS_LAGGED: &str = "stepflow_subscribers_lagged_total";
/// Log appends and bytes, by channel and log (`messages`, `dead_letters`).
pub const LOG_APPENDS: &str = "stepflow_log_appends_total";
pub const LOG_BYTES: &str = "stepflow_log_bytes_total";
/// Times the message log failed on I/O (a full disk, say) and was closed to be reopened.
pub const LOG_FAILURES: &str = "stepflow_log_failures_total";
/// How long one group commit's fsync took (messages that arrive meanwhile wait for it to be
/// inserted and handed to live subscribers).
pub const LOG_FLUSH_DURATION: &str = "stepflow_log_flush_seconds";
/// Messages per group commit.
pub const LOG_BATCH_SIZE: &str = "stepflow_log_batch_messages";
/// 1 while the message log accepts appends, 0 while it is being reopened after a failure.
pub const LOG_AVAILABLE: &str = "stepflow_log_available";
/// Messages dropped because a bounded queue was full, by channel and queue.
pub const QUEUE_OVERFLOWS: &str = "stepflow_queue_overflows_total";
/// Publishes to an upstream that failed, by channel, server and reason.
pub const PUBLISH_FAILURES: &str = "stepflow_publish_failures_total";
/// Kafka consumer lag (messages behind the high watermark), by channel, from librdkafka's
/// statistics every 5 s.
pub const KAFKA_CONSUMER_LAG: &str = "stepflow_kafka_consumer_lag";
/// Errors a Kafka consumer reported (a broker away, a failed fetch), by server.
pub const KAFKA_CONSUMER_ERRORS: &str = "stepflow_kafka_consumer_errors_total";
/// Records a starting Kafka consumer read again that the log already held (not logged twice),
/// by server.
pub const KAFKA_RECORDS_ALREADY_LOGGED: &str = "stepflow_kafka_records_already_logged_total";
/// Request-reply calls, by operation and outcome (`2xx`...`5xx`, `invalid`, `timeout`,
/// `unavailable`).
pub const CALLS: &str = "stepflow_calls_total";
/// Call latency (request in → response out, retries included), by operation.
pub const CALL_DURATION: &str = "stepflow_call_duration_seconds";
/// Calls waiting for their upstream.
pub const CALLS_PENDING: &str = "stepflow_calls_pending";
/// Upstream responses that did not match their documented schema, by operation.
pub const CALL_RESPONSE_MISMATCHES: &str = "stepflow_call_response_mismatches_total";
/// Replies on a reply channel that no call waits for (unknown or expired correlation id), by
/// channel.
pub const CALL_REPLIES_UNMATCHED: &str = "stepflow_call_replies_unmatched_total";
/// Messages a bridge lane finished with, by bridge, target and outcome (`forwarded`,
/// `filtered`, `dead_lettered`, `dropped`, `expired`).
pub const BRIDGE_MESSAGES: &str = "stepflow_bridge_messages_total";
/// Payloads converted on the way (`json_to_avro`, `avro_to_json`), by bridge and target.
pub const BRIDGE_CONVERSIONS: &str = "stepflow_bridge_conversions_total";
/// Failed delivery attempts, by bridge, target and reason.
pub const BRIDGE_FAILURES: &str = "stepflow_bridge_failures_total";
/// Deliveries attempted again after a failure, by bridge and target.
pub const BRIDGE_RETRIES: &str = "stepflow_bridge_retries_total";
/// Messages sent to a target and not yet confirmed, by bridge and target.
pub const BRIDGE_IN_FLIGHT: &str = "stepflow_bridge_in_flight";
/// Messages in the source log not yet delivered to the target, by bridge and target.
pub const BRIDGE_LAG: &str = "stepflow_bridge_lag_messages";
/// Source arrival → target confirmation, by bridge and target.
pub const BRIDGE_LATENCY: &str = "stepflow_bridge_latency_seconds";
/// Durable subscriptions: messages not yet acknowledged, by subscription.
pub const SUBSCRIPTION_LAG: &str = "stepflow_subscription_lag_messages";
/// Durable subscriptions' messages by `outcome` (`expired`: removed by retention before the
/// subscription received them).
pub const SUBSCRIPTION_MESSAGES: &str = "stepflow_subscription_messages_total";
/// Per log (`channel`, `log`): what its chunks take on disk, and its messages.
pub const LOG_STORED_BYTES: &str = "stepflow_log_stored_bytes";
pub const LOG_MESSAGES: &str = "stepflow_log_messages";
/// The data directory's size on disk (sled's files: logs, state, and space not yet reclaimed).
pub const DATA_DIR_BYTES: &str = "stepflow_data_dir_bytes";
/// The daemon's resident memory.
pub const PROCESS_RSS: &str = "stepflow_process_resident_memory_bytes";
/// HTTP requests, by matched route template and status class.
pub const HTTP_REQUESTS: &str = "stepflow_http_requests_total";
/// Requests refused by authentication, authorization or a rate limit, by reason
/// (unauthorized, forbidden, rate_limited, token_expired).
pub const AUTH_DENIED: &str = "stepflow_auth_denied_total";
/// Refusals by a limit a client met (`connections`, `connections_per_ip`, `header_timeout`,
/// `body_timeout`, `ws_message_size`, `ws_idle`, `calls_per_connection`, `json_depth`,
/// `document_size`, `yaml_budget`).
pub const LIMIT_REFUSALS: &str = "stepflow_limit_refusals_total";
/// Client connections open on the listener.
pub const CONNECTIONS_OPEN: &str = "stepflow_http_connections_open";
/// 1 while rate limits are counted in this process because Redis cannot be reached.
pub const RATE_LIMIT_FALLBACK: &str = "stepflow_rate_limit_fallback";
/// Redis rate-limit calls that failed (each then counted locally).
pub const RATE_LIMIT_REDIS_ERRORS: &str = "stepflow_rate_limit_redis_errors_total";

/// Latency buckets from 50 µs to 10 s: live delivery lives in the sub-millisecond range.
const LATENCY_BUCKETS: [f64; 18] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01,
    0.025, 0.05, 0.1, 0.5, 1.0, 10.0,
];

/// Installs the process-wide Prometheus recorder. The caller serves `handle.render()` and runs
/// `handle.run_upkeep()` periodically.
pub fn install_prometheus() -> Result<PrometheusHandle, BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)?
        .install_recorder()
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Sets up `tracing` from `RUST_LOG` (default `info`), in text or JSON.
///
/// lapin logs every failed reconnect of its I/O loop at `ERROR` ("Socket was readable but we
/// read 0", "Exponential backoff attempts exhausted"): several lines a second while RabbitMQ is
/// away. The AMQP connector reports each of those errors once, as a state change, so lapin's
/// own lines are off unless `RUST_LOG` names lapin.
pub fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let asked = std::env::var("RUST_LOG").unwrap_or_default();
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if !asked.contains("lapin") {
        filter = filter.add_directive("lapin=off".parse().expect("a valid directive"));
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a person at a terminal: a file, journald or a log shipper
        // would store them as noise.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // Already initialised (tests): keep the first.
    let _ = result;
}
