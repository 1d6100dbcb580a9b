//! The set of models the server knows: where each comes from (a model
//! repository directory, a single file, or the embedded demo), which
//! versions are loaded, and loading and unloading them at run time.
//!
//! Loads and unloads of one model run one at a time, and a load asked for
//! while another load of the same model runs joins it: N concurrent load
//! calls build one copy of the model.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::cascade::EscalationConfig;
use crate::config::{ModelSettings, ModelSettingsFile};
use crate::error::{ErrorKind, InferError, InferResult};
use crate::keyed_lock::KeyedLocks;
use crate::model::{model_not_found, Model, VersionSource};
use crate::runtime::{ModelBytes, Runtime};

/// File name of a model version inside `<repository>/<model>/<version>/`.
pub const MODEL_FILE: &str = "model.onnx";

/// An ONNX file, or an LLM directory when `path` is a directory with
/// `llm.json`, or an encoder directory when it has `encoder.json`.
fn source_of_path(path: &Path) -> VersionSource {
    if path.is_dir() && crate::llm::config::is_llm_dir(path) {
        VersionSource::Llm(path.to_path_buf())
    } else if path.is_dir() && crate::encoder::config::is_encoder_dir(path) {
        VersionSource::Encoder(path.to_path_buf())
    } else {
        VersionSource::Onnx(ModelBytes::File(path.to_path_buf()))
    }
}

/// Where the repository reports whether each model serves (the server
/// wires it into gRPC health). Awaited before a load or unload returns, so
/// a client that sees its call answered sees the new state.
pub trait ReadinessSink: Send + Sync {
    /// `model` now serves (`true`) or no longer does.
    fn publish<'a>(&'a self, model: &'a str, serving: bool) -> BoxFuture<'a, ()>;
}

/// Where the server finds its models.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// A Triton-style repository: `<root>/<model>/<version>/model.onnx`.
    pub repository: Option<PathBuf>,
    /// Single files (or LLM model directories) served as version 1 under
    /// the given names.
    pub files: BTreeMap<String, PathBuf>,
    /// A model built into the binary, served as version 1.
    pub embedded: Option<(String, &'static [u8])>,
}

/// Whether a model in the index serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexState {
    /// Loaded and taking requests.
    Ready,
    /// Not loaded: never, unloaded, or failed (see the reason).
    Unavailable,
}

impl IndexState {
    /// The state as Triton names it.
    pub fn as_str(self) -> &'static str {
        match self {
            IndexState::Ready => "READY",
            IndexState::Unavailable => "UNAVAILABLE",
        }
    }
}

/// One entry of the repository index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// The model's name.
    pub name: String,
    /// The version; empty when none is loaded.
    pub version: String,
    /// Whether it serves.
    pub state: IndexState,
    /// Why it does not (empty when ready).
    pub reason: String,
}

enum State {
    Ready(BTreeMap<u64, Arc<Model>>),
    /// Unloaded on request: does not make the server unready.
    Unloaded,
    /// Failed to load at startup, with the reason: the server is not ready.
    Failed(String),
    /// Failed to load on request and never served: reported in the index,
    /// but only that model is affected.
    LoadFailed(String),
}

/// The models of this server.
pub struct Repository {
    runtime: Arc<Runtime>,
    sources: Sources,
    defaults: ModelSettings,
    models: RwLock<BTreeMap<String, State>>,
    /// Set once `load_all` has finished: before that the server is not ready.
    initial_load_done: AtomicBool,
    readiness: Box<dyn ReadinessSink>,
    /// Loads requested through the API and still running, by model: their
    /// result, once known, for every caller that joined.
    loads: Mutex<HashMap<String, watch::Receiver<Option<InferResult<()>>>>>,
    /// Held by a load or unload of the model, so they run one at a time.
    operations: KeyedLocks,
    /// `--escalation-file`: every LLM's escalation, over its `ferrite.json`.
    escalation: Option<EscalationConfig>,
}

