//! Reloads the specs directories when their files change: the operating system's file events
//! through `notify` (inotify here), or its polling watcher where those are not available
//! (network file systems, some containers) or when the configuration asks for it.
//!
//! Events are coalesced: an editor's save is several events (a temporary file, a rename, a
//! chmod) and a `git checkout` is hundreds, and all of them make one reload once the
//! directory has been quiet for the debounce interval.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{SpecRegistry, Trigger};

/// The `watch` section of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchConfig {
    /// Reload when a file of the specs directories changes (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Poll every this many milliseconds instead of using the operating system's events.
    pub poll_interval_ms: Option<u64>,
    /// How long the directories must be quiet before a reload (default 300).
    #[serde(default = "default_debounce_ms")]
    pub debounce_ms: u64,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            enabled: true,
            poll_interval_ms: None,
            debounce_ms: default_debounce_ms(),
        }
    }
}

fn yes() -> bool {
    true
}

fn default_debounce_ms() -> u64 {
    300
}

/// Whether an event can change what the loader reads: documents only, not an editor's swap
/// file or the registry's own `.partial` files.
fn concerns_documents(event: &notify::Event) -> bool {
    !matches!(event.kind, EventKind::Access(_))
        && event.paths.iter().any(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) || p.is_dir()
        })
}

/// Starts watching `paths` and reloading `registry` until `shutdown`. Returns `Err` when no
/// watcher could be set up (the caller logs it; SIGHUP still reloads).
pub fn start(
    registry: Arc<SpecRegistry>,
    paths: Vec<PathBuf>,
    config: &WatchConfig,
    shutdown: CancellationToken,
) -> Result<(), notify::Error> {
    // One pending signal is enough: a reload reads every file anyway.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    // A file named on its own is watched through its directory: editors and config management
    // replace a file by renaming another over it, and a watch on the file would follow the old
    // inode. Only events on that file count.
    // Absolute, so that the paths events carry compare with them.
    let absolute: Vec<PathBuf> = paths
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .collect();
    let files: Vec<PathBuf> = absolute.iter().filter(|p| p.is_file()).cloned().collect();
    let dirs: Vec<PathBuf> = absolute.iter().filter(|p| !p.is_file()).cloned().collect();
    let (watched_files, watched_dirs) = (files.clone(), dirs.clone());
    let ours = move |event: &notify::Event| {
        event.paths.iter().any(|p| {
            watched_dirs.iter().any(|d| p.starts_with(d)) || watched_files.iter().any(|f| p == f)
        })
    };
    let handler = move |event: notify::Result<notify::Event>| match event {
        Ok(event) if concerns_documents(&event) && ours(&event) => {
            let _ = tx.try_send(());
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "file watcher error"),
    };
    let mut watcher: Box<dyn Watcher + Send> = match config.poll_interval_ms {
        Some(ms) => Box::new(notify::PollWatcher::new(
            handler,
            notify::Config::default().with_poll_interval(Duration::from_millis(ms.max(100))),
        )?),
        None => match notify::recommended_watcher(handler.clone()) {
            Ok(w) => Box::new(w),
            Err(e) => {
                tracing::warn!(error = %e, "no file events from the system: polling the specs directories every 2 s");
                Box::new(notify::PollWatcher::new(
                    handler,
                    notify::Config::default().with_poll_interval(Duration::from_secs(2)),
                )?)
            }
        },
    };
    for dir in &dirs {
        watcher.watch(dir, RecursiveMode::Recursive)?;
    }
    for file in &files {
        let parent = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        watcher.watch(parent, RecursiveMode::NonRecursive)?;
    }
    tracing::info!(
        paths = ?paths,
        polling = config.poll_interval_ms.is_some(),
        "watching the specs directories"
    );
    let debounce = Duration::from_millis(config.debounce_ms);
    tokio::spawn(async move {
        // Dropped with the task: the watcher stops with it.
        let _watcher = watcher;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                event = rx.recv() => if event.is_none() { break },
            }
            // Quiet for `debounce` since the last event.
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(debounce) => break,
                    _ = rx.recv() => {}
                }
            }
            registry.reload_files(Trigger::Watch).await;
        }
    });
    Ok(())
}
