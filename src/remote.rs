//! The binary's client commands: `stepflow specs|reload|publish|tail|replay` against a running
//! gateway's HTTP API (`stepflow::client`). Human-readable lines by default, `--json` for
//! scripts; exit 1 when the gateway refuses, 2 when the command line is wrong.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};
use stepflow::client::{Client, ClientError, segment};

/// Where the gateway is and how to authenticate.
#[derive(Args)]
pub struct Remote {
    /// The running gateway's base URL.
    #[arg(
        long,
        env = "STEPFLOW_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// An API key or a JWT, sent as `Authorization: Bearer`.
    #[arg(long, env = "STEPFLOW_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    /// Print the gateway's JSON answers (one JSON document per line for `tail`).
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
pub enum SpecsCommand {
    /// Every registered document.
    List,
    /// A document's text as registered.
    Get { id: String },
    /// Add a document (AsyncAPI or OpenAPI, YAML or JSON).
    Add {
        /// The document's file (`-` for stdin).
        file: String,
        /// The file name it is kept under (default: its `x-stepflow-id`, else `api`, `.yaml`).
        #[arg(long)]
        name: Option<String>,
        /// Show what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Replace a document added over the API, by diff.
    Replace {
        id: String,
        file: String,
        #[arg(long)]
        dry_run: bool,
        /// Refuse the change when it breaks the old version's producers or consumers.
        #[arg(long)]
        no_breaking: bool,
    },
    /// Remove a document added over the API.
    Rm {
        id: String,
        /// Delete its channels' logs now instead of leaving them to retention.
        #[arg(long)]
        purge: bool,
        #[arg(long)]
        dry_run: bool,
    },
    /// The last changes tried (API, file watcher, SIGHUP), newest first.
    History,
}

pub enum Action {
    Specs(SpecsCommand),
    Reload,
    Publish {
        channel: String,
        params: Vec<(String, String)>,
        data: String,
    },
    Tail {
        channel: String,
        from: Option<u64>,
        count: Option<u64>,
    },
    Replay {
        channel: String,
        from: u64,
        limit: usize,
        dead_letters: bool,
    },
}

/// `name=value`.
pub fn parse_param(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("'{text}' is not name=value")),
    }
}

