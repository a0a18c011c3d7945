//! What changes between two versions of a document, and which changes break the producers and
//! consumers that share it: a channel, operation or message removed; in a payload schema, a
//! field removed, a required field added (or a field no longer required), a type narrowed, an
//! enum value removed, additional properties closed.
//!
//! Pure functions over compiled routes and JSON Schemas: the registry answers every change
//! (and every `dry_run`) with their result.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::routing::{ChannelId, Route};
use crate::spec::Api;

/// One difference between an old and a new payload schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SchemaChange {
    /// JSON pointer into the payload schema (`/properties/temperature`); empty for its root.
    pub path: String,
    pub change: ChangeKind,
    pub breaking: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChangeKind {
    ChannelAdded,
    ChannelRemoved,
    OperationAdded,
    OperationRemoved,
    MessageAdded,
    MessageRemoved,
    DirectionNarrowed,
    DirectionWidened,
    FieldAdded,
    FieldRemoved,
    RequiredAdded,
    RequiredRemoved,
    TypeNarrowed,
    TypeWidened,
    EnumValueAdded,
    EnumValueRemoved,
    AdditionalPropertiesClosed,
    AdditionalPropertiesOpened,
}

impl ChangeKind {
    /// Whether a party built against the old version can trip over the new one. Widening a
    /// type or adding an enum value is not counted: the gateway validates what it forwards,
    /// and a consumer that ignores unknown values keeps working — the usual reading of
    /// schema evolution (Confluent's BACKWARD/FORWARD rules make the same split).
    pub fn breaking(self) -> bool {
        matches!(
            self,
            ChangeKind::ChannelRemoved
                | ChangeKind::OperationRemoved
                | ChangeKind::MessageRemoved
                | ChangeKind::DirectionNarrowed
                | ChangeKind::FieldRemoved
                | ChangeKind::RequiredAdded
                | ChangeKind::RequiredRemoved
                | ChangeKind::TypeNarrowed
                | ChangeKind::EnumValueRemoved
                | ChangeKind::AdditionalPropertiesClosed
        )
    }
}

/// Compares two payload schemas (JSON Schema, references resolved).
pub fn schema_changes(old: &Value, new: &Value) -> Vec<SchemaChange> {
    let mut out = Vec::new();
    compare(old, new, String::new(), &mut out);
    out
}

fn push(out: &mut Vec<SchemaChange>, path: &str, change: ChangeKind, detail: String) {
    out.push(SchemaChange {
        path: path.to_owned(),
        change,
        breaking: change.breaking(),
        detail,
    });
}

