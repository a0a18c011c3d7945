//! `{name}` templates: the one parser behind channel addresses, server URLs, Kafka key
//! templates and bridge mappings. A template is compiled once into literal text and named
//! placeholders; what a name may be, and where its value comes from, is the user's business.

use std::fmt;

/// A compiled template: literal text and `{name}` placeholders, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    /// A placeholder's name as written between the braces (not trimmed).
    Placeholder(String),
}

/// Why a template does not parse; byte offsets are into the template as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("has an unclosed '{{' at byte {at}")]
    Unclosed { at: usize },
    #[error("has an unmatched '}}' at byte {at}")]
    Unmatched { at: usize },
    #[error("has a nested '{{' at byte {at}")]
    Nested { at: usize },
}

impl Template {
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut rest = source;
        let mut offset = 0;
        while let Some(i) = rest.find(['{', '}']) {
            if rest.as_bytes()[i] == b'}' {
                return Err(TemplateError::Unmatched { at: offset + i });
            }
            text.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            let close = after
                .find('}')
                .ok_or(TemplateError::Unclosed { at: offset + i })?;
            let name = &after[..close];
            if let Some(nested) = name.find('{') {
                return Err(TemplateError::Nested {
                    at: offset + i + 1 + nested,
                });
            }
            if !text.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut text)));
            }
            pieces.push(Piece::Placeholder(name.to_owned()));
            offset += i + close + 2;
            rest = &after[close + 1..];
        }
        text.push_str(rest);
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Template {
            source: source.to_owned(),
            pieces,
        })
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// The placeholders' names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Placeholder(name) => Some(name.as_str()),
            Piece::Text(_) => None,
        })
    }

    /// The template with every placeholder replaced by `value_of(name)`; the error is the first
    /// name without a value.
    pub fn render<'v>(
        &self,
        mut value_of: impl FnMut(&str) -> Option<&'v str>,
    ) -> Result<String, MissingValue> {
        let mut out = String::with_capacity(self.source.len());
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Placeholder(name) => {
                    out.push_str(value_of(name).ok_or_else(|| MissingValue(name.clone()))?)
                }
            }
        }
        Ok(out)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// A placeholder a render had no value for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no value for '{{{0}}}'")]
pub struct MissingValue(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_placeholders_in_order() {
        let t = Template::parse("devices/{deviceId}/x-{kind}").unwrap();
        assert_eq!(t.names().collect::<Vec<_>>(), ["deviceId", "kind"]);
        assert_eq!(
            t.pieces(),
            [
                Piece::Text("devices/".into()),
                Piece::Placeholder("deviceId".into()),
                Piece::Text("/x-".into()),
                Piece::Placeholder("kind".into()),
            ]
        );
        assert_eq!(t.source(), "devices/{deviceId}/x-{kind}");
    }

    #[test]
    fn malformed_braces_name_their_byte() {
        assert_eq!(
            Template::parse("a/{b"),
            Err(TemplateError::Unclosed { at: 2 })
        );
        assert_eq!(
            Template::parse("a/b}"),
            Err(TemplateError::Unmatched { at: 3 })
        );
        assert_eq!(
            Template::parse("a/{{b}}"),
            Err(TemplateError::Nested { at: 3 })
        );
        assert_eq!(
            Template::parse("{x}/c}"),
            Err(TemplateError::Unmatched { at: 5 })
        );
    }

    #[test]
    fn renders_or_names_the_missing_value() {
        let t = Template::parse("dev-{id}").unwrap();
        assert_eq!(t.render(|n| (n == "id").then_some("42")).unwrap(), "dev-42");
        assert_eq!(t.render(|_| None), Err(MissingValue("id".into())));
        assert_eq!(
            Template::parse("plain").unwrap().render(|_| None).unwrap(),
            "plain"
        );
    }
}
