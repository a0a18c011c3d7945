//! Address templates (`devices/{deviceId}/telemetry`) and their per-protocol forms.
//!
//! A template is parsed once. Each protocol gets a [`ProtocolAddress`]: the template in that
//! protocol's syntax plus the rule for what a parameter value may contain there. From it come the
//! broker-side selector (MQTT filter `devices/+/telemetry`, AMQP topic pattern
//! `devices.*.telemetry`, Kafka topic or regex), the extraction of parameters from a concrete
//! address, and the filling of parameters on send. All plain data, no I/O.
//!
//! ```
//! use stepflow::routing::address::AddressTemplate;
//!
//! let template = AddressTemplate::parse("devices/{deviceId}/telemetry").unwrap();
//! let mqtt = template.mqtt().unwrap();
//! assert_eq!(mqtt.wildcard_selector().pattern, "devices/+/telemetry");
//! assert_eq!(mqtt.extract("devices/42/telemetry").unwrap().get("deviceId"), Some("42"));
//! assert_eq!(mqtt.fill(|_| Some("7")).unwrap(), "devices/7/telemetry");
//!
//! let amqp = template.amqp().unwrap();
//! assert_eq!(amqp.wildcard_selector().pattern, "devices.*.telemetry");
//! assert!(template.kafka().is_err(), "'/' is not legal in a Kafka topic");
//! ```

use std::fmt;
use std::sync::Arc;

use crate::spec::is_valid_parameter_name as is_parameter_name;
use crate::template::{Piece, Template, TemplateError};

/// Why an address cannot be used, or cannot be used with a protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("the address is empty")]
    Empty,
    #[error("'{{' at byte {at} is never closed")]
    UnclosedBrace { at: usize },
    #[error("'}}' at byte {at} has no matching '{{'")]
    UnmatchedBrace { at: usize },
    #[error("'{{' at byte {at} is inside another placeholder")]
    NestedBrace { at: usize },
    #[error("parameter name '{name}' is invalid: names match ^[A-Za-z0-9_\\-]+$")]
    BadParameterName { name: String },
    #[error(
        "parameters '{first}' and '{second}' touch: with nothing between them no value can be split"
    )]
    AdjacentParameters { first: String, second: String },
    #[error("parameter '{name}' appears twice")]
    RepeatedParameter { name: String },
    #[error("{protocol} cannot express it: {reason}")]
    Inexpressible {
        protocol: &'static str,
        reason: String,
    },
}

/// Why parameters cannot be filled into an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FillError {
    #[error("parameter '{name}' is missing")]
    Missing { name: String },
    #[error("parameter '{name}' is empty")]
    Empty { name: String },
    #[error("parameter '{name}' value '{value}' is not one of: {allowed}")]
    NotAllowed {
        name: String,
        value: String,
        allowed: String,
    },
    #[error("parameter '{name}' value '{value}' does not match its schema: {reason}")]
    SchemaMismatch {
        name: String,
        value: String,
        reason: String,
    },
    #[error(
        "parameter '{name}' value '{value}' contains '{character}', which {protocol} addresses reserve"
    )]
    ReservedCharacter {
        name: String,
        value: String,
        character: char,
        protocol: &'static str,
    },
    #[error("the address has the MQTT wildcard '{wildcard}': there is no one topic to send to")]
    Wildcard { wildcard: char },
}

impl FillError {
    /// The parameter the error is about.
    pub fn parameter(&self) -> &str {
        match self {
            FillError::Missing { name }
            | FillError::Empty { name }
            | FillError::NotAllowed { name, .. }
            | FillError::SchemaMismatch { name, .. }
            | FillError::ReservedCharacter { name, .. } => name,
            FillError::Wildcard { .. } => "address",
        }
    }
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    Param(Arc<str>),
    /// MQTT's `+`, written in the address itself (`devices/+/data`): any one level, unnamed.
    /// Only [`AddressTemplate::mqtt`] produces it.
    AnyLevel,
    /// MQTT's `#` as the last level (`site/#`): any remaining levels.
    AnyTail,
}

/// A parsed channel address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressTemplate {
    raw: String,
    segments: Vec<Segment>,
}

/// Parameter values taken from a concrete address, in template order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params(Vec<(Arc<str>, String)>);

