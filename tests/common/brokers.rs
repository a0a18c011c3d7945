//! The brokers the tests talk to: the machine's Mosquitto and RabbitMQ (a test fails naming
//! the command to start one that is down), a Mosquitto of the test's own, Kafka readers.

#[allow(unused_imports)]
use super::*;
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
    /// Sessions and queued messages kept on disk across a [`OwnMosquitto::restart_gracefully`].
    persistent: bool,
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
            persistent: false,
        };
        broker.restart();
        broker
    }

    /// A broker that keeps sessions and queued messages in its directory: a graceful restart
    /// (SIGTERM, which writes them out) loses nothing it acknowledged, as in production.
    pub fn start_persistent() -> OwnMosquitto {
        let mut broker = OwnMosquitto {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            listener_options: "allow_anonymous true".to_owned(),
            persistent: true,
        };
        // Started as root, Mosquitto drops to its own user before it writes its database.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(broker.dir.path(), std::fs::Permissions::from_mode(0o777))
            .unwrap();
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
                "per_listener_settings true\nlistener {} 127.0.0.1\n{}\npersistence {}\npersistence_location {}/\nmax_queued_messages 1000000\nmax_inflight_messages 1000\nmax_keepalive 65535\n",
                self.port,
                self.listener_options,
                self.persistent,
                self.dir.path().display()
            ),
        )
        .unwrap();
        let log_path = self.dir.path().join("mosquitto.log");
        // Appended: a restarted broker's log follows its earlier lives.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
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

    /// SIGTERM (a persistent broker writes its sessions out) and the exit waited for; SIGKILL
    /// after 10 s.
    pub fn terminate(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.wait();
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// What the broker logged, over all its restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for OwnMosquitto {
    fn drop(&mut self) {
        self.stop();
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

/// A Kafka consumer of `topic` in a group of its own, from the earliest offset.
pub fn kafka_reader(bootstrap: &str, topic: &str) -> KafkaReader {
    use rdkafka::consumer::Consumer;
    let consumer: rdkafka::consumer::StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    KafkaReader(Some(consumer))
}

/// A test's Kafka consumer. librdkafka's close waits for the group coordinator with no
/// deadline, so dropping a consumer of a broker that stopped answering blocks for ever: a test
/// that failed would hang (until CI's timeout) instead of failing. The close runs on a thread
/// of its own that nobody waits for.
pub struct KafkaReader(Option<rdkafka::consumer::StreamConsumer>);

impl std::ops::Deref for KafkaReader {
    type Target = rdkafka::consumer::StreamConsumer;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("present until dropped")
    }
}

impl Drop for KafkaReader {
    fn drop(&mut self) {
        if let Some(consumer) = self.0.take() {
            std::thread::spawn(move || drop(consumer));
        }
    }
}

/// A `redis-server` of the test's own, on a free port, keeping nothing on disk.
pub struct OwnRedis {
    pub port: u16,
    child: Child,
}

impl OwnRedis {
    pub fn start() -> OwnRedis {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (apt-get install redis-server)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        OwnRedis { port, child }
    }

    /// Kills it (a test that takes Redis away).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Publishes one QoS 1 message with `mosquitto_pub` (Debian package mosquitto-clients) on the
/// machine's Mosquitto.
pub fn mosquitto_pub(topic: &str, payload: &serde_json::Value) {
    let status = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            "1883",
            "-q",
            "1",
            "-t",
            topic,
            "-m",
        ])
        .arg(payload.to_string())
        .status()
        .expect("mosquitto_pub (Debian package mosquitto-clients)");
    assert!(status.success(), "mosquitto_pub {topic}: {status}");
}

/// Declares the test's exchange and a durable queue bound to every telemetry key.
pub async fn archive_queue(prefix: &str) -> (lapin::Connection, lapin::Channel, String) {
    let (connection, channel) = amqp_channel()
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (start it: rabbitmq-server -detached)");
    channel
        .exchange_declare(
            format!("{prefix}.events").into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let queue = format!("{prefix}.archive");
    channel
        .queue_declare(
            queue.clone().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.clone().into(),
            format!("{prefix}.events").into(),
            "devices.*.telemetry".into(),
            lapin::options::QueueBindOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    (connection, channel, queue)
}
