//! Conformance over the shared corpus (`../shared/conformance/`, read in place, never copied):
//! every official AsyncAPI 2.6 / 3.0 / 3.1 example and every OpenAPI example loads and compiles into a
//! routing table; every invalid document is rejected for the reason its README gives.

use std::path::{Path, PathBuf};
use stepflow::connectors::ws::WebSocketRoute;

use stepflow::routing::RoutingTable;
use stepflow::spec::{self, ReferenceRule, SpecError, SpecErrorKind};

fn corpus() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance");
    assert!(
        dir.is_dir(),
        "the conformance corpus is missing at {}: the repository must be checked out next to shared/",
        dir.display()
    );
    dir
}

/// Documents below `dir`, skipping the `common/` `$ref` targets of the social-media examples.
fn documents(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "common") {
                    stack.push(path);
                }
            } else if path
                .extension()
                .is_some_and(|e| e == "yml" || e == "yaml" || e == "json")
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn load_and_compile(path: &Path) -> Result<RoutingTable, Vec<SpecError>> {
    let loaded = spec::load_file(path).map_err(|f| f.errors)?;
    stepflow::connectors::compile(&loaded.apis).map(|c| c.table)
}

fn assert_all_compile(dir: &str, expected: usize) {
    let docs = documents(&corpus().join(dir));
    assert_eq!(docs.len(), expected, "documents in {dir}: {docs:#?}");
    let mut failures = Vec::new();
    for doc in &docs {
        match load_and_compile(doc) {
            Ok(table) => {
                let api = spec::load_file(doc).unwrap().apis.remove(0);
                assert_eq!(
                    table.len(),
                    api.channels.len(),
                    "{}: one route per channel",
                    doc.display()
                );
            }
            Err(errors) => failures.push(format!(
                "{}:\n  {}",
                doc.display(),
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n  ")
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "documents that did not compile:\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_asyncapi_2_6_example_compiles() {
    assert_all_compile("asyncapi/v2", 21);
}

#[test]
fn every_asyncapi_3_0_example_compiles() {
    assert_all_compile("asyncapi/v3", 24);
}

#[test]
fn every_asyncapi_3_1_example_compiles() {
    assert_all_compile("asyncapi/v3.1", 24);
}

#[test]
fn every_openapi_example_compiles() {
    assert_all_compile("openapi/v3.0", 7);
    assert_all_compile("openapi/v3.1", 8);
}

/// What the rejection of one invalid document must say: the JSON pointer of an error, and a
/// check on its kind.
struct Expected {
    file: &'static str,
    pointer: &'static str,
    kind: fn(&SpecErrorKind) -> bool,
}

fn assert_rejected(dir: &str, cases: &[Expected]) {
    let files = documents(&corpus().join(dir));
    let yaml: Vec<&PathBuf> = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert_eq!(
        yaml.len(),
        cases.len(),
        "every invalid document has an expectation"
    );
    for case in cases {
        let path = corpus().join(dir).join(case.file);
        let errors = match load_and_compile(&path) {
            Ok(_) => panic!("{} was accepted", path.display()),
            Err(errors) => errors,
        };
        assert!(
            errors.iter().any(|e| e.pointer() == case.pointer
                && (case.kind)(&e.kind)
                && e.file().ends_with(case.file)),
            "{}: expected an error at #{} of the expected kind, got:\n  {}",
            case.file,
            case.pointer,
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }
}

#[test]
fn every_invalid_asyncapi_document_is_rejected_for_its_reason() {
    use SpecErrorKind as K;
    let cases = [
        Expected {
            file: "pjs-v2-openapi-payload-bad-type.yaml",
            pointer: "/components/messages/testMessage/payload",
            kind: |k| matches!(k, K::InvalidSchema { reason, .. } if reason.contains("nonexistent")),
        },
        Expected {
            file: "pjs-v3-amqp-unresolvable-ref.yaml",
            pointer: "/components/schemas/AvroExample/schema/$ref",
            kind: |k| matches!(k, K::RefFragmentNotPointer { .. } | K::UnresolvedRef { .. }),
        },
        Expected {
            file: "pjs-v3-channel-address-param-undefined.yaml",
            pointer: "/channels/userChannel/parameters",
            kind: |k| matches!(k, K::UndeclaredParameters { missing } if missing == "anotherParam"),
        },
        Expected {
            file: "pjs-v3-missing-info.yaml",
            pointer: "",
            kind: |k| matches!(k, K::MissingField { field: "info" }),
        },
        Expected {
            file: "pjs-v3-operation-message-not-in-channel.yaml",
            pointer: "/operations/UserSignedUp/messages/0",
            kind: |k| matches!(k, K::Reference(ReferenceRule::OperationMessageNotInChannel { channel, .. }) if channel == "UserSignedUp"),
        },
        Expected {
            file: "pjs-v3-root-channel-servers-in-components.yaml",
            pointer: "/channels/UserSignedUp/servers/1/$ref",
            kind: |k| {
                matches!(
                    k,
                    K::Reference(ReferenceRule::ChannelServerNotInRoot { .. })
                )
            },
        },
        Expected {
            file: "pjs-v3-root-operation-channel-in-components.yaml",
            pointer: "/operations/UserSignedUp/channel/$ref",
            kind: |k| {
                matches!(
                    k,
                    K::Reference(ReferenceRule::OperationChannelNotInRoot { .. })
                )
            },
        },
        Expected {
            file: "tck-v2-amqp-channel-binding-bad-is.yaml",
            pointer: "/channels/~1user~1signedup/bindings/amqp/is",
            kind: |k| {
                matches!(
                    k,
                    K::InvalidBinding {
                        protocol: "amqp",
                        ..
                    }
                )
            },
        },
        Expected {
            file: "tck-v2-bad-version-string.yaml",
            pointer: "/asyncapi",
            kind: |k| matches!(k, K::UnsupportedVersion { found, .. } if found == "welcome"),
        },
        Expected {
            file: "tck-v2-channel-query-string.yaml",
            pointer: "/channels/~1user~1signedup?foo=1",
            kind: |k| matches!(k, K::BadChannelAddress { problem, .. } if problem.contains("query")),
        },
        Expected {
            file: "tck-v2-duplicate-operationId.yaml",
            pointer: "/channels/~1user~1signedup/subscribe/operationId",
            kind: |k| matches!(k, K::DuplicateId { what: "operationId", id, .. } if id == "userSignedUp"),
        },
        Expected {
            file: "tck-v2-http-operation-binding-bad-method.yaml",
            pointer: "/channels/~1user~1signedup/subscribe/bindings/http/method",
            kind: |k| {
                matches!(
                    k,
                    K::InvalidBinding {
                        protocol: "http",
                        ..
                    }
                )
            },
        },
        Expected {
            file: "tck-v2-kafka-operation-binding-extra-prop.yaml",
            pointer: "/channels/~1user~1signedup/subscribe/bindings/kafka/hello",
            kind: |k| matches!(k, K::InvalidBinding { protocol: "kafka", problem } if problem.contains("hello")),
        },
        Expected {
            file: "tck-v2-missing-channels.yaml",
            pointer: "",
            kind: |k| matches!(k, K::MissingField { field: "channels" }),
        },
        Expected {
            file: "tck-v2-mqtt-qos-out-of-range.yaml",
            pointer: "/channels/~1user~1signedup/publish/bindings/mqtt/qos",
            kind: |k| matches!(k, K::InvalidBinding { protocol: "mqtt", problem } if problem.contains("124")),
        },
        Expected {
            file: "tck-v2-not-a-mapping.yaml",
            pointer: "",
            kind: |k| matches!(k, K::RootNotAMapping { found: "a string" }),
        },
        Expected {
            file: "tck-v2-parameter-bad-key.yaml",
            pointer: "/channels/user~1{userId}~1signup/parameters/$!@$%#!@$",
            kind: |k| matches!(k, K::BadParameterName { .. }),
        },
        Expected {
            file: "tck-v2-ref-fragment-not-json-pointer.yaml",
            pointer: "/channels/~1user~1signedup/subscribe/message/payload/$ref",
            kind: |k| matches!(k, K::RefFragmentNotPointer { fragment, .. } if fragment == "userSignUp"),
        },
        Expected {
            file: "tck-v2-ref-missing-file.yaml",
            pointer: "/channels/~1user~1signedup/subscribe/message/payload/$ref",
            kind: |k| matches!(k, K::UnresolvedRef { reference, .. } if reference.starts_with("inexistingFile.yml")),
        },
        Expected {
            file: "tck-v2-server-missing-protocol.yaml",
            pointer: "/servers/production",
            kind: |k| matches!(k, K::MissingField { field: "protocol" }),
        },
    ];
    assert_rejected("asyncapi/invalid", &cases);
}

#[test]
fn both_misplaced_server_references_are_reported() {
    let path = corpus().join("asyncapi/invalid/pjs-v3-root-channel-servers-in-components.yaml");
    let errors = load_and_compile(&path).unwrap_err();
    let pointers: Vec<&str> = errors.iter().map(|e| e.pointer()).collect();
    assert!(
        pointers.contains(&"/channels/UserSignedUp/servers/0/$ref"),
        "{pointers:?}"
    );
    assert!(
        pointers.contains(&"/channels/UserSignedUp/servers/1/$ref"),
        "{pointers:?}"
    );
}

#[test]
fn every_invalid_openapi_document_is_rejected_for_its_reason() {
    use SpecErrorKind as K;
    let cases = [
        Expected {
            file: "oas31-invalid_schema_types.yaml",
            pointer: "/components/schemas/invalid_array",
            kind: |k| {
                matches!(
                    k,
                    K::WrongType {
                        found: "an array",
                        ..
                    }
                )
            },
        },
        Expected {
            file: "oas31-no_containers.yaml",
            pointer: "",
            kind: |k| matches!(k, K::Invalid(m) if m.contains("paths")),
        },
        Expected {
            file: "oas31-server_enum_empty.yaml",
            pointer: "/servers/0/variables/var/enum",
            kind: |k| matches!(k, K::Invalid(m) if m.contains("empty")),
        },
        Expected {
            file: "oas31-servers.yaml",
            pointer: "/servers",
            kind: |k| {
                matches!(
                    k,
                    K::WrongType {
                        expected: "a sequence",
                        ..
                    }
                )
            },
        },
        Expected {
            file: "oas31-unknown_container.yaml",
            pointer: "/overlays",
            kind: |k| matches!(k, K::UnknownField { field, .. } if field == "overlays"),
        },
    ];
    assert_rejected("openapi/invalid", &cases);
}

#[test]
fn no_file_in_the_corpus_panics_the_loader() {
    let mut all = Vec::new();
    let mut stack = vec![corpus()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                all.push(path);
            }
        }
    }
    assert!(
        all.len() > 80,
        "corpus looks incomplete: {} files",
        all.len()
    );
    for path in all {
        let outcome = std::panic::catch_unwind(|| {
            if let Ok(loaded) = spec::load_file(&path) {
                let _ = stepflow::connectors::compile(&loaded.apis);
            }
        });
        assert!(outcome.is_ok(), "loading {} panicked", path.display());
    }
}

#[test]
fn the_request_reply_example_compiles_into_a_request_reply_route() {
    let table =
        load_and_compile(&corpus().join("asyncapi/v3/adeo-kafka-request-reply-asyncapi.yml"))
            .unwrap();
    let request = table
        .get("adeo-kafka-request-reply-asyncapi.costingRequest")
        .expect("route");
    assert!(request.direction.readable);
    let rr = &request.request_reply[0];
    assert_eq!(rr.operation, "requestCosting");
    assert_eq!(
        rr.reply_channel.as_deref(),
        Some("adeo-kafka-request-reply-asyncapi.costingResponse")
    );
    assert_eq!(
        rr.reply_address_location.as_deref(),
        Some("$message.header#/REPLY_TOPIC")
    );
}

#[test]
fn the_websocket_examples_compile_into_client_side_websocket_routes() {
    // Gemini's documents describe its server (`send` = the server sends), on a `wss` server:
    // the gateway is the client, so the market data is readable through it.
    for (file, route) in [
        (
            "asyncapi/v3/websocket-gemini-asyncapi.yml",
            "websocket-gemini-asyncapi.marketDataV1",
        ),
        (
            "asyncapi/v2/websocket-gemini.yml",
            "websocket-gemini.v1-marketdata-symbol",
        ),
    ] {
        let table = load_and_compile(&corpus().join(file)).unwrap();
        let route = table.get(route).expect("route");
        assert!(route.direction.readable && !route.direction.writable);
        let upstream = &route.upstreams[0];
        assert_eq!(upstream.url, "wss://api.gemini.com");
        let Some(ws) = upstream.binding.get::<WebSocketRoute>() else {
            panic!("{file}: not a WebSocket upstream: {:?}", upstream.binding);
        };
        let path = ws.path.as_ref().expect("a path");
        assert_eq!(
            path.fill(|_| Some("btcusd")).unwrap(),
            "/v1/marketdata/btcusd"
        );
        assert!(ws.query.is_some(), "the ws binding's query schema is kept");
        let symbol = &route.parameters[0];
        assert_eq!(symbol.name, "symbol");
        assert!(symbol.allowed.as_ref().unwrap().contains(&"btcusd".into()));
    }
    // Kraken's documents name no server: their routes compile, with nothing to connect to.
    for file in [
        "asyncapi/v3/kraken-websocket-request-reply-multiple-channels-asyncapi.yml",
        "asyncapi/v3/kraken-websocket-request-reply-message-filter-in-reply-asyncapi.yml",
    ] {
        let table = load_and_compile(&corpus().join(file)).unwrap();
        assert!(!table.is_empty());
        assert!(table.routes().iter().all(|r| r.upstreams.is_empty()));
    }
}
