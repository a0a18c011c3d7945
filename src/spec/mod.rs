//! API documents: AsyncAPI 2.0–2.6 and 3.0, OpenAPI 3.0 and 3.1, YAML or JSON, loaded into one
//! normalized model ([`Api`]).
//!
//! Loading never stops at the first problem: [`load_paths`] returns every error of every document,
//! each with its file, JSON pointer and reason. This module knows nothing of the runtime; it must
//! not import routing, connectors or the server.

mod asyncapi;
pub mod bindings;
pub mod error;
pub mod model;
mod objects;
mod openapi;
mod reader;
pub mod source;

use std::path::{Path, PathBuf};

pub use error::{Diagnostics, Location, ReferenceRule, SpecError, SpecErrorKind, SpecWarning};
pub use model::*;
pub use reader::is_valid_parameter_name;

use reader::{Reader, slug};
use source::{Node, Sources};

/// Documents that loaded, with what an operator should know about them.
#[derive(Debug, Default)]
pub struct LoadedApis {
    pub apis: Vec<Api>,
    pub warnings: Vec<SpecWarning>,
}

/// Every problem of a failed load (and the warnings seen on the way).
#[derive(Debug, Default)]
pub struct LoadFailure {
    pub errors: Vec<SpecError>,
    pub warnings: Vec<SpecWarning>,
}

/// File extensions read when a directory is given.
const DOCUMENT_EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// Finds the document files under `paths`: files as given, directories walked recursively (in
/// name order, so loads are reproducible).
pub fn discover(paths: &[PathBuf]) -> Result<Vec<(PathBuf, bool)>, SpecError> {
    let mut out = Vec::new();
    for path in paths {
        if path.is_dir() {
            walk(path, &mut out)?;
        } else {
            out.push((path.clone(), true));
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, bool)>) -> Result<(), SpecError> {
    let unreadable = |e: std::io::Error| {
        SpecError::new(
            Location::new(dir, ""),
            SpecErrorKind::Unreadable {
                reason: e.to_string(),
            },
        )
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(unreadable)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            walk(&entry, out)?;
        } else if entry
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| DOCUMENT_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        {
            out.push((entry, false));
        }
    }
    Ok(())
}

/// Everything one load produced: the documents that loaded, and every error and warning.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub apis: Vec<Api>,
    pub errors: Vec<SpecError>,
    pub warnings: Vec<SpecWarning>,
}

/// Loads every document under `paths`, all or nothing.
pub fn load_paths(paths: &[PathBuf]) -> Result<LoadedApis, LoadFailure> {
    let report = load_all(paths);
    let diag = Diagnostics {
        errors: report.errors,
        warnings: report.warnings,
    };
    finish(report.apis, diag)
}

/// Loads every document under `paths`, keeping the good ones next to the errors of the bad ones
/// (so that a validator can go on to compile the good ones and report everything at once).
/// Files found in a directory that are neither AsyncAPI nor OpenAPI documents (shared `$ref`
/// targets such as `common/messages.yaml`) are skipped; a file named explicitly must be a
/// document.
pub fn load_all(paths: &[PathBuf]) -> LoadReport {
    let files = match discover(paths) {
        Ok(files) => files,
        Err(e) => {
            return LoadReport {
                errors: vec![e],
                ..LoadReport::default()
            };
        }
    };
    let mut sources = Sources::new();
    let mut diag = Diagnostics::default();
    let mut apis: Vec<Api> = Vec::new();
    for (file, explicit) in files {
        let root = match sources.root(&file) {
            Ok(root) => root,
            Err(e) => {
                diag.errors.push(e);
                continue;
            }
        };
        if !explicit && !is_document(&root) {
            continue;
        }
        if let Some(api) = load_root(&mut sources, &mut diag, &root) {
            if let Some(first) = apis.iter().find(|a| a.id == api.id) {
                diag.error(
                    root.loc.clone(),
                    SpecErrorKind::DuplicateId {
                        what: "api id (set `x-stepflow-id` to tell them apart)",
                        id: api.id.clone(),
                        first: first.source.file.display().to_string(),
                    },
                );
                continue;
            }
            apis.push(api);
        }
    }
    LoadReport {
        apis,
        errors: diag.errors,
        warnings: diag.warnings,
    }
}

/// Loads one document from a file.
pub fn load_file(path: &Path) -> Result<LoadedApis, LoadFailure> {
    let mut sources = Sources::new();
    let mut diag = Diagnostics::default();
    let api = match sources.root(path) {
        Ok(root) => load_root(&mut sources, &mut diag, &root),
        Err(e) => {
            diag.errors.push(e);
            None
        }
    };
    finish(api.into_iter().collect(), diag)
}

/// Loads one document from text (an upload); `name` stands for its file in errors. Its
/// references must stay inside it ([`Sources::confined`]).
pub fn load_text(name: &Path, text: &str) -> Result<LoadedApis, LoadFailure> {
    let mut sources = Sources::confined();
    let mut diag = Diagnostics::default();
    let api = match sources.insert_text(name, text) {
        Ok(root) => load_root(&mut sources, &mut diag, &root),
        Err(e) => {
            diag.errors.push(e);
            None
        }
    };
    finish(api.into_iter().collect(), diag)
}

