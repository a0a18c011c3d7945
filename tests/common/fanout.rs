//! Fan-out at scale: thousands of SSE and WebSocket clients on one channel while MQTT telemetry
//! arrives at a steady rate. Each client checks that it received every message once, in order
//! (offsets `1..=N` with no gap or repeat, `lagged` notices allowed), and the daemon's resident
//! memory is sampled before the clients, with them connected and idle, and at its peak.
//!
//! The clients are lean on purpose (a raw HTTP/1.1 request for SSE, tungstenite for WebSocket,
//! no JSON parsing), so that one test process can hold as many sockets as the daemon.

#[allow(unused_imports)]
use super::*;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// The scenario.
#[derive(Clone, Debug)]
pub struct FanoutPlan {
    pub sse_clients: usize,
    pub ws_clients: usize,
    /// Messages per second published to Mosquitto.
    pub rate: u64,
    /// Messages in all.
    pub messages: u64,
    /// How long every client may take to have every message, from the first publish.
    pub deadline: Duration,
}

/// What the clients and the daemon showed.
#[derive(Clone, Debug)]
pub struct FanoutReport {
    pub plan: FanoutPlan,
    /// Clients that received `1..=messages`, each once and in order.
    pub sse_complete: usize,
    pub ws_complete: usize,
    /// Clients that saw an offset twice or out of order (a defect, not a lag).
    pub out_of_order: usize,
    /// `lagged` notices received (the client was resumed from the log).
    pub lagged_notices: usize,
    /// Why clients stopped before the last message (a close frame's code and reason, an
    /// error, the end of the stream), with how many stopped so.
    pub stopped_early: std::collections::BTreeMap<String, usize>,
    /// From the first publish until the last client had the last message.
    pub all_delivered_in: Duration,
    /// How long publishing took (the rate's schedule).
    pub published_in: Duration,
    pub rss_before_kib: u64,
    pub rss_connected_kib: u64,
    pub rss_peak_kib: u64,
    pub open_files_connected: u64,
    /// CPU time (user + system) from the first publish until every client was done: the
    /// daemon's, and this process's (the clients').
    pub daemon_cpu: Duration,
    pub clients_cpu: Duration,
}

impl FanoutReport {
    pub fn clients(&self) -> usize {
        self.plan.sse_clients + self.plan.ws_clients
    }

    /// Resident memory added per connected client, idle.
    pub fn rss_per_client_kib(&self) -> f64 {
        self.rss_connected_kib.saturating_sub(self.rss_before_kib) as f64
            / self.clients().max(1) as f64
    }

    /// Resident memory per client at the peak of the stream.
    pub fn peak_rss_per_client_kib(&self) -> f64 {
        self.rss_peak_kib.saturating_sub(self.rss_before_kib) as f64 / self.clients().max(1) as f64
    }
}

impl std::fmt::Display for FanoutReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = &self.plan;
        writeln!(
            f,
            "fan-out: {} SSE + {} WebSocket clients on one channel, {} messages at {} msg/s (published in {:.1} s)",
            p.sse_clients,
            p.ws_clients,
            p.messages,
            p.rate,
            self.published_in.as_secs_f64()
        )?;
        writeln!(
            f,
            "  complete: {}/{} SSE, {}/{} WebSocket; {} out of order; {} lagged notices; all delivered {:.1} s after the first publish ({:.0} frames/s)",
            self.sse_complete,
            p.sse_clients,
            self.ws_complete,
            p.ws_clients,
            self.out_of_order,
            self.lagged_notices,
            self.all_delivered_in.as_secs_f64(),
            (self.clients() as u64 * p.messages) as f64 / self.all_delivered_in.as_secs_f64()
        )?;
        for (why, count) in &self.stopped_early {
            writeln!(f, "  stopped early: {count} clients: {why}")?;
        }
        let frames = (self.clients() as u64 * p.messages) as f64;
        writeln!(
            f,
            "  CPU: daemon {:.1} s ({:.2} µs per frame delivered), clients {:.1} s, over {:.1} s",
            self.daemon_cpu.as_secs_f64(),
            self.daemon_cpu.as_secs_f64() * 1e6 / frames,
            self.clients_cpu.as_secs_f64(),
            self.all_delivered_in.as_secs_f64()
        )?;
        writeln!(
            f,
            "  daemon RSS: {} KiB before, {} KiB connected ({:.1} KiB per client), peak {} KiB ({:.1} KiB per client); {} open files connected",
            self.rss_before_kib,
            self.rss_connected_kib,
            self.rss_per_client_kib(),
            self.rss_peak_kib,
            self.peak_rss_per_client_kib(),
            self.open_files_connected
        )
    }
}

