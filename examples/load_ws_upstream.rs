//! Load scenario: a WebSocket feed (axum, in this process) → StepFlow (the shipped
//! `market-feed-ws.yaml`) → N WebSocket subscribers, next to the baseline feed → N clients
//! connected to the feed directly, same rate, same run.
//!
//!     cargo build --release && cargo run --release --example load_ws_upstream -- --rate 5000 --subscribers 10 --seconds 10

use std::path::PathBuf;
use std::time::Duration;

mod common;
use common::*;

use anyhow::{Result, bail};
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use tokio::sync::broadcast;

/// Every client of the feed gets every frame sent on `frames`.
async fn stream(ws: WebSocketUpgrade, State(frames): State<broadcast::Sender<String>>) -> Response {
    let mut rx = frames.subscribe();
    ws.on_upgrade(move |socket: WebSocket| async move {
        let (mut tx, mut incoming) = socket.split();
        // Subscribe frames and pongs are read and ignored.
        tokio::spawn(async move { while let Some(Ok(_)) = incoming.next().await {} });
        while let Ok(frame) = rx.recv().await {
            if tx.send(Message::text(frame)).await.is_err() {
                return;
            }
        }
    })
}

async fn send_ticks(frames: &broadcast::Sender<String>, rate: u64, seconds: u64) -> u64 {
    let total = rate * seconds;
    let started = tokio::time::Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            let _ = frames.send(format!(
                r#"{{"event":"tick","symbol":"BTC-EUR","price":1.5,"seq":{sent},"ts":{}}}"#,
                now_nanos()
            ));
            sent += 1;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    sent
}

#[tokio::main]
async fn main() -> Result<()> {
    let flags = Flags::parse(&["rate", "subscribers", "seconds"])?;
    let rate: u64 = flags.get("rate", 5000)?;
    let subscribers: usize = flags.get("subscribers", 10)?;
    let seconds: u64 = flags.get("seconds", 10)?;
    let (frames, _) = broadcast::channel::<String>(1 << 16);
    let app = axum::Router::new()
        .route("/stream", axum::routing::get(stream))
        .with_state(frames.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let feed_port = listener.local_addr()?.port();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir()?;
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(
        &config,
        format!("servers:\n  feed:\n    url: ws://127.0.0.1:{feed_port}\n    token: load\n"),
    )?;
    let spec = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("asyncapi-specs/market-feed-ws.yaml");
    let http = free_port();
    let _daemon = start_daemon(
        &flags.binary(),
        http,
        &dir.path().join("data"),
        &[
            "--specs".as_ref(),
            spec.as_os_str(),
            "--config".as_ref(),
            config.as_os_str(),
        ],
    )
    .await?;
    // The feed is optional: ready does not mean connected to it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while frames.receiver_count() == 0 {
        if std::time::Instant::now() > deadline {
            bail!("the daemon did not connect to the feed");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("rate {rate} msg/s, {subscribers} subscribers, {seconds} s");

    // Baseline: the same clients on the feed itself (the gateway's socket is connected too,
    // and logs what it gets; that is part of the machine's load in both phases).
    let results = shared(subscribers);
    let mut tasks = Vec::new();
    for r in &results {
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{feed_port}/stream")).await?;
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
    let sent = send_ticks(&frames, rate, seconds).await;
    let direct = summarize(sent, &stop_and_collect(tasks, results).await);

    let results = shared(subscribers);
    let tasks = websocket_subscribers(http, "market-feed.ticker", &results).await?;
    let sent = send_ticks(&frames, rate, seconds).await;
    let bridged = summarize(sent, &stop_and_collect(tasks, results).await);
    report(&direct, &bridged);
    Ok(())
}
