//! What travels on a route: the [`Envelope`] (a message on its way in) and the [`Delivered`]
//! message (logged, with its offset) that subscribers receive.
//!
//! A payload is allocated once when it arrives (`Bytes`) and moves by reference count after that;
//! the JSON frame web clients receive is rendered once per message, not once per subscriber.

use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;

use super::ChannelId;
use super::address::Params;

/// How a message entered or leaves the gateway. A closed list: it is a metric label.
///
/// The log stores a message's origin transport as this byte (`repr(u8)`, read back with
/// [`Transport::from_index`]): a new variant is appended with the next number, and no variant is
/// ever renumbered or removed, or records already on disk change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Transport {
    Unknown = 0,
    Mqtt = 1,
    Kafka = 2,
    Amqp = 3,
    Http = 4,
    Ws = 5,
    Sse = 6,
    Bridge = 7,
    Replay = 8,
    /// An AI agent's tool call over MCP.
    Mcp = 9,
}

impl Transport {
    pub const ALL: [Transport; 10] = [
        Transport::Unknown,
        Transport::Mqtt,
        Transport::Kafka,
        Transport::Amqp,
        Transport::Http,
        Transport::Ws,
        Transport::Sse,
        Transport::Bridge,
        Transport::Replay,
        Transport::Mcp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Unknown => "unknown",
            Transport::Mqtt => "mqtt",
            Transport::Kafka => "kafka",
            Transport::Amqp => "amqp",
            Transport::Http => "http",
            Transport::Ws => "ws",
            Transport::Sse => "sse",
            Transport::Bridge => "bridge",
            Transport::Replay => "replay",
            Transport::Mcp => "mcp",
        }
    }

    pub fn from_index(i: u8) -> Transport {
        Self::ALL
            .get(i as usize)
            .copied()
            .unwrap_or(Transport::Unknown)
    }
}

/// Where a message entered the gateway, so a sink never echoes it back to its origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Origin {
    pub transport: Transport,
    /// The upstream server id, for broker sources.
    pub server: Option<Arc<str>>,
    /// A connection id unique in this process (a WebSocket client), 0 when not applicable.
    pub connection: u64,
}

impl Origin {
    pub fn upstream(transport: Transport, server: Arc<str>) -> Self {
        Self {
            transport,
            server: Some(server),
            connection: 0,
        }
    }

    pub fn client(transport: Transport, connection: u64) -> Self {
        Self {
            transport,
            server: None,
            connection,
        }
    }
}

/// Message headers (MQTT 5 user properties, Kafka headers, AMQP headers, selected HTTP headers).
pub type Headers = Vec<(String, String)>;

/// A message on its way into a route.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub channel: ChannelId,
    /// The concrete address (`devices/42/telemetry`).
    pub address: String,
    pub params: Params,
    pub headers: Headers,
    pub payload: Bytes,
    /// Wall-clock arrival time, stored with the message.
    pub received_at: SystemTime,
    /// Monotonic arrival time, for the ingress → delivery latency histogram.
    pub ingress: Instant,
    pub origin: Origin,
}

impl Envelope {
    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn new(
        channel: ChannelId,
        address: String,
        params: Params,
        payload: Bytes,
        origin: Origin,
    ) -> Self {
        Self {
            channel,
            address,
            params,
            headers: Headers::new(),
            payload,
            received_at: SystemTime::now(),
            ingress: Instant::now(),
            origin,
        }
    }

    /// Milliseconds since the Unix epoch of `received_at`.
    pub fn timestamp_ms(&self) -> u64 {
        self.received_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// A logged message, as subscribers and replay see it.
#[derive(Debug)]
pub struct Delivered {
    pub offset: u64,
    pub envelope: Envelope,
    /// Why it is in a dead-letter log, for dead letters.
    pub dead_letter_reason: Option<String>,
    frame: OnceLock<Bytes>,
    sse_event: OnceLock<Bytes>,
}

/// The JSON frame of a message: `{offset, address, params, headers, payload, timestamp}`.
#[derive(Serialize)]
struct Frame<'a> {
    offset: u64,
    channel: &'a str,
    address: &'a str,
    params: serde_json::Map<String, serde_json::Value>,
    headers: serde_json::Map<String, serde_json::Value>,
    payload: PayloadField<'a>,
    timestamp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    dead_letter_reason: Option<&'a str>,
}

/// JSON payloads are embedded as JSON; UTF-8 text as a string; anything else as base64.
enum PayloadField<'a> {
    Json(&'a serde_json::value::RawValue),
    Text(&'a str),
    Binary(&'a [u8]),
}

impl Serialize for PayloadField<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            PayloadField::Json(raw) => raw.serialize(s),
            PayloadField::Text(text) => s.serialize_str(text),
            PayloadField::Binary(bytes) => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("base64", &base64_encode(bytes))?;
                map.end()
            }
        }
    }
}

impl Delivered {
    pub fn new(offset: u64, envelope: Envelope, dead_letter_reason: Option<String>) -> Self {
        Self {
            offset,
            envelope,
            dead_letter_reason,
            frame: OnceLock::new(),
            sse_event: OnceLock::new(),
        }
    }

