//! The WebSocket and SSE upstream connectors follow a replaced document on their open
//! connections: a feed server and an event server the test runs on loopback (axum) count every
//! connection, and the daemon (a process) has its document replaced while both stream.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use axum::response::sse::{Event, Sse};
use common::*;
use futures::Stream;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

/// Per path: connections opened, and how many are open now.
#[derive(Clone, Default)]
struct Upstream {
    opened: Arc<Mutex<BTreeMap<String, usize>>>,
    open: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl Upstream {
    fn connected(&self, path: &str) -> Open {
        *self.opened.lock().unwrap().entry(path.into()).or_default() += 1;
        *self.open.lock().unwrap().entry(path.into()).or_default() += 1;
        Open {
            upstream: self.clone(),
            path: path.into(),
        }
    }

    fn opened(&self, path: &str) -> usize {
        self.opened.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    fn open(&self, path: &str) -> usize {
        self.open.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

/// One open connection; counted out when the server's side of it ends.
struct Open {
    upstream: Upstream,
    path: String,
}

impl Drop for Open {
    fn drop(&mut self) {
        *self
            .upstream
            .open
            .lock()
            .unwrap()
            .entry(self.path.clone())
            .or_default() -= 1;
    }
}

/// A tick every 5 ms, numbered from 0 on each connection: a reconnect shows as a restart.
async fn feed(
    ws: WebSocketUpgrade,
    Path(name): Path<String>,
    State(upstream): State<Upstream>,
) -> Response {
    ws.on_upgrade(move |mut socket| async move {
        let _open = upstream.connected(&format!("/stream/{name}"));
        for seq in 0u64.. {
            let tick = json!({"feed": name, "seq": seq}).to_string();
            if socket.send(Message::text(tick)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

/// An event every 5 ms, numbered from 0 on each request.
async fn events(
    Path(name): Path<String>,
    State(upstream): State<Upstream>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let open = upstream.connected(&format!("/events/{name}"));
    Sse::new(async_stream::stream! {
        let _open = open;
        for seq in 0u64.. {
            yield Ok(Event::default().data(json!({"stream": name, "seq": seq}).to_string()));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

async fn start_upstream() -> (u16, Upstream) {
    let upstream = Upstream::default();
    let app = axum::Router::new()
        .route("/stream/{name}", axum::routing::get(feed))
        .route("/events/{name}", axum::routing::get(events))
        .with_state(upstream.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, upstream)
}

/// A client-role document reading `/stream/a` over WebSocket and `/events/a` as SSE; with
/// `second`, also `/stream/b` and `/events/b`, and a narrower tick schema on `a`.
fn document(api: &str, port: u16, second: bool) -> String {
    let tick_seq = if second {
        "{type: integer, minimum: 0}"
    } else {
        "{type: integer}"
    };
    let mut channels = format!(
        "  ticker:\n    address: /stream/a\n    messages:\n      tick: {{payload: {{type: object, properties: {{seq: {tick_seq}}}}}}}\n  alerts:\n    address: /events/a\n    servers: [{{$ref: '#/servers/events'}}]\n    x-stepflow-sse: true\n    messages:\n      alert: {{payload: {{type: object}}}}\n"
    );
    let mut operations = "  ticks:\n    action: send\n    channel: {$ref: '#/channels/ticker'}\n  alerts:\n    action: send\n    channel: {$ref: '#/channels/alerts'}\n".to_owned();
    if second {
        channels.push_str("  tickerB:\n    address: /stream/b\n    messages:\n      tick: {payload: {type: object}}\n  alertsB:\n    address: /events/b\n    servers: [{$ref: '#/servers/events'}]\n    x-stepflow-sse: true\n    messages:\n      alert: {payload: {type: object}}\n");
        operations.push_str("  ticksB:\n    action: send\n    channel: {$ref: '#/channels/tickerB'}\n  alertsB:\n    action: send\n    channel: {$ref: '#/channels/alertsB'}\n");
    }
    format!(
        "asyncapi: 3.0.0\nx-stepflow-id: {api}\nx-stepflow-role: client\ninfo: {{title: follow, version: 1.0.0}}\nservers:\n  feed: {{host: '127.0.0.1:{port}', protocol: ws}}\n  events: {{host: '127.0.0.1:{port}', protocol: http}}\nchannels:\n{channels}operations:\n{operations}"
    )
}

fn consecutive(seqs: &[u64]) -> bool {
    seqs.windows(2).all(|w| w[1] == w[0] + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_sse_upstreams_follow_a_replacement_on_their_open_connections() {
    let (port, upstream) = start_upstream().await;
    let specs = tempfile::tempdir().unwrap();
    let api = unique("upfollow");
    std::fs::write(
        specs.path().join("follow.yaml"),
        document(&api, port, false),
    )
    .unwrap();
    let daemon = Daemon::start(&["--specs", specs.path().to_str().unwrap()])
        .await
        .unwrap();
    let mut ticker = ws_connect(&daemon.ws_url(&format!("/ws/{api}.ticker")))
        .await
        .unwrap();
    let mut alerts = ws_connect(&daemon.ws_url(&format!("/ws/{api}.alerts")))
        .await
        .unwrap();
    let mut before = seqs_of(&mut ticker, 20).await;
    let mut alerts_before = seqs_of(&mut alerts, 20).await;

    // Version 2: two more streams, and a changed schema on the ticker.
    std::fs::write(specs.path().join("follow.yaml"), document(&api, port, true)).unwrap();
    let reload = daemon.next_reload(0).await;
    assert_eq!(reload["outcome"], "applied", "{reload}");
    let mut ticker_b = ws_connect(&daemon.ws_url(&format!("/ws/{api}.tickerB")))
        .await
        .unwrap();
    let mut alerts_b = SseClient::connect(&daemon.url(&format!("/sse/{api}.alertsB")), None)
        .await
        .unwrap();
    assert_eq!(
        ws_next_json(&mut ticker_b, WAIT).await.unwrap()["payload"]["feed"],
        "b"
    );
    let (_, frame) = alerts_b.next_message(WAIT).await.unwrap();
    assert_eq!(frame["payload"]["stream"], "b", "{frame}");
    before.extend(seqs_of(&mut ticker, 100).await);
    alerts_before.extend(seqs_of(&mut alerts, 100).await);
    assert!(
        consecutive(&before),
        "the ticker went on without a gap or a restart: {before:?}"
    );
    assert!(
        consecutive(&alerts_before),
        "the event stream went on without a gap or a restart: {alerts_before:?}"
    );
    for path in ["/stream/a", "/events/a", "/stream/b", "/events/b"] {
        assert_eq!(upstream.opened(path), 1, "{path} connected once");
    }
    let log = daemon.log();
    assert!(
        log.contains(&format!(
            "WebSocket connector follows the document's new routes server={api}/feed opened=1 closed=0 kept=1"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "SSE connector follows the document's new routes server={api}/events opened=1 closed=0"
        )),
        "{log}"
    );

    // Back to version 1: the second streams close, the first go on.
    let spec = specs.path().join("follow.yaml");
    std::fs::write(&spec, document(&api, port, false)).unwrap();
    let reload = daemon.next_reload(1).await;
    assert_eq!(reload["outcome"], "applied", "{reload}");
    let deadline = tokio::time::Instant::now() + WAIT;
    while upstream.open("/stream/b") + upstream.open("/events/b") > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the removed streams closed upstream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    before.extend(seqs_of(&mut ticker, 50).await);
    assert!(consecutive(&before), "{before:?}");
    assert_eq!(upstream.opened("/stream/a"), 1);
    assert_eq!(upstream.opened("/events/a"), 1);
    assert_eq!(upstream.open("/stream/a"), 1);
    assert!(
        !daemon.log().contains("connectors restarted for the change"),
        "{}",
        daemon.log()
    );
}
