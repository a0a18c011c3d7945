//! The `stepflow` command line: thin glue over the library.

use std::path::{Path, PathBuf};

/// jemalloc instead of glibc's malloc: glibc keeps a heap arena per thread that grows under load
/// and is not returned. In the load scenario (5k msg/s, 10 WebSocket subscribers) peak RSS was
/// 54 MiB with glibc, 49 MiB with default jemalloc, 34 MiB with the settings below.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's startup options (its `malloc_conf` symbol, prefixed by tikv-jemallocator): two
/// arenas for a daemon that runs two worker threads, and freed pages returned within 250 ms
/// instead of ten seconds. `_RJEM_MALLOC_CONF` in the environment still overrides these.
#[allow(unsafe_code)] // Exporting a symbol is `unsafe` in edition 2024; the value is a C string.
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static JEMALLOC_CONF: &u8 = &b"narenas:2,dirty_decay_ms:250,muzzy_decay_ms:0\0"[0];
use std::process::ExitCode;

/// `println!` that survives its reader going away: `stepflow routes --json | head` ends
/// quietly when `head` has read enough, instead of panicking on the closed pipe.
macro_rules! out {
    ($($arg:tt)*) => { $crate::print_line(format_args!($($arg)*)) };
}

mod remote;

use clap::{Parser, Subcommand};
use stepflow::config::{Config, RunArgs};
use stepflow::connectors;
use stepflow::routing::{self, Route};
use stepflow::spec::{self, SpecError, SpecWarning};

#[derive(Parser)]
#[command(name = "stepflow", version, about = "AsyncAPI-first event bridge")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: compile the documents, connect upstream, serve HTTP, WebSocket and SSE.
    Run(Box<RunArgs>),
    /// Check API documents: print every error as `file#pointer: reason` (exit 1), or one summary
    /// line per document (exit 0).
    Validate {
        /// Document files or directories (walked recursively for .yaml, .yml and .json).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Also print warnings (remote references not fetched, at-most-once routes, ...).
        #[arg(long, short)]
        warnings: bool,
        /// A directory of bridge definitions to check against the documents.
        #[arg(long)]
        bridges: Option<PathBuf>,
    },
    /// API keys for the `auth.api_keys` section.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Print the routing table compiled from API documents.
    Routes {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// The documents a running gateway serves: list, get, add, replace, remove.
    Specs {
        #[command(flatten)]
        remote: remote::Remote,
        #[command(subcommand)]
        command: remote::SpecsCommand,
    },
    /// Reload a running gateway's specs directories now (as SIGHUP does), and print the result.
    Reload {
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Publish one message on a writable channel of a running gateway.
    Publish {
        #[command(flatten)]
        remote: remote::Remote,
        /// The channel id (`{api}.{channel}`).
        channel: String,
        /// An address parameter, `name=value` (repeatable).
        #[arg(long = "param", short = 'p', value_parser = remote::parse_param)]
        params: Vec<(String, String)>,
        /// The payload: JSON text, or `@FILE` to read it from a file (`@-` for stdin).
        #[arg(long, short)]
        data: String,
    },
    /// Follow a channel of a running gateway: each message as it arrives.
    Tail {
        #[command(flatten)]
        remote: remote::Remote,
        channel: String,
        /// Start at this offset of the channel's log (default: new messages only).
        #[arg(long)]
        from: Option<u64>,
        /// Stop after this many messages.
        #[arg(long, short = 'n')]
        count: Option<u64>,
    },
    /// Print a window of a channel's log from a running gateway.
    Replay {
        #[command(flatten)]
        remote: remote::Remote,
        channel: String,
        /// The first offset.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// How many messages (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Read the channel's dead letters instead.
        #[arg(long)]
        dead_letters: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a new random key and the `api_keys` entry (with its SHA-256) to paste into the
    /// config file; the key itself is shown once and stored nowhere.
    Generate {
        /// The entry's id (in logs and metrics; a client certificate's CN for mutual TLS).
        #[arg(long, default_value = "new-key")]
        id: String,
        /// Scopes: publish:<channels>, subscribe:<channels>, call:<operations>, admin:read,
        /// admin:write, * (comma-separated or repeated).
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(&args),
        Command::Validate {
            paths,
            warnings,
            bridges,
        } => validate(&paths, warnings, bridges.as_deref()),
        Command::Routes { paths, json } => routes(&paths, json),
        Command::Keys {
            command: KeysCommand::Generate { id, scopes },
        } => generate_key(&id, &scopes),
        Command::Specs { remote, command } => remote::run(&remote, remote::Action::Specs(command)),
        Command::Reload { remote } => remote::run(&remote, remote::Action::Reload),
        Command::Publish {
            remote,
            channel,
            params,
            data,
        } => remote::run(
            &remote,
            remote::Action::Publish {
                channel,
                params,
                data,
            },
        ),
        Command::Tail {
            remote,
            channel,
            from,
            count,
        } => remote::run(
            &remote,
            remote::Action::Tail {
                channel,
                from,
                count,
            },
        ),
        Command::Replay {
            remote,
            channel,
            from,
            limit,
            dead_letters,
        } => remote::run(
            &remote,
            remote::Action::Replay {
                channel,
                from,
                limit,
                dead_letters,
            },
        ),
    }
}

/// Writes one line to stdout. A reader that went away ends the command (exit 0: it had what
/// it wanted); any other write failure is reported (exit 1).
fn print_line(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{args}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("stepflow: cannot write the output: {e}");
        std::process::exit(1);
    }
}

fn generate_key(id: &str, scopes: &[String]) -> ExitCode {
    if let Err(e) = stepflow::auth::Scopes::parse(scopes.iter().map(String::as_str)) {
        eprintln!("stepflow: {e}");
        return ExitCode::from(2);
    }
    let (key, hash) = match stepflow::auth::generate_key() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("stepflow: {e}");
            return ExitCode::FAILURE;
        }
    };
    let scopes = scopes
        .iter()
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(", ");
    out!("# The key (give it to the client; it is not stored anywhere):");
    out!("# {key}");
    out!("# The entry for auth.api_keys in the config file:");
    out!("- id: {id}");
    out!("  key_sha256: {hash}");
    out!("  scopes: [{scopes}]");
    ExitCode::SUCCESS
}