    /// The frame as one `text/event-stream` event (`id:` the offset, `event: message`, the
    /// frame as `data:`), rendered on first use and shared by every SSE subscriber: a stream
    /// then writes the same bytes to each client instead of formatting an event per client.
    pub fn sse_event(&self) -> &Bytes {
        self.sse_event.get_or_init(|| {
            let id = self.offset.to_string();
            sse_event(Some(&id), "message", self.frame())
        })
    }

    /// The JSON frame, rendered on first use and shared by every subscriber after that.
    pub fn frame(&self) -> &Bytes {
        self.frame.get_or_init(|| {
            let e = &self.envelope;
            let raw: Option<&serde_json::value::RawValue> = serde_json::from_slice(&e.payload).ok();
            let payload = match raw {
                Some(raw) => PayloadField::Json(raw),
                None => match std::str::from_utf8(&e.payload) {
                    Ok(text) => PayloadField::Text(text),
                    Err(_) => PayloadField::Binary(&e.payload),
                },
            };
            let frame = Frame {
                offset: self.offset,
                channel: &e.channel,
                address: &e.address,
                params: e
                    .params
                    .iter()
                    .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v.to_owned())))
                    .collect(),
                headers: e
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                    .collect(),
                payload,
                timestamp: e.timestamp_ms(),
                dead_letter_reason: self.dead_letter_reason.as_deref(),
            };
            // Serializing these plain types cannot fail.
            Bytes::from(serde_json::to_vec(&frame).unwrap_or_default())
        })
    }
}

/// One `text/event-stream` event. `data` becomes one `data:` line per line of it (a JSON frame
/// holds raw newlines when its payload was pretty-printed), so a client joins them back with
/// `\n`, as the format says.
pub fn sse_event(id: Option<&str>, event: &str, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + id.map_or(0, str::len) + event.len() + 32);
    if let Some(id) = id {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(id.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.as_bytes());
    out.push(b'\n');
    for line in data.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.push(b'\n');
    Bytes::from(out)
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_bytes_on_disk_keep_their_meaning() {
        // The numbers records were written with; appending a variant keeps every one of them.
        let on_disk = [
            (0, "unknown"),
            (1, "mqtt"),
            (2, "kafka"),
            (3, "amqp"),
            (4, "http"),
            (5, "ws"),
            (6, "sse"),
            (7, "bridge"),
            (8, "replay"),
            (9, "mcp"),
        ];
        for (byte, name) in on_disk {
            assert_eq!(Transport::from_index(byte).as_str(), name);
        }
        for (i, t) in Transport::ALL.iter().enumerate() {
            assert_eq!(*t as u8 as usize, i, "{t:?} is out of place in ALL");
        }
    }

    fn envelope(payload: &'static [u8]) -> Envelope {
        let mut params = Params::default();
        params.insert("deviceId".into(), "42".into());
        Envelope::new(
            "iot.telemetry".into(),
            "devices/42/telemetry".into(),
            params,
            Bytes::from_static(payload),
            Origin::upstream(Transport::Mqtt, "mosquitto".into()),
        )
    }

    #[test]
    fn frames_embed_json_payloads_and_params() {
        let d = Delivered::new(7, envelope(br#"{"temperature": 21.5}"#), None);
        let frame: serde_json::Value = serde_json::from_slice(d.frame()).unwrap();
        assert_eq!(frame["offset"], 7);
        assert_eq!(frame["params"]["deviceId"], "42");
        assert_eq!(frame["payload"]["temperature"], 21.5);
        assert_eq!(frame["address"], "devices/42/telemetry");
    }

    #[test]
    fn frames_carry_text_and_binary() {
        let text = Delivered::new(1, envelope(b"on"), None);
        let frame: serde_json::Value = serde_json::from_slice(text.frame()).unwrap();
        assert_eq!(frame["payload"], "on");
        let binary = Delivered::new(1, envelope(&[0xff, 0x00, 0x10]), None);
        let frame: serde_json::Value = serde_json::from_slice(binary.frame()).unwrap();
        assert_eq!(frame["payload"]["base64"], "/wAQ");
    }

    #[test]
    fn sse_events_carry_each_line_of_the_frame_as_data() {
        let d = Delivered::new(7, envelope(b"{\n  \"temperature\": 21.5\n}"), None);
        let event = std::str::from_utf8(d.sse_event()).unwrap();
        assert!(
            event.starts_with("id: 7\nevent: message\ndata: "),
            "{event}"
        );
        assert!(event.ends_with("\n\n"));
        let data: Vec<&str> = event
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        let frame: serde_json::Value = serde_json::from_str(&data.join("\n")).unwrap();
        assert_eq!(frame["payload"]["temperature"], 21.5);
        assert_eq!(
            sse_event(None, "lagged", b"{}"),
            Bytes::from_static(b"event: lagged\ndata: {}\n\n")
        );
    }

    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(input.as_bytes()), expected);
        }
    }
}
