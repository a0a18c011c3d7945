//! The on-disk form of a logged message: a small length-prefixed binary record.
//!
//! Layout (version 1), integers big-endian:
//! `u8 version | u64 timestamp_ms | str address | u8 n, n × (str name, str value) params |
//!  u16 n, n × (str name, str value) headers | str dead-letter reason | u8 origin transport |
//!  str origin server | payload (the rest)`, where `str` is `u32 length` + UTF-8 bytes.

use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;

use crate::routing::ChannelId;
use crate::routing::address::Params;
use crate::routing::envelope::{Delivered, Envelope, Origin, Transport};

const VERSION: u8 = 1;

/// Encodes an envelope for the log.
#[cfg(test)]
pub fn encode(envelope: &Envelope, dead_letter_reason: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + envelope.address.len() + envelope.payload.len());
    encode_into(&mut out, envelope, dead_letter_reason);
    out
}

/// Encodes an envelope at the end of `out` (a batch's records share one buffer).
pub fn encode_into(out: &mut Vec<u8>, envelope: &Envelope, dead_letter_reason: Option<&str>) {
    out.push(VERSION);
    out.extend_from_slice(&envelope.timestamp_ms().to_be_bytes());
    put_str(out, &envelope.address);
    out.push(envelope.params.len().min(255) as u8);
    for (name, value) in envelope.params.iter().take(255) {
        put_str(out, name);
        put_str(out, value);
    }
    out.extend_from_slice(&(envelope.headers.len().min(u16::MAX as usize) as u16).to_be_bytes());
    for (name, value) in envelope.headers.iter().take(u16::MAX as usize) {
        put_str(out, name);
        put_str(out, value);
    }
    put_str(out, dead_letter_reason.unwrap_or(""));
    out.push(envelope.origin.transport as u8);
    put_str(out, envelope.origin.server.as_deref().unwrap_or(""));
    out.extend_from_slice(&envelope.payload);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt log record: {0}")]
pub struct CorruptRecord(&'static str);

impl CorruptRecord {
    pub(super) const fn new(reason: &'static str) -> Self {
        Self(reason)
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CorruptRecord> {
        let end = self
            .at
            .checked_add(n)
            .ok_or(CorruptRecord("length overflow"))?;
        let slice = self
            .bytes
            .get(self.at..end)
            .ok_or(CorruptRecord("truncated"))?;
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, CorruptRecord> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, CorruptRecord> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u64(&mut self) -> Result<u64, CorruptRecord> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn str(&mut self) -> Result<&'a str, CorruptRecord> {
        let b = self.take(4)?;
        let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        std::str::from_utf8(self.take(len)?).map_err(|_| CorruptRecord("invalid UTF-8"))
    }
}

/// Decodes a record read from the log. The payload is sliced out of `value` without a copy.
pub fn decode(channel: &ChannelId, offset: u64, value: Bytes) -> Result<Delivered, CorruptRecord> {
    let mut c = Cursor {
        bytes: &value,
        at: 0,
    };
    if c.u8()? != VERSION {
        return Err(CorruptRecord("unknown version"));
    }
    let timestamp_ms = c.u64()?;
    let address = c.str()?.to_owned();
    let mut params = Params::default();
    for _ in 0..c.u8()? {
        let name: Arc<str> = c.str()?.into();
        params.insert(name, c.str()?.to_owned());
    }
    let header_count = c.u16()?;
    let mut headers = Vec::with_capacity(header_count as usize);
    for _ in 0..header_count {
        headers.push((c.str()?.to_owned(), c.str()?.to_owned()));
    }
    let reason = c.str()?;
    let reason = (!reason.is_empty()).then(|| reason.to_owned());
    let transport = Transport::from_index(c.u8()?);
    let server = c.str()?;
    let origin = Origin {
        transport,
        server: (!server.is_empty()).then(|| server.into()),
        connection: 0,
    };
    let payload = value.slice(c.at..);
    let envelope = Envelope {
        channel: channel.clone(),
        address,
        params,
        headers,
        payload,
        received_at: UNIX_EPOCH + Duration::from_millis(timestamp_ms),
        ingress: Instant::now(),
        origin,
    };
    Ok(Delivered::new(offset, envelope, reason))
}

/// The stored timestamp of a record, read without decoding the rest (for age retention).
pub fn timestamp_ms(value: &[u8]) -> Option<u64> {
    let b = value.get(1..9)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_be_bytes(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let mut params = Params::default();
        params.insert("deviceId".into(), "42".into());
        let mut envelope = Envelope::new(
            "iot.telemetry".into(),
            "devices/42/telemetry".into(),
            params,
            Bytes::from_static(b"{\"t\":1}"),
            Origin::upstream(Transport::Mqtt, "mosquitto".into()),
        );
        envelope
            .headers
            .push(("content-type".into(), "application/json".into()));
        let encoded = encode(&envelope, Some("schema: /t"));
        assert_eq!(timestamp_ms(&encoded), Some(envelope.timestamp_ms()));
        let channel: ChannelId = "iot.telemetry".into();
        let d = decode(&channel, 9, Bytes::from(encoded)).unwrap();
        assert_eq!(d.offset, 9);
        assert_eq!(d.envelope.address, "devices/42/telemetry");
        assert_eq!(d.envelope.params.get("deviceId"), Some("42"));
        assert_eq!(d.envelope.headers, envelope.headers);
        assert_eq!(&d.envelope.payload[..], b"{\"t\":1}");
        assert_eq!(d.envelope.origin.transport, Transport::Mqtt);
        assert_eq!(d.envelope.origin.server.as_deref(), Some("mosquitto"));
        assert_eq!(d.dead_letter_reason.as_deref(), Some("schema: /t"));
        assert_eq!(d.envelope.timestamp_ms(), envelope.timestamp_ms());
    }

    #[test]
    fn truncated_records_are_errors_not_panics() {
        let envelope = Envelope::new(
            "c".into(),
            "a".into(),
            Params::default(),
            Bytes::from_static(b"x"),
            Origin::client(Transport::Http, 1),
        );
        let encoded = encode(&envelope, None);
        let channel: ChannelId = "c".into();
        for cut in 0..encoded.len() - 1 {
            let _ = decode(&channel, 1, Bytes::copy_from_slice(&encoded[..cut]));
        }
        assert!(decode(&channel, 1, Bytes::from_static(&[9])).is_err());
    }
}
