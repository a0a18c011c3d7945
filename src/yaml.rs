//! YAML as API documents, bridges and configs mean it: YAML 1.2's core schema, the one the
//! reference AsyncAPI parser (js-yaml) reads. Only `true` and `false` (in three spellings) are
//! booleans; `on`, `off`, `yes`, `no`, `y` and `n` stay strings. YAML 1.1 read them as booleans,
//! which turned a payload schema's `enum: [on, off]` into `[true, false]` and dead-lettered every
//! device that reported `{"state": "on"}`. Every YAML read in the crate goes through here.

use serde::de::DeserializeOwned;

/// Parses `text` as YAML 1.2 (core schema).
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, serde_saphyr::Error> {
    serde_saphyr::from_str_with_options(text, options())
}

fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
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
    fn mapping_keys_and_defaults_stay_strings_too() {
        let v: Value = super::from_str("on: 1\ndefault: off\nexamples: [yes]\n").unwrap();
        assert_eq!(v, json!({"on": 1, "default": "off", "examples": ["yes"]}));
    }
}
