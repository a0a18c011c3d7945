//! AsyncAPI 3: channels, operations on them, and replies, each its own object with references
//! between them.

use super::*;

/// Where a root channel's messages live, to check that operations only use their channel's.
pub(super) struct ChannelMessages {
    pub(super) id: String,
    /// Locations of the channel's message entries (as written, and after `$ref`s) → message id.
    pub(super) by_location: HashMap<Location, String>,
}

pub(super) fn load_v3(reader: &mut Reader<'_>, root: &Node, ctx: &Ctx, api: &mut Api) {
    let mut channel_messages: HashMap<String, ChannelMessages> = HashMap::new();
    if let Some(channels) = reader.object_field(root, "channels") {
        for (id, node) in channels.entries() {
            if !is_valid_component_key(&id) {
                reader.error(
                    node.loc.clone(),
                    SpecErrorKind::Invalid(format!(
                        "channel id '{id}' must match ^[a-zA-Z0-9.\\-_]+$ (the specification's rule for component keys)"
                    )),
                );
            }
            let Some(channel) = reader.object(&node) else {
                continue;
            };
            if let Some((c, messages)) =
                read_v3_channel(reader, &node, &channel, id.clone(), ctx, api)
            {
                channel_messages.insert(id, messages);
                api.channels.push(c);
            }
        }
    }
    if let Some(operations) = reader.object_field(root, "operations") {
        for (id, node) in operations.entries() {
            let Some(op) = reader.object(&node) else {
                continue;
            };
            if let Some(operation) = read_v3_operation(reader, root, &op, id, &channel_messages) {
                api.operations.push(operation);
            }
        }
    }
}

pub(super) fn read_v3_channel(
    reader: &mut Reader<'_>,
    written: &Node,
    channel: &Node,
    id: String,
    ctx: &Ctx,
    api: &Api,
) -> Option<(Channel, ChannelMessages)> {
    reader.check_fields(
        channel,
        &[
            "address",
            "messages",
            "title",
            "summary",
            "description",
            "servers",
            "parameters",
            "tags",
            "externalDocs",
            "bindings",
        ],
    );
    let address = match channel.get("address") {
        None => None,
        Some(n) => match n.value() {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            _ => {
                reader.wrong_type(&n, "a string or null");
                None
            }
        },
    };
    let address_at = channel.loc.join("address");
    if let Some(a) = &address {
        check_address(reader, a, &address_at);
    }
    let parameters = read_parameters(reader, channel, address.as_deref(), &address_at, Major::V3);

    let mut servers = Vec::new();
    if let Some(items) = reader.array_field(channel, "servers") {
        for item in items {
            let Some(reference) = item.reference().map(str::to_owned) else {
                reader.error(
                    item.loc.clone(),
                    SpecErrorKind::Invalid("a channel's servers must be references ($ref)".into()),
                );
                continue;
            };
            let tokens = reference
                .strip_prefix('#')
                .map(pointer_tokens)
                .unwrap_or_default();
            match tokens.as_slice() {
                [servers_key, name] if servers_key == "servers" => {
                    if api.server(name).is_some() {
                        servers.push(name.clone());
                    } else {
                        reader.error(
                            item.loc.join("$ref"),
                            SpecErrorKind::UnknownServer {
                                server: name.clone(),
                            },
                        );
                    }
                }
                _ => reader.error(
                    item.loc.join("$ref"),
                    SpecErrorKind::Reference(ReferenceRule::ChannelServerNotInRoot { reference }),
                ),
            }
        }
    }

    let mut messages = Vec::new();
    let mut by_location = HashMap::new();
    if let Some(map) = reader.object_field(channel, "messages") {
        for (message_id, node) in map.entries() {
            by_location.insert(node.loc.clone(), message_id.clone());
            by_location.insert(
                written.loc.join("messages").join(&message_id),
                message_id.clone(),
            );
            if let Some(target) = reader.deref(&node) {
                by_location.insert(target.loc.clone(), message_id.clone());
            }
            if let Some(m) = read_message(reader, &node, message_id, ctx) {
                messages.push(m);
            }
        }
    }
    let bindings = read_bindings(reader, channel, BindingTarget::Channel);
    let description = reader.summary(channel);
    Some((
        Channel {
            id: id.clone(),
            address,
            parameters,
            messages,
            description,
            servers,
            bindings,
            extensions: stepflow_extensions(channel),
            location: channel.loc.clone(),
        },
        ChannelMessages { id, by_location },
    ))
}

