//! Document files and `$ref` resolution.
//!
//! `Sources` reads and caches each file once (YAML or JSON, into `serde_json::Value`). A `Node`
//! is a place in one of those files; `Sources::deref` follows `$ref` chains (local pointers,
//! relative files, `components`), reports cycles instead of looping, and refuses to fetch remote
//! documents. `Sources::inline` builds a self-contained copy of a schema for the validators.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::error::{Location, SpecError, SpecErrorKind, type_name};

/// A position in a loaded file: the file's parsed root plus a JSON pointer into it.
#[derive(Debug, Clone)]
pub struct Node {
    root: Arc<Value>,
    pub loc: Location,
}

impl Node {
    /// The value at this position.
    pub fn value(&self) -> &Value {
        // A Node is only built for pointers that were checked to exist in `root`.
        self.root.pointer(&self.loc.pointer).unwrap_or(&Value::Null)
    }

    /// A member of this mapping (not dereferenced).
    pub fn get(&self, key: &str) -> Option<Node> {
        self.value().as_object()?.get(key)?;
        Some(Node {
            root: self.root.clone(),
            loc: self.loc.join(key),
        })
    }

    /// The members of this mapping, in document order (not dereferenced).
    pub fn entries(&self) -> Vec<(String, Node)> {
        match self.value().as_object() {
            Some(map) => map
                .keys()
                .map(|k| {
                    (
                        k.clone(),
                        Node {
                            root: self.root.clone(),
                            loc: self.loc.join(k),
                        },
                    )
                })
                .collect(),
            None => Vec::new(),
        }
    }

    /// The items of this sequence (not dereferenced).
    pub fn items(&self) -> Vec<Node> {
        match self.value().as_array() {
            Some(items) => (0..items.len())
                .map(|i| Node {
                    root: self.root.clone(),
                    loc: self.loc.join(i),
                })
                .collect(),
            None => Vec::new(),
        }
    }

    /// The `$ref` string when this node is a Reference Object.
    pub fn reference(&self) -> Option<&str> {
        self.value().as_object()?.get("$ref")?.as_str()
    }
}

/// Why a reference could not be followed.
enum RefTarget {
    Local { file: PathBuf, pointer: String },
    Remote,
}

/// The files of one load, each read and parsed once.
#[derive(Debug, Default)]
pub struct Sources {
    files: HashMap<PathBuf, Result<Arc<Value>, SpecErrorKind>>,
    /// Set for text that came over the network: its references stay inside it, so an upload
    /// cannot make the gateway read (and echo back, inlined into a schema) its own files.
    confined: bool,
}

/// What [`Sources::inline`] produced.
#[derive(Debug)]
pub struct Inlined {
    /// The value with every resolvable `$ref` replaced by its target.
    pub value: Value,
    /// Remote references left in place (they are never fetched).
    pub remote_refs: Vec<String>,
    /// Pointers where a recursive schema was cut (the recursion accepts anything there).
    pub recursion_cut_at: Vec<Location>,
}

impl Sources {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sources whose documents may refer only to themselves (`#/...`), never to a file.
    pub fn confined() -> Self {
        Sources {
            confined: true,
            ..Self::default()
        }
    }

    /// The root node of a document file.
    pub fn root(&mut self, path: &Path) -> Result<Node, SpecError> {
        let path = normalize(path);
        match self.file(&path) {
            Ok(root) => Ok(Node {
                root,
                loc: Location::new(path, ""),
            }),
            Err(kind) => Err(SpecError::new(Location::new(path, ""), kind)),
        }
    }

    /// Parses document text that did not come from a file (e.g. an API upload); `path` names it
    /// in errors and anchors relative references.
    pub fn insert_text(&mut self, path: &Path, text: &str) -> Result<Node, SpecError> {
        let path = normalize(path);
        let parsed = parse_text(&path, text).map(Arc::new);
        self.files.insert(path.clone(), parsed);
        self.root(&path)
    }

    fn file(&mut self, path: &Path) -> Result<Arc<Value>, SpecErrorKind> {
        if let Some(cached) = self.files.get(path) {
            return cached.clone();
        }
        let parsed = std::fs::read_to_string(path)
            .map_err(|e| SpecErrorKind::Unreadable {
                reason: e.to_string(),
            })
            .and_then(|text| parse_text(path, &text))
            .map(Arc::new);
        self.files.insert(path.to_path_buf(), parsed.clone());
        parsed
    }