/// One client's bookkeeping: the next offset it expects.
#[derive(Default)]
struct Progress {
    next: u64,
    disordered: bool,
    lagged: usize,
}

impl Progress {
    fn offset(&mut self, offset: u64) {
        if offset == self.next + 1 {
            self.next = offset;
        } else {
            self.disordered = true;
        }
    }
}

/// The counts every client updates.
#[derive(Default)]
struct Board {
    complete: [AtomicUsize; 2],
    disordered: AtomicUsize,
    lagged: AtomicUsize,
    stopped_early: std::sync::Mutex<std::collections::BTreeMap<String, usize>>,
}

impl Board {
    fn stopped_early(&self, why: String) {
        *self.stopped_early.lock().unwrap().entry(why).or_default() += 1;
    }
}

const SSE: usize = 0;
const WS: usize = 1;

fn finish(board: &Board, kind: usize, progress: &Progress, messages: u64) {
    board.lagged.fetch_add(progress.lagged, Ordering::Relaxed);
    if progress.disordered {
        board.disordered.fetch_add(1, Ordering::Relaxed);
    } else if progress.next == messages {
        board.complete[kind].fetch_add(1, Ordering::Relaxed);
    }
}

/// The number after `"offset":` in a frame.
fn offset_in(text: &str) -> Option<u64> {
    let at = text.find("\"offset\":")? + "\"offset\":".len();
    let digits: String = text[at..]
        .chars()
        .skip_while(|c| *c == ' ')
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// A TCP connection to the daemon from `source` (any 127/8 address is loopback on Linux): the
/// clients spread over several, so the ephemeral ports of one address do not run out.
async fn connect_from(
    source: std::net::Ipv4Addr,
    port: u16,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((source, 0).into())?;
    socket.connect(([127, 0, 0, 1], port).into()).await
}

fn source_of(i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(127, 0, 1, (i / 5000) as u8 + 1)
}

/// An SSE client as a raw HTTP/1.1 request: it reads lines and takes the `id:` of each
/// `message` event (chunk-size lines and the rest are skipped). Returns once connected; the
/// reading goes on in a task until every message came or `stop`.
async fn sse_client(
    i: usize,
    port: u16,
    channel: &str,
    messages: u64,
    board: Arc<Board>,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let stream = connect_from(source_of(i), port).await?;
    let mut stream = tokio::io::BufReader::new(stream);
    stream
        .get_mut()
        .write_all(
            format!("GET /sse/{channel}?from=1 HTTP/1.1\r\nhost: gateway\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut status = String::new();
    stream.read_line(&mut status).await?;
    if !status.starts_with("HTTP/1.1 200") {
        bail!("SSE client {i}: {status}");
    }
    Ok(tokio::spawn(async move {
        let mut progress = Progress::default();
        let mut line = String::new();
        while progress.next < messages {
            line.clear();
            let read = tokio::select! {
                _ = stop.cancelled() => break,
                read = stream.read_line(&mut line) => read,
            };
            match read {
                Ok(0) => {
                    board.stopped_early("SSE stream ended".into());
                    break;
                }
                Err(e) => {
                    board.stopped_early(format!("SSE read error: {e}"));
                    break;
                }
                Ok(_) => {}
            }
            let line = line.trim_end();
            if let Some(id) = line.strip_prefix("id:") {
                if let Ok(offset) = id.trim().parse::<u64>() {
                    progress.offset(offset);
                }
            } else if line.strip_prefix("event:").map(str::trim) == Some("lagged") {
                progress.lagged += 1;
            }
        }
        finish(&board, SSE, &progress, messages);
    }))
}

/// A WebSocket client (tungstenite over the same kind of socket).
async fn ws_client(
    i: usize,
    port: u16,
    channel: &str,
    messages: u64,
    board: Arc<Board>,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let stream = connect_from(source_of(i), port).await?;
    let url = format!("ws://127.0.0.1:{port}/ws/{channel}?from=1");
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    Ok(tokio::spawn(async move {
        let mut progress = Progress::default();
        while progress.next < messages {
            let frame = tokio::select! {
                _ = stop.cancelled() => break,
                frame = ws.next() => frame,
            };
            match frame {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => {
                    if text.starts_with("{\"type\":\"lagged\"") {
                        progress.lagged += 1;
                    } else if let Some(offset) = offset_in(&text) {
                        progress.offset(offset);
                    }
                }
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame))) => {
                    board.stopped_early(match frame {
                        Some(f) => format!("WebSocket close {} {}", u16::from(f.code), f.reason),
                        None => "WebSocket close without a frame".into(),
                    });
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    board.stopped_early(format!("WebSocket error: {e}"));
                    break;
                }
                None => {
                    board.stopped_early("WebSocket stream ended".into());
                    break;
                }
            }
        }
        finish(&board, WS, &progress, messages);
    }))
}

