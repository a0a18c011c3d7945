//! Clients of the gateway's surfaces: MQTT, WebSocket and SSE.

#[allow(unused_imports)]
use super::*;
/// An MQTT test client with its own event loop task.
pub struct MqttClient {
    pub client: rumqttc::AsyncClient,
    pub messages: tokio::sync::mpsc::UnboundedReceiver<rumqttc::Publish>,
    task: tokio::task::JoinHandle<()>,
}

impl MqttClient {
    pub async fn connect(port: u16, id: &str) -> Result<MqttClient> {
        let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_inflight(1000);
        options.set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10_000);
        let (tx, messages) = tokio::sync::mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(5), ready_rx)
            .await
            .context("MQTT test client did not connect")??;
        Ok(MqttClient {
            client,
            messages,
            task,
        })
    }

    pub async fn subscribe(&self, filter: &str) -> Result<()> {
        self.client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .await?;
        // The SUBACK arrives on the event loop; give the broker a moment to register it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(())
    }

    /// Publishes at QoS 1 (the broker has it once the PUBACK returns to the event loop).
    pub async fn publish(&self, topic: &str, payload: String) -> Result<()> {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await?;
        Ok(())
    }

    pub async fn recv(&mut self, timeout: Duration) -> Result<rumqttc::Publish> {
        tokio::time::timeout(timeout, self.messages.recv())
            .await
            .context("no MQTT message in time")?
            .ok_or_else(|| anyhow!("MQTT client stopped"))
    }
}

impl Drop for MqttClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn ws_connect(url: &str) -> Result<WsStream> {
    let (ws, _) = tokio_tungstenite::connect_async(url).await?;
    Ok(ws)
}

/// The next JSON text frame.
pub async fn ws_next_json(ws: &mut WsStream, timeout: Duration) -> Result<serde_json::Value> {
    loop {
        let frame = tokio::time::timeout(timeout, ws.next())
            .await
            .context("no WebSocket frame in time")?
            .ok_or_else(|| anyhow!("WebSocket closed"))??;
        match frame {
            tokio_tungstenite::tungstenite::Message::Text(text) => {
                return Ok(serde_json::from_str(&text)?);
            }
            tokio_tungstenite::tungstenite::Message::Close(c) => bail!("WebSocket closed: {c:?}"),
            _ => continue,
        }
    }
}

/// An SSE client over reqwest + eventsource-stream.
pub struct SseClient {
    stream: std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<eventsource_stream::Event, String>> + Send>,
    >,
}

impl SseClient {
    pub async fn connect(url: &str, last_event_id: Option<u64>) -> Result<SseClient> {
        use eventsource_stream::Eventsource;
        let mut request = reqwest::Client::new().get(url);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let response = request.send().await?;
        if response.status() != 200 {
            bail!(
                "SSE connect: {} {}",
                response.status(),
                response.text().await?
            );
        }
        let stream = response
            .bytes_stream()
            .eventsource()
            .map(|e| e.map_err(|e| e.to_string()));
        Ok(SseClient {
            stream: Box::pin(stream),
        })
    }

    pub async fn next(&mut self, timeout: Duration) -> Result<eventsource_stream::Event> {
        tokio::time::timeout(timeout, self.stream.next())
            .await
            .context("no SSE event in time")?
            .ok_or_else(|| anyhow!("SSE stream ended"))?
            .map_err(|e| anyhow!(e))
    }

    /// The next `message` event's JSON frame.
    pub async fn next_message(&mut self, timeout: Duration) -> Result<(String, serde_json::Value)> {
        loop {
            let event = self.next(timeout).await?;
            if event.event == "message" {
                return Ok((event.id, serde_json::from_str(&event.data)?));
            }
        }
    }
}

/// Publishes with mosquitto_pub until the SSE client sees the message: the upstream
/// subscription of a just-added document is made a moment after the document is.
pub async fn publish_until_seen(
    sse: &mut SseClient,
    topic: &str,
    payload: &serde_json::Value,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        mosquitto_pub(topic, payload);
        match sse.next_message(Duration::from_millis(700)).await {
            Ok((_, frame)) => return frame,
            Err(_) if tokio::time::Instant::now() < deadline => continue,
            Err(e) => panic!("no message on {topic}: {e}"),
        }
    }
}

/// The client of a removed channel is closed with 1001 `channel removed`.
pub async fn assert_closed_as_removed(ws: &mut WsStream) {
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame))) => {
                break frame.unwrap();
            }
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(
        close.code,
        tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Away
    );
    assert_eq!(close.reason.as_str(), "channel removed");
}

/// Reads `count` frames from a WebSocket client: the `seq` of each payload.
pub async fn seqs_of(ws: &mut WsStream, count: u64) -> Vec<u64> {
    let mut seqs = Vec::new();
    while (seqs.len() as u64) < count {
        match ws_next_json(ws, Duration::from_secs(20)).await {
            Ok(frame) => seqs.push(frame["payload"]["seq"].as_u64().unwrap()),
            Err(e) => panic!("after {} of {count} messages: {e}", seqs.len()),
        }
    }
    seqs
}
