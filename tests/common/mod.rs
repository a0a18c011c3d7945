//! Helpers for integration tests: the daemon as a process, brokers, clients. Every wait has a
//! timeout; every test owns its topics and client ids.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;

mod brokers;
mod clients;
mod daemon;
pub mod fanout;
mod faults;
mod fixtures;
pub mod soak;
mod tansu;
mod tls;

#[allow(unused_imports)]
pub use brokers::*;
#[allow(unused_imports)]
pub use clients::*;
#[allow(unused_imports)]
pub use daemon::*;
#[allow(unused_imports)]
pub use faults::*;
#[allow(unused_imports)]
pub use fixtures::*;
#[allow(unused_imports)]
pub use tansu::{Tansu, TestKafka, on_tansu};
#[allow(unused_imports)]
pub use tls::*;

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A `/proc/PID/status` field in KiB (`VmRSS:`, `VmHWM:`); none once the process is gone.
pub fn process_status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// How many descriptors a process has open; none once it is gone.
pub fn open_files(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// A name unique to this test run: `prefix-<pid>-<n>`.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Which of the sequence numbers `0..total` (the payloads' `seq`) a log lacks, and how many
/// extra copies it holds: the at-least-once bookkeeping of the crash tests.
pub fn sequence_report(log: &[serde_json::Value], total: u64) -> (Vec<u64>, u32) {
    let mut seen: std::collections::BTreeMap<u64, u32> = std::collections::BTreeMap::new();
    for m in log {
        *seen
            .entry(m["payload"]["seq"].as_u64().unwrap())
            .or_default() += 1;
    }
    let missing = (0..total).filter(|s| !seen.contains_key(s)).collect();
    let duplicates = seen.values().map(|n| n - 1).sum();
    (missing, duplicates)
}
