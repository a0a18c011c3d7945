//! The WebSocket upstream connector against a feed server the test runs on loopback (axum),
//! serving the shipped `asyncapi-specs/market-feed-ws.yaml`, with the daemon as a process.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(15);
/// Ticks the feed sends on its first connection before dropping it, and in all.
const BEFORE_DROP: u64 = 5;
const TICKS: u64 = 10;

/// What the feed saw of one client connection.
#[derive(Debug, Clone)]
struct Connection {
    api_key: Option<String>,
    format: Option<String>,
    subscribe: Option<Value>,
}

#[derive(Clone)]
struct Feed {
    connections: Arc<Mutex<Vec<Connection>>>,
    /// Frames clients sent after their subscribe frame.
    received: mpsc::UnboundedSender<Value>,
}

async fn stream(
    ws: WebSocketUpgrade,
    headers: HeaderMap,
    Query(query): Query<std::collections::HashMap<String, String>>,
    State(feed): State<Feed>,
) -> Response {
    let api_key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let format = query.get("format").cloned();
    ws.on_upgrade(move |socket| serve(socket, feed, api_key, format))
}

/// The feed: waits for the subscribe frame, then sends ticks. The first connection is dropped
/// after `BEFORE_DROP` ticks; the next one gets the rest and a heartbeat, then stays open.
async fn serve(socket: WebSocket, feed: Feed, api_key: Option<String>, format: Option<String>) {
    let (mut tx, mut rx) = socket.split();
    let subscribe = match rx.next().await {
        Some(Ok(Message::Text(t))) => serde_json::from_str(&t).ok(),
        _ => None,
    };
    let number = {
        let mut c = feed.connections.lock().unwrap();
        c.push(Connection {
            api_key,
            format,
            subscribe,
        });
        c.len()
    };
    let ticks = if number == 1 {
        0..BEFORE_DROP
    } else if number == 2 {
        BEFORE_DROP..TICKS
    } else {
        0..0
    };
    for seq in ticks {
        let tick = json!({"event": "tick", "symbol": "BTC-EUR", "price": 50_000.0 + seq as f64, "seq": seq});
        if tx.send(Message::text(tick.to_string())).await.is_err() {
            return;
        }
    }
    if number == 1 {
        // Dropped mid-stream, without a close frame.
        return;
    }
    if number == 2 {
        let _ = tx
            .send(Message::text(json!({"event": "heartbeat"}).to_string()))
            .await;
    }
    while let Some(Ok(frame)) = rx.next().await {
        if let Message::Text(t) = frame
            && let Ok(v) = serde_json::from_str(&t)
        {
            let _ = feed.received.send(v);
        }
    }
}

async fn start_feed() -> (u16, Feed, mpsc::UnboundedReceiver<Value>) {
    let (received, frames) = mpsc::unbounded_channel();
    let feed = Feed {
        connections: Arc::default(),
        received,
    };
    let app = axum::Router::new()
        .route("/stream", axum::routing::get(stream))
        .with_state(feed.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, feed, frames)
}

