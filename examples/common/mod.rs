//! What the load scenarios share: latency bookkeeping, the daemon process, result summaries.
#![allow(dead_code)]

use std::process::Child;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use tokio::sync::Mutex;

/// Wall-clock nanoseconds: publisher and subscribers run on one machine, one clock.
pub fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The `"ts":` number in a frame, without parsing the whole JSON (the observer must stay cheap).
pub fn ts_of(text: &[u8]) -> Option<u64> {
    let key = b"\"ts\":";
    let at = text.windows(key.len()).position(|w| w == key)? + key.len();
    let digits: Vec<u8> = text[at..]
        .iter()
        .copied()
        .skip_while(|c| *c == b' ')
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One subscriber's latencies and receive times.
#[derive(Default)]
pub struct Results {
    histogram: Option<Histogram<u64>>,
    pub received: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Results {
    pub fn record(&mut self, ts: u64) {
        let latency = now_nanos().saturating_sub(ts);
        let h = self
            .histogram
            .get_or_insert_with(|| Histogram::new_with_bounds(1_000, 60_000_000_000, 3).unwrap());
        let _ = h.record(latency.max(1_000));
        self.received += 1;
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.last = Some(now);
    }
}

pub type Shared = Arc<Mutex<Results>>;

pub fn shared(n: usize) -> Vec<Shared> {
    (0..n).map(|_| Arc::default()).collect()
}

pub async fn stop_and_collect(
    tasks: Vec<tokio::task::JoinHandle<()>>,
    results: Vec<Shared>,
) -> Vec<Results> {
    for t in tasks {
        t.abort();
    }
    let mut out = Vec::new();
    for r in results {
        out.push(std::mem::take(&mut *r.lock().await));
    }
    out
}

/// All subscribers of one phase.
pub struct Summary {
    pub expected: u64,
    pub delivered: u64,
    /// Mean of the subscribers' receive rates.
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

pub fn summarize(sent: u64, results: &[Results]) -> Summary {
    let mut all = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3).unwrap();
    let mut delivered = 0;
    let mut rates = Vec::new();
    for r in results {
        if let Some(h) = &r.histogram {
            all.add(h).unwrap();
        }
        delivered += r.received;
        if let (Some(first), Some(last)) = (r.first, r.last) {
            let secs = last.duration_since(first).as_secs_f64();
            if secs > 0.0 {
                rates.push(r.received as f64 / secs);
            }
        }
    }
    Summary {
        expected: sent * results.len() as u64,
        delivered,
        rate: if rates.is_empty() {
            0.0
        } else {
            rates.iter().sum::<f64>() / rates.len() as f64
        },
        p50_ms: all.value_at_quantile(0.50) as f64 / 1e6,
        p99_ms: all.value_at_quantile(0.99) as f64 / 1e6,
        max_ms: all.max() as f64 / 1e6,
    }
}

/// Prints both phases and their ratios.
pub fn report(direct: &Summary, bridged: &Summary) {
    for (name, s) in [("direct", direct), ("bridged", bridged)] {
        println!(
            "{name:<8} delivered {}/{} (loss {}), {:.0} msg/s per subscriber, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            s.delivered,
            s.expected,
            s.expected.saturating_sub(s.delivered),
            s.rate,
            s.p50_ms,
            s.p99_ms,
            s.max_ms
        );
    }
    println!(
        "ratios bridged/direct: throughput {:.3}, p50 {:.2}, p99 {:.2}",
        bridged.rate / direct.rate.max(1.0),
        bridged.p50_ms / direct.p50_ms.max(1e-9),
        bridged.p99_ms / direct.p99_ms.max(1e-9)
    );
}

/// Waits until the daemon's `/readyz` answers 200.
pub async fn wait_ready(http: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{http}/readyz")).await
            && r.status() == 200
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("daemon not ready");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Connects `n` WebSocket clients to a channel, each recording latencies.
pub async fn websocket_subscribers(
    http: u16,
    channel: &str,
    results: &[Shared],
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    use futures::StreamExt;
    let mut tasks = Vec::new();
    for r in results {
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{http}/ws/{channel}")).await?;
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(frame)) = ws.next().await {
                if let tokio_tungstenite::tungstenite::Message::Text(text) = frame
                    && let Some(ts) = ts_of(text.as_bytes())
                {
                    r.lock().await.record(ts);
                }
            }
        }));
    }
    Ok(tasks)
}

/// `--name value` flags, each allowed name with its default.
pub struct Flags(std::collections::HashMap<String, String>);

