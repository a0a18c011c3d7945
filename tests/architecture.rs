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

#[test]
fn only_the_daemon_and_the_binary_reach_into_connectors() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 20, "the source tree was found: {files:?}");
    let mut offenders = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap().to_path_buf();
        // The registry is `connectors/mod.rs`; the daemon starts connectors through it and the
        // binary compiles documents with it (`validate`, `routes`). Every other layer is below.
        let allowed = relative.starts_with("connectors")
            || relative == Path::new("daemon.rs")
            || relative == Path::new("main.rs");
        if allowed {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            if line.contains("crate::connectors") || line.contains("stepflow::connectors") {
                offenders.push(format!(
                    "src/{}:{}: {}",
                    relative.display(),
                    n + 1,
                    line.trim()
                ));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "shared upstream types live in `crate::upstream`, protocol bindings behind `routing::binding`; only daemon.rs and main.rs use the registry:\n{}",
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
