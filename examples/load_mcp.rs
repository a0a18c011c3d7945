//! Load scenario for `/mcp`, against the daemon as a process and the scenario's own Mosquitto,
//! with a generated document of N writable channels (each with a payload schema):
//! - `tools/list` latency with N routes, next to `GET /api/v1/channels` listing the same routes;
//! - the publish round trip as an MCP `tools/call` (revision 2026-07-28, stateless, as the Python
//!   SDK sends it) next to `POST /api/v1/channels/{id}/messages` of the same message, alternating
//!   one after the other in the same run (each waits for the broker's PUBACK and the log).
//!
//!     cargo build --release && cargo run --release --example load_mcp -- --channels 1000 --rounds 2000

use std::time::{Duration, Instant};

mod common;
use common::*;

use anyhow::{Result, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

fn spec(channels: usize) -> String {
    let mut out = String::from(
        "asyncapi: 3.0.0\nx-stepflow-id: load\ninfo: {title: Load, version: 1.0.0}\nservers:\n  broker: {host: '127.0.0.1:1883', protocol: mqtt}\nchannels:\n",
    );
    for i in 0..channels {
        out.push_str(&format!(
            "  c{i}:\n    address: 'load/c{i}/{{deviceId}}'\n    description: Commands of kind {i}.\n    messages:\n      m:\n        payload:\n          type: object\n          required: [action, seq]\n          additionalProperties: false\n          properties:\n            action: {{type: string, enum: [reboot, identify]}}\n            seq: {{type: integer}}\n            note: {{type: string, maxLength: 64}}\n"
        ));
    }
    out.push_str("operations:\n");
    for i in 0..channels {
        out.push_str(&format!(
            "  send{i}:\n    action: send\n    channel: {{$ref: '#/channels/c{i}'}}\n    bindings: {{mqtt: {{qos: 1}}}}\n"
        ));
    }
    out
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).unwrap()
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1e6
}

fn mcp_request(
    client: &reqwest::Client,
    url: &str,
    id: u64,
    method: &str,
    params: Value,
) -> reqwest::RequestBuilder {
    let mut params = params;
    let name = params["name"].as_str().map(str::to_owned);
    params["_meta"] = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "load_mcp", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {},
    });
    client
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", method)
        .header("mcp-name", name.unwrap_or_default())
        .json(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
}

#[tokio::main]
async fn main() -> Result<()> {
    let flags = Flags::parse(&["channels", "rounds", "binary"])?;
    let channels: usize = flags.get("channels", 1000)?;
    let rounds: u64 = flags.get("rounds", 2000)?;
    let dir = tempfile::tempdir()?;
    let (broker_port, _broker) = start_mosquitto(dir.path(), "")?;
    let spec_path = dir.path().join("load.yaml");
    std::fs::write(&spec_path, spec(channels))?;
    let http = free_port();
    let server = format!("broker=mqtt://127.0.0.1:{broker_port}");
    let data = dir.path().join("data");
    let _daemon = start_daemon(
        &flags.binary(),
        http,
        &data,
        &[
            "--specs".as_ref(),
            spec_path.as_os_str(),
            "--server".as_ref(),
            server.as_ref(),
        ],
    )
    .await?;
    let client = reqwest::Client::new();
    let mcp = format!("http://127.0.0.1:{http}/mcp");

    // Listing: tools/list (every tool with its schemas) vs the channel listing, alternating.
    let (mut list_mcp, mut list_http) = (histogram(), histogram());
    let mut tools = 0;
    let mut bytes = (0, 0);
    for i in 0..200 {
        let started = Instant::now();
        let body = mcp_request(&client, &mcp, i, "tools/list", json!({}))
            .send()
            .await?
            .bytes()
            .await?;
        list_mcp.record(started.elapsed().as_nanos() as u64)?;
        let listed: Value = serde_json::from_slice(&body)?;
        tools = listed["result"]["tools"].as_array().map_or(0, Vec::len);
        bytes.0 = body.len();
        let started = Instant::now();
        let body = client
            .get(format!("http://127.0.0.1:{http}/api/v1/channels"))
            .send()
            .await?
            .bytes()
            .await?;
        list_http.record(started.elapsed().as_nanos() as u64)?;
        bytes.1 = body.len();
    }
    if tools != channels + 3 {
        bail!("tools/list listed {tools} tools for {channels} channels");
    }
    println!(
        "listing {channels} routes: tools/list p50 {:.2} ms p99 {:.2} ms ({} KiB) | GET /api/v1/channels p50 {:.2} ms p99 {:.2} ms ({} KiB) | ratio p50 {:.2}",
        ms(&list_mcp, 0.5),
        ms(&list_mcp, 0.99),
        bytes.0 / 1024,
        ms(&list_http, 0.5),
        ms(&list_http, 0.99),
        bytes.1 / 1024,
        ms(&list_mcp, 0.5) / ms(&list_http, 0.5),
    );

    // Publishing: the same message both ways, one after the other.
    let (mut pub_mcp, mut pub_http) = (histogram(), histogram());
    for seq in 0..rounds {
        let channel = seq as usize % channels;
        let payload = json!({"action": "identify", "seq": seq});
        let started = Instant::now();
        let r = client
            .post(format!(
                "http://127.0.0.1:{http}/api/v1/channels/load.c{channel}/messages?deviceId=d1"
            ))
            .json(&payload)
            .send()
            .await?;
        if r.status() != 202 {
            bail!("HTTP publish: {} {}", r.status(), r.text().await?);
        }
        r.bytes().await?;
        pub_http.record(started.elapsed().as_nanos() as u64)?;
        let started = Instant::now();
        let body = mcp_request(
            &client,
            &mcp,
            1000 + seq,
            "tools/call",
            json!({"name": format!("publish_load_c{channel}"), "arguments": {"deviceId": "d1", "payload": payload}}),
        )
        .send()
        .await?
        .bytes()
        .await?;
        pub_mcp.record(started.elapsed().as_nanos() as u64)?;
        let answer: Value = serde_json::from_slice(&body)?;
        if answer["result"]["isError"] == true || answer.get("error").is_some() {
            bail!("MCP publish failed: {answer}");
        }
    }
    println!(
        "publish round trip ({rounds} each, alternating): tools/call p50 {:.2} ms p99 {:.2} ms | HTTP POST p50 {:.2} ms p99 {:.2} ms | ratio p50 {:.2} p99 {:.2}",
        ms(&pub_mcp, 0.5),
        ms(&pub_mcp, 0.99),
        ms(&pub_http, 0.5),
        ms(&pub_http, 0.99),
        ms(&pub_mcp, 0.5) / ms(&pub_http, 0.5),
        ms(&pub_mcp, 0.99) / ms(&pub_http, 0.99),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}
