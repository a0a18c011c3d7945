//! What the daemon takes of the machine: its resident memory, and the store's size per log and
//! on disk — sampled for `/metrics` and `/api/v1/stats`.

use crate::store::Store;

/// The process's resident set size, from `/proc/self/statm` (Linux; `None` elsewhere). A read of
/// procfs: call it off the runtime's workers.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // The page size of every Linux target this daemon ships for.
    Some(pages * 4096)
}

/// A sample of the store and the process.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sample {
    pub data_dir_bytes: u64,
    pub log_bytes: u64,
    pub log_messages: u64,
    pub resident_bytes: Option<u64>,
}

/// Takes a sample (on the blocking pool: it walks the data directory) and sets the gauges.
pub async fn sample(store: &Store) -> Sample {
    let mut sample = Sample::default();
    for (log, stats) in store.all_stats() {
        let labels = [
            ("channel", log.channel.to_string()),
            ("log", log.kind.as_str().to_owned()),
        ];
        metrics::gauge!(super::LOG_STORED_BYTES, &labels).set(stats.bytes as f64);
        metrics::gauge!(super::LOG_MESSAGES, &labels).set(stats.messages as f64);
        sample.log_bytes += stats.bytes;
        sample.log_messages += stats.messages;
    }
    sample.data_dir_bytes = store.size_on_disk().await;
    sample.resident_bytes = tokio::task::spawn_blocking(resident_bytes)
        .await
        .ok()
        .flatten();
    metrics::gauge!(super::DATA_DIR_BYTES).set(sample.data_dir_bytes as f64);
    if let Some(rss) = sample.resident_bytes {
        metrics::gauge!(super::PROCESS_RSS).set(rss as f64);
    }
    sample
}
