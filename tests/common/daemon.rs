//! The daemon as a process: started on free ports with its own data dir, waited for, asked
//! over HTTP, read through its metrics; killed on drop.

#[allow(unused_imports)]
use super::*;
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

static BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Points these helpers at another build of the daemon (the examples that reuse them run the
/// release build); the first call wins.
pub fn use_stepflow_binary(path: PathBuf) {
    let _ = BINARY.set(path);
}

/// The daemon's binary: the one [`use_stepflow_binary`] named, else cargo's.
pub fn stepflow_binary() -> PathBuf {
    BINARY
        .get()
        .cloned()
        .or_else(|| option_env!("CARGO_BIN_EXE_stepflow").map(PathBuf::from))
        .expect("use_stepflow_binary names the daemon outside the integration tests")
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

    /// Spawns without waiting for anything (a daemon the test reaches over HTTPS itself).
    pub fn start_spawned(args: &[&str]) -> Result<Daemon> {
        Self::spawned(args, &[])
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
        let mut command = Command::new(stepflow_binary());
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
    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the daemon runs").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        self.wait_for("/readyz", timeout).await
    }

    /// Waits until `probe` (`/readyz`, or `/healthz` for a daemon whose upstreams may be away)
    /// answers 200; a start that lost its port to another process is tried on another.
    async fn wait_for(&mut self, probe: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let client = reqwest::Client::new();
        let mut respawns = 0;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                // The free port was taken meanwhile (a parallel test's client ports): another.
                if respawns < 5 && self.log().contains("Address already in use") {
                    respawns += 1;
                    self.port = free_port();
                    std::fs::write(&self.log, "")?;
                    self.spawn()?;
                    continue;
                }
                bail!(
                    "stepflow exited with {status} before it was ready:\n{}",
                    self.log()
                );
            }
            if let Ok(r) = client.get(self.url(probe)).send().await
                && r.status() == 200
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "stepflow: no 200 from {probe} after {timeout:?}:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `signal` (`HUP`, `TERM`, ...) to the running process.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let child = self.child.as_ref().ok_or_else(|| anyhow!("not running"))?;
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{signal} failed");
        }
        Ok(())
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

    /// Like [`Daemon::restart`], waiting only until it serves: its upstreams may be away.
    pub async fn restart_serving(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()?;
        self.wait_for("/healthz", Duration::from_secs(20)).await
    }

    /// Waits until the newest entry of `GET /api/v1/reloads` is a new one (past `seen`) and
    /// returns it.
    pub async fn next_reload(&self, seen: usize) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let reloads = self.get_json("/api/v1/reloads").await.unwrap();
            let list = reloads["reloads"].as_array().unwrap();
            if list.len() > seen {
                return list[0].clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no reload after {seen}: {reloads}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `POST /api/v1/specs?name={name}` with `text`, asserting 201.
    pub async fn add_spec(&self, name: &str, text: &str) {
        let r = reqwest::Client::new()
            .post(self.url(&format!("/api/v1/specs?name={name}")))
            .body(text.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }

    /// `PUT /api/v1/specs/{api}` with `text`: its answer, asserting 200.
    pub async fn replace_spec(&self, api: &str, text: &str) -> serde_json::Value {
        let r = reqwest::Client::new()
            .put(self.url(&format!("/api/v1/specs/{api}")))
            .body(text.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
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
    let payload_of =
        |seq: u64| serde_json::json!({"temperature": 20.5, "seq": seq, "pad": "x"}).to_string();
    publish_acknowledged_with(port, topic_of, payload_of, seqs, per_second, on_progress).await
}

/// [`publish_acknowledged_with`] on `topic` in a task of its own: its handle (the count
/// acknowledged) and how many are acknowledged so far.
pub fn spawn_publisher(
    topic: String,
    payload_of: impl Fn(u64) -> String + Send + 'static,
    seqs: std::ops::Range<u64>,
    per_second: u64,
) -> (
    tokio::task::JoinHandle<u64>,
    tokio::sync::watch::Receiver<u64>,
) {
    let (progress, acked) = tokio::sync::watch::channel(0u64);
    let publisher = tokio::spawn(async move {
        publish_acknowledged_with(
            1883,
            move |_| topic.clone(),
            payload_of,
            seqs,
            per_second,
            progress,
        )
        .await
    });
    (publisher, acked)
}

/// Like [`publish_acknowledged_on`], with the payload `payload_of(seq)`.
pub async fn publish_acknowledged_with(
    port: u16,
    topic_of: impl Fn(u64) -> String,
    payload_of: impl Fn(u64) -> String,
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
                payload_of(seq),
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
