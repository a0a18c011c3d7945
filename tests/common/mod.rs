//! Helpers for integration tests: the daemon as a process, brokers, clients. Every wait has a
//! timeout; every test owns its topics and client ids.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;

mod tansu;
#[allow(unused_imports)]
pub use tansu::{Tansu, TestKafka};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A name unique to this test run: `prefix-<pid>-<n>`.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Fails (never skips) when the machine's Mosquitto is down, naming the command that starts it.
pub fn require_mosquitto() {
    if TcpStream::connect_timeout(&"127.0.0.1:1883".parse().unwrap(), Duration::from_secs(2))
        .is_err()
    {
        panic!(
            "Mosquitto is not reachable on 127.0.0.1:1883; start it with: mosquitto -d -c /etc/mosquitto/mosquitto.conf"
        );
    }
}

/// A Mosquitto of the test's own on a free port, for tests that stop the broker or need its
/// limits raised. Killed on drop.
pub struct OwnMosquitto {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Lines after the `listener` line (per-listener TLS and auth settings).
    listener_options: String,
}

impl OwnMosquitto {
    pub fn start() -> OwnMosquitto {
        Self::start_with("allow_anonymous true")
    }

    /// Starts with `listener_options` (e.g. TLS files, `password_file`) under the listener.
    pub fn start_with(listener_options: &str) -> OwnMosquitto {
        let dir = tempfile::tempdir().unwrap();
        let mut broker = OwnMosquitto {
            port: free_port(),
            dir,
            child: None,
            listener_options: listener_options.to_owned(),
        };
        broker.restart();
        broker
    }

