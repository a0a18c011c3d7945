//! Faults made on purpose: a disk that fills up, a TCP proxy that can be cut.

#[allow(unused_imports)]
use super::*;
/// A small tmpfs of the test's own, so it can fill a disk; unmounted when dropped.
pub struct SmallDisk {
    pub path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    pub fn mount(megabytes: u32) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "this test fills a disk of its own and mounts a tmpfs for it, which needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk { path, _dir: dir }
    }

    /// Writes a file until the disk is full.
    pub fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Waits until the daemon reports its message log down for lack of space (in `/readyz` and the
/// metrics), as it does when its disk is full.
pub async fn wait_for_log_failure(daemon: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = reqwest::get(daemon.url("/readyz")).await.unwrap();
        if ready.status() == 503 {
            let body: serde_json::Value = ready.json().await.unwrap();
            if body["log"]["ok"] == false {
                let error = body["log"]["error"].as_str().unwrap_or_default();
                assert!(error.contains("No space left"), "{body}");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the log never failed:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        daemon
            .metric("stepflow_log_failures_total", &[])
            .await
            .unwrap()
            >= 1.0
    );
    assert_eq!(
        daemon.metric("stepflow_log_available", &[]).await.unwrap(),
        0.0
    );
}

/// Frees the full disk (removes `filler`) and checks that the log healed: every sequence number
/// `0..total` of `channel` is logged (duplicates reported) and the daemon is ready again.
pub async fn free_disk_and_check_the_log(
    daemon: &Daemon,
    filler: &Path,
    channel: &str,
    total: u64,
    what: &str,
) -> Vec<serde_json::Value> {
    std::fs::remove_file(filler).unwrap();
    let log = daemon.wait_for_log(channel, total as usize).await;
    let (missing, duplicates) = sequence_report(&log, total);
    println!(
        "{what} full-disk test: {total} sent, {} logged, {duplicates} duplicates",
        log.len()
    );
    assert!(missing.is_empty(), "lost: {missing:?}\n{}", daemon.log());
    let ready = reqwest::get(daemon.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200, "ready again once the log is back");
    log
}

/// The first half of a full-disk test: `send(0..5)` logged, then the disk filled and
/// `send(5..total)` while the daemon reports its log down. The filler file, to free the disk.
pub async fn send_while_the_disk_fills<F, Fut>(
    daemon: &Daemon,
    disk: &SmallDisk,
    channel: &str,
    total: u64,
    send: F,
) -> PathBuf
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for seq in 0..5 {
        send(seq).await;
    }
    assert_eq!(daemon.wait_for_log(channel, 5).await.len(), 5);
    let filler = disk.fill();
    for seq in 5..total {
        send(seq).await;
    }
    // The log fails, says so, and nothing is acknowledged meanwhile.
    wait_for_log_failure(daemon).await;
    filler
}

/// A TCP proxy to a real server that the test can take down and bring back: to the gateway, the
/// server is gone (open connections cut, new ones closed at once) for that time. The proxy keeps
/// its port bound throughout, so no other process can take it meanwhile (a re-bind could fail).
pub struct TcpProxy {
    pub port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Cancelled when the proxy goes down: cuts the relays of that period.
    relays: std::sync::Arc<std::sync::Mutex<tokio_util::sync::CancellationToken>>,
    stop: tokio_util::sync::CancellationToken,
}

impl TcpProxy {
    /// A proxy to `upstream` (`host:port`), relaying.
    pub async fn start(upstream: &str) -> TcpProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let proxy = TcpProxy {
            port: listener.local_addr().unwrap().port(),
            up: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
            relays: std::sync::Arc::default(),
            stop: tokio_util::sync::CancellationToken::new(),
        };
        let upstream: std::net::SocketAddr = upstream.parse().expect("host:port");
        let (up, relays, stop) = (proxy.up.clone(), proxy.relays.clone(), proxy.stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((mut client, _)) = accepted else {
                    continue;
                };
                if !up.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees its connection closed
                }
                let cut = relays.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        proxy
    }

    /// Relays again.
    pub async fn up(&mut self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// Cuts every relayed connection and closes new ones at once.
    pub fn down(&mut self) {
        self.up.store(false, Ordering::SeqCst);
        let mut relays = self.relays.lock().unwrap();
        relays.cancel();
        *relays = tokio_util::sync::CancellationToken::new();
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.down();
        self.stop.cancel();
    }
}
