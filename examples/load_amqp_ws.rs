//! Load scenario: publisher → RabbitMQ → StepFlow → N WebSocket subscribers, next to the
//! baseline publisher → RabbitMQ → N AMQP consumers (a queue each), same rate, same run.
//! Uses the machine's RabbitMQ (127.0.0.1:5672, guest) and its own exchange and queues.
//!
//!     cargo build --release && cargo run --release --example load_amqp_ws -- --rate 5000 --subscribers 10 --seconds 10

mod common;
use common::*;
use std::time::Duration;

use anyhow::Result;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

async fn publish(exchange: &str, routing_key: &str, rate: u64, seconds: u64) -> Result<u64> {
    let connection =
        Connection::connect("amqp://127.0.0.1:5672", ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let total = rate * seconds;
    let started = tokio::time::Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut confirms = futures::stream::FuturesUnordered::new();
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            let body = format!(r#"{{"temperature":1,"seq":{sent},"ts":{}}}"#, now_nanos());
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    BasicProperties::default(),
                )
                .await?;
            confirms.push(confirm);
            sent += 1;
        }
        while let Some(Some(_)) = futures::FutureExt::now_or_never(confirms.next()) {}
    }
    while confirms.next().await.is_some() {}
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(sent)
}

#[tokio::main]
async fn main() -> Result<()> {
    let flags = Flags::parse(&["rate", "subscribers", "seconds"])?;
    let rate: u64 = flags.get("rate", 5000)?;
    let subscribers: usize = flags.get("subscribers", 10)?;
    let seconds: u64 = flags.get("seconds", 10)?;
    let prefix = format!("load{}", std::process::id());
    let exchange = format!("{prefix}.events");
    let dir = tempfile::tempdir()?;
    let spec = dir.path().join("load.yaml");
    std::fs::write(
        &spec,
        format!(
            r#"asyncapi: 3.0.0
x-stepflow-id: load
info: {{title: Load, version: 1.0.0}}
servers:
  rabbit: {{host: '127.0.0.1:5672', protocol: amqp}}
channels:
  telemetry:
    address: 'devices/{{deviceId}}/telemetry'
    bindings:
      amqp:
        is: routingKey
        exchange: {{name: {exchange}, type: topic, durable: false, autoDelete: false}}
        queue: {{name: {prefix}.bridged, durable: false}}
    messages:
      reading:
        payload: {{type: object, required: [temperature, seq, ts], properties: {{temperature: {{type: number}}, seq: {{type: integer}}, ts: {{type: integer}}}}}}
operations:
  receive: {{action: receive, channel: {{$ref: '#/channels/telemetry'}}}}
"#
        ),
    )?;
    let http = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let _daemon = start_daemon(
        &flags.binary(),
        http,
        &dir.path().join("data"),
        &["--specs".as_ref(), spec.as_os_str()],
    )
    .await?;
    println!("rate {rate} msg/s, {subscribers} subscribers, {seconds} s");

    let admin =
        Connection::connect("amqp://127.0.0.1:5672", ConnectionProperties::default()).await?;
    let results = shared(subscribers);
    let mut tasks = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let channel = admin.create_channel().await?;
        let queue = format!("{prefix}.direct{i}");
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "direct.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            let _channel = channel;
            while let Some(Ok(d)) = consumer.next().await {
                if let Some(ts) = ts_of(&d.data) {
                    r.lock().await.record(ts);
                }
                let _ = d.acker.ack(BasicAckOptions::default()).await;
            }
        }));
    }
    let sent = publish(&exchange, "direct.1", rate, seconds).await?;
    let direct = summarize(sent, &stop_and_collect(tasks, results).await);

    let results = shared(subscribers);
    let tasks = websocket_subscribers(http, "load.telemetry", &results).await?;
    let sent = publish(&exchange, "devices.1.telemetry", rate, seconds).await?;
    let bridged = summarize(sent, &stop_and_collect(tasks, results).await);
    report(&direct, &bridged);
    let cleanup = admin.create_channel().await?;
    let _ = cleanup
        .queue_delete(
            format!("{prefix}.bridged").as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await;
    let _ = cleanup
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    Ok(())
}