impl Repository {
    /// A repository of the models `sources` name, loaded with `defaults`
    /// unless a model's own settings say otherwise; each model's readiness
    /// is reported to `readiness`.
    pub fn new(
        runtime: Arc<Runtime>,
        sources: Sources,
        defaults: ModelSettings,
        readiness: Box<dyn ReadinessSink>,
    ) -> Self {
        Repository {
            runtime,
            sources,
            defaults,
            models: RwLock::new(BTreeMap::new()),
            initial_load_done: AtomicBool::new(false),
            readiness,
            loads: Mutex::default(),
            operations: KeyedLocks::default(),
            escalation: None,
        }
    }

    /// This repository with `escalation` for every LLM it loads (the
    /// `--escalation-file`), whatever their `ferrite.json` says.
    pub fn with_escalation(mut self, escalation: Option<EscalationConfig>) -> Self {
        self.escalation = escalation;
        self
    }

    /// Loads every model the sources name. A model that fails to load is
    /// marked unavailable with its reason; the others still serve.
    pub async fn load_all(&self) {
        for name in self.source_names() {
            if let Err(error) = self.load_as(&name, true).await {
                tracing::error!(model = %name, %error, "model failed to load");
            }
        }
        self.initial_load_done.store(true, Ordering::SeqCst);
    }

    /// Loads (or reloads) every version of `name` from its source. If a
    /// reload fails, the versions already serving go on serving (as in
    /// Triton) and the error is returned. A call made while a load of
    /// `name` runs waits for that load and returns its result. The load
    /// runs in its own task: a caller that goes away does not cancel it.
    pub async fn load(self: &Arc<Self>, name: &str) -> InferResult<()> {
        let mut result = {
            let mut loads = self.loads.lock().expect("loads lock");
            loads
                .entry(name.to_string())
                .or_insert_with(|| {
                    let (sender, receiver) = watch::channel(None);
                    let (repository, name) = (self.clone(), name.to_string());
                    tokio::spawn(async move {
                        let result = repository.load_as(&name, false).await;
                        // Removed before the result is sent: a later call
                        // starts a new load, one that joined gets this one.
                        repository.loads.lock().expect("loads lock").remove(&name);
                        sender.send_replace(Some(result));
                    });
                    receiver
                })
                .clone()
        };
        let done = result.wait_for(Option::is_some).await;
        let done = done.map_err(|_| InferError::internal(format!("loading '{name}' ended without a result")))?;
        done.clone().expect("waited for a result")
    }

    async fn load_as(&self, name: &str, at_startup: bool) -> InferResult<()> {
        let _one_at_a_time = self.operations.lock(name).await;
        let (versions, settings, escalation) = self.discover(name)?;
        let runtime = self.runtime.clone();
        let model_name = name.to_string();
        let loaded = tokio::task::spawn_blocking(move || {
            versions
                .into_iter()
                .map(|(version, source)| {
                    Model::load(&runtime, &model_name, version, &source, settings, escalation.as_ref())
                        .map(|m| (version, Arc::new(m)))
                })
                .collect::<anyhow::Result<BTreeMap<_, _>>>()
        })
        .await
        .map_err(|e| InferError::internal(format!("loading '{name}' panicked: {e}")))?;
        match loaded {
            Ok(versions) => {
                self.replace(name, State::Ready(versions));
                self.readiness.publish(name, true).await;
                Ok(())
            }
            Err(error) => {
                let reason = format!("{error:#}");
                let serving = matches!(self.models.read().expect("models lock").get(name), Some(State::Ready(_)));
                if at_startup {
                    self.replace(name, State::Failed(reason.clone()));
                } else if !serving {
                    self.replace(name, State::LoadFailed(reason.clone()));
                }
                if !serving {
                    self.readiness.publish(name, false).await;
                }
                Err(InferError::invalid(format!("failed to load model '{name}': {reason}")))
            }
        }
    }

    /// Unloads every version of `name`. Requests already queued finish.
    pub async fn unload(&self, name: &str) -> InferResult<()> {
        let _one_at_a_time = self.operations.lock(name).await;
        if !self.models.read().expect("models lock").contains_key(name) {
            return Err(model_not_found(name, ""));
        }
        self.replace(name, State::Unloaded);
        self.readiness.publish(name, false).await;
        tracing::info!(model = name, "model unloaded");
        Ok(())
    }