pub fn run(remote: &Remote, action: Action) -> ExitCode {
    let client = match Client::new(&remote.url, remote.api_key.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stepflow: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("stepflow: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(perform(&client, remote.json, action));
    match result {
        Ok(code) => code,
        Err(Failure::Usage(message)) => {
            eprintln!("stepflow: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Client(e)) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Usage(String),
    Client(ClientError),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Client(e)
    }
}

/// The refusal on stderr, with the document's problems or the breaking changes one per line.
fn report(e: &ClientError) {
    eprintln!("stepflow: {e}");
    if let ClientError::Refused { details, .. } = e {
        if let Some(errors) = details["errors"].as_array() {
            for error in errors {
                eprintln!("  {}", error.as_str().unwrap_or_default());
            }
        }
        if let Some(breaking) = details["diff"]["breaking"].as_array() {
            for change in breaking {
                eprintln!("  breaking: {}", describe_change(change));
            }
        }
    }
}

fn describe_change(change: &Value) -> String {
    let place = change["channel"]
        .as_str()
        .or_else(|| change["operation"].as_str())
        .unwrap_or("");
    format!(
        "{place} {} {}: {}",
        change["change"].as_str().unwrap_or_default(),
        change["path"].as_str().unwrap_or_default(),
        change["detail"].as_str().unwrap_or_default()
    )
}

fn read_input(file: &str) -> Result<(String, Vec<u8>), Failure> {
    use std::io::Read;
    let mut bytes = Vec::new();
    let name = if file == "-" {
        std::io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|e| Failure::Usage(format!("cannot read stdin: {e}")))?;
        "stdin".to_owned()
    } else {
        bytes =
            std::fs::read(file).map_err(|e| Failure::Usage(format!("cannot read {file}: {e}")))?;
        file.to_owned()
    };
    Ok((name, bytes))
}

fn content_type_of(file: &str) -> &'static str {
    if file.ends_with(".json") {
        "application/json"
    } else {
        "application/yaml"
    }
}

async fn perform(client: &Client, json: bool, action: Action) -> Result<ExitCode, Failure> {
    match action {
        Action::Specs(command) => specs(client, json, command).await,
        Action::Reload => {
            let answer = client
                .call(Method::POST, "/api/v1/reloads", &[], None)
                .await?;
            if json {
                out!("{answer}");
            } else {
                out!("{}", describe_reload(&answer));
            }
            Ok(ExitCode::SUCCESS)
        }
        Action::Publish {
            channel,
            params,
            data,
        } => {
            let bytes = match data.strip_prefix('@') {
                Some(file) => read_input(file)?.1,
                None => data.into_bytes(),
            };
            let content_type = if serde_json::from_slice::<Value>(&bytes).is_ok() {
                "application/json"
            } else {
                "text/plain"
            };
            let query: Vec<(&str, String)> = params
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone()))
                .collect();
            let answer = client
                .call(
                    Method::POST,
                    &format!("/api/v1/channels/{}/messages", segment(&channel)),
                    &query,
                    Some((content_type, bytes)),
                )
                .await?;
            if json {
                out!("{answer}");
            } else {
                out!(
                    "published on {} at offset {} ({})",
                    answer["channel"].as_str().unwrap_or(&channel),
                    answer["offset"],
                    answer["address"].as_str().unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Action::Tail {
            channel,
            from,
            count,
        } => tail(client, json, &channel, from, count).await,
        Action::Replay {
            channel,
            from,
            limit,
            dead_letters,
        } => {
            let log = if dead_letters {
                "dead-letters"
            } else {
                "messages"
            };
            let answer = client
                .get(
                    &format!("/api/v1/channels/{}/{log}", segment(&channel)),
                    &[("from", from.to_string()), ("limit", limit.to_string())],
                )
                .await?;
            if json {
                out!("{answer}");
            } else {
                let messages = answer["messages"].as_array().cloned().unwrap_or_default();
                for message in &messages {
                    out!("{}", message_line(message));
                }
                eprintln!(
                    "{} message(s); next offset {}",
                    messages.len(),
                    answer["next"]
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn specs(client: &Client, json: bool, command: SpecsCommand) -> Result<ExitCode, Failure> {
    match command {
        SpecsCommand::List => {
            let answer = client.get("/api/v1/specs", &[]).await?;
            if json {
                out!("{answer}");
                return Ok(ExitCode::SUCCESS);
            }
            let specs = answer["specs"].as_array().cloned().unwrap_or_default();
            let rows: Vec<[String; 6]> = specs
                .iter()
                .map(|s| {
                    [
                        text(&s["id"]),
                        format!("{} {}", text(&s["kind"]), text(&s["specVersion"])),
                        text(&s["version"]),
                        text(&s["source"]),
                        format!("{}/{}", s["channels"], s["operations"]),
                        text(&s["title"]),
                    ]
                })
                .collect();
            print_table(
                ["ID", "KIND", "VERSION", "SOURCE", "CHANNELS/OPS", "TITLE"],
                &rows,
            );
            Ok(ExitCode::SUCCESS)
        }
        SpecsCommand::Get { id } => {
            let text = client
                .get_text(&format!("/api/v1/specs/{}", segment(&id)))
                .await?;
            if json {
                out!("{}", json!({ "id": id, "text": text }));
            } else {
                out!("{}", text.trim_end_matches('\n'));
            }
            Ok(ExitCode::SUCCESS)
        }
        SpecsCommand::Add {
            file,
            name,
            dry_run,
        } => {
            let (source, bytes) = read_input(&file)?;
            let mut query = vec![("dry_run", dry_run.to_string())];
            // Kept under the file's own name unless told otherwise.
            let name = name.or_else(|| {
                (file != "-")
                    .then(|| std::path::Path::new(&source).file_name())
                    .flatten()
                    .map(|n| n.to_string_lossy().into_owned())
            });
            if let Some(name) = name {
                query.push(("name", name));
            }
            let answer = client
                .call(
                    Method::POST,
                    "/api/v1/specs",
                    &query,
                    Some((content_type_of(&file), bytes)),
                )
                .await?;
            if json {
                out!("{answer}");
            } else {
                let document = &answer["document"];
                out!(
                    "{} {} ({} {}, version {}): {} channel(s), {} operation(s)",
                    if dry_run { "would add" } else { "added" },
                    text(&document["id"]),
                    text(&document["kind"]),
                    text(&document["specVersion"]),
                    text(&document["version"]),
                    answer["channels"].as_array().map_or(0, Vec::len),
                    document["operations"],
                );
                for channel in answer["channels"].as_array().into_iter().flatten() {
                    out!("  + {}", text(channel));
                }
                for warning in answer["warnings"].as_array().into_iter().flatten() {
                    eprintln!("warning: {}", text(warning));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        SpecsCommand::Replace {
            id,
            file,
            dry_run,
            no_breaking,
        } => {
            let (_, bytes) = read_input(&file)?;
            let answer = client
                .call(
                    Method::PUT,
                    &format!("/api/v1/specs/{}", segment(&id)),
                    &[
                        ("dry_run", dry_run.to_string()),
                        ("allow_breaking", (!no_breaking).to_string()),
                    ],
                    Some((content_type_of(&file), bytes)),
                )
                .await?;
            if json {
                out!("{answer}");
            } else {
                let diff = &answer["diff"];
                out!(
                    "{} {} (version {}){}",
                    if dry_run { "would replace" } else { "replaced" },
                    id,
                    text(&answer["document"]["version"]),
                    if answer["reconnected"] == true {
                        ", connectors reconnect"
                    } else {
                        ""
                    }
                );
                for kind in ["channels", "operations", "servers"] {
                    for (sign, side) in [("+", "added"), ("~", "changed"), ("-", "removed")] {
                        for item in diff[kind][side].as_array().into_iter().flatten() {
                            out!("  {sign} {} {}", &kind[..kind.len() - 1], text(item));
                        }
                    }
                }
                for change in diff["breaking"].as_array().into_iter().flatten() {
                    out!("  breaking: {}", describe_change(change));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        SpecsCommand::Rm { id, purge, dry_run } => {
            let answer = client
                .call(
                    Method::DELETE,
                    &format!("/api/v1/specs/{}", segment(&id)),
                    &[
                        ("purge", purge.to_string()),
                        ("dry_run", dry_run.to_string()),
                    ],
                    None,
                )
                .await?;
            if json {
                out!("{answer}");
            } else {
                out!(
                    "{} {}: {} channel(s), {} operation(s){}",
                    if dry_run { "would remove" } else { "removed" },
                    id,
                    answer["channels"].as_array().map_or(0, Vec::len),
                    answer["document"]["operations"],
                    if purge && !dry_run {
                        format!(", {} message(s) purged", answer["purgedMessages"])
                    } else {
                        String::new()
                    }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        SpecsCommand::History => {
            let answer = client.get("/api/v1/reloads", &[]).await?;
            if json {
                out!("{answer}");
            } else {
                for reload in answer["reloads"].as_array().into_iter().flatten() {
                    out!("{}  {}", text(&reload["at"]), describe_reload(reload));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn tail(
    client: &Client,
    json: bool,
    channel: &str,
    from: Option<u64>,
    count: Option<u64>,
) -> Result<ExitCode, Failure> {
    let mut query = Vec::new();
    if let Some(from) = from {
        query.push(("from", from.to_string()));
    }
    let mut seen = 0u64;
    let mut ended: Option<String> = None;
    client
        .stream(
            &format!("/sse/{}", segment(channel)),
            &query,
            |event| match event.event.as_str() {
                "message" => {
                    if json {
                        out!("{}", event.data);
                    } else {
                        let message: Value =
                            serde_json::from_str(&event.data).unwrap_or(Value::Null);
                        out!("{}", message_line(&message));
                    }
                    seen += 1;
                    count.is_none_or(|n| seen < n)
                }
                "lagged" | "expired" => {
                    eprintln!("stepflow: {}: {}", event.event, event.data);
                    true
                }
                "removed" => {
                    ended = Some(format!("channel {channel} was removed from the gateway"));
                    false
                }
                "error" => {
                    let body: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
                    ended = Some(
                        body["error"]["message"]
                            .as_str()
                            .unwrap_or(&event.data)
                            .to_owned(),
                    );
                    false
                }
                _ => true,
            },
        )
        .await?;
    match ended {
        Some(reason) => {
            eprintln!("stepflow: {reason}");
            Ok(ExitCode::FAILURE)
        }
        None if count.is_some_and(|n| seen < n) => {
            eprintln!("stepflow: the stream ended after {seen} message(s)");
            Ok(ExitCode::FAILURE)
        }
        None => Ok(ExitCode::SUCCESS),
    }
}

/// `#offset  address  payload` for a message frame.
fn message_line(message: &Value) -> String {
    let payload = match &message["payload"] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    format!(
        "#{}  {}  {payload}",
        message["offset"],
        text(&message["address"])
    )
}

fn describe_reload(reload: &Value) -> String {
    let list = |key: &str| {
        reload[key]
            .as_array()
            .map(|a| a.iter().map(text).collect::<Vec<_>>().join(","))
            .unwrap_or_default()
    };
    let mut line = format!(
        "{} ({}): added [{}] replaced [{}] removed [{}]; channels +{} ~{} -{}; {} breaking",
        text(&reload["outcome"]),
        text(&reload["trigger"]),
        list("added"),
        list("replaced"),
        list("removed"),
        reload["channelsAdded"],
        reload["channelsChanged"],
        reload["channelsRemoved"],
        reload["breaking"],
    );
    for error in reload["errors"].as_array().into_iter().flatten() {
        line.push_str(&format!("\n  {}", text(error)));
    }
    line
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
        }
        line.trim_end().to_owned()
    };
    out!("{}", line(header.to_vec()));
    for row in rows {
        out!("{}", line(row.iter().map(String::as_str).collect()));
    }
}
