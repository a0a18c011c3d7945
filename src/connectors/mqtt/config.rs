//! An MQTT server's connection settings: from the document's server and bindings, then the
//! operator's overrides.

use super::*;

/// Why an MQTT server cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("server {server}: invalid address '{address}': {reason}")]
    InvalidAddress {
        server: String,
        address: String,
        reason: String,
    },
}

/// Connection settings of one MQTT server, from the document and the daemon's configuration.
#[derive(Clone, PartialEq, Serialize)]
pub struct MqttServerConfig {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub client_id: String,
    pub clean_session: bool,
    pub keep_alive: Duration,
    pub username: Option<String>,
    #[serde(skip)]
    pub password: Option<String>,
    pub max_packet_size: usize,
    /// Unacknowledged outgoing publishes at most.
    pub inflight: u16,
    /// Extra CA (PEM) for TLS.
    #[serde(skip)]
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for MqttServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttServerConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("client_id", &self.client_id)
            .field("clean_session", &self.clean_session)
            .field("keep_alive", &self.keep_alive)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field(
                "ca_pem",
                &self.ca_pem.as_ref().map(|c| format!("{} bytes", c.len())),
            )
            .finish()
    }
}

impl MqttServerConfig {
    /// Settings for `server` of document `api`: host from the override URL or the document,
    /// client id, session and keep-alive from the server's `mqtt` binding.
    pub fn build(
        api: &str,
        server: &Server,
        overrides: &ServerOverride,
        max_packet_size: usize,
    ) -> Result<MqttServerConfig, Error> {
        let binding = server.bindings.get("mqtt");
        let mut tls = server.protocol == Protocol::SecureMqtt;
        let mut address = server.host.clone();
        let mut username = None;
        let mut password = None;
        if let Some(url) = &overrides.url {
            let (scheme, rest) = url.split_once("://").unwrap_or(("mqtt", url.as_str()));
            tls = matches!(scheme, "mqtts" | "ssl" | "secure-mqtt");
            let rest = rest.trim_end_matches('/');
            let (userinfo, host) = match rest.rsplit_once('@') {
                Some((u, h)) => (Some(u), h),
                None => (None, rest),
            };
            if let Some(userinfo) = userinfo {
                let (u, p) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                username = Some(u.to_owned());
                password = (!p.is_empty()).then(|| p.to_owned());
            }
            address = host.to_owned();
        }
        let invalid = |reason: String| Error::InvalidAddress {
            server: server.id.clone(),
            address: address.clone(),
            reason,
        };
        let (host, port) = match address.rsplit_once(':') {
            Some((h, p)) => (
                h.to_owned(),
                p.parse::<u16>()
                    .map_err(|_| invalid(format!("port '{p}' is not a number")))?,
            ),
            None => (address.clone(), if tls { 8883 } else { 1883 }),
        };
        if host.is_empty() {
            return Err(invalid("no host".into()));
        }
        let client_id = overrides
            .client_id
            .clone()
            .or_else(|| {
                binding
                    .and_then(|b| b.get("clientId"))
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| format!("stepflow-{api}-{}", server.id));
        Ok(MqttServerConfig {
            host,
            port,
            tls,
            client_id,
            clean_session: binding
                .and_then(|b| b.get("cleanSession"))
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            keep_alive: Duration::from_secs(
                binding
                    .and_then(|b| b.get("keepAlive"))
                    .and_then(|v| v.as_u64())
                    .unwrap_or(30)
                    .max(5),
            ),
            username: overrides.username.clone().or(username),
            password: overrides.password.clone().or(password),
            max_packet_size,
            inflight: 100,
            ca_pem: overrides.ca_pem.clone(),
        })
    }

    pub(super) fn to_mqtt_options(&self) -> MqttOptions {
        let mut options = MqttOptions::new(self.client_id.clone(), self.host.clone(), self.port);
        options
            .set_keep_alive(self.keep_alive)
            .set_clean_session(self.clean_session)
            .set_manual_acks(true)
            .set_inflight(self.inflight)
            // Room for the topic and headers on top of the largest payload.
            .set_max_packet_size(
                self.max_packet_size + 64 * 1024,
                self.max_packet_size + 64 * 1024,
            );
        if let Some(user) = &self.username {
            options.set_credentials(user.clone(), self.password.clone().unwrap_or_default());
        }
        if self.tls {
            let tls = match &self.ca_pem {
                Some(ca) => rumqttc::TlsConfiguration::SimpleNative {
                    ca: ca.clone(),
                    client_auth: None,
                },
                None => rumqttc::TlsConfiguration::Native,
            };
            options.set_transport(MqttTransport::tls_with_config(tls));
        }
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(host: &str, binding: serde_json::Value) -> Server {
        let mut bindings = serde_json::Map::new();
        if !binding.is_null() {
            bindings.insert("mqtt".into(), binding);
        }
        Server {
            location: crate::spec::Location::new("", ""),
            protocol_name: String::new(),
            id: "broker".into(),
            protocol: Protocol::Mqtt,
            protocol_version: None,
            host: host.into(),
            pathname: None,
            security: Vec::new(),
            bindings,
            optional: false,
        }
    }

    #[test]
    fn config_comes_from_document_and_overrides() {
        let c = MqttServerConfig::build(
            "iot",
            &server("127.0.0.1:1883", serde_json::Value::Null),
            &ServerOverride::default(),
            1024,
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port, c.tls), ("127.0.0.1", 1883, false));
        assert_eq!(c.client_id, "stepflow-iot-broker");
        assert!(!c.clean_session);

        let c = MqttServerConfig::build(
            "iot",
            &server(
                "broker.example:1883",
                serde_json::json!({"clientId": "gw-1", "cleanSession": true, "keepAlive": 10}),
            ),
            &ServerOverride {
                url: Some("mqtts://user:secret@10.0.0.5:8884".into()),
                ..ServerOverride::default()
            },
            1024,
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port, c.tls), ("10.0.0.5", 8884, true));
        assert_eq!(c.client_id, "gw-1");
        assert!(c.clean_session);
        assert_eq!(c.username.as_deref(), Some("user"));
        assert!(
            !format!("{c:?}").contains("secret"),
            "password hidden from Debug"
        );

        assert!(
            MqttServerConfig::build(
                "iot",
                &server("host:port", serde_json::Value::Null),
                &ServerOverride::default(),
                1
            )
            .is_err()
        );
    }
}
