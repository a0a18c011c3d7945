//! tansu, an independent Kafka-protocol broker (crates.io, Apache-2.0), as a test's own
//! processes: a plaintext listener and, when asked, a SASL/SCRAM one on the same sqlite
//! database, each test with its own database and topics.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::free_port;

/// How `.ci/run` installs it (a 30–40 min compile, once per machine).
const INSTALL: &str =
    "cargo install tansu --version 0.6.0 --locked --no-default-features --features libsql";

/// Where a broker keeps its sqlite database: in memory (`/dev/shm`) where there is one. tansu
/// writes and syncs its database for every produce and commit; on a loaded machine's disk that
/// takes long enough for librdkafka's idempotent producer to time out a request and bump its
/// epoch, which tansu 0.6.0 does not handle (see [`Tansu::own_panic`]). The database still
/// outlives a broker restart, which the restart tests need.
fn database_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::Builder::new().prefix("tansu").tempdir_in(shm)
    {
        return dir;
    }
    tempfile::tempdir().unwrap()
}

/// A tansu broker of the test's own. Killed on drop.
pub struct Tansu {
    /// The plaintext listener.
    pub port: u16,
    /// The SASL (SCRAM) listener, when started with [`Tansu::start_with_sasl`].
    pub sasl_port: Option<u16>,
    dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl Tansu {
    /// The binary: `tansu` on the PATH, else cargo's bin directory. Fails (never skips) with the
    /// install command when it is missing.
    pub fn binary() -> PathBuf {
        let on_path = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("tansu"))
                .find(|p| p.is_file())
        });
        let cargo_bin = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
            .map(|h| h.join("bin/tansu"))
            .filter(|p| p.is_file());
        on_path.or(cargo_bin).unwrap_or_else(|| {
            panic!("the tansu Kafka broker is not installed; install it with: {INSTALL}")
        })
    }

    /// A plaintext broker on a free port.
    pub fn start() -> Tansu {
        let mut broker = Tansu {
            port: 0,
            sasl_port: None,
            dir: database_dir(),
            children: Vec::new(),
        };
        broker.port = broker.spawn(false);
        broker
    }

    /// A plaintext broker plus a SASL listener on the same database (tansu serves one listener
    /// per process). Users are created through the plaintext one.
    pub fn start_with_sasl() -> Tansu {
        let mut broker = Self::start();
        broker.sasl_port = Some(broker.spawn(true));
        broker
    }

    /// Starts a listener on a free port; its port. A start that fails for a reason of the
    /// machine's, not tansu's (a port taken between choosing and binding it, the shared sqlite
    /// database busy while the other process opens it), is tried again on another port.
    fn spawn(&mut self, authentication: bool) -> u16 {
        let mut failures = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            match self.try_spawn(port, authentication) {
                Ok(()) => return port,
                Err(e) => failures.push(e),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("tansu did not start:\n{}", failures.join("\n"));
    }

    fn try_spawn(&mut self, port: u16, authentication: bool) -> Result<(), String> {
        let url = format!("tcp://127.0.0.1:{port}");
        // Appended, not truncated: a restart must not erase the panic of the instance before it.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("tansu-{port}.log")))
            .unwrap();
        let mut command = Command::new(Self::binary());
        command
            .current_dir(self.dir.path())
            .arg("broker")
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu.db"]);
        if authentication {
            command.arg("--authentication");
        }
        let mut child = command
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tansu starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = child.try_wait().ok().flatten().is_some();
            if exited || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("tansu did not listen on {port}:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.children.push(child);
        Ok(())
    }

    /// Everything the broker processes logged.
    pub fn log(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for entry in entries.flatten() {
                if entry.path().extension().is_some_and(|e| e == "log") {
                    out.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
                }
            }
        }
        out
    }

    /// `host:port` of the plaintext listener.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The first line of a panic in tansu's own code, if it had one. tansu 0.6.0's sqlite
    /// engine can panic in its idempotent-producer check ("more or less than one row",
    /// `tansu-storage/src/lite.rs:503`) on a loaded machine; its storage task is gone after
    /// that and every later request fails ("unreachable code" in `service.rs`), so the broker
    /// answers nothing until it is restarted.
    pub fn own_panic(&self) -> Option<String> {
        let log = self.log();
        let mut lines = log.lines();
        lines.find(|l| l.contains("panicked at"))?;
        Some(lines.next().unwrap_or("").to_owned())
    }

    /// `host:port` of the SASL listener.
    pub fn sasl_bootstrap(&self) -> String {
        format!(
            "127.0.0.1:{}",
            self.sasl_port.expect("started with start_with_sasl")
        )
    }

    fn admin(&self, args: &[&str]) {
        let broker = format!("tcp://127.0.0.1:{}", self.port);
        let output = Command::new(Self::binary())
            .current_dir(self.dir.path())
            .args(args)
            .args(["--broker", &broker])
            .output()
            .expect("tansu runs");
        assert!(
            output.status.success(),
            "tansu {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Topics are not created on first use: the test creates each of its own.
    pub fn create_topic(&self, name: &str, partitions: u32) {
        self.admin(&[
            "topic",
            "create",
            "--partitions",
            &partitions.to_string(),
            name,
        ]);
    }

    /// A SCRAM user (`mechanism`: `scram256` or `scram512`).
    pub fn create_user(&self, mechanism: &str, user: &str, password: &str) {
        self.admin(&["user", "create", "--mechanism", mechanism, user, password]);
    }

    /// Stops every listener (the database stays).
    pub fn stop(&mut self) {
        for mut child in self.children.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the listeners again on the same ports and database.
    pub fn restart(&mut self) {
        self.stop();
        self.respawn(self.port, false);
        if let Some(sasl) = self.sasl_port {
            self.respawn(sasl, true);
        }
    }

    /// Starts a listener again on its port (clients know it), trying again while the port or
    /// the database is still held by the process just stopped.
    fn respawn(&mut self, port: u16, authentication: bool) {
        let mut failures = Vec::new();
        for _ in 0..5 {
            match self.try_spawn(port, authentication) {
                Ok(()) => return,
                Err(e) => failures.push(e),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("tansu did not start again:\n{}", failures.join("\n"));
    }
}

/// The plaintext ports of brokers that panicked in their own code while a test used them.
static PANICKED: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// Runs `scenario` against a tansu broker of its own. When the scenario fails *and* tansu's log
/// shows a panic of tansu's own (see [`Tansu::own_panic`]), the scenario runs once more on a
/// fresh broker, and says so: that failure is the broker's, not the gateway's. Any other
/// failure, or a second one, fails the test.
pub async fn on_tansu<F, Fut>(scenario: F)
where
    F: Fn(TestKafka) -> Fut,
    Fut: Future<Output = ()>,
{
    use futures::FutureExt;
    for attempt in 1..=2 {
        let kafka = TestKafka::tansu();
        let port = kafka.as_tansu_ref().map(|t| t.port).unwrap_or_default();
        let failure = match std::panic::AssertUnwindSafe(scenario(kafka))
            .catch_unwind()
            .await
        {
            Ok(()) => return,
            Err(panic) => panic,
        };
        let broker_failed = PANICKED.lock().unwrap().contains(&port);
        if attempt == 1 && broker_failed {
            println!(
                "tansu on port {port} panicked in its own code (its log is printed above): \
                 running the scenario again on a fresh broker"
            );
            continue;
        }
        std::panic::resume_unwind(failure);
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
        if self.own_panic().is_some() {
            PANICKED.lock().unwrap().insert(self.port);
        }
        // A failing Kafka test needs the broker's side too: the last lines say whether tansu
        // refused, stalled or failed on its database.
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!("---- tansu log (last 60 lines) ----\n{}", tail.join("\n"));
        }
    }
}

/// A Kafka-protocol broker for a test: tansu (independent of the client), or librdkafka's mock
/// (for what only it can do, such as injected errors).
pub enum TestKafka {
    Tansu(Tansu),
    Mock(rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>),
}

impl TestKafka {
    pub fn tansu() -> TestKafka {
        TestKafka::Tansu(Tansu::start())
    }

    /// tansu with a SASL listener beside the plaintext one.
    pub fn tansu_with_sasl() -> TestKafka {
        TestKafka::Tansu(Tansu::start_with_sasl())
    }

    pub fn mock() -> TestKafka {
        TestKafka::Mock(rdkafka::mocking::MockCluster::new(1).expect("librdkafka mock cluster"))
    }

    pub fn bootstrap(&self) -> String {
        match self {
            TestKafka::Tansu(t) => t.bootstrap(),
            TestKafka::Mock(m) => m.bootstrap_servers(),
        }
    }

    /// The tansu broker, if this is one.
    pub fn as_tansu_ref(&self) -> Option<&Tansu> {
        match self {
            TestKafka::Tansu(t) => Some(t),
            TestKafka::Mock(_) => None,
        }
    }

    /// Fails the test at once when tansu panicked in its own code: it will answer nothing more.
    pub fn assert_broker_alive(&self) {
        if let Some(reason) = self.as_tansu_ref().and_then(Tansu::own_panic) {
            panic!("tansu panicked in its own code: {reason}");
        }
    }

    /// The tansu broker; a test that needs one (SASL, a restart) fails on the mock.
    pub fn as_tansu(&mut self) -> &mut Tansu {
        match self {
            TestKafka::Tansu(t) => t,
            TestKafka::Mock(_) => panic!("a tansu broker was expected"),
        }
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        match self {
            TestKafka::Tansu(t) => t.create_topic(name, partitions),
            TestKafka::Mock(m) => m
                .create_topic(name, partitions as i32, 1)
                .expect("topic created"),
        }
    }
}