fn shipped(name: &str) -> String {
    format!("{}/asyncapi-specs/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_reaches_websocket_sse_and_the_log_across_a_drop_and_orders_reach_the_feed() {
    let (port, feed, mut received) = start_feed().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(
        &config,
        format!(
            "servers:\n  feed:\n    url: ws://127.0.0.1:{port}\n    token: ${{STEPFLOW_TEST_FEED_KEY}}\n"
        ),
    )
    .unwrap();
    let spec = shipped("market-feed-ws.yaml");
    let daemon = Daemon::start_with_env(
        &["--specs", &spec, "--config", config.to_str().unwrap()],
        &[("STEPFLOW_TEST_FEED_KEY", "k-123")],
    )
    .await
    .unwrap();

    // Every tick across the drop, and the heartbeat, told apart by their message.
    let mut ws = ws_connect(&daemon.ws_url("/ws/market-feed.ticker?from=0"))
        .await
        .unwrap();
    let mut seqs = Vec::new();
    let mut heartbeats = 0;
    while seqs.len() < TICKS as usize || heartbeats == 0 {
        let frame = ws_next_json(&mut ws, WAIT).await.unwrap();
        match frame["headers"]["asyncapi_message"].as_str() {
            Some("tick") => seqs.push(frame["payload"]["seq"].as_u64().unwrap()),
            Some("heartbeat") => heartbeats += 1,
            other => panic!("unexpected message {other:?}: {frame}"),
        }
    }
    assert_eq!(seqs, (0..TICKS).collect::<Vec<_>>());
    let mut sse = SseClient::connect(&daemon.url("/sse/market-feed.ticker?from=0"), None)
        .await
        .unwrap();
    let (_, first) = sse.next_message(WAIT).await.unwrap();
    assert_eq!(first["payload"]["seq"], 0);
    assert_eq!(
        daemon
            .wait_for_log("market-feed.ticker", TICKS as usize + 1)
            .await
            .len(),
        TICKS as usize + 1
    );

    // The gateway reconnected after the drop, each time with its key, query and subscribe frame.
    let connections = feed.connections.lock().unwrap().clone();
    assert!(connections.len() >= 2, "{connections:?}");
    for c in &connections {
        assert_eq!(c.api_key.as_deref(), Some("k-123"));
        assert_eq!(c.format.as_deref(), Some("json"));
        assert_eq!(
            c.subscribe,
            Some(json!({"type": "subscribe", "channels": ["ticker"]}))
        );
    }
    let status = daemon.get_json("/api/v1/connections").await.unwrap();
    let feed_status = status["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["api"] == "market-feed")
        .unwrap()
        .clone();
    assert_eq!(feed_status["state"], "connected", "{feed_status}");
    assert!(feed_status["disconnects"].as_u64().unwrap() >= 1);
    assert!(
        !daemon.log().contains("k-123"),
        "the key never reaches the log"
    );

    // Orders go the other way, on the same socket: by POST and by a client frame.
    let order = json!({"symbol": "BTC-EUR", "side": "buy", "quantity": 0.5});
    let response = reqwest::Client::new()
        .post(daemon.url("/api/v1/channels/market-feed.orders/messages"))
        .header("content-type", "application/json")
        .body(order.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let got = tokio::time::timeout(WAIT, received.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, order);
    let mut orders = ws_connect(&daemon.ws_url("/ws/market-feed.orders"))
        .await
        .unwrap();
    let sell = json!({"symbol": "ETH-EUR", "side": "sell", "quantity": 2});
    orders
        .send(WsMessage::text(sell.to_string()))
        .await
        .unwrap();
    let ack = ws_next_json(&mut orders, WAIT).await.unwrap();
    assert_eq!(ack["type"], "ack", "{ack}");
    let got = tokio::time::timeout(WAIT, received.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, sell);
    // An invalid order is refused by the gateway and never reaches the feed.
    let response = reqwest::Client::new()
        .post(daemon.url("/api/v1/channels/market-feed.orders/messages"))
        .header("content-type", "application/json")
        .body(json!({"symbol": "BTC-EUR", "side": "hold", "quantity": 1}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), received.recv())
            .await
            .is_err(),
        "the feed saw nothing more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_that_is_down_is_reported_and_joined_when_it_comes_up() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(
        &config,
        format!(
            "servers:\n  feed:\n    url: ws://127.0.0.1:{port}\n    token: k\nroutes:\n  market-feed.ticker:\n    subscribe: [{{type: subscribe, channels: [ticker, trades]}}]\n"
        ),
    )
    .unwrap();
    let spec = shipped("market-feed-ws.yaml");
    // The shipped feed is optional: the daemon is ready without it, and says it is down.
    let daemon = Daemon::start(&["--specs", &spec, "--config", config.to_str().unwrap()])
        .await
        .unwrap();
    let response = reqwest::Client::new()
        .post(daemon.url("/api/v1/channels/market-feed.orders/messages"))
        .header("content-type", "application/json")
        .body(json!({"symbol": "BTC-EUR", "side": "buy", "quantity": 1}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        503,
        "nothing is accepted that cannot be sent"
    );
    let status = daemon.get_json("/api/v1/connections").await.unwrap();
    assert_eq!(
        status["connections"][0]["state"], "disconnected",
        "{status}"
    );

    let (received_tx, _received) = mpsc::unbounded_channel();
    let feed = Feed {
        connections: Arc::default(),
        received: received_tx,
    };
    let app = axum::Router::new()
        .route("/stream", axum::routing::get(stream))
        .with_state(feed.clone());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let log = daemon
        .wait_for_log("market-feed.ticker", BEFORE_DROP as usize)
        .await;
    assert!(log.len() >= BEFORE_DROP as usize, "{}", daemon.log());
    // The configured subscribe frame replaces the document's.
    assert_eq!(
        feed.connections.lock().unwrap()[0].subscribe,
        Some(json!({"type": "subscribe", "channels": ["ticker", "trades"]}))
    );
}