    fn replace(&self, name: &str, state: State) {
        let old = self.models.write().expect("models lock").insert(name.to_string(), state);
        if let Some(State::Ready(versions)) = old {
            versions.values().for_each(|model| model.close());
        }
    }

    /// The model version to serve: `version` if given, else the highest.
    pub fn get(&self, name: &str, version: &str) -> InferResult<Arc<Model>> {
        let models = self.models.read().expect("models lock");
        let Some(State::Ready(versions)) = models.get(name) else {
            return Err(model_not_found(name, ""));
        };
        let model = if version.is_empty() {
            versions.values().next_back()
        } else {
            version.parse::<u64>().ok().and_then(|v| versions.get(&v))
        };
        model.cloned().ok_or_else(|| model_not_found(name, version))
    }

    /// Every loaded version of every model (or of `name` only).
    pub fn loaded(&self, name: Option<&str>) -> Vec<Arc<Model>> {
        let models = self.models.read().expect("models lock");
        models
            .iter()
            .filter(|(model, _)| name.is_none_or(|n| n == model.as_str()))
            .filter_map(|(_, state)| match state {
                State::Ready(versions) => Some(versions.values().cloned()),
                State::Unloaded | State::Failed(_) | State::LoadFailed(_) => None,
            })
            .flatten()
            .collect()
    }

    /// Whether every model this server was started with is ready: none
    /// failed to load at startup. Models unloaded, or loaded later through
    /// the repository API, affect only their own readiness, so one bad load
    /// request cannot take every model out of service.
    pub fn all_ready(&self) -> bool {
        let models = self.models.read().expect("models lock");
        self.initial_load_done.load(Ordering::SeqCst)
            && !models.is_empty()
            && !models.values().any(|state| matches!(state, State::Failed(_)))
    }

    /// Every known model and its state, including repository models never
    /// loaded.
    pub fn index(&self) -> Vec<IndexEntry> {
        let models = self.models.read().expect("models lock");
        let mut names = self.source_names();
        names.extend(models.keys().cloned());
        names.sort();
        names.dedup();
        let mut entries = Vec::new();
        for name in names {
            match models.get(&name) {
                Some(State::Ready(versions)) => entries.extend(versions.keys().map(|v| IndexEntry {
                    name: name.clone(),
                    version: v.to_string(),
                    state: IndexState::Ready,
                    reason: String::new(),
                })),
                other => entries.push(IndexEntry {
                    name,
                    version: String::new(),
                    state: IndexState::Unavailable,
                    reason: match other {
                        Some(State::Failed(reason) | State::LoadFailed(reason)) => reason.clone(),
                        Some(State::Unloaded) => "unloaded".to_string(),
                        _ => "not loaded".to_string(),
                    },
                }),
            }
        }
        entries
    }

    /// Whether `name` (and `version`, unless empty) is a model this server
    /// knows, loaded or not: an unknown one is NOT_FOUND, a known one that
    /// does not serve is only not ready.
    pub fn knows(&self, name: &str, version: &str) -> bool {
        self.index().iter().any(|entry| {
            entry.name == name && (version.is_empty() || entry.version.is_empty() || entry.version == version)
        })
    }

