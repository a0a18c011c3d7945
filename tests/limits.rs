//! Limits a hostile client meets, with the daemon as a process: connections per address and in
//! all, a slowloris header, a body that never arrives, WebSocket messages over the size limit,
//! a WebSocket client that stops answering pings, calls in flight per `/ws/operations` socket,
//! a 10,000-level nested JSON body and a YAML alias bomb. Each refusal is asserted in
//! `stepflow_limit_refusals_total`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(15);

/// A document with a writable channel the gateway keeps to itself (no server).
fn notes_document(dir: &std::path::Path) -> String {
    let path = dir.join("notes.yaml");
    std::fs::write(
        &path,
        "asyncapi: 3.0.0\nx-stepflow-id: notes\ninfo: {title: notes, version: 1.0.0}\nchannels:\n  notes:\n    address: notes\n    messages:\n      note: {payload: {type: object}}\noperations:\n  takeNotes:\n    action: send\n    channel: {$ref: '#/channels/notes'}\n",
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

async fn start(limits: &str) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let spec = notes_document(dir.path());
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(&config, format!("limits:\n{limits}")).unwrap();
    let daemon = Daemon::start(&["--specs", &spec, "--config", config.to_str().unwrap()])
        .await
        .unwrap();
    (daemon, dir)
}

async fn refusals(daemon: &Daemon, limit: &str) -> f64 {
    daemon
        .metric_value("stepflow_limit_refusals_total", &[("limit", limit)])
        .await
        .unwrap()
        .unwrap_or(0.0)
}

fn port_of(daemon: &Daemon) -> u16 {
    daemon
        .url("/")
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

/// A TCP connection to the daemon from `source` (any 127/8 address is loopback on Linux).
async fn connect_from(source: &str, port: u16) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    socket
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
}

/// What a connection that sent nothing gets within `wait`: the start of a 503, an end, or
/// nothing (it is held open).
async fn fate(mut stream: TcpStream, wait: Duration) -> (&'static str, TcpStream) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(wait, stream.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 && buf[..n].starts_with(b"HTTP/1.1 503") => ("refused", stream),
        Ok(_) => ("closed", stream),
        Err(_) => ("held", stream),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_from_one_address_meet_the_per_address_limit() {
    const PER_IP: usize = 1000;
    const OPENED: usize = 10_000;
    // Every connection is a descriptor of this process too: the soft limit up to the hard one.
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap();
    assert!(
        limit as usize > OPENED + 200,
        "the test opens {OPENED} connections; the hard open-files limit is {limit} (raise it: ulimit -Hn)"
    );
    let (daemon, _dir) = start(&format!(
        "  max_connections_per_ip: {PER_IP}\n  max_connections: 5000\n  header_read_timeout_ms: 120000\n"
    ))
    .await;
    let port = port_of(&daemon);
    let mut streams = Vec::with_capacity(OPENED);
    for i in 0..OPENED {
        match connect_from("127.0.0.1", port).await {
            Ok(s) => streams.push(s),
            Err(e) => panic!("connection {i}: {e} (the test needs `ulimit -n` above {OPENED})"),
        }
    }
    let fates =
        futures::future::join_all(streams.into_iter().map(|s| fate(s, Duration::from_secs(3))))
            .await;
    let count = |what: &str| fates.iter().filter(|(f, _)| *f == what).count();
    println!(
        "per-address limit: {} held, {} refused with 503, {} closed",
        count("held"),
        count("refused"),
        count("closed")
    );
    assert_eq!(count("held"), PER_IP, "exactly the limit is held open");
    assert_eq!(count("refused") + count("closed"), OPENED - PER_IP);
    assert!(
        count("refused") > (OPENED - PER_IP) / 2,
        "refusals are answered with a 503"
    );

    // Another address still gets in, while the first one is at its limit.
    let client = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let r = client.get(daemon.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = client.get(daemon.url("/metrics")).send().await.unwrap();
    let text = r.text().await.unwrap();
    let refused = text
        .lines()
        .find(|l| l.starts_with("stepflow_limit_refusals_total{limit=\"connections_per_ip\"}"))
        .unwrap_or_else(|| panic!("no refusal counted:\n{text}"));
    assert!(
        refused.ends_with(&format!(" {}", OPENED - PER_IP)),
        "{refused}"
    );
    // The held ones go; the address gets in again.
    drop(fates);
    let deadline = Instant::now() + WAIT;
    loop {
        let s = connect_from("127.0.0.1", port).await.unwrap();
        let (f, mut s) = fate(s, Duration::from_millis(200)).await;
        if f == "held" {
            s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).await.unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            break;
        }
        assert!(Instant::now() < deadline, "the address is still refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_total_limit_every_address_gets_a_503() {
    let (daemon, _dir) = start("  max_connections: 5\n  header_read_timeout_ms: 60000\n").await;
    let port = port_of(&daemon);
    let mut held = Vec::new();
    for i in 0..5 {
        let mut stream = connect_from(&format!("127.0.0.{}", 10 + i), port)
            .await
            .unwrap();
        // An answer proves the connection was admitted (and counted) before the sixth arrives;
        // keep-alive holds it open afterwards.
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        tokio::time::timeout(WAIT, stream.read_exact(&mut first))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&first, b"HTTP/1.1 200", "connection {i} admitted");
        held.push(stream);
    }
    let mut sixth = connect_from("127.0.0.20", port).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, sixth.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "limit_exceeded", "{body}");
    assert_eq!(body["error"]["details"]["limit"], "connections");
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(refusals(&daemon, "connections").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_dropped_within_the_header_timeout_and_a_slow_body_gets_408() {
    let (daemon, _dir) =
        start("  header_read_timeout_ms: 1500\n  body_read_timeout_ms: 1000\n").await;
    let port = port_of(&daemon);
    let mut slow = connect_from("127.0.0.1", port).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    // A header line a byte every 200 ms: never complete.
    let dropped = loop {
        if slow.write_all(b"x").await.is_err() {
            break started.elapsed();
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(200), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            // hyper answers 408 on the way out.
            Ok(Ok(_)) => break started.elapsed(),
            Err(_) => {}
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never dropped");
    };
    println!("slowloris: dropped after {dropped:?} (header timeout 1.5 s)");
    assert!(
        dropped < Duration::from_secs(3),
        "dropped after {dropped:?}"
    );
    assert_eq!(refusals(&daemon, "header_timeout").await, 1.0);

    // A body announced but never sent.
    let mut stream = connect_from("127.0.0.1", port).await.unwrap();
    stream
        .write_all(b"POST /api/v1/channels/notes.notes/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"a\":")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(refusals(&daemon, "body_timeout").await, 1.0);
    // Neither cost the daemon anything it needs: it still answers.
    assert_eq!(
        reqwest::get(daemon.url("/healthz")).await.unwrap().status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_messages_over_the_limit_get_1009_and_a_silent_client_is_closed() {
    let (daemon, _dir) = start("  ws_max_message_bytes: 1024\n  ws_idle_timeout_ms: 1500\n").await;
    for path in ["/ws/notes.notes", "/ws/operations"] {
        let mut ws = ws_connect(&daemon.ws_url(path)).await.unwrap();
        ws.send(WsMessage::text(format!(
            "{{\"x\": \"{}\"}}",
            "a".repeat(2000)
        )))
        .await
        .unwrap();
        let close = loop {
            match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
                Some(Ok(WsMessage::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("{path}: no close frame: {other:?}"),
            }
        };
        let close = close.expect("a close frame with a code");
        assert_eq!(u16::from(close.code), 1009, "{path}: {close:?}");
        assert!(close.reason.contains("1024"), "{close:?}");
    }
    assert_eq!(refusals(&daemon, "ws_message_size").await, 2.0);

    // A client that reads nothing answers no ping: it is closed as idle.
    let mut silent = ws_connect(&daemon.ws_url("/ws/notes.notes")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    // Reading now answers the queued pings, which may fail on the closed socket before the
    // close frame is read: either way the server ended it, and counted it as idle.
    loop {
        match tokio::time::timeout(WAIT, silent.next()).await.unwrap() {
            Some(Ok(WsMessage::Close(frame))) => {
                let close = frame.expect("a close frame");
                assert_eq!(u16::from(close.code), 1001, "{close:?}");
                assert!(close.reason.contains("idle"), "{close:?}");
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => break,
        }
    }
    assert_eq!(refusals(&daemon, "ws_idle").await, 1.0);
    // One that answers pings (tungstenite does while it reads) stays.
    let mut lively = ws_connect(&daemon.ws_url("/ws/notes.notes")).await.unwrap();
    let until = Instant::now() + Duration::from_millis(3000);
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_millis(100), lively.next()).await {
            Ok(Some(Ok(WsMessage::Close(frame)))) => panic!("closed: {frame:?}"),
            Ok(Some(Ok(_))) | Err(_) => {}
            Ok(other) => panic!("{other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_thousand_level_json_body_is_a_400_and_an_alias_bomb_is_refused_quickly() {
    let (daemon, _dir) = start("  max_document_bytes: 65536\n").await;
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let client = reqwest::Client::new();
    let r = client
        .post(daemon.url("/api/v1/channels/notes.notes/messages"))
        .header("content-type", "application/json")
        .body(deep.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "{}", r.text().await.unwrap());
    let mut ws = ws_connect(&daemon.ws_url("/ws/notes.notes")).await.unwrap();
    ws.send(WsMessage::text(deep.clone())).await.unwrap();
    let frame = ws_next_json(&mut ws, WAIT).await.unwrap();
    assert_eq!(frame["type"], "error", "{frame}");
    let r = client
        .post(daemon.url("/api/v1/specs?name=deep.json"))
        .header("content-type", "application/json")
        .body(format!("{{\"asyncapi\": \"3.0.0\", \"x\": {deep}}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "{}", r.text().await.unwrap());
    let r = client
        .post(daemon.url("/api/v1/subscriptions"))
        .json(&json!({"name": "deep", "channel": "notes.notes", "filter": format!("{}true{}", "(".repeat(5000), ")".repeat(5000))}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "{}", r.text().await.unwrap());

    // A YAML document whose aliases expand to 10^9 strings.
    let mut bomb = String::from(
        "asyncapi: 3.0.0\ninfo: {title: bomb, version: 1.0.0}\nx-a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n",
    );
    for level in 1..10 {
        let items = vec![format!("*a{}", level - 1); 10].join(", ");
        bomb.push_str(&format!("x-a{level}: &a{level} [{items}]\n"));
    }
    let rss_before = peak_rss_kib(daemon.pid());
    let started = Instant::now();
    let r = client
        .post(daemon.url("/api/v1/specs?name=bomb.yaml"))
        .header("content-type", "application/yaml")
        .body(bomb)
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("alias replay limit"), "{body}");
    let grown = peak_rss_kib(daemon.pid()) - rss_before;
    println!("alias bomb: refused in {took:?}, peak RSS grew {grown} KiB");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(grown < 64 * 1024, "peak RSS grew {grown} KiB");
    assert_eq!(refusals(&daemon, "yaml_budget").await, 1.0);
    // Past the document size: 413.
    let r = client
        .post(daemon.url("/api/v1/specs?name=big.yaml"))
        .body(format!(
            "asyncapi: 3.0.0\nx-pad: '{}'\n",
            "a".repeat(70_000)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(refusals(&daemon, "body_size").await >= 1.0);
}

/// The process's peak resident memory (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_the_cap_on_one_operations_socket_are_answered_at_once() {
    // An upstream that answers after a second.
    let app = axum::Router::new().route(
        "/slow",
        axum::routing::get(|| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            axum::Json(json!({"ok": true}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let (daemon, _dir) = start("  max_calls_per_connection: 2\n").await;
    daemon
        .add_spec(
            "slow.yaml",
            &format!(
                "openapi: 3.1.0\nx-stepflow-id: slow\ninfo: {{title: slow, version: 1.0.0}}\nservers:\n  - url: http://127.0.0.1:{upstream}\npaths:\n  /slow:\n    get:\n      operationId: getSlow\n      responses:\n        '200': {{description: ok}}\n"
            ),
        )
        .await;
    let mut ws = ws_connect(&daemon.ws_url("/ws/operations")).await.unwrap();
    for i in 0..5 {
        ws.send(WsMessage::text(
            json!({"op": "slow.getSlow", "correlationId": format!("c-{i}")}).to_string(),
        ))
        .await
        .unwrap();
    }
    let mut answers = Vec::new();
    while answers.len() < 5 {
        let frame = ws_next_json(&mut ws, WAIT).await.unwrap();
        answers.push(frame);
    }
    let (replies, refused): (Vec<&Value>, Vec<&Value>) =
        answers.iter().partition(|f| f["type"] == "reply");
    assert_eq!(replies.len(), 2, "{answers:?}");
    assert_eq!(refused.len(), 3, "{answers:?}");
    for frame in &refused {
        assert_eq!(frame["error"]["code"], "limit_exceeded", "{frame}");
        assert_eq!(frame["error"]["details"]["limit"], 2, "{frame}");
    }
    // The refusals came before the replies: nothing waited on the cap.
    assert!(
        answers[..3].iter().all(|f| f["type"] == "error"),
        "{answers:?}"
    );
    assert_eq!(refusals(&daemon, "calls_per_connection").await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploaded_document_cannot_refer_to_the_gateways_files() {
    let (daemon, dir) = start("  max_document_bytes: 65536\n").await;
    // A YAML file of the gateway's own, with something worth reading in it.
    let secret = dir.path().join("secret.yaml");
    std::fs::write(&secret, "password: hunter2-secret\n").unwrap();
    let r = reqwest::Client::new()
        .post(daemon.url("/api/v1/specs?name=evil.yaml"))
        .body(format!(
            "asyncapi: 3.0.0\ninfo: {{title: evil, version: 1.0.0}}\nchannels:\n  a:\n    address: a\n    messages:\n      m: {{payload: {{$ref: '{}#/password'}}}}\n",
            secret.display()
        ))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("may refer only to itself"), "{body}");
    assert!(!body.contains("hunter2"), "{body}");
    let listing = reqwest::get(daemon.url("/api/v1/channels"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!listing.contains("hunter2"));
    assert!(
        !daemon.log().contains("hunter2"),
        "the refused file's content reached the daemon's log"
    );
}
