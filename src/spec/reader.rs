//! Reading a document tree with diagnostics: every accessor records what is wrong and returns
//! `None`, so a loader walks the whole document and reports every problem, never only the first.

use serde_json::Value;

use super::error::{Diagnostics, Location, SpecErrorKind, type_name};
use super::source::{Inlined, Node, Sources, is_remote};

/// The loader's view of one load: the files and the diagnostics collected so far.
pub struct Reader<'a> {
    pub sources: &'a mut Sources,
    pub diag: &'a mut Diagnostics,
}

impl Reader<'_> {
    /// Follows `$ref`s; a failure is recorded.
    pub fn deref(&mut self, node: &Node) -> Option<Node> {
        match self.sources.deref(node) {
            Ok(n) => Some(n),
            Err(e) => {
                self.diag.errors.push(e);
                None
            }
        }
    }

    /// Follows `$ref`s and requires a mapping.
    pub fn object(&mut self, node: &Node) -> Option<Node> {
        let target = self.deref(node)?;
        if target.value().is_object() {
            Some(target)
        } else {
            self.wrong_type(&target, "a mapping");
            None
        }
    }

    /// An optional member that must be a mapping when present.
    pub fn object_field(&mut self, node: &Node, key: &str) -> Option<Node> {
        let child = node.get(key)?;
        self.object(&child)
    }

    /// A required member that must be a mapping.
    pub fn required_object(&mut self, node: &Node, key: &'static str) -> Option<Node> {
        if node.get(key).is_none() {
            self.missing(node, key);
            return None;
        }
        self.object_field(node, key)
    }

    /// An optional member that must be a sequence when present.
    pub fn array_field(&mut self, node: &Node, key: &str) -> Option<Vec<Node>> {
        let child = node.get(key)?;
        let child = self.deref(&child)?;
        if child.value().is_array() {
            Some(child.items())
        } else {
            self.wrong_type(&child, "a sequence");
            None
        }
    }

    /// An optional scalar member read as text: strings as they are, numbers and booleans
    /// printed (YAML authors write `version: 1.0`).
    pub fn string(&mut self, node: &Node, key: &str) -> Option<String> {
        let child = node.get(key)?;
        match child.value() {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => {
                self.wrong_type(&child, "a string");
                None
            }
        }
    }

    /// What an object says of itself: its `summary`, its `description`, or both (summary
    /// first). For listings and agent-facing tool descriptions.
    pub fn summary(&mut self, node: &Node) -> Option<String> {
        let summary = self
            .string(node, "summary")
            .filter(|s| !s.trim().is_empty());
        let description = self
            .string(node, "description")
            .filter(|s| !s.trim().is_empty());
        match (summary, description) {
            (Some(s), Some(d)) => Some(format!("{}\n\n{}", s.trim(), d.trim())),
            (s, d) => s.or(d).map(|t| t.trim().to_owned()),
        }
    }

    /// A required scalar member read as text.
    pub fn required_string(&mut self, node: &Node, key: &'static str) -> Option<String> {
        if node.get(key).is_none() {
            self.missing(node, key);
            return None;
        }
        self.string(node, key)
    }

    /// An optional boolean member.
    pub fn boolean(&mut self, node: &Node, key: &str) -> Option<bool> {
        let child = node.get(key)?;
        match child.value() {
            Value::Bool(b) => Some(*b),
            _ => {
                self.wrong_type(&child, "a boolean");
                None
            }
        }
    }

    /// Reports members that are neither in `allowed` nor `x-` extensions.
    pub fn check_fields(&mut self, node: &Node, allowed: &[&str]) {
        let Some(map) = node.value().as_object() else {
            return;
        };
        for key in map.keys() {
            if key.starts_with("x-") || allowed.contains(&key.as_str()) {
                continue;
            }
            self.diag.error(
                node.loc.join(key),
                SpecErrorKind::UnknownField {
                    field: key.clone(),
                    allowed: allowed.join(", "),
                },
            );
        }
    }

    /// A reference-free copy of `node` for compilers; remote references are warned about once.
    pub fn inline(&mut self, node: &Node) -> Option<Inlined> {
        match self.sources.inline(node) {
            Ok(inlined) => {
                for reference in &inlined.remote_refs {
                    self.diag.warn(
                        node.loc.clone(),
                        format!(
                            "remote $ref '{reference}' is not fetched: what it describes is not enforced"
                        ),
                    );
                }
                for cut in &inlined.recursion_cut_at {
                    self.diag.warn(
                        cut.clone(),
                        "recursive schema: validation accepts any value below this point",
                    );
                }
                Some(inlined)
            }
            Err(e) => {
                self.diag.errors.push(e);
                None
            }
        }
    }

    /// True when `node` is a reference to another host.
    pub fn is_remote_ref(node: &Node) -> bool {
        node.reference().is_some_and(is_remote)
    }

    pub fn missing(&mut self, node: &Node, field: &'static str) {
        self.diag
            .error(node.loc.clone(), SpecErrorKind::MissingField { field });
    }

    pub fn wrong_type(&mut self, node: &Node, expected: &'static str) {
        self.diag.error(
            node.loc.clone(),
            SpecErrorKind::WrongType {
                expected,
                found: type_name(node.value()),
            },
        );
    }

    pub fn error(&mut self, location: Location, kind: SpecErrorKind) {
        self.diag.error(location, kind);
    }

    pub fn warn(&mut self, location: Location, message: impl Into<String>) {
        self.diag.warn(location, message);
    }
}

/// JSON Merge Patch (RFC 7386), used to apply AsyncAPI traits.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

/// Turns a name into an id usable in URLs and metric labels: ASCII letters, digits, `_` and `-`,
/// other runs collapsed into one `-`.
pub fn slug(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut pending_dash = false;
    for c in name.chars() {
        if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
            if pending_dash && !out.is_empty() {
                out.push('-');
            }
            pending_dash = false;
            out.push(c);
        } else {
            pending_dash = true;
        }
    }
    if out.is_empty() {
        out.push('_');
    }
    out
}

/// The `{name}` placeholders of an address, in order; `Err` says what is malformed.
pub fn placeholders(address: &str) -> Result<Vec<String>, String> {
    crate::template::Template::parse(address)
        .map(|t| t.names().map(str::to_owned).collect())
        .map_err(|e| e.to_string())
}

/// Parameter names as AsyncAPI allows them.
/// The specification's rule for component keys (`^[a-zA-Z0-9\.\-_]+$`), which channel and
/// operation ids follow too: Kafka and RabbitMQ users name channels `order.created`.
pub fn is_valid_component_key(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

pub fn is_valid_parameter_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_found_in_order() {
        assert_eq!(
            placeholders("devices/{deviceId}/x-{kind}").unwrap(),
            vec!["deviceId", "kind"]
        );
        assert!(placeholders("a/{b").is_err());
        assert!(placeholders("a/b}").is_err());
        assert!(placeholders("a/{{b}}").is_err());
    }

    #[test]
    fn slug_keeps_safe_characters() {
        assert_eq!(slug("/user/{id}/signedup"), "user-id-signedup");
        assert_eq!(slug("Streetlights Kafka API"), "Streetlights-Kafka-API");
        assert_eq!(slug("///"), "_");
    }

    #[test]
    fn merge_patch_overrides_and_removes() {
        let mut target = serde_json::json!({"a": 1, "b": {"c": 2, "d": 3}});
        merge_patch(&mut target, &serde_json::json!({"a": null, "b": {"c": 5}}));
        assert_eq!(target, serde_json::json!({"b": {"c": 5, "d": 3}}));
    }
}