impl Params {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (&**n, v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn insert(&mut self, name: Arc<str>, value: String) {
        self.0.push((name, value));
    }
}

impl AddressTemplate {
    /// Parses `{name}` placeholders between literal text.
    pub fn parse(raw: &str) -> Result<AddressTemplate, AddressError> {
        if raw.is_empty() {
            return Err(AddressError::Empty);
        }
        let template = Template::parse(raw).map_err(|e| match e {
            TemplateError::Unclosed { at } => AddressError::UnclosedBrace { at },
            TemplateError::Unmatched { at } => AddressError::UnmatchedBrace { at },
            TemplateError::Nested { at } => AddressError::NestedBrace { at },
        })?;
        let mut segments = Vec::new();
        for piece in template.pieces() {
            match piece {
                Piece::Text(text) => segments.push(Segment::Literal(text.clone())),
                Piece::Placeholder(name) => {
                    if !is_parameter_name(name) {
                        return Err(AddressError::BadParameterName { name: name.clone() });
                    }
                    if let Some(Segment::Param(prev)) = segments.last() {
                        return Err(AddressError::AdjacentParameters {
                            first: prev.to_string(),
                            second: name.clone(),
                        });
                    }
                    if segments
                        .iter()
                        .any(|s| matches!(s, Segment::Param(p) if **p == **name))
                    {
                        return Err(AddressError::RepeatedParameter { name: name.clone() });
                    }
                    segments.push(Segment::Param(name.as_str().into()));
                }
            }
        }
        Ok(AddressTemplate {
            raw: raw.to_owned(),
            segments,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Parameter names in order of appearance.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Param(p) => Some(&**p),
            _ => None,
        })
    }

    pub fn has_params(&self) -> bool {
        self.params().next().is_some()
    }

    /// The template as written, for HTTP paths, WebSocket and SSE URLs: values may not contain `/`.
    pub fn generic(&self) -> ProtocolAddress {
        ProtocolAddress {
            segments: self.segments.clone(),
            syntax: Syntax::Generic,
        }
    }