    /// Names of every model the sources provide.
    fn source_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.sources.files.keys().cloned().collect();
        names.extend(self.sources.embedded.iter().map(|(name, _)| name.clone()));
        if let Some(root) = &self.sources.repository {
            if let Ok(entries) = std::fs::read_dir(root) {
                names.extend(
                    entries
                        .flatten()
                        .filter(|e| e.path().is_dir())
                        .filter_map(|e| e.file_name().to_str().map(str::to_string))
                        .filter(|n| !n.starts_with('.')),
                );
            }
        }
        names.sort();
        names.dedup();
        names
    }

    /// Finds the versions of `name`, the settings to load them with and
    /// their escalation settings (the `--escalation-file`'s, else the
    /// model's `ferrite.json`'s; only for LLMs).
    fn discover(&self, name: &str) -> InferResult<Discovered> {
        let for_llms = |versions: &[(u64, VersionSource)], escalation: Option<EscalationConfig>| {
            escalation.filter(|_| versions.iter().any(|(_, source)| matches!(source, VersionSource::Llm(_))))
        };
        if let Some(path) = self.sources.files.get(name) {
            let versions = vec![(1, source_of_path(path))];
            let escalation = for_llms(&versions, self.escalation.clone());
            return Ok((versions, self.defaults, escalation));
        }
        if let Some((_, bytes)) = self.sources.embedded.as_ref().filter(|(n, _)| n == name) {
            return Ok((vec![(1, VersionSource::Onnx(ModelBytes::Embedded(bytes)))], self.defaults, None));
        }
        let not_in_repository = || InferError::not_found(format!("model '{name}' is not in the model repository"));
        let root = self.sources.repository.as_ref().ok_or_else(not_in_repository)?;
        let dir = safe_join(root, name).ok_or_else(not_in_repository)?;
        if !dir.is_dir() {
            return Err(not_in_repository());
        }
        let file = ModelSettingsFile::read(&dir).map_err(|e| InferError::invalid(format!("{e:#}")))?;
        let settings = self.defaults.with_overrides(&file);
        let versions = model_versions(&dir);
        let escalation = for_llms(&versions, self.escalation.clone().or(file.escalation));
        if versions.is_empty() {
            return Err(InferError::new(
                ErrorKind::InvalidArgument,
                format!("model '{name}' has no version directory with a {MODEL_FILE}"),
            ));
        }
        Ok((versions, settings, escalation))
    }
}

/// What a model's load starts from: its versions, settings and escalation.
type Discovered = (Vec<(u64, VersionSource)>, ModelSettings, Option<EscalationConfig>);

/// `root/name` if `name` is a plain directory name (no path tricks).
fn safe_join(root: &Path, name: &str) -> Option<PathBuf> {
    let plain = !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0']);
    plain.then(|| root.join(name))
}

/// The numbered version directories of a model that hold a model file
/// (LLMs: with `llm.json` next to it; encoders: with `encoder.json`).
fn model_versions(dir: &Path) -> Vec<(u64, VersionSource)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut versions: Vec<(u64, VersionSource)> = entries
        .flatten()
        .filter_map(|entry| {
            let version: u64 = entry.file_name().to_str()?.parse().ok().filter(|&v| v > 0)?;
            let file = entry.path().join(MODEL_FILE);
            if !file.is_file() {
                return None;
            }
            let source = if crate::llm::config::is_llm_dir(&entry.path()) {
                VersionSource::Llm(entry.path())
            } else if crate::encoder::config::is_encoder_dir(&entry.path()) {
                VersionSource::Encoder(entry.path())
            } else {
                VersionSource::Onnx(ModelBytes::File(file))
            };
            Some((version, source))
        })
        .collect();
    versions.sort_by_key(|(v, _)| *v);
    versions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_join_refuses_paths() {
        let root = Path::new("/models");
        assert_eq!(safe_join(root, "resnet"), Some(PathBuf::from("/models/resnet")));
        for bad in ["", ".", "..", "../etc", "a/b"] {
            assert_eq!(safe_join(root, bad), None, "{bad}");
        }
    }

    #[test]
    fn versions_are_numbered_dirs_with_a_model() {
        let dir = std::env::temp_dir().join(format!("ferrite-versions-{}", std::process::id()));
        for (version, with_file) in [("1", true), ("3", true), ("2", false), ("x", true), ("0", true)] {
            let path = dir.join(version);
            std::fs::create_dir_all(&path).unwrap();
            if with_file {
                std::fs::write(path.join(MODEL_FILE), b"").unwrap();
            }
        }
        let found: Vec<u64> = model_versions(&dir).into_iter().map(|(v, _)| v).collect();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found, vec![1, 3]);
    }
}
