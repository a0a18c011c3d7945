//! MQTT bindings: a channel's topic (with `+`/`#` for receiving), and the operations' QoS and
//! retain flags.

use serde::Serialize;
use serde_json::Value;

use crate::routing::address::{AddressError, FillError, ProtocolAddress, Selector};
use crate::routing::envelope::Transport;
use crate::routing::{BindingReader, ChannelContext, ProtocolRoute, UpstreamBinding};
use crate::spec::Action;

#[derive(Debug, Clone, Serialize)]
pub struct MqttRoute {
    #[serde(skip)]
    pub topic: ProtocolAddress,
    pub filter: Selector,
    pub subscribe_qos: u8,
    pub publish_qos: u8,
    pub retain: bool,
}

impl ProtocolRoute for MqttRoute {
    fn kind(&self) -> &'static str {
        "mqtt"
    }

    fn transport(&self) -> Transport {
        Transport::Mqtt
    }

    fn address<'v>(
        &self,
        value_of: &dyn Fn(&str) -> Option<&'v str>,
        _generic: &str,
    ) -> Result<String, FillError> {
        self.topic.fill(value_of)
    }

    fn at_most_once(&self) -> Option<String> {
        (self.subscribe_qos == 0)
            .then(|| "subscribes with MQTT QoS 0: the broker does not redeliver".into())
    }

    fn describe(&self) -> String {
        format!(
            "filter {} qos {}/{}{}",
            self.filter.pattern,
            self.subscribe_qos,
            self.publish_qos,
            if self.filter.exact { "" } else { " (+match)" }
        )
    }
}

pub struct MqttBindings;

impl BindingReader for MqttBindings {
    fn read(&self, cx: &mut ChannelContext<'_>) -> Option<UpstreamBinding> {
        let Some(template) = cx.template else {
            return Some(UpstreamBinding::DynamicAddress);
        };
        let topic = match template.mqtt() {
            Ok(t) => t,
            Err(e) => {
                cx.address_error(e);
                return None;
            }
        };
        // A wildcard address is a filter to receive on; a message sent needs one topic.
        if let Some(wildcard) = topic.wildcard()
            && cx.direction.writable
        {
            cx.address_error(AddressError::Inexpressible {
                protocol: "MQTT",
                reason: format!(
                    "the gateway sends on this channel, and a message cannot be published to the wildcard '{wildcard}'; use a parameter ({{name}}) for the level instead"
                ),
            });
            return None;
        }
        let qos = |b: Option<&Value>| {
            b.and_then(|b| b.get("qos"))
                .and_then(Value::as_u64)
                .map_or(1, |q| q as u8)
        };
        let send = cx.operation_binding(Action::Send, "mqtt");
        Some(UpstreamBinding::new(MqttRoute {
            filter: topic.wildcard_selector(),
            subscribe_qos: qos(cx.operation_binding(Action::Receive, "mqtt")),
            publish_qos: qos(send),
            retain: send
                .and_then(|b| b.get("retain"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            topic,
        }))
    }
}
