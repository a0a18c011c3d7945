//! The layering rules the code keeps, checked on the source: a rule that only lives in a
//! module comment is one refactor away from being broken.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Lines of `src/` that mention any of `needles`, outside the files `allowed` lets through, as
/// `src/path:line: text`.
fn mentions(allowed: impl Fn(&Path) -> bool, needles: &[&str]) -> Vec<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 20, "the source tree was found: {files:?}");
    let mut offenders = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap().to_path_buf();
        if allowed(&relative) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            if needles.iter().any(|needle| line.contains(needle)) {
                offenders.push(format!(
                    "src/{}:{}: {}",
                    relative.display(),
                    n + 1,
                    line.trim()
                ));
            }
        }
    }
    offenders
}

#[test]
fn only_the_daemon_the_binary_and_the_fuzz_entry_points_reach_into_connectors() {
    // The registry is `connectors/mod.rs`; the daemon starts connectors through it, and the
    // binary (`validate`, `routes`) and the fuzz entry points (an upload's whole compile)
    // compile documents with it. Every other layer is below.
    let offenders = mentions(
        |file| {
            file.starts_with("connectors")
                || file == Path::new("daemon.rs")
                || file == Path::new("main.rs")
                || file == Path::new("fuzzing.rs")
        },
        &["crate::connectors", "stepflow::connectors"],
    );
    assert!(
        offenders.is_empty(),
        "shared upstream types live in `crate::upstream`, protocol bindings behind `routing::binding`; only daemon.rs, main.rs and fuzzing.rs use the registry:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn the_upstream_layer_knows_no_protocol_client() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/upstream");
    let mut files = Vec::new();
    sources(&dir, &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for forbidden in [
            "rumqttc",
            "rdkafka",
            "lapin",
            "tokio_tungstenite",
            "axum",
            "crate::hub",
        ] {
            assert!(
                !text.contains(forbidden),
                "{} uses {forbidden}: the upstream layer sits below the hub and the connectors",
                file.display()
            );
        }
    }
}

#[test]
fn only_the_store_knows_its_backend_is_sled() {
    // Everything above the store holds a `Store` (a `dyn LogBackend`): a cluster-wide backend
    // replaces sled without touching them.
    let offenders = mentions(|file| file.starts_with("store"), &["sled::", "SledLog"]);
    assert!(
        offenders.is_empty(),
        "sled is the store's business; above it, use `Store` and `LogBackend`:\n{}",
        offenders.join("\n")
    );
}