    /// The MQTT topic form. MQTT's `+` and `#` are wildcards, so a literal containing them cannot be
    /// subscribed to exactly; parameter values may not contain `/`, `+` or `#`.
    ///
    /// A whole level that is `+`, or a last level that is `#`, is MQTT's own wildcard, as people
    /// write it for the channels they receive on (`devices/+/data`, `site/#`): the route subscribes
    /// with it and matches any topic it covers. Anywhere else `+` and `#` cannot be expressed.
    pub fn mqtt(&self) -> Result<ProtocolAddress, AddressError> {
        let inexpressible = |literal: &str, c: char| AddressError::Inexpressible {
            protocol: "MQTT",
            reason: format!(
                "the literal '{literal}' contains '{}', a wildcard (or forbidden) character in MQTT topic filters; as a wildcard it must be a whole level ('+') or the last level ('#')",
                c.escape_default()
            ),
        };
        // Each level as written, parameters as NUL (no literal may contain it).
        let rendered: String = self
            .segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => l.as_str(),
                _ => "\0",
            })
            .collect();
        for literal in self.literals() {
            if literal.contains('\0') {
                return Err(inexpressible(literal, '\0'));
            }
        }
        let levels: Vec<&str> = rendered.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            let whole = *level == "+" || (*level == "#" && i == levels.len() - 1);
            if !whole && let Some(c) = level.chars().find(|c| matches!(c, '+' | '#')) {
                let literal = self.literals().find(|l| l.contains(c)).unwrap_or(level);
                return Err(inexpressible(literal, c));
            }
        }
        let mut segments = Vec::with_capacity(self.segments.len());
        for segment in &self.segments {
            let Segment::Literal(literal) = segment else {
                segments.push(segment.clone());
                continue;
            };
            // Every '+' and '#' left is a whole level (checked above): split them out.
            let mut text = String::new();
            for c in literal.chars() {
                let wildcard = match c {
                    '+' => Segment::AnyLevel,
                    '#' => Segment::AnyTail,
                    c => {
                        text.push(c);
                        continue;
                    }
                };
                if !text.is_empty() {
                    segments.push(Segment::Literal(std::mem::take(&mut text)));
                }
                segments.push(wildcard);
            }
            if !text.is_empty() {
                segments.push(Segment::Literal(text));
            }
        }
        Ok(ProtocolAddress {
            segments,
            syntax: Syntax::Mqtt,
        })
    }

    /// The AMQP routing-key form: `/` becomes `.`, the topic-exchange word separator (as
    /// RabbitMQ's MQTT plugin maps topics); parameter values may not contain `.`, `*` or `#`.
    pub fn amqp(&self) -> Result<ProtocolAddress, AddressError> {
        let mut segments = Vec::with_capacity(self.segments.len());
        for segment in &self.segments {
            match segment {
                Segment::Literal(l) => {
                    if let Some(c) = l.chars().find(|c| matches!(c, '*' | '#')) {
                        return Err(AddressError::Inexpressible {
                            protocol: "AMQP",
                            reason: format!(
                                "the literal '{l}' contains '{c}', a wildcard in AMQP topic patterns"
                            ),
                        });
                    }
                    if l.len() > 255 {
                        return Err(AddressError::Inexpressible {
                            protocol: "AMQP",
                            reason: "routing keys are at most 255 bytes".into(),
                        });
                    }
                    segments.push(Segment::Literal(l.replace('/', ".")));
                }
                p => segments.push(p.clone()),
            }
        }
        Ok(ProtocolAddress {
            segments,
            syntax: Syntax::Amqp,
        })
    }

    /// The Kafka topic form: topic names use only `[A-Za-z0-9._-]` (at most 249 bytes), and so
    /// do parameter values.
    pub fn kafka(&self) -> Result<ProtocolAddress, AddressError> {
        for literal in self.literals() {
            if let Some(c) = literal.chars().find(|c| !is_kafka_topic_char(*c)) {
                return Err(AddressError::Inexpressible {
                    protocol: "Kafka",
                    reason: format!(
                        "'{c}' in '{}' is not legal in a topic name (Kafka allows [a-zA-Z0-9._-]); name the topic in bindings.kafka.topic",
                        self.raw
                    ),
                });
            }
        }
        if !self.has_params() && self.raw.len() > 249 {
            return Err(AddressError::Inexpressible {
                protocol: "Kafka",
                reason: "topic names are at most 249 bytes".into(),
            });
        }
        if !self.has_params() && (self.raw == "." || self.raw == "..") {
            return Err(AddressError::Inexpressible {
                protocol: "Kafka",
                reason: format!("'{}' is not a legal topic name", self.raw),
            });
        }
        Ok(ProtocolAddress {
            segments: self.segments.clone(),
            syntax: Syntax::Kafka,
        })
    }

    fn literals(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Literal(l) => Some(l.as_str()),
            _ => None,
        })
    }
}

impl fmt::Display for AddressTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

fn is_kafka_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// The address syntaxes, each with its rule for parameter values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    Generic,
    Mqtt,
    Amqp,
    Kafka,
}

impl Syntax {
    fn name(self) -> &'static str {
        match self {
            Syntax::Generic => "URL path",
            Syntax::Mqtt => "MQTT",
            Syntax::Amqp => "AMQP",
            Syntax::Kafka => "Kafka",
        }
    }

    /// The first character a parameter value may not contain in this syntax.
    fn reserved_in(self, value: &str) -> Option<char> {
        value.chars().find(|&c| !self.allows(c))
    }

    fn allows(self, c: char) -> bool {
        match self {
            Syntax::Generic => !matches!(c, '/' | '?' | '#'),
            Syntax::Mqtt => !matches!(c, '/' | '+' | '#' | '\0'),
            Syntax::Amqp => !matches!(c, '.' | '*' | '#'),
            Syntax::Kafka => is_kafka_topic_char(c),
        }
    }
}

/// A template in one protocol's syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolAddress {
    segments: Vec<Segment>,
    syntax: Syntax,
}

/// How a broker-side selector relates to the template.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Selector {
    /// What to subscribe or bind with (`devices/+/telemetry`, `devices.*.telemetry`,
    /// `^devices\.[A-Za-z0-9._-]+$`).
    pub pattern: String,
    /// False when the broker may deliver addresses outside the template (a parameter shares a
    /// level with literal text): the route then keeps only addresses [`ProtocolAddress::extract`]
    /// accepts.
    pub exact: bool,
}

impl ProtocolAddress {
    pub fn syntax(&self) -> Syntax {
        self.syntax
    }