    /// Follows `$ref` chains from `node` to the first node that is not a reference.
    ///
    /// Errors are reported at the `$ref` that failed, in the file that contains it.
    pub fn deref(&mut self, node: &Node) -> Result<Node, SpecError> {
        let mut current = node.clone();
        let mut seen: Vec<Location> = Vec::new();
        while let Some(reference) = current.reference().map(str::to_owned) {
            let at = current.loc.join("$ref");
            if seen.contains(&current.loc) {
                seen.push(current.loc.clone());
                return Err(SpecError::new(
                    at,
                    SpecErrorKind::RefCycle {
                        chain: seen
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(" -> "),
                    },
                ));
            }
            if seen.len() >= MAX_REF_CHAIN {
                return Err(SpecError::new(
                    at,
                    refused(
                        "ref_chain",
                        SpecErrorKind::RefChainTooLong {
                            limit: MAX_REF_CHAIN,
                        },
                    ),
                ));
            }
            seen.push(current.loc.clone());
            current = self.follow(&current, &reference, &at)?;
        }
        Ok(current)
    }

    /// Follows one `$ref` step from `node` (which must be a Reference Object), without following
    /// the target's own references. Structural rules look at where a reference points first.
    pub fn deref_once(&mut self, node: &Node) -> Result<Node, SpecError> {
        match node.reference().map(str::to_owned) {
            Some(reference) => self.follow(node, &reference, &node.loc.join("$ref")),
            None => Ok(node.clone()),
        }
    }

    /// Resolves one reference written at `from` (without following further references).
    fn follow(&mut self, from: &Node, reference: &str, at: &Location) -> Result<Node, SpecError> {
        let target = parse_reference(&from.loc.file, reference)
            .map_err(|kind| SpecError::new(at.clone(), kind))?;
        let (file, pointer) = match target {
            RefTarget::Remote => {
                return Err(SpecError::new(
                    at.clone(),
                    SpecErrorKind::RemoteRef {
                        reference: reference.to_owned(),
                    },
                ));
            }
            RefTarget::Local { file, pointer } => (file, pointer),
        };
        let root = if file == from.loc.file {
            from.root.clone()
        } else if self.confined {
            return Err(SpecError::new(
                at.clone(),
                SpecErrorKind::FileRefNotAllowed {
                    reference: reference.to_owned(),
                },
            ));
        } else {
            self.file(&file).map_err(|kind| {
                SpecError::new(
                    at.clone(),
                    SpecErrorKind::UnresolvedRef {
                        reference: reference.to_owned(),
                        reason: format!("file {}: {kind}", file.display()),
                    },
                )
            })?
        };
        if root.pointer(&pointer).is_none() {
            return Err(SpecError::new(
                at.clone(),
                SpecErrorKind::UnresolvedRef {
                    reference: reference.to_owned(),
                    reason: format!("nothing at '{pointer}' in {}", file.display()),
                },
            ));
        }
        Ok(Node {
            root,
            loc: Location::new(file, pointer),
        })
    }

    /// A copy of `node` with every reference replaced by its target, for schema compilers.
    ///
    /// Remote references stay as they are and are listed; a reference back into a schema that is
    /// being inlined (a recursive schema) becomes `true` (accept anything) and is listed. A
    /// schema whose copy would pass [`MAX_INLINED_NODES`] (references that each refer to
    /// several others, many levels deep, grow it exponentially) or nest references past
    /// [`MAX_REF_NESTING`] is refused.
    pub fn inline(&mut self, node: &Node) -> Result<Inlined, SpecError> {
        let mut inlining = Inlining {
            stack: Vec::new(),
            remote_refs: Vec::new(),
            recursion_cut_at: Vec::new(),
            nodes: 0,
            ref_nesting: 0,
        };
        let value = self.inline_at(node, &mut inlining)?;
        Ok(Inlined {
            value,
            remote_refs: inlining.remote_refs,
            recursion_cut_at: inlining.recursion_cut_at,
        })
    }

    fn inline_at(&mut self, node: &Node, inlining: &mut Inlining) -> Result<Value, SpecError> {
        inlining.nodes += 1;
        if inlining.nodes > MAX_INLINED_NODES {
            return Err(SpecError::new(
                node.loc.clone(),
                refused(
                    "inlined_schema_size",
                    SpecErrorKind::InlinedTooLarge {
                        limit: MAX_INLINED_NODES,
                    },
                ),
            ));
        }
        if let Some(reference) = node.reference() {
            if is_remote(reference) {
                inlining.remote_refs.push(reference.to_owned());
                return Ok(node.value().clone());
            }
            let target = self.deref(node)?;
            if inlining.stack.contains(&target.loc) {
                inlining.recursion_cut_at.push(node.loc.clone());
                return Ok(Value::Bool(true));
            }
            if inlining.ref_nesting >= MAX_REF_NESTING {
                return Err(SpecError::new(
                    node.loc.join("$ref"),
                    refused(
                        "ref_nesting",
                        SpecErrorKind::RefNestingTooDeep {
                            limit: MAX_REF_NESTING,
                        },
                    ),
                ));
            }
            inlining.stack.push(target.loc.clone());
            inlining.ref_nesting += 1;
            let value = self.inline_at(&target, inlining);
            inlining.ref_nesting -= 1;
            inlining.stack.pop();
            return value;
        }
        match node.value() {
            Value::Object(_) => {
                inlining.stack.push(node.loc.clone());
                let mut map = serde_json::Map::new();
                for (key, child) in node.entries() {
                    match self.inline_at(&child, inlining) {
                        Ok(v) => {
                            map.insert(key, v);
                        }
                        Err(e) => {
                            inlining.stack.pop();
                            return Err(e);
                        }
                    }
                }
                inlining.stack.pop();
                Ok(Value::Object(map))
            }
            Value::Array(_) => {
                let mut items = Vec::new();
                for child in node.items() {
                    items.push(self.inline_at(&child, inlining)?);
                }
                Ok(Value::Array(items))
            }
            other => Ok(other.clone()),
        }
    }
}

