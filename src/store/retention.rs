//! How much of each log is kept. A fresh gateway bounds every log (7 days and 1 GiB per log, 10
//! GiB for all logs together), so one left running with telemetry never fills its disk; each
//! bound can be changed for all logs or per channel, or set to `unlimited`.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The defaults of a gateway whose config says nothing.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
pub const DEFAULT_MAX_BYTES: u64 = 1024 * 1024 * 1024;
pub const DEFAULT_MAX_TOTAL_BYTES: u64 = 10 * 1024 * 1024 * 1024;

/// One bound as written in the config: a number, or `unlimited`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Unlimited,
    At(u64),
}

impl Limit {
    fn get(self) -> Option<u64> {
        match self {
            Limit::Unlimited => None,
            Limit::At(n) => Some(n),
        }
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Limit::At(n)),
            Raw::Word(w) if w == "unlimited" => Ok(Limit::Unlimited),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "expected a number or `unlimited`, found `{w}`"
            ))),
        }
    }
}

impl Serialize for Limit {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Limit::Unlimited => s.serialize_str("unlimited"),
            Limit::At(n) => s.serialize_u64(*n),
        }
    }
}

/// Retention as the config writes it (top level, or under a route); an absent field falls
/// back to the level above.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSetting {
    pub max_messages: Option<Limit>,
    pub max_age_seconds: Option<Limit>,
    pub max_bytes: Option<Limit>,
    /// All logs together; top level only.
    pub max_total_bytes: Option<Limit>,
}

impl RetentionSetting {
    /// This setting over `base`.
    pub fn over(&self, base: &Retention) -> Retention {
        let pick = |field: Option<Limit>, base: Option<u64>| field.map_or(base, Limit::get);
        Retention {
            max_messages: pick(self.max_messages, base.max_messages),
            max_age: self
                .max_age_seconds
                .map_or(base.max_age, |l| l.get().map(Duration::from_secs)),
            max_bytes: pick(self.max_bytes, base.max_bytes),
        }
    }
}

/// How much of one log to keep; `None` keeps everything of that measure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Retention {
    pub max_messages: Option<u64>,
    #[serde(serialize_with = "seconds", rename = "max_age_seconds")]
    pub max_age: Option<Duration>,
    pub max_bytes: Option<u64>,
}

fn seconds<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(d) => s.serialize_some(&d.as_secs()),
        None => s.serialize_none(),
    }
}

impl Retention {
    /// Keeps everything.
    pub const UNLIMITED: Retention = Retention {
        max_messages: None,
        max_age: None,
        max_bytes: None,
    };
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_messages: None,
            max_age: Some(DEFAULT_MAX_AGE),
            max_bytes: Some(DEFAULT_MAX_BYTES),
        }
    }
}

/// Retention for every log of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// For logs of channels not named in `channels`.
    pub default: Retention,
    /// By channel id (its messages, dead letters and calls alike).
    pub channels: HashMap<String, Retention>,
    /// All logs together; past it the oldest chunks of any log go first.
    pub max_total_bytes: Option<u64>,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            default: Retention::default(),
            channels: HashMap::new(),
            max_total_bytes: Some(DEFAULT_MAX_TOTAL_BYTES),
        }
    }
}

impl RetentionPolicy {
    /// Keeps everything (for tests and benches that measure the log itself).
    pub fn unlimited() -> Self {
        RetentionPolicy {
            default: Retention::UNLIMITED,
            channels: HashMap::new(),
            max_total_bytes: None,
        }
    }

    pub fn for_channel(&self, channel: &str) -> &Retention {
        self.channels.get(channel).unwrap_or(&self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_fall_back_level_by_level_and_say_unlimited() {
        let top: RetentionSetting =
            serde_json::from_str(r#"{"max_bytes": 1000, "max_age_seconds": "unlimited"}"#).unwrap();
        let global = top.over(&Retention::default());
        assert_eq!(global.max_bytes, Some(1000));
        assert_eq!(global.max_age, None);
        assert_eq!(global.max_messages, None);
        let channel: RetentionSetting =
            serde_json::from_str(r#"{"max_messages": 5, "max_bytes": "unlimited"}"#).unwrap();
        let resolved = channel.over(&global);
        assert_eq!(resolved.max_messages, Some(5));
        assert_eq!(resolved.max_bytes, None);
        assert_eq!(resolved.max_age, None);
        assert_eq!(
            RetentionSetting::default().over(&Retention::default()),
            Retention::default(),
            "a config that says nothing gets the defaults"
        );
        let bad = serde_json::from_str::<RetentionSetting>(r#"{"max_bytes": "lots"}"#);
        assert!(bad.unwrap_err().to_string().contains("unlimited"));
    }
}