fn finish(apis: Vec<Api>, diag: Diagnostics) -> Result<LoadedApis, LoadFailure> {
    if diag.has_errors() {
        Err(LoadFailure {
            errors: diag.errors,
            warnings: diag.warnings,
        })
    } else {
        Ok(LoadedApis {
            apis,
            warnings: diag.warnings,
        })
    }
}

fn is_document(root: &Node) -> bool {
    root.get("asyncapi").is_some() || root.get("openapi").is_some()
}

/// Loads a parsed document; `None` when it has errors (they are in `diag`).
fn load_root(sources: &mut Sources, diag: &mut Diagnostics, root: &Node) -> Option<Api> {
    let errors_before = diag.errors.len();
    let mut reader = Reader { sources, diag };
    let id = api_id(&mut reader, root);
    let api = if root.get("asyncapi").is_some() {
        let version = reader.required_string(root, "asyncapi")?;
        match asyncapi_major(&version) {
            Some(major) => asyncapi::load(&mut reader, root, id, version, major),
            None => {
                reader.error(
                    root.loc.join("asyncapi"),
                    SpecErrorKind::UnsupportedVersion {
                        field: "asyncapi",
                        found: version,
                        supported: "2.0.0 to 2.6.0, 3.0.x, 3.1.x",
                    },
                );
                return None;
            }
        }
    } else if root.get("openapi").is_some() {
        let version = reader.required_string(root, "openapi")?;
        if !is_version(&version, &["3.0", "3.1"]) {
            reader.error(
                root.loc.join("openapi"),
                SpecErrorKind::UnsupportedVersion {
                    field: "openapi",
                    found: version,
                    supported: "3.0.x, 3.1.x",
                },
            );
            return None;
        }
        openapi::load(&mut reader, root, id, version)
    } else {
        reader.error(root.loc.clone(), SpecErrorKind::UnknownDocumentType);
        return None;
    };
    check_every_reference(reader.sources, reader.diag, root);
    (diag.errors.len() == errors_before).then_some(api)
}

/// Resolves every `$ref` of the document, also in components nothing uses yet: a dangling
/// reference is a defect the author wants to hear about now, not when a route starts using it.
fn check_every_reference(sources: &mut Sources, diag: &mut Diagnostics, node: &Node) {
    if let Some(reference) = node.reference() {
        if source::is_remote(reference) {
            return;
        }
        if let Err(e) = sources.deref(node)
            && !diag.errors.iter().any(|known| known.location == e.location)
        {
            diag.errors.push(e);
        }
        return;
    }
    match node.value() {
        serde_json::Value::Object(_) => {
            for (_, child) in node.entries() {
                check_every_reference(sources, diag, &child);
            }
        }
        serde_json::Value::Array(_) => {
            for child in node.items() {
                check_every_reference(sources, diag, &child);
            }
        }
        _ => {}
    }
}

fn asyncapi_major(version: &str) -> Option<asyncapi::Major> {
    if is_version(version, &["2.0", "2.1", "2.2", "2.3", "2.4", "2.5", "2.6"]) {
        Some(asyncapi::Major::V2)
    } else if is_version(version, &["3.0", "3.1"]) {
        // 3.1 adds to 3.0 (ROS 2 bindings, message examples, multi-format schemas) and changes
        // nothing the gateway reads: one reader serves both.
        Some(asyncapi::Major::V3)
    } else {
        None
    }
}

/// `major.minor.patch` (patch digits, optional pre-release) with a listed `major.minor`.
fn is_version(version: &str, minors: &[&str]) -> bool {
    minors.iter().any(|minor| {
        version
            .strip_prefix(minor)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|patch| {
                let digits = patch.split('-').next().unwrap_or("");
                !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
            })
    })
}

/// `x-stepflow-id`, else the file stem; generic stems (`asyncapi.yaml`, `openapi.json`) take the
/// directory's name, as in the official multi-service examples.
fn api_id(reader: &mut Reader<'_>, root: &Node) -> String {
    if let Some(id) = reader.string(root, "x-stepflow-id") {
        let clean = slug(&id);
        if clean != id {
            reader.error(
                root.loc.join("x-stepflow-id"),
                SpecErrorKind::Invalid(format!(
                    "x-stepflow-id '{id}' may only use letters, digits, '_' and '-' (try '{clean}')"
                )),
            );
        }
        return clean;
    }
    let file = &root.loc.file;
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("api");
    let generic = matches!(
        stem.to_ascii_lowercase().as_str(),
        "asyncapi" | "openapi" | "api" | "index" | "spec" | "swagger"
    );
    let name = if generic {
        file.parent()
            .and_then(|p| p.file_name())
            .and_then(|s| s.to_str())
            .unwrap_or(stem)
    } else {
        stem
    };
    slug(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert!(is_version("2.6.0", &["2.6"]));
        assert!(is_version("3.0.0-next", &["3.0"]));
        assert!(!is_version("welcome", &["2.6"]));
        assert!(!is_version("2.6", &["2.6"]));
        assert!(!is_version("2.60.0", &["2.6"]));
        assert!(asyncapi_major("2.7.0").is_none());
    }
}
