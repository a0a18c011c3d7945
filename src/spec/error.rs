//! Load errors and warnings: every problem names the file, the JSON pointer inside it, and why.
//!
//! The loader never stops at the first problem; it collects them all so that `stepflow validate`
//! can show an author everything to fix in one pass.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where in which document a problem sits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    /// The file the problem is in (a `$ref` target file when the problem is there).
    pub file: PathBuf,
    /// RFC 6901 JSON pointer inside that file; empty for the whole document.
    pub pointer: String,
}

impl Location {
    /// A location at `pointer` in `file`.
    pub fn new(file: impl Into<PathBuf>, pointer: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            pointer: pointer.into(),
        }
    }

    /// The location of a child member or array index.
    pub fn join(&self, token: impl fmt::Display) -> Self {
        Self {
            file: self.file.clone(),
            pointer: join_pointer(&self.pointer, &token.to_string()),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.file.display(), self.pointer)
    }
}

/// Appends one reference token to a JSON pointer, escaping `~` and `/` as RFC 6901 says.
pub fn join_pointer(pointer: &str, token: &str) -> String {
    let mut out = String::with_capacity(pointer.len() + token.len() + 1);
    out.push_str(pointer);
    out.push('/');
    for c in token.chars() {
        match c {
            '~' => out.push_str("~0"),
            '/' => out.push_str("~1"),
            c => out.push(c),
        }
    }
    out
}

/// Why a document, or a part of it, cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecErrorKind {
    #[error("cannot read file: {reason}")]
    Unreadable { reason: String },
    #[error("not valid YAML/JSON: {reason}")]
    Syntax { reason: String },
    #[error("the document root must be a mapping (an object), found {found}")]
    RootNotAMapping { found: &'static str },
    #[error("neither an `asyncapi` nor an `openapi` field: not an AsyncAPI or OpenAPI document")]
    UnknownDocumentType,
    #[error("unsupported {field} version '{found}' (supported: {supported})")]
    UnsupportedVersion {
        field: &'static str,
        found: String,
        supported: &'static str,
    },
    #[error("required field `{field}` is missing")]
    MissingField { field: &'static str },
    #[error("expected {expected}, found {found}")]
    WrongType {
        expected: &'static str,
        found: &'static str,
    },
    #[error("unknown field `{field}` (allowed: {allowed}; extensions start with `x-`)")]
    UnknownField { field: String, allowed: String },
    #[error("$ref '{reference}' does not resolve: {reason}")]
    UnresolvedRef { reference: String, reason: String },
    #[error(
        "$ref '{reference}': the fragment '{fragment}' is not a JSON pointer (it must start with '/')"
    )]
    RefFragmentNotPointer { reference: String, fragment: String },
    #[error("$ref '{reference}' is remote; the gateway does not fetch documents over the network")]
    RemoteRef { reference: String },
    #[error("$ref cycle: {chain}")]
    RefCycle { chain: String },
    #[error(
        "$ref '{reference}' points into a file; a document added over the API may refer only to itself (#/...)"
    )]
    FileRefNotAllowed { reference: String },
    #[error("$ref chain longer than {limit} references")]
    RefChainTooLong { limit: usize },
    #[error("references nest deeper than {limit} levels")]
    RefNestingTooDeep { limit: usize },
    #[error(
        "the schema with its references inlined passes {limit} nodes (references that each refer to several others, many levels deep)"
    )]
    InlinedTooLarge { limit: usize },
    #[error("duplicate {what} '{id}' (first defined at {first})")]
    DuplicateId {
        what: &'static str,
        id: String,
        first: String,
    },
    #[error("server '{server}' is not defined under the root `servers`")]
    UnknownServer { server: String },
    #[error("{0}")]
    Reference(ReferenceRule),
    #[error("channel address '{address}' {problem}")]
    BadChannelAddress { address: String, problem: String },
    #[error("parameter name '{name}' is invalid: names match ^[A-Za-z0-9_\\-]+$")]
    BadParameterName { name: String },
    #[error("parameter '{name}' is declared but not used in the address '{address}'")]
    RedundantParameter { name: String, address: String },
    #[error("not all the address's parameters are described in `parameters`; missing: {missing}")]
    UndeclaredParameters { missing: String },
    #[error("{protocol} binding: {problem}")]
    InvalidBinding {
        protocol: &'static str,
        problem: String,
    },
    #[error("invalid payload schema ({format}): {reason}")]
    InvalidSchema { format: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// Structural rules on where a `$ref` may point (AsyncAPI 3.0 "unambiguity" rules).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceRule {
    #[error(
        "the `channel` of an operation under the root `operations` must reference a channel under the root `channels`, not '{reference}'"
    )]
    OperationChannelNotInRoot { reference: String },
    #[error(
        "a channel under the root `channels` must reference servers under the root `servers`, not '{reference}'"
    )]
    ChannelServerNotInRoot { reference: String },
    #[error(
        "operation message '{reference}' does not belong to the operation's channel '{channel}'"
    )]
    OperationMessageNotInChannel { reference: String, channel: String },
}

/// One problem in one document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {kind}")]
pub struct SpecError {
    pub location: Location,
    pub kind: SpecErrorKind,
}

impl SpecError {
    pub fn new(location: Location, kind: SpecErrorKind) -> Self {
        Self { location, kind }
    }

    /// The file this error is reported against.
    pub fn file(&self) -> &Path {
        &self.location.file
    }

    /// The JSON pointer this error is reported against.
    pub fn pointer(&self) -> &str {
        &self.location.pointer
    }
}

/// Something that loads but that an operator should know: a remote schema not fetched, a route that
/// cannot guarantee at-least-once delivery, a schema format the gateway does not validate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecWarning {
    pub location: Location,
    pub message: String,
}

impl fmt::Display for SpecWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: warning: {}", self.location, self.message)
    }
}

/// Collects every error and warning of one load so none is lost to an early return.
#[derive(Debug, Default)]
pub struct Diagnostics {
    pub errors: Vec<SpecError>,
    pub warnings: Vec<SpecWarning>,
}

impl Diagnostics {
    pub fn error(&mut self, location: Location, kind: SpecErrorKind) {
        self.errors.push(SpecError::new(location, kind));
    }

    pub fn warn(&mut self, location: Location, message: impl Into<String>) {
        self.warnings.push(SpecWarning {
            location,
            message: message.into(),
        });
    }

    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }
}

/// The JSON type name of a value, for "expected X, found Y" messages.
pub fn type_name(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "a mapping",
    }
}
