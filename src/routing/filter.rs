//! Message filters for bridges and durable subscriptions: a CEL (Common Expression Language)
//! expression over one message, compiled once at load time.
//!
//! The expression sees `params` (address parameters, strings), `headers` (strings), `payload`
//! (the JSON payload, `null` when it is not JSON), `address` and `channel`:
//! `payload.temperature > 30.0 && params.deviceId.startsWith("lab-")`. A message passes when the
//! expression is `true`; `false`, another type or an evaluation error (a missing field: guard it
//! with `has(payload.battery)`) filters it out.

use std::sync::{Arc, OnceLock};

use cel::{Context, Env, Program};

use super::envelope::Delivered;

/// Longest expression accepted, in bytes.
pub const MAX_SOURCE_BYTES: usize = 2048;
/// Deepest nesting of brackets and unary operators accepted.
pub const MAX_NESTING: usize = 16;
/// Most binary operators accepted in one expression.
pub const MAX_OPERATORS: usize = 64;

/// Refuses an expression whose shape would make the parser or the evaluator recurse deeply.
///
/// CEL's parser recurses through a dozen grammar rules per nesting level: in a debug build 20
/// nested parentheses overflow a 2 MiB stack, and an operator chain parses to a tree as deep as
/// it is long, which the evaluator then walks recursively on a runtime thread. A filter comes
/// from a client (a subscription, a bridge), so its shape is bounded before either sees it.
fn check_shape(source: &str) -> Result<(), String> {
    if source.len() > MAX_SOURCE_BYTES {
        return Err(format!(
            "the expression is {} bytes; at most {MAX_SOURCE_BYTES} are accepted",
            source.len()
        ));
    }
    let bytes = source.as_bytes();
    let (mut depth, mut deepest, mut operators) = (0usize, 0usize, 0usize);
    let mut unary_run = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            // String literals may hold any character: skipped, escapes included.
            b'"' | b'\'' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth + unary_run);
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b'!' if bytes.get(i + 1) != Some(&b'=') => {
                unary_run += 1;
                deepest = deepest.max(depth + unary_run);
                i += 1;
                continue;
            }
            b'&' | b'|' if bytes.get(i + 1) == Some(&b) => {
                operators += 1;
                i += 1;
            }
            b'+' | b'-' | b'*' | b'/' | b'%' | b'<' | b'>' | b'=' | b'!' | b'?' => {
                operators += 1;
                if matches!(bytes.get(i + 1), Some(b'=')) {
                    i += 1;
                }
            }
            _ => {}
        }
        if !b.is_ascii_whitespace() {
            unary_run = 0;
        }
        i += 1;
    }
    if deepest > MAX_NESTING {
        return Err(format!(
            "the expression nests {deepest} levels deep; at most {MAX_NESTING} are accepted"
        ));
    }
    if operators > MAX_OPERATORS {
        return Err(format!(
            "the expression has {operators} operators; at most {MAX_OPERATORS} are accepted"
        ));
    }
    Ok(())
}

/// Compiles on a thread of its own with a generous stack: within [`check_shape`]'s bounds the
/// parser is safe on any stack in a release build, and this keeps it so in a debug one (the
/// stack is reserved, not committed, so the size costs nothing it does not use).
fn compile_on_a_large_stack(source: &str) -> Result<Program, String> {
    let owned = source.to_owned();
    let compiled = std::thread::Builder::new()
        .name("cel-compile".into())
        .stack_size(64 << 20)
        .spawn(move || Program::compile(&owned).map_err(|e| e.to_string().trim().to_owned()))
        .map_err(|e| format!("cannot compile the expression: {e}"))?
        .join()
        .map_err(|_| "the expression could not be compiled".to_owned())?;
    compiled.map_err(|e| format!("not a valid CEL expression: {e}"))
}

/// The variables an expression may use.
pub const VARIABLES: [&str; 5] = ["params", "headers", "payload", "address", "channel"];

/// A compiled filter.
#[derive(Clone)]
pub struct Filter {
    source: String,
    program: Arc<Program>,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Filter({:?})", self.source)
    }
}