fn run(args: &RunArgs) -> ExitCode {
    let config = match Config::load(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stepflow: {e}");
            return ExitCode::from(2);
        }
    };
    stepflow::telemetry::init_tracing(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("stepflow: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async {
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn(stop_on_signals(shutdown.clone()));
        stepflow::daemon::run(config, shutdown).await.map_err(|e| {
            if let stepflow::daemon::Error::Specs(errors) = &e {
                for error in errors {
                    eprintln!("{error}");
                }
            }
            anyhow::Error::new(e)
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // One line: the log's (stderr, in the configured format).
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM or SIGINT start a graceful shutdown; a second one exits at once.
async fn stop_on_signals(shutdown: tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "stopping"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "stopping"),
    }
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("second signal: exiting without draining");
    std::process::exit(130);
}

/// Loads and compiles; on failure prints every error and returns `None`.
fn load_and_compile(
    paths: &[PathBuf],
) -> Option<(Vec<spec::Api>, routing::Compiled, Vec<SpecWarning>)> {
    let mut report = spec::load_all(paths);
    match connectors::compile(&report.apis) {
        Ok(compiled) if report.errors.is_empty() => Some((report.apis, compiled, report.warnings)),
        Ok(_) => {
            print_errors(&report.errors);
            None
        }
        Err(errors) => {
            report.errors.extend(errors);
            print_errors(&report.errors);
            None
        }
    }
}

fn print_errors(errors: &[SpecError]) {
    for e in errors {
        out!("{e}");
    }
    let files: std::collections::BTreeSet<_> = errors.iter().map(|e| e.file()).collect();
    eprintln!(
        "{} error{} in {} file{}",
        errors.len(),
        if errors.len() == 1 { "" } else { "s" },
        files.len(),
        if files.len() == 1 { "" } else { "s" }
    );
}

/// Checks every document, each on its own: a valid one is reported `ok` even when another
/// file of the directory is invalid; the exit code is 1 when any is invalid (or cannot run).
fn validate(paths: &[PathBuf], show_warnings: bool, bridges: Option<&Path>) -> ExitCode {
    let report = spec::load_all(paths);
    let mut errors = report.errors;
    let mut warnings = report.warnings;
    let mut valid = Vec::new();
    for api in report.apis {
        match connectors::compile(std::slice::from_ref(&api)) {
            Ok(compiled) => {
                warnings.extend(compiled.warnings);
                valid.push((api, compiled.table));
            }
            Err(e) => errors.extend(e),
        }
    }
    if valid.is_empty() && errors.is_empty() {
        out!("no AsyncAPI or OpenAPI documents found");
        return ExitCode::FAILURE;
    }
    let files_with_errors: std::collections::BTreeSet<PathBuf> =
        errors.iter().map(|e| e.file().to_path_buf()).collect();
    for (api, table) in &valid {
        let routes = table.routes();
        let readable = routes.iter().filter(|r| r.direction.readable).count();
        let writable = routes.iter().filter(|r| r.direction.writable).count();
        let own_warnings = warnings
            .iter()
            .filter(|w| w.location.file == api.source.file)
            .count();
        out!(
            "ok {} ({}, \"{}\" {}, id {}): {} routes ({} readable, {} writable), {} operations, {} servers{}",
            api.source.file.display(),
            api.kind,
            api.title,
            api.version,
            api.id,
            routes.len(),
            readable,
            writable,
            api.operations.len(),
            api.servers.len(),
            match own_warnings {
                0 => String::new(),
                n => format!(", {n} warning{}", if n == 1 { "" } else { "s" }),
            }
        );
    }
    // Errors stay one `file#pointer: reason` line each on stdout (for editors and grep); the
    // per-file verdict goes to stderr.
    for file in &files_with_errors {
        let own: Vec<&SpecError> = errors
            .iter()
            .filter(|e| e.file() == file.as_path())
            .collect();
        for e in &own {
            out!("{e}");
        }
        eprintln!(
            "invalid {}: {} error{}",
            file.display(),
            own.len(),
            if own.len() == 1 { "" } else { "s" }
        );
    }
    let mut failed = !errors.is_empty();
    // Bridges link documents: they are checked against the valid ones together.
    if let Some(dir) = bridges {
        let apis: Vec<spec::Api> = valid.iter().map(|(api, _)| api.clone()).collect();
        match connectors::compile(&apis) {
            Ok(compiled) => {
                let table = &compiled.table;
                // Operations callable by id: OpenAPI operations and AsyncAPI sends with a reply.
                let has_operation = |id: &str| {
                    table.routes().iter().any(|r| {
                        r.request_reply
                            .iter()
                            .any(|rr| format!("{}.{}", r.api, rr.operation) == id)
                    })
                };
                match stepflow::bridge::load(dir, table, &has_operation) {
                    Ok(bridges) => {
                        for b in &bridges {
                            out!(
                                "ok bridge {} ({}): {} → {}",
                                b.name,
                                b.file.display(),
                                b.source,
                                b.lanes
                                    .iter()
                                    .map(|l| l.target.label())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            );
                        }
                    }
                    Err(bridge_errors) => {
                        print_errors(&bridge_errors);
                        failed = true;
                    }
                }
            }
            Err(e) => {
                print_errors(&e);
                failed = true;
            }
        }
    }
    if show_warnings {
        for w in &warnings {
            out!("{w}");
        }
    } else if !warnings.is_empty() {
        eprintln!("{} warnings (see them with --warnings)", warnings.len());
    }
    if failed {
        let files = files_with_errors.len();
        if files > 0 {
            eprintln!(
                "{} error{} in {files} file{}",
                errors.len(),
                if errors.len() == 1 { "" } else { "s" },
                if files == 1 { "" } else { "s" }
            );
        }
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn routes(paths: &[PathBuf], json: bool) -> ExitCode {
    let Some((_, compiled, _)) = load_and_compile(paths) else {
        return ExitCode::FAILURE;
    };
    let routes = compiled.table.routes();
    if json {
        let list: Vec<&Route> = routes.iter().map(|r| &**r).collect();
        match serde_json::to_string_pretty(&list) {
            Ok(text) => out!("{text}"),
            Err(e) => {
                eprintln!("cannot render the routing table as JSON: {e}");
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }
    // One line per upstream; the route's own columns only on its first line.
    let mut rows: Vec<[String; 5]> = Vec::new();
    for r in routes {
        let mut direction = r.direction.as_str().to_owned();
        if !r.request_reply.is_empty() {
            direction.push_str("+reply");
        }
        let upstreams = upstream_lines(r);
        for (i, upstream) in upstreams.into_iter().enumerate() {
            rows.push(if i == 0 {
                [
                    r.id.to_string(),
                    direction.clone(),
                    r.address.clone().unwrap_or_else(|| "(dynamic)".into()),
                    upstream,
                    r.messages
                        .iter()
                        .map(|m| m.id.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                ]
            } else {
                [
                    String::new(),
                    String::new(),
                    String::new(),
                    upstream,
                    String::new(),
                ]
            });
        }
    }
    let header = ["ROUTE", "DIRECTION", "ADDRESS", "UPSTREAM", "MESSAGES"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let print_row = |cells: [&str; 5]| {
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out!("{}", line.trim_end());
    };
    print_row(header);
    for row in &rows {
        print_row([&row[0], &row[1], &row[2], &row[3], &row[4]]);
    }
    out!("{} routes", routes.len());
    ExitCode::SUCCESS
}

fn upstream_lines(route: &Route) -> Vec<String> {
    if route.upstreams.is_empty() {
        return vec!["-".into()];
    }
    route
        .upstreams
        .iter()
        .map(|u| {
            let detail = u.binding.describe();
            format!("{}:{} {}", u.server, u.protocol, detail)
        })
        .collect()
}
