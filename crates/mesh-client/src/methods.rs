//! What the mesh knows about each method from the contracts' descriptors:
//! whether it is safe to retry (`idempotency_level`) and whether its request
//! is a single message that can be buffered for replay; and gRPC paths split
//! into service and method for labels.

use std::collections::{HashMap, HashSet};

use prost::Message;
use prost_types::{FileDescriptorSet, method_options::IdempotencyLevel};

use crate::error::MeshError;

/// Facts about one method.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MethodInfo {
    /// Declared `IDEMPOTENT` or `NO_SIDE_EFFECTS`: retried and hedged automatically.
    pub idempotent: bool,
    /// The request is a stream, so it cannot be buffered for replay.
    pub client_streaming: bool,
}

/// Method facts keyed by gRPC path (`/package.Service/Method`).
#[derive(Clone, Debug, Default)]
pub struct MethodTable {
    methods: HashMap<String, MethodInfo>,
    // Declared `NO_SIDE_EFFECTS` (a subset of the idempotent ones): the
    // only methods a mirror copies unless its route allows side effects.
    no_side_effects: HashSet<String>,
}

impl MethodTable {
    /// Adds every method of an encoded `FileDescriptorSet`.
    pub fn add_encoded(&mut self, encoded: &[u8]) -> Result<(), MeshError> {
        let set = FileDescriptorSet::decode(encoded).map_err(|e| MeshError::InvalidConfig {
            field: "descriptor_set".into(),
            reason: format!("not an encoded FileDescriptorSet: {e}"),
        })?;
        for file in &set.file {
            let package = file.package();
            for service in &file.service {
                for method in &service.method {
                    let level = method
                        .options
                        .as_ref()
                        .map(|o| o.idempotency_level())
                        .unwrap_or(IdempotencyLevel::IdempotencyUnknown);
                    let path = if package.is_empty() {
                        format!("/{}/{}", service.name(), method.name())
                    } else {
                        format!("/{package}.{}/{}", service.name(), method.name())
                    };
                    if level == IdempotencyLevel::NoSideEffects {
                        self.no_side_effects.insert(path.clone());
                    } else {
                        self.no_side_effects.remove(&path);
                    }
                    self.methods.insert(
                        path,
                        MethodInfo {
                            idempotent: matches!(
                                level,
                                IdempotencyLevel::Idempotent | IdempotencyLevel::NoSideEffects
                            ),
                            client_streaming: method.client_streaming(),
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// Adds (or replaces) what is known of one method, for a contract whose
    /// descriptor does not say it (`path` is `/package.Service/Method`).
    pub fn insert(&mut self, path: &str, info: MethodInfo) {
        self.methods.insert(path.to_owned(), info);
    }

    /// Declares `path` free of side effects (`NO_SIDE_EFFECTS`), for a
    /// contract whose descriptor does not say it.
    pub fn insert_no_side_effects(&mut self, path: &str) {
        self.no_side_effects.insert(path.to_owned());
    }

    /// Whether `path`'s proto declares `idempotency_level = NO_SIDE_EFFECTS`
    /// (or [`MethodTable::insert_no_side_effects`] said so).
    pub fn has_no_side_effects(&self, path: &str) -> bool {
        self.no_side_effects.contains(path)
    }

    /// Every registered path.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.methods.keys().map(String::as_str)
    }

    /// What is known of `path`; `None` for a method in no registered descriptor.
    pub fn get(&self, path: &str) -> Option<MethodInfo> {
        self.methods.get(path).copied()
    }
}

/// A gRPC path split for labels and span attributes.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) struct RpcPath {
    pub(crate) service: std::sync::Arc<str>,
    pub(crate) method: std::sync::Arc<str>,
}

impl RpcPath {
    /// `/pkg.Service/Method` → (`pkg.Service`, `Method`); anything else is unknown.
    pub(crate) fn parse(path: &str) -> Self {
        match path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .filter(|(s, m)| !s.is_empty() && !m.is_empty() && !m.contains('/'))
        {
            Some((service, method)) => Self {
                service: service.into(),
                method: method.into(),
            },
            None => Self::unknown(),
        }
    }

    pub(crate) fn unknown() -> Self {
        Self {
            service: "unknown".into(),
            method: "unknown".into(),
        }
    }
}
