//! Scopes: what a principal may do. `publish:<channel glob>`, `subscribe:<channel glob>`,
//! `call:<operation glob>`, `admin:read`, `admin:write` and `*`; globs use `*` for any run of
//! characters, over the ids `stepflow routes` prints.

use std::fmt;

/// One granted scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Publish(Glob),
    Subscribe(Glob),
    Call(Glob),
    AdminRead,
    AdminWrite,
    All,
}

/// What a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    Publish(String),
    Subscribe(String),
    Call(String),
    AdminRead,
    AdminWrite,
    /// Any authenticated principal (the handler checks the rest, e.g. per frame).
    Authenticated,
    /// Nothing: health probes.
    Nothing,
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Need::Publish(c) => write!(f, "publish:{c}"),
            Need::Subscribe(c) => write!(f, "subscribe:{c}"),
            Need::Call(o) => write!(f, "call:{o}"),
            Need::AdminRead => f.write_str("admin:read"),
            Need::AdminWrite => f.write_str("admin:write"),
            Need::Authenticated => f.write_str("credentials"),
            Need::Nothing => f.write_str("nothing"),
        }
    }
}

/// A scope that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "scope '{0}' is not one of publish:<channels>, subscribe:<channels>, call:<operations>, admin:read, admin:write or *"
)]
pub struct BadScope(pub String);

impl Scope {
    pub fn parse(text: &str) -> Result<Scope, BadScope> {
        let bad = || BadScope(text.to_owned());
        match text {
            "*" => return Ok(Scope::All),
            "admin:read" => return Ok(Scope::AdminRead),
            "admin:write" => return Ok(Scope::AdminWrite),
            _ => {}
        }
        let (kind, pattern) = text.split_once(':').ok_or_else(bad)?;
        if pattern.is_empty() || pattern.chars().any(char::is_whitespace) {
            return Err(bad());
        }
        let glob = Glob(pattern.to_owned());
        match kind {
            "publish" => Ok(Scope::Publish(glob)),
            "subscribe" => Ok(Scope::Subscribe(glob)),
            "call" => Ok(Scope::Call(glob)),
            _ => Err(bad()),
        }
    }

    /// Whether this scope grants `need`. `admin:write` includes `admin:read`.
    pub fn grants(&self, need: &Need) -> bool {
        match (self, need) {
            (_, Need::Nothing | Need::Authenticated) => true,
            (Scope::All, _) => true,
            (Scope::Publish(g), Need::Publish(c)) => g.matches(c),
            (Scope::Subscribe(g), Need::Subscribe(c)) => g.matches(c),
            (Scope::Call(g), Need::Call(o)) => g.matches(o),
            (Scope::AdminRead | Scope::AdminWrite, Need::AdminRead) => true,
            (Scope::AdminWrite, Need::AdminWrite) => true,
            _ => false,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Publish(g) => write!(f, "publish:{}", g.0),
            Scope::Subscribe(g) => write!(f, "subscribe:{}", g.0),
            Scope::Call(g) => write!(f, "call:{}", g.0),
            Scope::AdminRead => f.write_str("admin:read"),
            Scope::AdminWrite => f.write_str("admin:write"),
            Scope::All => f.write_str("*"),
        }
    }
}

/// A pattern where `*` matches any run of characters (dots included: `iot.*` covers every
/// channel of the `iot` document).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn new(pattern: impl Into<String>) -> Glob {
        Glob(pattern.into())
    }

    pub fn matches(&self, text: &str) -> bool {
        let mut parts = self.0.split('*');
        let first = parts.next().unwrap_or("");
        let Some(mut rest) = text.strip_prefix(first) else {
            return false;
        };
        let parts: Vec<&str> = parts.collect();
        let Some((last, middle)) = parts.split_last() else {
            return rest.is_empty();
        };
        for part in middle {
            match rest.find(part) {
                Some(i) => rest = &rest[i + part.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }
}

/// A principal's scopes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes(Vec<Scope>);

impl Scopes {
    pub fn new(scopes: Vec<Scope>) -> Scopes {
        Scopes(scopes)
    }

    /// Parses every scope; the first that does not parse is the error.
    pub fn parse<'a>(texts: impl IntoIterator<Item = &'a str>) -> Result<Scopes, BadScope> {
        texts
            .into_iter()
            .map(Scope::parse)
            .collect::<Result<_, _>>()
            .map(Scopes)
    }

    /// Like [`Scopes::parse`], ignoring scopes that are not the gateway's (an identity
    /// provider's token carries `openid`, `profile` and the like).
    pub fn parse_lenient<'a>(texts: impl IntoIterator<Item = &'a str>) -> Scopes {
        Scopes(
            texts
                .into_iter()
                .filter_map(|t| Scope::parse(t).ok())
                .collect(),
        )
    }

    pub fn allows(&self, need: &Need) -> bool {
        matches!(need, Need::Nothing | Need::Authenticated) || self.0.iter().any(|s| s.grants(need))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_runs_of_any_character() {
        let g = Glob::new("iot.*");
        assert!(g.matches("iot.telemetry"));
        assert!(g.matches("iot.a.b"));
        assert!(g.matches("iot."));
        assert!(!g.matches("iotx.telemetry"));
        assert!(!g.matches("building.iot.telemetry"));
        assert!(Glob::new("*").matches("anything"));
        assert!(Glob::new("*.telemetry").matches("iot.telemetry"));
        assert!(!Glob::new("*.telemetry").matches("iot.telemetryx"));
        assert!(Glob::new("a*b*c").matches("aXbYc"));
        assert!(!Glob::new("a*b*c").matches("aXcYb"));
        assert!(Glob::new("exact").matches("exact"));
        assert!(!Glob::new("exact").matches("exactly"));
        assert!(!Glob::new("ab*ba").matches("aba"));
    }

    #[test]
    fn scopes_split_publish_and_subscribe() {
        let s = Scopes::parse(["publish:iot.*", "subscribe:iot.telemetry"]).unwrap();
        assert!(s.allows(&Need::Publish("iot.commands".into())));
        assert!(!s.allows(&Need::Subscribe("iot.commands".into())));
        assert!(s.allows(&Need::Subscribe("iot.telemetry".into())));
        assert!(!s.allows(&Need::Publish("building.lights".into())));
        assert!(!s.allows(&Need::AdminRead));
        assert!(s.allows(&Need::Authenticated));
    }

    #[test]
    fn admin_write_includes_read_and_star_is_everything() {
        let read = Scopes::parse(["admin:read"]).unwrap();
        assert!(read.allows(&Need::AdminRead));
        assert!(!read.allows(&Need::AdminWrite));
        let write = Scopes::parse(["admin:write"]).unwrap();
        assert!(write.allows(&Need::AdminRead));
        assert!(!write.allows(&Need::Publish("x".into())));
        let all = Scopes::parse(["*"]).unwrap();
        assert!(all.allows(&Need::Call("registry.getDevice".into())));
    }

    #[test]
    fn unknown_scopes_are_errors_in_config_and_ignored_in_tokens() {
        assert!(Scope::parse("publish").is_err());
        assert!(Scope::parse("write:iot.*").is_err());
        assert!(Scope::parse("publish:").is_err());
        let lenient = Scopes::parse_lenient(["openid", "subscribe:iot.*"]);
        assert_eq!(lenient.iter().count(), 1);
    }
}