    fn binary() -> &'static str {
        for candidate in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
            if Path::new(candidate).exists() {
                return candidate;
            }
        }
        panic!("the mosquitto binary is missing; install it with: apt-get install -y mosquitto");
    }

    /// Starts (again) on the same port.
    pub fn restart(&mut self) {
        let config = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &config,
            format!(
                "per_listener_settings true\nlistener {} 127.0.0.1\n{}\npersistence false\nmax_queued_messages 1000000\nmax_inflight_messages 1000\nmax_keepalive 65535\n",
                self.port, self.listener_options
            ),
        )
        .unwrap();
        let log_path = self.dir.path().join("mosquitto.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(Self::binary())
            .arg("-c")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("mosquitto starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "own mosquitto did not start on {}:\n{}\n{}",
                self.port,
                std::fs::read_to_string(&log_path).unwrap_or_default(),
                std::fs::read_to_string(&config).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnMosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes an IoT document (AsyncAPI 3.0) whose topics start with `prefix`, with a `telemetry`
/// channel the gateway receives and a `commands` channel it sends, on server `broker`.
pub fn iot_spec(dir: &Path, api: &str, prefix: &str, qos: u8) -> PathBuf {
    let path = dir.join(format!("{api}.yaml"));
    std::fs::write(
        &path,
        format!(
            r#"asyncapi: 3.0.0
x-stepflow-id: {api}
info: {{title: Test IoT, version: 1.0.0}}
servers:
  broker: {{host: '127.0.0.1:1883', protocol: mqtt}}
channels:
  telemetry:
    address: '{prefix}/devices/{{deviceId}}/telemetry'
    messages:
      reading:
        payload:
          type: object
          required: [temperature]
          properties:
            temperature: {{type: number}}
            seq: {{type: integer}}
            pad: {{type: string}}
  commands:
    address: '{prefix}/devices/{{deviceId}}/commands'
    messages:
      command:
        payload:
          type: object
          required: [action]
          additionalProperties: false
          properties:
            action: {{type: string, enum: [reboot, identify]}}
            deviceId: {{type: string}}
operations:
  receiveTelemetry:
    action: receive
    channel: {{$ref: '#/channels/telemetry'}}
    bindings: {{mqtt: {{qos: {qos}}}}}
  sendCommand:
    action: send
    channel: {{$ref: '#/channels/commands'}}
    bindings: {{mqtt: {{qos: 1}}}}
"#
        ),
    )
    .unwrap();
    path
}

/// A daemon on an IoT document of its own ([`iot_spec`], QoS 1) whose broker is `broker`.
pub struct IotDaemon {
    pub daemon: Daemon,
    pub api: String,
    pub prefix: String,
    _dir: tempfile::TempDir,
}

impl IotDaemon {
    pub async fn start(broker: &OwnMosquitto, api_prefix: &str) -> IotDaemon {
        let dir = tempfile::tempdir().unwrap();
        let api = unique(api_prefix);
        let prefix = unique("t");
        let spec = iot_spec(dir.path(), &api, &prefix, 1);
        let server = format!("broker={}", broker.url());
        let daemon = Daemon::start(&["--specs", spec.to_str().unwrap(), "--server", &server])
            .await
            .unwrap();
        IotDaemon {
            daemon,
            api,
            prefix,
            _dir: dir,
        }
    }

    /// The readable telemetry channel's id.
    pub fn telemetry(&self) -> String {
        format!("{}.telemetry", self.api)
    }

    /// A device's telemetry topic.
    pub fn telemetry_topic(&self, device: &str) -> String {
        format!("{}/devices/{device}/telemetry", self.prefix)
    }
}

/// The gateway as a process.
pub struct Daemon {
    pub port: u16,
    pub data_dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    log: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Daemon {
    /// Starts `stepflow run` with `args` (plus `--listen` and `--data-dir` unless given) and
    /// waits until `/readyz` answers 200.
    pub async fn start(args: &[&str]) -> Result<Daemon> {
        Self::start_with_env(args, &[]).await
    }

    /// Starts and waits only for `/healthz` (the process serves), not for readiness.
    pub async fn start_serving(args: &[&str]) -> Result<Daemon> {
        Self::start_serving_with_env(args, &[]).await
    }

    /// Like [`Daemon::start_serving`], with extra environment variables.
    pub async fn start_serving_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<Daemon> {
        let daemon = Self::spawned(args, env)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = reqwest::get(daemon.url("/healthz")).await
                && r.status() == 200
            {
                return Ok(daemon);
            }
            if Instant::now() > deadline {
                bail!("stepflow not serving:\n{}", daemon.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Like [`Daemon::start`], with extra environment variables.
    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<Daemon> {
        let mut daemon = Self::spawned(args, env)?;
        daemon.wait_ready(Duration::from_secs(20)).await?;
        Ok(daemon)
    }

    /// Like [`Daemon::start`], with its data directory at `data_dir`.
    pub async fn start_in(data_dir: &Path, args: &[&str]) -> Result<Daemon> {
        let mut daemon = Self::spawned_in(Some(data_dir), args, &[])?;
        daemon.wait_ready(Duration::from_secs(20)).await?;
        Ok(daemon)
    }

    fn spawned(args: &[&str], env: &[(&str, &str)]) -> Result<Daemon> {
        Self::spawned_in(None, args, env)
    }

    fn spawned_in(data_dir: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> Result<Daemon> {
        let dir = tempfile::tempdir()?;
        let mut daemon = Daemon {
            port: free_port(),
            data_dir: data_dir
                .map(Path::to_path_buf)
                .unwrap_or_else(|| dir.path().join("data")),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            log: dir.path().join("daemon.log"),
            _dir: Some(dir),
        };
        daemon.spawn()?;
        Ok(daemon)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut command = Command::new(env!("CARGO_BIN_EXE_stepflow"));
        command
            .arg("run")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env("RUST_LOG", "info,stepflow=debug")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env_remove("STEPFLOW_CONFIG")
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(command.spawn().context("spawning stepflow")?);
        Ok(())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.port)
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let client = reqwest::Client::new();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "stepflow exited with {status} before it was ready:\n{}",
                    self.log()
                );
            }
            if let Ok(r) = client.get(self.url("/readyz")).send().await
                && r.status() == 200
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("stepflow not ready after {timeout:?}:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no cleanup at all.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and how long the process took to exit (with its status).
    pub fn terminate(&mut self, timeout: Duration) -> Result<(std::process::ExitStatus, Duration)> {
        let mut child = self.child.take().ok_or_else(|| anyhow!("not running"))?;
        let started = Instant::now();
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((status, started.elapsed()));
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                bail!(
                    "stepflow did not exit within {timeout:?} of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts again with the same data directory, port and arguments.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()?;
        self.wait_ready(Duration::from_secs(20)).await
    }

    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        let r = reqwest::get(self.url(path)).await?;
        Ok(r.json().await?)
    }

    /// `POST /api/v1/channels/{channel}/dead-letters/replay` with `body`; the JSON answer.
    pub async fn replay_dead_letters(
        &self,
        channel: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        reqwest::Client::new()
            .post(self.url(&format!("/api/v1/channels/{channel}/dead-letters/replay")))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Every message of a channel's log, by following `next`.
    pub async fn replay_all(&self, channel: &str, log: &str) -> Result<Vec<serde_json::Value>> {
        let mut out = Vec::new();
        let mut from = 1;
        loop {
            let page = self
                .get_json(&format!(
                    "/api/v1/channels/{channel}/{log}?from={from}&limit=1000"
                ))
                .await?;
            let messages = page["messages"].as_array().cloned().unwrap_or_default();
            if messages.is_empty() {
                return Ok(out);
            }
            from = page["next"].as_u64().unwrap();
            out.extend(messages);
        }
    }

    /// The channel's log once it holds at least `count` messages (or what it holds after 60 s).
    pub async fn wait_for_log(&self, channel: &str, count: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let messages = self.replay_all(channel, "messages").await.unwrap();
            if messages.len() >= count || Instant::now() > deadline {
                return messages;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// POSTs `body` as JSON to `path`.
    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("the daemon answers")
    }

    /// How many messages the channel's log holds, from `/api/v1/stats`.
    pub async fn log_count(&self, channel: &str) -> Result<u64> {
        let stats = self.get_json("/api/v1/stats").await?;
        stats["channels"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["id"] == channel))
            .and_then(|c| c["log"]["messages"].as_u64())
            .ok_or_else(|| anyhow!("no channel {channel} in /api/v1/stats: {stats}"))
    }

    /// Waits until the channel's log holds at least `count` messages; fails with what it
    /// holds (and the daemon's log) after `timeout` without progress.
    pub async fn wait_for_count(&self, channel: &str, count: u64, timeout: Duration) -> u64 {
        let mut last = (0, Instant::now());
        loop {
            let now = self.log_count(channel).await.unwrap();
            if now >= count {
                return now;
            }
            if now > last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() > timeout {
                panic!(
                    "the log of {channel} stopped at {now} of {count} messages for {timeout:?}:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The sum of the series of `name` whose labels include `labels`, or `None` when no series
    /// matches (so a renamed metric fails the test instead of reading as 0).
    pub async fn metric_value(&self, name: &str, labels: &[(&str, &str)]) -> Result<Option<f64>> {
        let text = reqwest::get(self.url("/metrics")).await?.text().await?;
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))?;
        let mut total = None;
        for sample in scrape.samples.iter().filter(|s| s.metric == name) {
            if labels.iter().all(|(k, v)| sample.labels.get(k) == Some(*v)) {
                let value = match sample.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => v,
                    _ => continue,
                };
                *total.get_or_insert(0.0) += value;
            }
        }
        Ok(total)
    }

    /// The value of a metric series (summing every series whose labels include `labels`).
    /// Fails when no series matches: a renamed or never-emitted metric must not read as 0.
    /// For "has not happened yet", use [`Daemon::metric_value`] and expect `None`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        self.metric_value(name, labels)
            .await?
            .ok_or_else(|| anyhow!("no series {name} with labels {labels:?} in /metrics"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- stepflow log ----\n{}", self.log());
        }
    }
}

/// An MQTT test client with its own event loop task.
pub struct MqttClient {
    pub client: rumqttc::AsyncClient,
    pub messages: tokio::sync::mpsc::UnboundedReceiver<rumqttc::Publish>,
    task: tokio::task::JoinHandle<()>,
}

impl MqttClient {
    pub async fn connect(port: u16, id: &str) -> Result<MqttClient> {
        let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_inflight(1000);
        options.set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10_000);
        let (tx, messages) = tokio::sync::mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(5), ready_rx)
            .await
            .context("MQTT test client did not connect")??;
        Ok(MqttClient {
            client,
            messages,
            task,
        })
    }

    pub async fn subscribe(&self, filter: &str) -> Result<()> {
        self.client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .await?;
        // The SUBACK arrives on the event loop; give the broker a moment to register it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(())
    }

    pub async fn recv(&mut self, timeout: Duration) -> Result<rumqttc::Publish> {
        tokio::time::timeout(timeout, self.messages.recv())
            .await
            .context("no MQTT message in time")?
            .ok_or_else(|| anyhow!("MQTT client stopped"))
    }
}

impl Drop for MqttClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn ws_connect(url: &str) -> Result<WsStream> {
    let (ws, _) = tokio_tungstenite::connect_async(url).await?;
    Ok(ws)
}

/// The next JSON text frame.
pub async fn ws_next_json(ws: &mut WsStream, timeout: Duration) -> Result<serde_json::Value> {
    loop {
        let frame = tokio::time::timeout(timeout, ws.next())
            .await
            .context("no WebSocket frame in time")?
            .ok_or_else(|| anyhow!("WebSocket closed"))??;
        match frame {
            tokio_tungstenite::tungstenite::Message::Text(text) => {
                return Ok(serde_json::from_str(&text)?);
            }
            tokio_tungstenite::tungstenite::Message::Close(c) => bail!("WebSocket closed: {c:?}"),
            _ => continue,
        }
    }
}

/// An SSE client over reqwest + eventsource-stream.
pub struct SseClient {
    stream: std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<eventsource_stream::Event, String>> + Send>,
    >,
}

impl SseClient {
    pub async fn connect(url: &str, last_event_id: Option<u64>) -> Result<SseClient> {
        use eventsource_stream::Eventsource;
        let mut request = reqwest::Client::new().get(url);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let response = request.send().await?;
        if response.status() != 200 {
            bail!(
                "SSE connect: {} {}",
                response.status(),
                response.text().await?
            );
        }
        let stream = response
            .bytes_stream()
            .eventsource()
            .map(|e| e.map_err(|e| e.to_string()));
        Ok(SseClient {
            stream: Box::pin(stream),
        })
    }

    pub async fn next(&mut self, timeout: Duration) -> Result<eventsource_stream::Event> {
        tokio::time::timeout(timeout, self.stream.next())
            .await
            .context("no SSE event in time")?
            .ok_or_else(|| anyhow!("SSE stream ended"))?
            .map_err(|e| anyhow!(e))
    }

    /// The next `message` event's JSON frame.
    pub async fn next_message(&mut self, timeout: Duration) -> Result<(String, serde_json::Value)> {
        loop {
            let event = self.next(timeout).await?;
            if event.event == "message" {
                return Ok((event.id, serde_json::from_str(&event.data)?));
            }
        }
    }
}

/// Fails (never skips) when the machine's RabbitMQ is down, naming the command that starts it.
pub fn require_rabbitmq() {
    if TcpStream::connect_timeout(&"127.0.0.1:5672".parse().unwrap(), Duration::from_secs(2))
        .is_err()
    {
        panic!(
            "RabbitMQ is not reachable on 127.0.0.1:5672; start it with: rabbitmq-server -detached (it takes ~10 s to accept)"
        );
    }
}

/// An AMQP document whose exchange and queues start with `prefix`: a `telemetry` channel the
/// gateway consumes (topic exchange, its own queue) and a `commands` channel it publishes to
/// (persistent, priority 5, mandatory).
pub fn amqp_spec(dir: &Path, api: &str, prefix: &str) -> PathBuf {
    let path = dir.join(format!("{api}.yaml"));
    std::fs::write(
        &path,
        format!(
            r#"asyncapi: 3.0.0
x-stepflow-id: {api}
info: {{title: AMQP test, version: 1.0.0}}
servers:
  rabbit: {{host: '127.0.0.1:5672', protocol: amqp}}
channels:
  telemetry:
    address: 'devices/{{deviceId}}/telemetry'
    bindings:
      amqp:
        is: routingKey
        exchange: {{name: {prefix}.events, type: topic, durable: true, autoDelete: false}}
        queue: {{name: {prefix}.telemetry, durable: true, exclusive: false, autoDelete: false}}
    messages:
      reading:
        payload: {{type: object, required: [temperature], properties: {{temperature: {{type: number}}, seq: {{type: integer}}}}}}
  commands:
    address: 'devices/{{deviceId}}/commands'
    bindings:
      amqp:
        is: routingKey
        exchange: {{name: {prefix}.events, type: topic, durable: true, autoDelete: false}}
    messages:
      command:
        payload: {{type: object, required: [action], properties: {{action: {{type: string}}}}}}
operations:
  receiveTelemetry:
    action: receive
    channel: {{$ref: '#/channels/telemetry'}}
  sendCommand:
    action: send
    channel: {{$ref: '#/channels/commands'}}
    bindings:
      amqp: {{deliveryMode: 2, priority: 5, mandatory: true, expiration: 60000, cc: [audit.commands]}}
"#
        ),
    )
    .unwrap();
    path
}

/// A plain AMQP client for the test's side of the conversation.
pub async fn amqp_channel() -> Result<(lapin::Connection, lapin::Channel)> {
    let connection = lapin::Connection::connect(
        "amqp://127.0.0.1:5672",
        lapin::ConnectionProperties::default(),
    )
    .await?;
    let channel = connection.create_channel().await?;
    Ok((connection, channel))
}

/// A client channel with publisher confirms on.
pub async fn amqp_confirm_channel() -> Result<(lapin::Connection, lapin::Channel)> {
    let (connection, channel) = amqp_channel().await?;
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await?;
    Ok((connection, channel))
}

/// Deletes a test's exchange and queues.
pub async fn amqp_cleanup(prefix: &str, queues: &[&str]) {
    if let Ok((connection, channel)) = amqp_channel().await {
        for q in queues {
            let _ = channel
                .queue_delete(
                    format!("{prefix}.{q}").into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
        }
        let _ = channel
            .exchange_delete(
                format!("{prefix}.events").into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = connection.close(200, "done".into()).await;
    }
}

/// Which of the sequence numbers `0..total` (the payloads' `seq`) a log lacks, and how many
/// extra copies it holds: the at-least-once bookkeeping of the crash tests.
pub fn sequence_report(log: &[serde_json::Value], total: u64) -> (Vec<u64>, u32) {
    let mut seen: std::collections::BTreeMap<u64, u32> = std::collections::BTreeMap::new();
    for m in log {
        *seen
            .entry(m["payload"]["seq"].as_u64().unwrap())
            .or_default() += 1;
    }
    let missing = (0..total).filter(|s| !seen.contains_key(s)).collect();
    let duplicates = seen.values().map(|n| n - 1).sum();
    (missing, duplicates)
}

/// A CA and a server certificate for 127.0.0.1, made with the openssl command line.
pub fn make_certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs (apt-get install openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=stepflow-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
}

/// Brokers started as root drop to their own user (Mosquitto, RabbitMQ's `rabbitmq`), which must still read the test's files.
pub fn readable_by_all(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

/// A small tmpfs of the test's own, so it can fill a disk; unmounted when dropped.
pub struct SmallDisk {
    pub path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    pub fn mount(megabytes: u32) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "this test fills a disk of its own and mounts a tmpfs for it, which needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk { path, _dir: dir }
    }

    /// Writes a file until the disk is full.
    pub fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Waits until the daemon reports its message log down for lack of space (in `/readyz` and the
/// metrics), as it does when its disk is full.
pub async fn wait_for_log_failure(daemon: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = reqwest::get(daemon.url("/readyz")).await.unwrap();
        if ready.status() == 503 {
            let body: serde_json::Value = ready.json().await.unwrap();
            if body["log"]["ok"] == false {
                let error = body["log"]["error"].as_str().unwrap_or_default();
                assert!(error.contains("No space left"), "{body}");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the log never failed:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        daemon
            .metric("stepflow_log_failures_total", &[])
            .await
            .unwrap()
            >= 1.0
    );
    assert_eq!(
        daemon.metric("stepflow_log_available", &[]).await.unwrap(),
        0.0
    );
}

/// Frees the full disk (removes `filler`) and checks that the log healed: every sequence number
/// `0..total` of `channel` is logged (duplicates reported) and the daemon is ready again.
pub async fn free_disk_and_check_the_log(
    daemon: &Daemon,
    filler: &Path,
    channel: &str,
    total: u64,
    what: &str,
) -> Vec<serde_json::Value> {
    std::fs::remove_file(filler).unwrap();
    let log = daemon.wait_for_log(channel, total as usize).await;
    let (missing, duplicates) = sequence_report(&log, total);
    println!(
        "{what} full-disk test: {total} sent, {} logged, {duplicates} duplicates",
        log.len()
    );
    assert!(missing.is_empty(), "lost: {missing:?}\n{}", daemon.log());
    let ready = reqwest::get(daemon.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200, "ready again once the log is back");
    log
}

/// `POST /api/v1/operations/{op}/call` with a call request (`{path, query, headers, body}`).
pub async fn call_operation(
    daemon: &Daemon,
    op: &str,
    request: serde_json::Value,
) -> reqwest::Response {
    reqwest::Client::new()
        .post(daemon.url(&format!("/api/v1/operations/{op}/call")))
        .header("content-type", "application/json")
        .body(request.to_string())
        .send()
        .await
        .unwrap()
}

/// The first half of a full-disk test: `send(0..5)` logged, then the disk filled and
/// `send(5..total)` while the daemon reports its log down. The filler file, to free the disk.
pub async fn send_while_the_disk_fills<F, Fut>(
    daemon: &Daemon,
    disk: &SmallDisk,
    channel: &str,
    total: u64,
    send: F,
) -> PathBuf
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for seq in 0..5 {
        send(seq).await;
    }
    assert_eq!(daemon.wait_for_log(channel, 5).await.len(), 5);
    let filler = disk.fill();
    for seq in 5..total {
        send(seq).await;
    }
    // The log fails, says so, and nothing is acknowledged meanwhile.
    wait_for_log_failure(daemon).await;
    filler
}

/// Publishes `count` QoS 1 messages with a `seq` field and waits for every PUBACK.
pub async fn publish_acknowledged(
    port: u16,
    topic: String,
    seqs: std::ops::Range<u64>,
    per_second: u64,
    on_progress: tokio::sync::watch::Sender<u64>,
) -> u64 {
    publish_acknowledged_on(port, move |_| topic.clone(), seqs, per_second, on_progress).await
}

/// Like [`publish_acknowledged`], each message on the topic `topic_of(seq)`.
pub async fn publish_acknowledged_on(
    port: u16,
    topic_of: impl Fn(u64) -> String,
    seqs: std::ops::Range<u64>,
    per_second: u64,
    on_progress: tokio::sync::watch::Sender<u64>,
) -> u64 {
    let count = seqs.end - seqs.start;
    let mut options = rumqttc::MqttOptions::new(unique("publisher"), "127.0.0.1", port);
    options.set_inflight(100);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
    let acks = tokio::spawn(async move {
        let mut acked = 0u64;
        while acked < count {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    acked += 1;
                    let _ = on_progress.send(acked);
                }
                Ok(_) => {}
                Err(e) => panic!("publisher lost its broker: {e}"),
            }
        }
        acked
    });
    // Paced against a schedule, not by a sleep per message: a timer's millisecond granularity
    // would cap the rate at about 1,000/s.
    let started = tokio::time::Instant::now();
    let per_second = per_second.max(1);
    for (sent, seq) in seqs.enumerate() {
        client
            .publish(
                topic_of(seq),
                rumqttc::QoS::AtLeastOnce,
                false,
                serde_json::json!({"temperature": 20.5, "seq": seq, "pad": "x"}).to_string(),
            )
            .await
            .unwrap();
        let due = started + Duration::from_micros((sent as u64 + 1) * 1_000_000 / per_second);
        if due > tokio::time::Instant::now() + Duration::from_millis(1) {
            tokio::time::sleep_until(due).await;
        }
    }
    tokio::time::timeout(Duration::from_secs(60), acks)
        .await
        .unwrap()
        .unwrap()
}

/// A Kafka consumer of `topic` in a group of its own, from the earliest offset.
pub fn kafka_reader(bootstrap: &str, topic: &str) -> rdkafka::consumer::StreamConsumer {
    use rdkafka::consumer::Consumer;
    let consumer: rdkafka::consumer::StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    consumer
}

/// A TCP proxy to a real server that the test can take down and bring back: to the gateway, the
/// server is gone (open connections cut, new ones closed at once) for that time. The proxy keeps
/// its port bound throughout, so no other process can take it meanwhile (a re-bind could fail).
pub struct TcpProxy {
    pub port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Cancelled when the proxy goes down: cuts the relays of that period.
    relays: std::sync::Arc<std::sync::Mutex<tokio_util::sync::CancellationToken>>,
    stop: tokio_util::sync::CancellationToken,
}

impl TcpProxy {
    /// A proxy to `upstream` (`host:port`), relaying.
    pub async fn start(upstream: &str) -> TcpProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let proxy = TcpProxy {
            port: listener.local_addr().unwrap().port(),
            up: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
            relays: std::sync::Arc::default(),
            stop: tokio_util::sync::CancellationToken::new(),
        };
        let upstream: std::net::SocketAddr = upstream.parse().expect("host:port");
        let (up, relays, stop) = (proxy.up.clone(), proxy.relays.clone(), proxy.stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((mut client, _)) = accepted else {
                    continue;
                };
                if !up.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees its connection closed
                }
                let cut = relays.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        proxy
    }

    /// Relays again.
    pub async fn up(&mut self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// Cuts every relayed connection and closes new ones at once.
    pub fn down(&mut self) {
        self.up.store(false, Ordering::SeqCst);
        let mut relays = self.relays.lock().unwrap();
        relays.cancel();
        *relays = tokio_util::sync::CancellationToken::new();
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.down();
        self.stop.cancel();
    }
}