/// User + system CPU time of a process so far (`/proc/PID/stat`, in clock ticks of 10 ms).
fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// What the clients connect to: the gateway, or the floor baseline.
struct Server {
    port: u16,
    pid: u32,
    /// The channel in the clients' URLs.
    channel: String,
    /// The daemon, whose subscriber count is checked against the clients.
    daemon: Option<Daemon>,
}

/// Runs the scenario against a daemon of its own, on a Mosquitto of its own.
pub async fn run(plan: FanoutPlan) -> Result<FanoutReport> {
    let clients = plan.sse_clients + plan.ws_clients;
    raise_open_files(clients)?;
    let broker = OwnMosquitto::start();
    let dir = tempfile::tempdir()?;
    let (api, prefix) = (unique("fan"), unique("f"));
    let spec = iot_spec(dir.path(), &api, &prefix, 1);
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(
        &config,
        format!(
            "limits:\n  max_connections: {}\n  max_connections_per_ip: {}\n",
            clients + 100,
            clients + 100
        ),
    )?;
    let server = format!("broker={}", broker.url());
    let daemon = Daemon::start(&[
        "--specs",
        spec.to_str().unwrap(),
        "--server",
        &server,
        "--config",
        config.to_str().unwrap(),
    ])
    .await?;
    // A few requests first, so the baseline holds what every daemon holds once it serves.
    for _ in 0..10 {
        reqwest::get(daemon.url("/api/v1/channels")).await?;
    }
    let server = Server {
        port: daemon.port,
        pid: daemon.pid(),
        channel: format!("{api}.telemetry"),
        daemon: Some(daemon),
    };
    let topic = format!("{prefix}/devices/d1/telemetry");
    measure(plan, server, &broker, &topic).await
}

/// The same SSE clients against the floor: a process (`executable --floor PORT --broker PORT
/// --topic T`, see [`serve_floor`]) that relays the MQTT topic to its sockets and does nothing
/// else. Its CPU per frame is what delivering a frame to a socket costs at all.
pub async fn run_floor(plan: FanoutPlan, executable: &Path) -> Result<FanoutReport> {
    raise_open_files(plan.sse_clients)?;
    let broker = OwnMosquitto::start();
    let topic = format!("{}/devices/d1/telemetry", unique("floor"));
    let port = free_port();
    let child = Command::new(executable)
        .args(["--floor", &port.to_string()])
        .args(["--broker", &broker.port.to_string()])
        .args(["--topic", &topic])
        .spawn()
        .context("starting the floor server")?;
    let child = KilledOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("the floor server did not listen on {port}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its MQTT subscription is made right after it listens.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server = Server {
        port,
        pid: child.0.id(),
        channel: "floor".into(),
        daemon: None,
    };
    let plan = FanoutPlan {
        ws_clients: 0,
        ..plan
    };
    measure(plan, server, &broker, &topic).await
}

struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Each client is a descriptor here too: the soft limit up to the hard one.
fn raise_open_files(clients: usize) -> Result<()> {
    let limit = rlimit::increase_nofile_limit(u64::MAX)?;
    if (limit as usize) < clients + 200 {
        bail!(
            "{clients} clients need {} open files; the hard limit is {limit} (raise it: ulimit -Hn)",
            clients + 200
        );
    }
    Ok(())
}