fn compare(old: &Value, new: &Value, path: String, out: &mut Vec<SchemaChange>) {
    if old == new {
        return;
    }
    compare_types(old, new, &path, out);
    compare_enums(old, new, &path, out);
    let empty = serde_json::Map::new();
    let required = |s: &Value| -> BTreeSet<String> {
        s.get("required")
            .and_then(Value::as_array)
            .map(|r| {
                r.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let (old_props, new_props) = (
        properties(old).unwrap_or(&empty),
        properties(new).unwrap_or(&empty),
    );
    let (old_required, new_required) = (required(old), required(new));
    for (name, old_field) in old_props {
        let field_path = format!("{path}/properties/{}", escape(name));
        match new_props.get(name) {
            None => push(
                out,
                &field_path,
                ChangeKind::FieldRemoved,
                format!("field '{name}' was removed"),
            ),
            Some(new_field) => compare(old_field, new_field, field_path, out),
        }
    }
    for name in new_props.keys().filter(|n| !old_props.contains_key(*n)) {
        let field_path = format!("{path}/properties/{}", escape(name));
        if new_required.contains(name) {
            push(
                out,
                &field_path,
                ChangeKind::RequiredAdded,
                format!("required field '{name}' was added"),
            );
        } else {
            push(
                out,
                &field_path,
                ChangeKind::FieldAdded,
                format!("optional field '{name}' was added"),
            );
        }
    }
    for name in new_required.difference(&old_required) {
        // A new declared field that is required was reported above, as its addition; a name
        // required without being declared is a new demand on producers all the same.
        let added_above = new_props.contains_key(name) && !old_props.contains_key(name);
        if !added_above {
            push(
                out,
                &format!("{path}/required"),
                ChangeKind::RequiredAdded,
                format!("field '{name}' is now required"),
            );
        }
    }
    for name in old_required.difference(&new_required) {
        if new_props.contains_key(name) {
            push(
                out,
                &format!("{path}/required"),
                ChangeKind::RequiredRemoved,
                format!("field '{name}' is no longer required: consumers may not get it"),
            );
        }
    }
    let closed = |s: &Value| s.get("additionalProperties") == Some(&Value::Bool(false));
    match (closed(old), closed(new)) {
        (false, true) => push(
            out,
            &format!("{path}/additionalProperties"),
            ChangeKind::AdditionalPropertiesClosed,
            "fields not listed are now refused".into(),
        ),
        (true, false) => push(
            out,
            &format!("{path}/additionalProperties"),
            ChangeKind::AdditionalPropertiesOpened,
            "fields not listed are now accepted".into(),
        ),
        _ => {}
    }
    if let (Some(old_items), Some(new_items)) = (old.get("items"), new.get("items")) {
        compare(old_items, new_items, format!("{path}/items"), out);
    }
}

fn properties(schema: &Value) -> Option<&serde_json::Map<String, Value>> {
    schema.get("properties").and_then(Value::as_object)
}

/// The JSON types a schema accepts; `None` for any. `integer` is a subset of `number`.
fn types(schema: &Value) -> Option<BTreeSet<&str>> {
    match schema.get("type")? {
        Value::String(t) => Some(BTreeSet::from([t.as_str()])),
        Value::Array(ts) => Some(ts.iter().filter_map(Value::as_str).collect()),
        _ => None,
    }
}

fn covers(set: &BTreeSet<&str>, t: &str) -> bool {
    set.contains(t) || (t == "integer" && set.contains("number"))
}

fn compare_types(old: &Value, new: &Value, path: &str, out: &mut Vec<SchemaChange>) {
    let (old_types, new_types) = (types(old), types(new));
    let describe = |t: &Option<BTreeSet<&str>>| match t {
        None => "any".to_owned(),
        Some(set) => set.iter().copied().collect::<Vec<_>>().join(" or "),
    };
    let narrowed = match (&old_types, &new_types) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(o), Some(n)) => o.iter().any(|t| !covers(n, t)),
    };
    let widened = match (&old_types, &new_types) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(o), Some(n)) => n.iter().any(|t| !covers(o, t)),
    };
    let detail = format!(
        "type {} became {}",
        describe(&old_types),
        describe(&new_types)
    );
    let path = if path.is_empty() {
        "/type".to_owned()
    } else {
        format!("{path}/type")
    };
    if narrowed {
        push(out, &path, ChangeKind::TypeNarrowed, detail);
    } else if widened {
        push(out, &path, ChangeKind::TypeWidened, detail);
    }
}

fn compare_enums(old: &Value, new: &Value, path: &str, out: &mut Vec<SchemaChange>) {
    let values = |s: &Value| s.get("enum").and_then(Value::as_array).cloned();
    let enum_path = format!("{path}/enum");
    match (values(old), values(new)) {
        (Some(o), Some(n)) => {
            for v in o.iter().filter(|v| !n.contains(v)) {
                push(
                    out,
                    &enum_path,
                    ChangeKind::EnumValueRemoved,
                    format!("enum value {v} was removed"),
                );
            }
            for v in n.iter().filter(|v| !o.contains(v)) {
                push(
                    out,
                    &enum_path,
                    ChangeKind::EnumValueAdded,
                    format!("enum value {v} was added"),
                );
            }
        }
        (None, Some(n)) => push(
            out,
            &enum_path,
            ChangeKind::EnumValueRemoved,
            format!("values are now limited to {}", Value::Array(n)),
        ),
        (Some(_), None) => push(
            out,
            &enum_path,
            ChangeKind::EnumValueAdded,
            "values are no longer limited to a list".into(),
        ),
        (None, None) => {}
    }
}

/// RFC 6901 escaping of one pointer segment.
fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// One change of a document, located.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    pub channel: Option<ChannelId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub path: String,
    pub change: ChangeKind,
    pub breaking: bool,
    pub detail: String,
}