/// Longest `$ref` chain (a reference to a reference to …) followed.
pub const MAX_REF_CHAIN: usize = 32;
/// Deepest nesting of references inside inlined references.
pub const MAX_REF_NESTING: usize = 64;
/// Largest inlined schema, in JSON nodes.
pub const MAX_INLINED_NODES: usize = 200_000;

/// Counts a document refused by one of the limits above.
fn refused(limit: &'static str, kind: SpecErrorKind) -> SpecErrorKind {
    metrics::counter!(crate::telemetry::LIMIT_REFUSALS, "limit" => limit).increment(1);
    kind
}

/// What [`Sources::inline`] carries down the tree.
struct Inlining {
    /// The schemas being inlined, outermost first (a reference back into one is recursion).
    stack: Vec<Location>,
    remote_refs: Vec<String>,
    recursion_cut_at: Vec<Location>,
    nodes: usize,
    ref_nesting: usize,
}

/// Is this reference to another host (never fetched)?
pub fn is_remote(reference: &str) -> bool {
    let lower = reference.get(..8).unwrap_or(reference).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

fn parse_reference(base_file: &Path, reference: &str) -> Result<RefTarget, SpecErrorKind> {
    if is_remote(reference) {
        return Ok(RefTarget::Remote);
    }
    let (file_part, fragment) = match reference.split_once('#') {
        Some((f, frag)) => (f, Some(frag)),
        None => (reference, None),
    };
    let pointer = match fragment {
        None | Some("") => String::new(),
        Some(frag) => {
            let decoded = percent_decode(frag);
            if !decoded.starts_with('/') {
                return Err(SpecErrorKind::RefFragmentNotPointer {
                    reference: reference.to_owned(),
                    fragment: frag.to_owned(),
                });
            }
            decoded
        }
    };
    let file = if file_part.is_empty() {
        base_file.to_path_buf()
    } else {
        let file_part = file_part.strip_prefix("file://").unwrap_or(file_part);
        let base_dir = base_file.parent().unwrap_or(Path::new("."));
        normalize(&base_dir.join(percent_decode(file_part)))
    };
    Ok(RefTarget::Local { file, pointer })
}

/// Decodes `%XX` escapes (URI fragments may encode `{`, `}` and spaces); invalid escapes stay.
fn percent_decode(s: &str) -> String {
    if !s.contains('%') {
        return s.to_owned();
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_owned())
}

/// Removes `.` and `..` components lexically, so one file has one cache key however it is reached.
pub fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Parses YAML (which includes JSON) or, for `.json` files, JSON with JSON's own error messages.
fn parse_text(path: &Path, text: &str) -> Result<Value, SpecErrorKind> {
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let value: Value = if is_json {
        serde_json::from_str(text).map_err(|e| SpecErrorKind::Syntax {
            reason: e.to_string(),
        })?
    } else {
        crate::yaml::from_str(text).map_err(|e| SpecErrorKind::Syntax {
            reason: first_line(&e.to_string()),
        })?
    };
    if !value.is_object() {
        return Err(SpecErrorKind::RootNotAMapping {
            found: type_name(&value),
        });
    }
    Ok(value)
}

/// serde-saphyr renders a source snippet under its message; a `file#pointer: reason` line wants
/// only the message, which already carries line and column.
fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or(message);
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_handles_braces_and_bad_escapes() {
        assert_eq!(percent_decode("/channels/a%7Bid%7D"), "/channels/a{id}");
        assert_eq!(percent_decode("/a%zz"), "/a%zz");
        assert_eq!(percent_decode("/a%2"), "/a%2");
    }

    #[test]
    fn fragment_without_slash_is_not_a_pointer() {
        let err = parse_reference(Path::new("a/b.yaml"), "common.yml#userSignUp");
        assert!(matches!(
            err,
            Err(SpecErrorKind::RefFragmentNotPointer { .. })
        ));
    }

    #[test]
    fn relative_reference_resolves_against_the_referring_file() {
        match parse_reference(Path::new("x/svc/asyncapi.yaml"), "../common/m.yaml#/a") {
            Ok(RefTarget::Local { file, pointer }) => {
                assert_eq!(file, PathBuf::from("x/common/m.yaml"));
                assert_eq!(pointer, "/a");
            }
            _ => panic!("expected a local target"),
        }
    }
}
