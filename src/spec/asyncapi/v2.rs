//! AsyncAPI 2 channels: `publish`/`subscribe` operations inside each channel, from the
//! application's point of view.

use super::*;

pub(super) fn load_v2_channels(reader: &mut Reader<'_>, root: &Node, ctx: &Ctx, api: &mut Api) {
    let Some(channels) = reader.required_object(root, "channels") else {
        return;
    };
    let mut channel_ids: HashMap<String, Location> = HashMap::new();
    let mut operation_ids: HashMap<String, Location> = HashMap::new();
    for (address, node) in channels.entries() {
        let Some(channel) = reader.object(&node) else {
            continue;
        };
        reader.check_fields(
            &channel,
            &[
                "description",
                "servers",
                "subscribe",
                "publish",
                "parameters",
                "bindings",
            ],
        );
        check_address(reader, &address, &node.loc);
        // AsyncAPI 2 channels have no id; `x-stepflow-id` names one, else the address's slug.
        let id = match reader.string(&channel, "x-stepflow-id") {
            Some(explicit) if is_valid_component_key(&explicit) => explicit,
            Some(explicit) => {
                reader.error(
                    channel.loc.join("x-stepflow-id"),
                    SpecErrorKind::Invalid(format!(
                        "x-stepflow-id '{explicit}' must match ^[a-zA-Z0-9.\\-_]+$"
                    )),
                );
                slug(&address)
            }
            None => slug(&address),
        };
        if let Some(first) = channel_ids.get(&id) {
            reader.error(
                node.loc.clone(),
                SpecErrorKind::DuplicateId {
                    what: "channel id (derived from the channel name)",
                    id: id.clone(),
                    first: first.to_string(),
                },
            );
            continue;
        }
        channel_ids.insert(id.clone(), node.loc.clone());
        let parameters = read_parameters(reader, &channel, Some(&address), &node.loc, Major::V2);
        let servers = read_v2_channel_servers(reader, &channel, api);
        let bindings = read_bindings(reader, &channel, BindingTarget::Channel);

        let mut messages: Vec<Message> = Vec::new();
        let mut seen: HashMap<Location, String> = HashMap::new();
        for (verb, action) in [("publish", Action::Receive), ("subscribe", Action::Send)] {
            let Some(op) = reader.object_field(&channel, verb) else {
                continue;
            };
            reader.check_fields(
                &op,
                &[
                    "operationId",
                    "summary",
                    "description",
                    "security",
                    "tags",
                    "externalDocs",
                    "bindings",
                    "traits",
                    "message",
                ],
            );
            let op_id = reader
                .string(&op, "operationId")
                .unwrap_or_else(|| format!("{id}.{verb}"));
            if let Some(first) = operation_ids.get(&op_id) {
                reader.error(
                    op.loc.join("operationId"),
                    SpecErrorKind::DuplicateId {
                        what: "operationId",
                        id: op_id.clone(),
                        first: first.to_string(),
                    },
                );
            } else {
                operation_ids.insert(op_id.clone(), op.loc.join("operationId"));
            }
            let mut op_messages = Vec::new();
            if let Some(message_node) = op.get("message") {
                let candidates = match reader.deref(&message_node) {
                    Some(target) if target.get("oneOf").is_some() => {
                        reader.array_field(&target, "oneOf").unwrap_or_default()
                    }
                    Some(_) => vec![message_node.clone()],
                    None => Vec::new(),
                };
                for (i, candidate) in candidates.iter().enumerate() {
                    let Some(target) = reader.deref(candidate) else {
                        continue;
                    };
                    if let Some(existing) = seen.get(&target.loc) {
                        op_messages.push(existing.clone());
                        continue;
                    }
                    let mut message_id = v2_message_id(candidate, &target, verb, i);
                    if messages.iter().any(|m| m.id == message_id) {
                        message_id = format!("{message_id}-{}", messages.len() + 1);
                    }
                    if let Some(m) = read_message(reader, candidate, message_id.clone(), ctx) {
                        seen.insert(target.loc.clone(), message_id.clone());
                        op_messages.push(message_id);
                        messages.push(m);
                    }
                }
            }
            let security = read_security(reader, root, &op, Major::V2);
            let description = reader.summary(&op);
            api.operations.push(Operation {
                id: op_id,
                action,
                channel: id.clone(),
                messages: op_messages,
                reply: None,
                description,
                bindings: read_bindings(reader, &op, BindingTarget::Operation),
                security,
                http: None,
                location: op.loc.clone(),
            });
        }
        api.channels.push(Channel {
            id,
            address: Some(address),
            parameters,
            messages,
            description: reader.summary(&channel),
            servers,
            bindings,
            extensions: stepflow_extensions(&channel),
            location: channel.loc.clone(),
        });
    }
}

pub(super) fn v2_message_id(reference: &Node, target: &Node, verb: &str, index: usize) -> String {
    if reference.reference().is_some()
        && let Some(last) = pointer_tokens(&target.loc.pointer).last()
    {
        return last.clone();
    }
    let value = target.value();
    value
        .get("messageId")
        .or_else(|| value.get("name"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| {
            if index == 0 {
                format!("{verb}Message")
            } else {
                format!("{verb}Message{index}")
            }
        })
}

pub(super) fn read_v2_channel_servers(
    reader: &mut Reader<'_>,
    channel: &Node,
    api: &Api,
) -> Vec<String> {
    let Some(items) = reader.array_field(channel, "servers") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in items {
        match item.value().as_str() {
            Some(name) if api.server(name).is_some() => out.push(name.to_owned()),
            Some(name) => reader.error(
                item.loc.clone(),
                SpecErrorKind::UnknownServer {
                    server: name.to_owned(),
                },
            ),
            None => reader.wrong_type(&item, "a server name"),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// AsyncAPI 3