impl Flags {
    /// Reads the command line; a flag not in `allowed` (besides `--binary`) is an error.
    pub fn parse(allowed: &[&str]) -> anyhow::Result<Flags> {
        let mut values = std::collections::HashMap::new();
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let name = flag
                .strip_prefix("--")
                .filter(|n| *n == "binary" || allowed.contains(n))
                .ok_or_else(|| {
                    anyhow::anyhow!("unknown flag {flag} (known: {allowed:?}, binary)")
                })?;
            let value = it
                .next()
                .ok_or_else(|| anyhow::anyhow!("{flag} without a value"))?;
            values.insert(name.to_owned(), value);
        }
        Ok(Flags(values))
    }

    pub fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> anyhow::Result<T>
    where
        T::Err: std::fmt::Display,
    {
        match self.0.get(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|e| anyhow::anyhow!("--{name} {v}: {e}")),
        }
    }

    /// The daemon binary: `--binary`, else the release build.
    pub fn binary(&self) -> std::path::PathBuf {
        self.0.get("binary").map(Into::into).unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/stepflow")
        })
    }
}

/// Starts `binary run` on 127.0.0.1:`http` with its log in `data_dir` and `args` after it
/// (`--specs`, `--config`, `--server`...), and waits until it is ready. `MALLOC_*` variables
/// pass through (allocator experiments).
pub async fn start_daemon(
    binary: &std::path::Path,
    http: u16,
    data_dir: &std::path::Path,
    args: &[&std::ffi::OsStr],
) -> anyhow::Result<Killed> {
    use anyhow::Context;
    let daemon = Killed(
        std::process::Command::new(binary)
            .args([
                "run",
                "--listen",
                &format!("127.0.0.1:{http}"),
                "--data-dir",
            ])
            .arg(data_dir)
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(std::env::vars().filter(|(k, _)| k.starts_with("MALLOC_")))
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("run `cargo build --release` first")?,
    );
    wait_ready(http).await?;
    Ok(daemon)
}

/// Publishes `rate` messages a second for `seconds` over MQTT QoS 1, paced every millisecond,
/// each with its send time in `ts` (wall-clock nanoseconds).
pub async fn mqtt_publish(
    port: u16,
    topic: String,
    rate: u64,
    seconds: u64,
    payload: usize,
) -> anyhow::Result<u64> {
    use rumqttc::{AsyncClient, MqttOptions, QoS};
    let mut options = MqttOptions::new(
        format!("load-pub-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    options
        .set_inflight(1000)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 10_000);
    let driver = tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let pad = "x".repeat(payload.saturating_sub(60));
    let total = rate * seconds;
    let started = tokio::time::Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            let body = format!(
                r#"{{"temperature":1,"seq":{sent},"pad":"{pad}","ts":{}}}"#,
                now_nanos()
            );
            client
                .publish(&topic, QoS::AtLeastOnce, false, body)
                .await?;
            sent += 1;
        }
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    driver.abort();
    Ok(sent)
}

/// A Mosquitto of the scenario's own on a free port (its defaults, except
/// `max_inflight_messages 100` and `extra` config lines); killed when the handle is dropped.
pub fn start_mosquitto(dir: &std::path::Path, extra: &str) -> anyhow::Result<(u16, Killed)> {
    use anyhow::Context;
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 100\n{extra}"
        ),
    )?;
    let broker = Killed(
        std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("mosquitto (apt-get install mosquitto)")?,
    );
    Ok((port, broker))
}

/// The load scenarios' MQTT telemetry document: `{id}.telemetry` on `load/devices/{deviceId}/
/// telemetry`, received at QoS 1, payloads `{temperature, seq, ts, pad}`.
pub fn load_telemetry_spec(id: &str) -> String {
    format!(
        r#"asyncapi: 3.0.0
x-stepflow-id: {id}
info: {{title: Load, version: 1.0.0}}
servers:
  broker: {{host: '127.0.0.1:1883', protocol: mqtt}}
channels:
  telemetry:
    address: 'load/devices/{{deviceId}}/telemetry'
    messages:
      reading:
        payload:
          type: object
          required: [temperature, seq, ts]
          properties:
            temperature: {{type: number}}
            seq: {{type: integer}}
            ts: {{type: integer}}
            pad: {{type: string}}
operations:
  receive:
    action: receive
    channel: {{$ref: '#/channels/telemetry'}}
    bindings: {{mqtt: {{qos: 1}}}}
"#
    )
}

/// A `/proc/PID/status` memory field (`VmRSS:`, `VmHWM:`) of a process, in KiB (0 when unreadable).
pub fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