/// Added, removed and changed names of one kind of thing.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Delta {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl Delta {
    fn of<T: PartialEq>(old: &BTreeMap<String, T>, new: &BTreeMap<String, T>) -> Delta {
        Delta {
            added: new
                .keys()
                .filter(|k| !old.contains_key(*k))
                .cloned()
                .collect(),
            removed: old
                .keys()
                .filter(|k| !new.contains_key(*k))
                .cloned()
                .collect(),
            changed: old
                .iter()
                .filter(|(k, v)| new.get(*k).is_some_and(|n| n != *v))
                .map(|(k, _)| k.clone())
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Everything that differs between two versions of one document.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DocumentDiff {
    pub channels: Delta,
    pub operations: Delta,
    pub servers: Delta,
    /// Changes a producer or consumer of the old version can trip over.
    pub breaking: Vec<Change>,
    /// The other changes found in channels, messages and schemas.
    pub compatible: Vec<Change>,
}

impl DocumentDiff {
    pub fn is_empty(&self) -> bool {
        self.channels.is_empty() && self.operations.is_empty() && self.servers.is_empty()
    }
}

/// A route's definition as compared: everything it serialises (schemas as written, address,
/// bindings, direction), not its compiled validators.
pub fn definition(route: &Route) -> Value {
    serde_json::to_value(route).unwrap_or(Value::Null)
}

/// Compares the old and new version of a document, with their compiled routes.
pub fn diff(
    old_api: &Api,
    old_routes: &[Arc<Route>],
    new_api: &Api,
    new_routes: &[Arc<Route>],
) -> DocumentDiff {
    let by_id = |routes: &[Arc<Route>]| -> BTreeMap<String, Value> {
        routes
            .iter()
            .map(|r| (r.id.to_string(), definition(r)))
            .collect()
    };
    let ops = |api: &Api| -> BTreeMap<String, Value> {
        api.operations
            .iter()
            .map(|o| {
                (
                    format!("{}.{}", api.id, o.id),
                    serde_json::to_value(o).unwrap_or(Value::Null),
                )
            })
            .collect()
    };
    let servers = |api: &Api| -> BTreeMap<String, Value> {
        api.servers
            .iter()
            .map(|s| (s.id.clone(), serde_json::to_value(s).unwrap_or(Value::Null)))
            .collect()
    };
    let mut diff = DocumentDiff {
        channels: Delta::of(&by_id(old_routes), &by_id(new_routes)),
        operations: Delta::of(&ops(old_api), &ops(new_api)),
        servers: Delta::of(&servers(old_api), &servers(new_api)),
        ..DocumentDiff::default()
    };
    let mut changes = Vec::new();
    let channel_change = |id: &str, change: ChangeKind, detail: String| Change {
        channel: Some(id.into()),
        operation: None,
        message: None,
        path: String::new(),
        change,
        breaking: change.breaking(),
        detail,
    };
    for id in &diff.channels.removed {
        changes.push(channel_change(
            id,
            ChangeKind::ChannelRemoved,
            format!("channel '{id}' was removed"),
        ));
    }
    for id in &diff.channels.added {
        changes.push(channel_change(
            id,
            ChangeKind::ChannelAdded,
            format!("channel '{id}' was added"),
        ));
    }
    for id in &diff.operations.removed {
        changes.push(Change {
            channel: None,
            operation: Some(id.clone()),
            ..channel_change(
                "",
                ChangeKind::OperationRemoved,
                format!("operation '{id}' was removed"),
            )
        });
    }
    for id in &diff.operations.added {
        changes.push(Change {
            channel: None,
            operation: Some(id.clone()),
            ..channel_change(
                "",
                ChangeKind::OperationAdded,
                format!("operation '{id}' was added"),
            )
        });
    }
    for id in &diff.channels.changed {
        let (Some(old), Some(new)) = (
            old_routes.iter().find(|r| *r.id == **id),
            new_routes.iter().find(|r| *r.id == **id),
        ) else {
            continue;
        };
        route_changes(old, new, &mut changes);
    }
    let (breaking, compatible) = changes.into_iter().partition(|c| c.breaking);
    diff.breaking = breaking;
    diff.compatible = compatible;
    diff
}

fn route_changes(old: &Route, new: &Route, out: &mut Vec<Change>) {
    let at = |message: Option<&str>, change: ChangeKind, path: String, detail: String| Change {
        channel: Some(old.id.clone()),
        operation: None,
        message: message.map(str::to_owned),
        path,
        change,
        breaking: change.breaking(),
        detail,
    };
    let (o, n) = (old.direction, new.direction);
    if (o.readable && !n.readable) || (o.writable && !n.writable) {
        out.push(at(
            None,
            ChangeKind::DirectionNarrowed,
            String::new(),
            format!("direction {} became {}", o.as_str(), n.as_str()),
        ));
    } else if o != n {
        out.push(at(
            None,
            ChangeKind::DirectionWidened,
            String::new(),
            format!("direction {} became {}", o.as_str(), n.as_str()),
        ));
    }
    for message in &old.messages {
        let Some(next) = new.messages.iter().find(|m| m.id == message.id) else {
            out.push(at(
                Some(&message.id),
                ChangeKind::MessageRemoved,
                String::new(),
                format!("message '{}' was removed", message.id),
            ));
            continue;
        };
        let schema = |m: &crate::routing::RouteMessage| {
            m.json_schema
                .clone()
                .or_else(|| m.schema.clone())
                .unwrap_or(Value::Bool(true))
        };
        for c in schema_changes(&schema(message), &schema(next)) {
            out.push(at(Some(&message.id), c.change, c.path, c.detail));
        }
    }
    for message in new
        .messages
        .iter()
        .filter(|m| !old.messages.iter().any(|o| o.id == m.id))
    {
        out.push(at(
            Some(&message.id),
            ChangeKind::MessageAdded,
            String::new(),
            format!("message '{}' was added", message.id),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reading() -> Value {
        json!({
            "type": "object",
            "required": ["temperature"],
            "properties": {
                "temperature": {"type": "number"},
                "unit": {"type": "string", "enum": ["C", "F"]},
                "seq": {"type": "integer"}
            }
        })
    }

    fn kinds(old: &Value, new: &Value) -> Vec<(ChangeKind, bool, String)> {
        schema_changes(old, new)
            .into_iter()
            .map(|c| (c.change, c.breaking, c.path))
            .collect()
    }

    #[test]
    fn the_same_schema_has_no_changes() {
        assert!(schema_changes(&reading(), &reading()).is_empty());
    }

    #[test]
    fn a_removed_field_is_breaking() {
        let mut new = reading();
        new["properties"].as_object_mut().unwrap().remove("seq");
        assert_eq!(
            kinds(&reading(), &new),
            vec![(ChangeKind::FieldRemoved, true, "/properties/seq".into())]
        );
    }

    #[test]
    fn an_added_required_field_is_breaking_an_optional_one_is_not() {
        let mut required = reading();
        required["properties"]["battery"] = json!({"type": "number"});
        required["required"] = json!(["temperature", "battery"]);
        assert_eq!(
            kinds(&reading(), &required),
            vec![(
                ChangeKind::RequiredAdded,
                true,
                "/properties/battery".into()
            )]
        );
        let mut optional = reading();
        optional["properties"]["battery"] = json!({"type": "number"});
        assert_eq!(
            kinds(&reading(), &optional),
            vec![(ChangeKind::FieldAdded, false, "/properties/battery".into())]
        );
    }

    #[test]
    fn requiring_an_undeclared_field_is_breaking() {
        let mut stricter = reading();
        stricter["required"] = json!(["temperature", "battery"]);
        assert_eq!(
            kinds(&reading(), &stricter),
            vec![(ChangeKind::RequiredAdded, true, "/required".into())]
        );
    }

    #[test]
    fn an_existing_field_made_required_is_breaking() {
        let mut new = reading();
        new["required"] = json!(["temperature", "seq"]);
        assert_eq!(
            kinds(&reading(), &new),
            vec![(ChangeKind::RequiredAdded, true, "/required".into())]
        );
    }

    #[test]
    fn a_narrowed_type_is_breaking_a_widened_one_is_not() {
        let mut narrowed = reading();
        narrowed["properties"]["temperature"] = json!({"type": "integer"});
        assert_eq!(
            kinds(&reading(), &narrowed),
            vec![(
                ChangeKind::TypeNarrowed,
                true,
                "/properties/temperature/type".into()
            )]
        );
        let mut widened = reading();
        widened["properties"]["seq"] = json!({"type": "number"});
        assert_eq!(
            kinds(&reading(), &widened),
            vec![(
                ChangeKind::TypeWidened,
                false,
                "/properties/seq/type".into()
            )]
        );
        let mut changed = reading();
        changed["properties"]["seq"] = json!({"type": "string"});
        assert!(kinds(&reading(), &changed)[0].1, "integer → string breaks");
    }

    #[test]
    fn a_removed_enum_value_is_breaking_an_added_one_is_not() {
        let mut removed = reading();
        removed["properties"]["unit"]["enum"] = json!(["C"]);
        assert_eq!(
            kinds(&reading(), &removed),
            vec![(
                ChangeKind::EnumValueRemoved,
                true,
                "/properties/unit/enum".into()
            )]
        );
        let mut added = reading();
        added["properties"]["unit"]["enum"] = json!(["C", "F", "K"]);
        assert_eq!(
            kinds(&reading(), &added),
            vec![(
                ChangeKind::EnumValueAdded,
                false,
                "/properties/unit/enum".into()
            )]
        );
    }

    #[test]
    fn nested_fields_and_array_items_are_followed() {
        let old = json!({"type": "array", "items": {"type": "object", "properties": {"a~b/c": {"type": "string"}}}});
        let new = json!({"type": "array", "items": {"type": "object", "properties": {}}});
        assert_eq!(
            kinds(&old, &new),
            vec![(
                ChangeKind::FieldRemoved,
                true,
                "/items/properties/a~0b~1c".into()
            )]
        );
    }

    #[test]
    fn closing_additional_properties_is_breaking() {
        let mut new = reading();
        new["additionalProperties"] = json!(false);
        assert_eq!(
            kinds(&reading(), &new),
            vec![(
                ChangeKind::AdditionalPropertiesClosed,
                true,
                "/additionalProperties".into()
            )]
        );
    }
}
