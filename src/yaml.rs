//! YAML as API documents, bridges and configs mean it: YAML 1.2's core schema, the one the
//! reference AsyncAPI parser (js-yaml) reads. Only `true` and `false` (in three spellings) are
//! booleans; `on`, `off`, `yes`, `no`, `y` and `n` stay strings. YAML 1.1 read them as booleans,
//! which turned a payload schema's `enum: [on, off]` into `[true, false]` and dead-lettered every
//! device that reported `{"state": "on"}`. Every YAML read in the crate goes through here.

use serde::de::DeserializeOwned;

/// Events aliases may replay in one parse. A "billion laughs" document (aliases of aliases)
/// is refused once it would expand past this, so its memory stays in the low megabytes; a
/// document that reuses a few schemas through anchors stays far below it.
const MAX_ALIAS_REPLAY: usize = 100_000;

/// Parses `text` as YAML 1.2 (core schema), within the parser's budget (nesting depth, node
/// count, alias expansion).
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, serde_saphyr::Error> {
    let parsed = serde_saphyr::from_str_with_options(text, options());
    if let Err(e) = &parsed
        && is_budget_breach(e)
    {
        metrics::counter!(crate::telemetry::LIMIT_REFUSALS, "limit" => "yaml_budget").increment(1);
    }
    parsed
}

fn is_budget_breach(mut e: &serde_saphyr::Error) -> bool {
    use serde_saphyr::Error as E;
    while let E::WithSnippet { error, .. } | E::AliasError { error, .. } = e {
        e = error;
    }
    matches!(
        e,
        E::Budget { .. }
            | E::AliasReplayLimitExceeded { .. }
            | E::AliasReplayStackDepthExceeded { .. }
            | E::AliasReplayCounterOverflow { .. }
    )
}

fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: MAX_ALIAS_REPLAY,
        },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    #[test]
    fn only_true_and_false_are_booleans() {
        let v: Value = super::from_str(
            "enum: [on, off, yes, no, y, n, On, OFF, Yes, NO, Y, N]\nflags: [true, false, True, FALSE]\nrequired: [line, n]\n",
        )
        .unwrap();
        assert_eq!(
            v["enum"],
            json!([
                "on", "off", "yes", "no", "y", "n", "On", "OFF", "Yes", "NO", "Y", "N"
            ])
        );
        assert_eq!(v["flags"], json!([true, false, true, false]));
        assert_eq!(v["required"], json!(["line", "n"]));
    }

    #[test]
    fn an_alias_bomb_is_refused_quickly() {
        // Nine levels of ten aliases each: 10^9 strings if expanded.
        let mut text = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for level in 1..10 {
            let prev = format!("*a{}", level - 1);
            let items = [prev.as_str(); 10].join(", ");
            text.push_str(&format!("a{level}: &a{level} [{items}]\n"));
        }
        let started = std::time::Instant::now();
        let e = super::from_str::<Value>(&text).unwrap_err();
        assert!(super::is_budget_breach(&e), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn mapping_keys_and_defaults_stay_strings_too() {
        let v: Value = super::from_str("on: 1\ndefault: off\nexamples: [yes]\n").unwrap();
        assert_eq!(v, json!({"on": 1, "default": "off", "examples": ["yes"]}));
    }
}
