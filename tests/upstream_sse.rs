//! The SSE upstream connector against an event server the test runs on loopback (axum),
//! serving the shipped `asyncapi-specs/alerts-sse.yaml`, with the daemon as a process.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use common::*;
use futures::Stream;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);
/// The reconnection time the server asks for with `retry:`.
const RETRY: Duration = Duration::from_millis(700);

/// What the server saw of one request.
#[derive(Debug, Clone)]
struct Request {
    site: String,
    last_event_id: Option<String>,
    authorization: Option<String>,
    at: Instant,
}

#[derive(Clone, Default)]
struct Alerts {
    requests: Arc<Mutex<Vec<Request>>>,
    /// When the first stream was ended by the server.
    first_ended: Arc<Mutex<Option<Instant>>>,
}

fn alert(seq: u64) -> Result<Event, Infallible> {
    Ok(Event::default().id(seq.to_string()).event("alert").data(
        json!({"severity": "warning", "text": format!("alert {seq}"), "seq": seq}).to_string(),
    ))
}

/// First request: `retry:`, alerts 1–5, then the server ends the stream. Second: it resumes
/// after `Last-Event-ID` up to 8, then a `resolved` event 9, and stays open. Later requests
/// stay open and send nothing.
async fn events(
    Path(site): Path<String>,
    headers: HeaderMap,
    State(alerts): State<Alerts>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let last_event_id = header("last-event-id");
    let number = {
        let mut r = alerts.requests.lock().unwrap();
        r.push(Request {
            site,
            last_event_id: last_event_id.clone(),
            authorization: header("authorization"),
            at: Instant::now(),
        });
        r.len()
    };
    let resume_after: u64 = last_event_id.and_then(|id| id.parse().ok()).unwrap_or(0);
    let stream = async_stream::stream! {
        match number {
            1 => {
                yield Ok(Event::default().retry(RETRY).comment("reconnect after this long"));
                for seq in 1..=5 {
                    yield alert(seq);
                }
                *alerts.first_ended.lock().unwrap() = Some(Instant::now());
            }
            2 => {
                for seq in resume_after + 1..=8 {
                    yield alert(seq);
                }
                yield Ok(Event::default().id("9").event("resolved").data(json!({"seq": 9}).to_string()));
                futures::future::pending::<()>().await;
            }
            _ => futures::future::pending::<()>().await,
        }
    };
    Sse::new(stream)
}

async fn start_alerts() -> (u16, Alerts) {
    let alerts = Alerts::default();
    let app = axum::Router::new()
        .route("/events/{site}", axum::routing::get(events))
        .with_state(alerts.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, alerts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_clients_and_the_log_and_the_stream_resumes_with_last_event_id() {
    let (port, alerts) = start_alerts().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stepflow.yaml");
    std::fs::write(
        &config,
        format!(
            "servers:\n  alerting:\n    url: http://127.0.0.1:{port}\n    token: ${{STEPFLOW_TEST_ALERTS_TOKEN}}\n"
        ),
    )
    .unwrap();
    let spec = format!(
        "{}/asyncapi-specs/alerts-sse.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let args = ["--specs", &spec, "--config", config.to_str().unwrap()];
    let env = [("STEPFLOW_TEST_ALERTS_TOKEN", "s3cret")];
    let mut daemon = Daemon::start_with_env(&args, &env).await.unwrap();

    let mut ws = ws_connect(&daemon.ws_url("/ws/alerts.alerts?from=0"))
        .await
        .unwrap();
    let mut ids = Vec::new();
    while ids.len() < 9 {
        let frame = ws_next_json(&mut ws, WAIT).await.unwrap();
        let id: u64 = frame["headers"]["sse_id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(frame["payload"]["seq"], id);
        assert_eq!(frame["params"]["site"], "main");
        let (event, message) = if id == 9 {
            ("resolved", "resolved")
        } else {
            ("alert", "raised")
        };
        assert_eq!(frame["headers"]["sse_event"], event, "{frame}");
        assert_eq!(frame["headers"]["asyncapi_message"], message, "{frame}");
        ids.push(id);
    }
    assert_eq!(ids, (1..=9).collect::<Vec<_>>(), "no gap, no duplicate");
    let mut sse = SseClient::connect(&daemon.url("/sse/alerts.alerts?from=0"), None)
        .await
        .unwrap();
    let (_, first) = sse.next_message(WAIT).await.unwrap();
    assert_eq!(first["headers"]["sse_id"], "1");
    assert_eq!(daemon.wait_for_log("alerts.alerts", 9).await.len(), 9);

    // The server saw the resume with the right id, after the delay it asked for.
    let requests = alerts.requests.lock().unwrap().clone();
    assert!(requests.len() >= 2, "{requests:?}");
    assert_eq!(requests[0].last_event_id, None);
    assert_eq!(requests[1].last_event_id.as_deref(), Some("5"));
    let ended = alerts.first_ended.lock().unwrap().unwrap();
    let waited = requests[1].at.duration_since(ended);
    assert!(
        waited >= RETRY.mul_f64(0.9) && waited < RETRY * 4,
        "reconnected after {waited:?}; the server asked for {RETRY:?}"
    );
    for r in &requests {
        assert_eq!(r.site, "main");
        assert_eq!(r.authorization.as_deref(), Some("Bearer s3cret"));
    }
    println!("SSE test: reconnected {waited:?} after the drop (retry: {RETRY:?})");

    // A restart resumes from the log: the next request carries the last id logged.
    daemon.terminate(Duration::from_secs(10)).unwrap();
    let before = alerts.requests.lock().unwrap().len();
    daemon.restart().await.unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let requests = alerts.requests.lock().unwrap().clone();
        if requests.len() > before {
            assert_eq!(requests[before].last_event_id.as_deref(), Some("9"));
            break;
        }
        assert!(Instant::now() < deadline, "no request after the restart");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !daemon.log().contains("s3cret"),
        "the token never reaches the log"
    );
}