/// Connects the clients, publishes, and waits until every client has every message.
async fn measure(
    plan: FanoutPlan,
    server: Server,
    broker: &OwnMosquitto,
    topic: &str,
) -> Result<FanoutReport> {
    let clients = plan.sse_clients + plan.ws_clients;
    let pid = server.pid;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before_kib = process_status_kib(pid, "VmRSS:").unwrap_or(0);

    let board = Arc::new(Board::default());
    let stop = CancellationToken::new();
    let mut readers = Vec::with_capacity(clients);
    // Connected a few hundred at a time: the accept queue is finite.
    for chunk_start in (0..clients).step_by(250) {
        let mut connecting = Vec::new();
        for i in chunk_start..(chunk_start + 250).min(clients) {
            let (board, stop, channel) = (board.clone(), stop.clone(), server.channel.clone());
            let port = server.port;
            let messages = plan.messages;
            connecting.push(async move {
                if i < plan.sse_clients {
                    sse_client(i, port, &channel, messages, board, stop).await
                } else {
                    ws_client(i, port, &channel, messages, board, stop).await
                }
            });
        }
        for connected in futures::future::join_all(connecting).await {
            readers.push(connected.context("a client did not connect")?);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_connected_kib = process_status_kib(pid, "VmRSS:").unwrap_or(0);
    let open_files_connected = open_files(pid).unwrap_or(0);
    if let Some(daemon) = &server.daemon {
        let subscribers = daemon
            .metric("stepflow_subscribers", &[("channel", &server.channel)])
            .await
            .unwrap_or(0.0);
        if subscribers as usize != clients {
            bail!("the daemon counts {subscribers} subscribers, not {clients}");
        }
    }

    let started = Instant::now();
    let (server_cpu_before, clients_cpu_before) = (cpu_time(&pid.to_string()), cpu_time("self"));
    let (progress, _) = tokio::sync::watch::channel(0);
    let published = publish_acknowledged(
        broker.port,
        topic.to_owned(),
        0..plan.messages,
        plan.rate,
        progress,
    )
    .await;
    let published_in = started.elapsed();
    if published != plan.messages {
        bail!(
            "{published} of {} messages acknowledged by Mosquitto",
            plan.messages
        );
    }
    let remaining = plan.deadline.saturating_sub(started.elapsed());
    let all = futures::future::join_all(readers);
    let finished = tokio::time::timeout(remaining, all).await.is_ok();
    let all_delivered_in = started.elapsed();
    let daemon_cpu = cpu_time(&pid.to_string()).saturating_sub(server_cpu_before);
    let clients_cpu = cpu_time("self").saturating_sub(clients_cpu_before);
    stop.cancel();
    if !finished {
        // The stragglers count themselves as they stop.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rss_peak_kib = process_status_kib(pid, "VmHWM:")
        .unwrap_or(0)
        .max(rss_connected_kib);
    drop(server);
    Ok(FanoutReport {
        plan,
        sse_complete: board.complete[SSE].load(Ordering::Relaxed),
        ws_complete: board.complete[WS].load(Ordering::Relaxed),
        out_of_order: board.disordered.load(Ordering::Relaxed),
        lagged_notices: board.lagged.load(Ordering::Relaxed),
        stopped_early: std::mem::take(&mut board.stopped_early.lock().unwrap()),
        all_delivered_in,
        published_in,
        rss_before_kib,
        rss_connected_kib,
        rss_peak_kib,
        open_files_connected,
        daemon_cpu,
        clients_cpu,
    })
}

/// The floor baseline's server: MQTT in (QoS 1, the topic the scenario publishes), each
/// message rendered once as an SSE event the size of the gateway's (the same JSON frame
/// fields), written to every connected socket; when a socket is behind, what is waiting goes
/// in one write, as the gateway does. No log, no schema, no auth, no metrics, no HTTP parsing
/// beyond skipping the request head: what fanning out costs before any gateway work.
pub async fn serve_floor(port: u16, broker: u16, topic: String) -> Result<()> {
    use tokio::io::AsyncReadExt;
    let (events, _) = tokio::sync::broadcast::channel::<bytes::Bytes>(4096);
    let mut options = rumqttc::MqttOptions::new(unique("floor"), "127.0.0.1", broker);
    options.set_inflight(1000);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
    client
        .subscribe(topic.clone(), rumqttc::QoS::AtLeastOnce)
        .await?;
    let intake = events.clone();
    tokio::spawn(async move {
        let _client = client;
        let mut offset = 0u64;
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    offset += 1;
                    let payload = String::from_utf8_lossy(&p.payload);
                    let frame = format!(
                        r#"{{"offset":{offset},"channel":"floor.telemetry","address":"{}","params":{{"deviceId":"d1"}},"headers":{{}},"payload":{payload},"timestamp":0}}"#,
                        p.topic
                    );
                    let id = offset.to_string();
                    let _ = intake.send(stepflow::routing::envelope::sse_event(
                        Some(&id),
                        "message",
                        frame.as_bytes(),
                    ));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (mut socket, _) = listener.accept().await?;
        let mut receiver = events.subscribe();
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let ok = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\r\n";
            if socket.write_all(ok).await.is_err() {
                return;
            }
            let mut out = Vec::new();
            while let Ok(first) = receiver.recv().await {
                out.clear();
                out.extend_from_slice(&first);
                while let Ok(next) = receiver.try_recv() {
                    out.extend_from_slice(&next);
                }
                if socket.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}