/// The channel id a root-level `channel: {$ref: '#/channels/X'}` names, or the rule it breaks.
pub(super) fn root_channel_id(
    reader: &mut Reader<'_>,
    field: &Node,
    root: &Node,
) -> Option<String> {
    let Some(reference) = field.reference().map(str::to_owned) else {
        reader.error(
            field.loc.clone(),
            SpecErrorKind::Invalid("`channel` must be a reference ($ref) to a channel".into()),
        );
        return None;
    };
    let at = field.loc.join("$ref");
    let target = match reader.sources.deref_once(field) {
        Ok(t) => t,
        Err(e) => {
            reader.diag.errors.push(e);
            return None;
        }
    };
    let tokens = pointer_tokens(&target.loc.pointer);
    match tokens.as_slice() {
        [channels, id] if channels == "channels" && target.loc.file == root.loc.file => {
            Some(id.clone())
        }
        _ => {
            reader.error(
                at,
                SpecErrorKind::Reference(ReferenceRule::OperationChannelNotInRoot { reference }),
            );
            None
        }
    }
}

/// Maps message references to ids of `channel`'s messages, reporting the ones that are not.
pub(super) fn message_ids(
    reader: &mut Reader<'_>,
    items: Vec<Node>,
    channel: &ChannelMessages,
) -> Vec<String> {
    let mut ids = Vec::new();
    for item in items {
        let Some(reference) = item.reference().map(str::to_owned) else {
            reader.error(
                item.loc.clone(),
                SpecErrorKind::Invalid("operation messages must be references ($ref)".into()),
            );
            continue;
        };
        let first = match reader.sources.deref_once(&item) {
            Ok(t) => t,
            Err(e) => {
                reader.diag.errors.push(e);
                continue;
            }
        };
        let last = reader.deref(&first);
        let found = channel
            .by_location
            .get(&first.loc)
            .or_else(|| last.as_ref().and_then(|l| channel.by_location.get(&l.loc)));
        match found {
            Some(id) => ids.push(id.clone()),
            None => reader.error(
                item.loc.clone(),
                SpecErrorKind::Reference(ReferenceRule::OperationMessageNotInChannel {
                    reference,
                    channel: channel.id.clone(),
                }),
            ),
        }
    }
    ids
}

pub(super) fn read_v3_operation(
    reader: &mut Reader<'_>,
    root: &Node,
    op: &Node,
    id: String,
    channels: &HashMap<String, ChannelMessages>,
) -> Option<Operation> {
    reader.check_fields(
        op,
        &[
            "action",
            "channel",
            "title",
            "summary",
            "description",
            "security",
            "tags",
            "externalDocs",
            "bindings",
            "traits",
            "messages",
            "reply",
        ],
    );
    let action = match reader.required_string(op, "action").as_deref() {
        Some("send") => Some(Action::Send),
        Some("receive") => Some(Action::Receive),
        Some(other) => {
            reader.error(
                op.loc.join("action"),
                SpecErrorKind::Invalid(format!(
                    "action must be 'send' or 'receive', found '{other}'"
                )),
            );
            None
        }
        None => None,
    };
    let channel_id = match op.get("channel") {
        Some(field) => root_channel_id(reader, &field, root),
        None => {
            reader.missing(op, "channel");
            None
        }
    };
    let channel = channel_id.as_ref().and_then(|c| channels.get(c));
    let messages = match (reader.array_field(op, "messages"), channel) {
        (Some(items), Some(channel)) => message_ids(reader, items, channel),
        _ => Vec::new(),
    };
    let reply = op
        .get("reply")
        .and_then(|r| read_v3_reply(reader, root, &r, channels));
    let bindings = read_bindings(reader, op, BindingTarget::Operation);
    let security = read_security(reader, root, op, Major::V3);
    let description = reader.summary(op);
    Some(Operation {
        id,
        action: action?,
        channel: channel_id?,
        messages,
        reply,
        description,
        bindings,
        security,
        http: None,
        location: op.loc.clone(),
    })
}

pub(super) fn read_v3_reply(
    reader: &mut Reader<'_>,
    root: &Node,
    node: &Node,
    channels: &HashMap<String, ChannelMessages>,
) -> Option<Reply> {
    let reply = reader.object(node)?;
    reader.check_fields(&reply, &["address", "channel", "messages"]);
    let address_location = match reader.object_field(&reply, "address") {
        Some(address) => {
            reader.check_fields(&address, &["location", "description"]);
            let location = reader.required_string(&address, "location");
            if let Some(l) = &location
                && !l.starts_with("$message.")
            {
                reader.error(
                    address.loc.join("location"),
                    SpecErrorKind::Invalid(format!(
                        "reply address location '{l}' must be a runtime expression starting with '$message.'"
                    )),
                );
            }
            location
        }
        None => None,
    };
    let channel = reply
        .get("channel")
        .and_then(|c| root_channel_id(reader, &c, root));
    let messages = match (
        reader.array_field(&reply, "messages"),
        channel.as_ref().and_then(|c| channels.get(c)),
    ) {
        (Some(items), Some(ch)) => message_ids(reader, items, ch),
        _ => Vec::new(),
    };
    if channel.is_none() && address_location.is_none() {
        reader.error(
            reply.loc.clone(),
            SpecErrorKind::Invalid("a reply needs a `channel` or an `address`".into()),
        );
    }
    Some(Reply {
        channel,
        address_location,
        messages,
    })
}