    /// The MQTT wildcard written in the address (`+` or `#`), if it has one.
    pub fn wildcard(&self) -> Option<char> {
        self.segments.iter().find_map(|s| match s {
            Segment::AnyLevel => Some('+'),
            Segment::AnyTail => Some('#'),
            _ => None,
        })
    }

    /// The concrete address when the template has no parameters.
    pub fn literal(&self) -> Option<String> {
        match self.segments.as_slice() {
            [Segment::Literal(l)] => Some(l.clone()),
            _ => None,
        }
    }

    /// The MQTT topic filter (levels holding a parameter become `+`) or the AMQP topic pattern
    /// (words holding a parameter become `*`).
    pub fn wildcard_selector(&self) -> Selector {
        let (separator, wildcard) = match self.syntax {
            Syntax::Amqp => ('.', "*"),
            _ => ('/', "+"),
        };
        // Render parameters as NUL (no literal may contain it) and rebuild level by level.
        let rendered: String = self
            .segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => l.as_str(),
                Segment::Param(_) => "\0",
                // Whole levels already: they stand for themselves in the filter.
                Segment::AnyLevel => "+",
                Segment::AnyTail => "#",
            })
            .collect();
        let mut exact = true;
        let levels: Vec<&str> = rendered
            .split(separator)
            .map(|level| {
                if level == "\0" {
                    wildcard
                } else if level.contains('\0') {
                    exact = false;
                    wildcard
                } else {
                    level
                }
            })
            .collect();
        Selector {
            pattern: levels.join(&separator.to_string()),
            exact,
        }
    }

    /// The Kafka subscription: the topic itself, or an anchored regex (librdkafka subscribes to
    /// topics matching a pattern that starts with `^`).
    pub fn kafka_selector(&self) -> Selector {
        if let Some(topic) = self.literal() {
            return Selector {
                pattern: topic,
                exact: true,
            };
        }
        let mut pattern = String::from("^");
        for segment in &self.segments {
            match segment {
                Segment::Literal(l) => {
                    for c in l.chars() {
                        if c == '.' {
                            pattern.push('\\');
                        }
                        pattern.push(c);
                    }
                }
                // Only MQTT addresses hold wildcards; a Kafka form never does.
                Segment::Param(_) | Segment::AnyLevel | Segment::AnyTail => {
                    pattern.push_str("[A-Za-z0-9._-]+")
                }
            }
        }
        pattern.push('$');
        Selector {
            pattern,
            exact: true,
        }
    }

    /// Parameters from a concrete address, or `None` when the address is not an instance of the
    /// template. Values are never empty and never contain the syntax's reserved characters.
    pub fn extract(&self, concrete: &str) -> Option<Params> {
        let mut values: Vec<(Arc<str>, String)> = Vec::new();
        let mut failed = std::collections::HashSet::new();
        if self.match_at(0, concrete, &mut values, &mut failed) {
            Some(Params(values))
        } else {
            None
        }
    }

    /// Whether segments from `index` on match `rest`. `failed` holds the (segment, remaining
    /// length) states already known not to match: whether the rest matches does not depend on
    /// how the values before it were split, so each state is tried once. Without it, a
    /// template of many parameters whose values may hold the separator between them backtracks
    /// exponentially (fuzzing found one that ran for minutes on a 257-byte input).
    fn match_at(
        &self,
        index: usize,
        rest: &str,
        out: &mut Vec<(Arc<str>, String)>,
        failed: &mut std::collections::HashSet<(usize, usize)>,
    ) -> bool {
        if failed.contains(&(index, rest.len())) {
            return false;
        }
        let matched = self.match_segment(index, rest, out, failed);
        if !matched {
            failed.insert((index, rest.len()));
        }
        matched
    }

    fn match_segment(
        &self,
        index: usize,
        rest: &str,
        out: &mut Vec<(Arc<str>, String)>,
        failed: &mut std::collections::HashSet<(usize, usize)>,
    ) -> bool {
        let Some(segment) = self.segments.get(index) else {
            return rest.is_empty();
        };
        match segment {
            Segment::Literal(l) => {
                rest.starts_with(l.as_str())
                    && self.match_at(index + 1, &rest[l.len()..], out, failed)
            }
            // One level, possibly empty, as MQTT's `+` matches.
            Segment::AnyLevel => {
                let end = rest.find('/').unwrap_or(rest.len());
                self.match_at(index + 1, &rest[end..], out, failed)
            }
            // `#` is last: whatever remains.
            Segment::AnyTail => true,
            Segment::Param(name) => {
                // The longest prefix the value may span: up to the first reserved character.
                let limit = rest
                    .char_indices()
                    .find(|&(_, c)| !self.syntax.allows(c))
                    .map_or(rest.len(), |(i, _)| i);
                if limit == 0 {
                    return false;
                }
                match self.segments.get(index + 1) {
                    None => {
                        if limit != rest.len() {
                            return false;
                        }
                        out.push((name.clone(), rest.to_owned()));
                        true
                    }
                    Some(Segment::Literal(next)) => {
                        // Shortest value first; backtrack to longer ones if the rest fails.
                        // `limit > 0`, so there is a first character; a value holds at least it.
                        let mut from = rest.chars().next().map_or(1, char::len_utf8);
                        while from <= limit {
                            let Some(found) = rest[from..].find(next.as_str()) else {
                                return false;
                            };
                            let end = from + found;
                            if end > limit {
                                return false;
                            }
                            out.push((name.clone(), rest[..end].to_owned()));
                            if self.match_at(index + 1, &rest[end..], out, failed) {
                                return true;
                            }
                            out.pop();
                            from = end + 1;
                            while !rest.is_char_boundary(from) && from < rest.len() {
                                from += 1;
                            }
                        }
                        false
                    }
                    // Parsing rejects adjacent parameters, and a wildcard is a whole level.
                    Some(_) => false,
                }
            }
        }
    }

    /// Builds the concrete address from parameter values.
    pub fn fill<'v>(
        &self,
        mut value_of: impl FnMut(&str) -> Option<&'v str>,
    ) -> Result<String, FillError> {
        let mut out = String::new();
        for segment in &self.segments {
            match segment {
                Segment::Literal(l) => out.push_str(l),
                Segment::AnyLevel => return Err(FillError::Wildcard { wildcard: '+' }),
                Segment::AnyTail => return Err(FillError::Wildcard { wildcard: '#' }),
                Segment::Param(name) => {
                    let value = value_of(name).ok_or_else(|| FillError::Missing {
                        name: name.to_string(),
                    })?;
                    if value.is_empty() {
                        return Err(FillError::Empty {
                            name: name.to_string(),
                        });
                    }
                    if let Some(character) = self.syntax.reserved_in(value) {
                        return Err(FillError::ReservedCharacter {
                            name: name.to_string(),
                            value: value.to_owned(),
                            character,
                            protocol: self.syntax.name(),
                        });
                    }
                    out.push_str(value);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(raw: &str) -> AddressTemplate {
        AddressTemplate::parse(raw).unwrap()
    }

    fn params(p: &Params) -> Vec<(String, String)> {
        p.iter()
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect()
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn mqtt_filters_and_amqp_patterns() {
        let cases = [
            // (template, mqtt filter, exact, amqp pattern, exact)
            (
                "devices/{deviceId}/telemetry",
                "devices/+/telemetry",
                true,
                "devices.*.telemetry",
                true,
            ),
            (
                "devices/telemetry",
                "devices/telemetry",
                true,
                "devices.telemetry",
                true,
            ),
            ("{tenant}/{site}/temp", "+/+/temp", true, "*.*.temp", true),
            ("a/{x}", "a/+", true, "a.*", true),
            ("dev-{id}/state", "+/state", false, "*.state", false),
            ("a/{x}-{y}/b", "a/+/b", false, "a.*.b", false),
            (
                "/user/{userId}/signup",
                "/user/+/signup",
                true,
                ".user.*.signup",
                true,
            ),
            (
                "smartylighting.streetlights.1.0.event.{id}.lighting.measured",
                "+",
                false,
                "smartylighting.streetlights.1.0.event.*.lighting.measured",
                true,
            ),
        ];
        for (raw, mqtt, mqtt_exact, amqp, amqp_exact) in cases {
            let m = t(raw).mqtt().unwrap().wildcard_selector();
            assert_eq!(
                (m.pattern.as_str(), m.exact),
                (mqtt, mqtt_exact),
                "mqtt {raw}"
            );
            let a = t(raw).amqp().unwrap().wildcard_selector();
            assert_eq!(
                (a.pattern.as_str(), a.exact),
                (amqp, amqp_exact),
                "amqp {raw}"
            );
        }
    }

    #[test]
    fn kafka_topics_and_patterns() {
        assert_eq!(
            t("telemetry.raw").kafka().unwrap().kafka_selector().pattern,
            "telemetry.raw"
        );
        assert_eq!(
            t("adeo-{env}-case-study-{version}")
                .kafka()
                .unwrap()
                .kafka_selector()
                .pattern,
            "^adeo-[A-Za-z0-9._-]+-case-study-[A-Za-z0-9._-]+$"
        );
        assert_eq!(
            t("a.{b}.c").kafka().unwrap().kafka_selector().pattern,
            "^a\\.[A-Za-z0-9._-]+\\.c$"
        );
        let err = t("devices/{id}/telemetry").kafka().unwrap_err();
        assert!(err.to_string().contains("bindings.kafka.topic"), "{err}");
    }

    #[test]
    fn unmappable_addresses_say_why() {
        // Whole-level wildcards are filters (see below); inside a level they cannot be expressed.
        let err = t("devices/a+b/telemetry").mqtt().unwrap_err();
        assert!(err.to_string().contains("wildcard"), "{err}");
        let err = t("alerts/#/x").mqtt().unwrap_err();
        assert!(err.to_string().contains("'#'"), "{err}");
        let err = t("orders.*").amqp().unwrap_err();
        assert!(err.to_string().contains("AMQP"), "{err}");
        assert_eq!(
            AddressTemplate::parse("a/{x}{y}"),
            Err(AddressError::AdjacentParameters {
                first: "x".into(),
                second: "y".into()
            })
        );
        assert!(matches!(
            AddressTemplate::parse("a/{x"),
            Err(AddressError::UnclosedBrace { at: 2 })
        ));
        assert!(matches!(
            AddressTemplate::parse("a/x}"),
            Err(AddressError::UnmatchedBrace { at: 3 })
        ));
        assert!(matches!(
            AddressTemplate::parse("a/{x y}"),
            Err(AddressError::BadParameterName { .. })
        ));
        assert!(matches!(
            AddressTemplate::parse("{x}/{x}"),
            Err(AddressError::RepeatedParameter { .. })
        ));
        assert_eq!(AddressTemplate::parse(""), Err(AddressError::Empty));
    }

    #[test]
    fn extraction_of_several_parameters() {
        let mqtt = t("sites/{site}/devices/{deviceId}/telemetry")
            .mqtt()
            .unwrap();
        let p = mqtt.extract("sites/berlin/devices/42/telemetry").unwrap();
        assert_eq!(params(&p), pairs(&[("site", "berlin"), ("deviceId", "42")]));
        assert!(
            mqtt.extract("sites/berlin/devices/42/telemetry/extra")
                .is_none()
        );
        assert!(
            mqtt.extract("sites//devices/42/telemetry").is_none(),
            "empty value"
        );
        assert!(
            mqtt.extract("sites/a/b/devices/42/telemetry").is_none(),
            "value spans a level"
        );
    }

    #[test]
    fn extraction_next_to_literals_backtracks() {
        let g = t("dev-{id}-{kind}.json").generic();
        let p = g.extract("dev-a-b-c.json").unwrap();
        assert_eq!(params(&p), pairs(&[("id", "a"), ("kind", "b-c")]));
        let k = t("adeo-{env}-case-study-COSTING-REQUEST-{version}")
            .kafka()
            .unwrap();
        let p = k
            .extract("adeo-prod-eu-case-study-COSTING-REQUEST-v2")
            .unwrap();
        assert_eq!(params(&p), pairs(&[("env", "prod-eu"), ("version", "v2")]));
        assert!(k.extract("adeo--case-study-COSTING-REQUEST-v2").is_none());
    }

    #[test]
    fn a_failing_match_backtracks_each_split_once() {
        // 24 parameters whose values may hold the `.` between them, against a string of dots
        // that cannot match (no closing literal): every split of the dots is a candidate.
        let template: Vec<String> = (0..24).map(|i| format!("{{p{i}}}")).collect();
        let g = t(&format!("{}.end", template.join("."))).generic();
        let concrete = format!("{}x", "a.".repeat(60));
        assert!(g.extract(&concrete).is_none());
        let matching = format!("{}a.end", "a.".repeat(40));
        let p = g.extract(&matching).unwrap();
        assert_eq!(p.len(), 24);
    }

    #[test]
    fn extraction_in_amqp_routing_keys() {
        let a = t("devices/{deviceId}/telemetry").amqp().unwrap();
        let p = a.extract("devices.42.telemetry").unwrap();
        assert_eq!(p.get("deviceId"), Some("42"));
        assert!(a.extract("devices.4.2.telemetry").is_none());
        assert!(a.extract("devices/42/telemetry").is_none());
    }

    #[test]
    fn filling_checks_reserved_characters() {
        let mqtt = t("devices/{deviceId}/commands").mqtt().unwrap();
        assert_eq!(mqtt.fill(|_| Some("42")).unwrap(), "devices/42/commands");
        for bad in ["a/b", "+", "#"] {
            assert!(
                matches!(
                    mqtt.fill(|_| Some(bad)),
                    Err(FillError::ReservedCharacter { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            mqtt.fill(|_| Some("")),
            Err(FillError::Empty { .. })
        ));
        assert!(matches!(
            mqtt.fill(|_| None),
            Err(FillError::Missing { .. })
        ));
        let amqp = t("devices/{deviceId}/commands").amqp().unwrap();
        assert_eq!(amqp.fill(|_| Some("42")).unwrap(), "devices.42.commands");
        assert!(amqp.fill(|_| Some("4.2")).is_err());
        let kafka = t("cmd-{deviceId}").kafka().unwrap();
        assert!(kafka.fill(|_| Some("a b")).is_err());
    }

    #[test]
    fn unicode_values_round_trip() {
        let mqtt = t("rooms/{room}/temp").mqtt().unwrap();
        let topic = mqtt.fill(|_| Some("küche")).unwrap();
        assert_eq!(mqtt.extract(&topic).unwrap().get("room"), Some("küche"));
        let g = t("x{a}é{b}").generic();
        let p = g.extract("xüéé").unwrap();
        assert_eq!(params(&p), pairs(&[("a", "ü"), ("b", "é")]));
    }

    #[test]
    fn mqtt_wildcards_written_in_the_address_subscribe_and_match() {
        let m = t("devices/+/data").mqtt().unwrap();
        assert_eq!(m.wildcard_selector().pattern, "devices/+/data");
        assert_eq!(m.wildcard(), Some('+'));
        assert!(m.extract("devices/abc/data").is_some_and(|p| p.is_empty()));
        assert!(m.extract("devices/abc/other").is_none());
        assert!(m.extract("devices/a/b/data").is_none(), "+ is one level");

        let m = t("devices/{uuid}/limits/+").mqtt().unwrap();
        assert_eq!(m.wildcard_selector().pattern, "devices/+/limits/+");
        let p = m.extract("devices/u1/limits/max").unwrap();
        assert_eq!(params(&p), pairs(&[("uuid", "u1")]));

        let m = t("site/#").mqtt().unwrap();
        assert_eq!(m.wildcard_selector().pattern, "site/#");
        assert_eq!(m.wildcard(), Some('#'));
        assert!(m.extract("site/a/b/c").is_some());
        assert!(m.extract("other/a").is_none());

        let m = t("{site}/sensors/#").mqtt().unwrap();
        assert_eq!(m.wildcard_selector().pattern, "+/sensors/#");
        let p = m.extract("lab/sensors/t1/temp").unwrap();
        assert_eq!(params(&p), pairs(&[("site", "lab")]));

        // Nothing to fill a wildcard with.
        assert_eq!(
            t("devices/+/data").mqtt().unwrap().fill(|_| None),
            Err(FillError::Wildcard { wildcard: '+' })
        );
        // Parameters alone keep no wildcard.
        assert_eq!(t("devices/{id}/data").mqtt().unwrap().wildcard(), None);
    }

    #[test]
    fn mqtt_wildcards_that_are_not_whole_levels_are_refused() {
        for raw in ["devices/a+/x", "site/#/x", "devices/{id}+", "a#", "x/+y"] {
            let err = t(raw).mqtt().unwrap_err();
            assert!(err.to_string().contains("whole level"), "{raw}: {err}");
        }
        // Other protocols' forms are unchanged: '#' is an AMQP wildcard.
        assert!(t("site/#").amqp().is_err());
    }
}