impl Filter {
    /// Compiles an expression; the error says what is wrong with it.
    pub fn compile(source: &str) -> Result<Filter, String> {
        check_shape(source)?;
        let program = compile_on_a_large_stack(source)?;
        let references = program.references();
        let unknown: Vec<&str> = references
            .variables()
            .into_iter()
            .filter(|v| !VARIABLES.contains(v))
            .collect();
        if !unknown.is_empty() {
            return Err(format!(
                "unknown variable(s) {}; a filter can use {}",
                unknown.join(", "),
                VARIABLES.join(", ")
            ));
        }
        Ok(Filter {
            source: source.to_owned(),
            program: Arc::new(program),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the message passes; the error explains an expression that did not evaluate to a
    /// boolean.
    pub fn matches(&self, message: &Delivered) -> Result<bool, String> {
        let envelope = &message.envelope;
        let mut context = Context::with_env(stdlib());
        let params: std::collections::HashMap<&str, &str> = envelope.params.iter().collect();
        let headers: std::collections::HashMap<&str, &str> = envelope
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let payload: serde_json::Value =
            serde_json::from_slice(&envelope.payload).unwrap_or(serde_json::Value::Null);
        let bind = |context: &mut Context, name: &str, value: Result<cel::Value, String>| {
            value.map(|v| context.add_variable_from_value(name, v))
        };
        bind(&mut context, "params", to_cel(&params))?;
        bind(&mut context, "headers", to_cel(&headers))?;
        bind(&mut context, "payload", to_cel(&payload))?;
        context.add_variable_from_value("address", envelope.address.as_str());
        context.add_variable_from_value("channel", envelope.channel.as_ref());
        match self.program.execute(&context) {
            Ok(cel::Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("the filter evaluated to {other:?}, not a boolean")),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// CEL's standard functions, built once: building them per evaluation cost 14 µs a message.
fn stdlib() -> Arc<Env> {
    static STDLIB: OnceLock<Arc<Env>> = OnceLock::new();
    STDLIB.get_or_init(|| Arc::new(Env::stdlib())).clone()
}

fn to_cel(value: &impl serde::Serialize) -> Result<cel::Value, String> {
    cel::to_value(value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::address::Params;
    use crate::routing::envelope::{Envelope, Origin, Transport};
    use bytes::Bytes;

    fn message(device: &str, payload: &str) -> Delivered {
        let mut params = Params::default();
        params.insert("deviceId".into(), device.into());
        let mut envelope = Envelope::new(
            "iot.telemetry".into(),
            format!("devices/{device}/telemetry"),
            params,
            Bytes::copy_from_slice(payload.as_bytes()),
            Origin::client(Transport::Http, 0),
        );
        envelope.headers.push(("site".into(), "lab".into()));
        Delivered::new(1, envelope, None)
    }

    #[test]
    fn deep_or_long_expressions_are_refused_before_the_parser_sees_them() {
        let nested = |n: usize| format!("{}true{}", "(".repeat(n), ")".repeat(n));
        assert!(Filter::compile(&nested(MAX_NESTING)).is_ok());
        let e = Filter::compile(&nested(1000)).unwrap_err();
        assert!(e.contains("nests 1000 levels"), "{e}");
        let e = Filter::compile(&nested(10_000)).unwrap_err();
        assert!(e.contains("20004 bytes"), "{e}");
        let e = Filter::compile(&format!("{}true", "!".repeat(500))).unwrap_err();
        assert!(e.contains("levels deep"), "{e}");
        let chain = vec!["payload.a == 1"; 40].join(" || ");
        let e = Filter::compile(&chain).unwrap_err();
        assert!(e.contains("operators"), "{e}");
        let e = Filter::compile(&"x".repeat(5000)).unwrap_err();
        assert!(e.contains("5000 bytes"), "{e}");
        // Brackets inside string literals do not count.
        assert!(Filter::compile(&format!("headers.site == \"{}\"", "(".repeat(100))).is_ok());
        // `!=` is an operator, not a negation.
        assert!(Filter::compile("payload.a != 1 && !(payload.b == 2)").is_ok());
    }

    #[test]
    fn the_worst_accepted_expression_evaluates_on_a_runtime_sized_stack() {
        // As deep and as long as accepted: nested groups, each a chain of comparisons.
        let mut expression = "payload.t > 1.0".to_owned();
        for _ in 0..MAX_NESTING - 1 {
            expression = format!("(payload.t > 1.0 && {expression})");
        }
        let tail = vec!["payload.t < 9.0"; (MAX_OPERATORS - 2 * MAX_NESTING) / 2].join(" && ");
        let expression = format!("{expression} && {tail}");
        let filter = Filter::compile(&expression).unwrap();
        // Tokio's worker threads have 2 MiB.
        let matched = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || filter.matches(&message("d-1", r#"{"t": 5.0}"#)))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(matched, Ok(true));
    }

    #[test]
    fn filters_on_payload_params_and_headers() {
        let f = Filter::compile(
            r#"payload.temperature > 30.0 && params.deviceId.startsWith("d-") && headers.site == "lab""#,
        )
        .unwrap();
        assert_eq!(
            f.matches(&message("d-1", r#"{"temperature": 31.5}"#)),
            Ok(true)
        );
        assert_eq!(
            f.matches(&message("d-1", r#"{"temperature": 20}"#)),
            Ok(false)
        );
        assert_eq!(
            f.matches(&message("x-1", r#"{"temperature": 40}"#)),
            Ok(false)
        );
        // A missing field is an evaluation error: the message does not pass.
        assert!(f.matches(&message("d-1", r#"{"humidity": 40}"#)).is_err());
        let guarded = Filter::compile("has(payload.battery) && payload.battery < 10.0").unwrap();
        assert_eq!(guarded.matches(&message("d-1", r#"{"t": 1}"#)), Ok(false));
    }

    #[test]
    fn rejects_bad_syntax_and_unknown_variables() {
        assert!(Filter::compile("payload.t >").unwrap_err().contains("CEL"));
        let e = Filter::compile("temperature > 3").unwrap_err();
        assert!(e.contains("temperature") && e.contains("payload"), "{e}");
    }
}
