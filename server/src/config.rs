//! Per-model settings: the server-wide defaults from the command line,
//! overridden by an optional `ferrite.json` next to the model's versions.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::runtime::ExecutionProvider;

/// File name of the per-model settings in a model repository.
pub const MODEL_SETTINGS_FILE: &str = "ferrite.json";

/// Settings a model may override. Every field is optional; unknown fields
/// are refused so that a typo does not silently fall back to a default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettingsFile {
    /// See [`ModelSettings::max_batch_size`].
    pub max_batch_size: Option<usize>,
    /// See [`ModelSettings::max_queue_delay`].
    pub max_queue_delay_microseconds: Option<u64>,
    /// See [`ModelSettings::max_queue_size`].
    pub max_queue_size: Option<usize>,
    /// See [`ModelSettings::instance_count`].
    pub instance_count: Option<usize>,
    /// See [`ModelSettings::intra_op_threads`].
    pub intra_op_threads: Option<usize>,
    /// See [`ModelSettings::execution_provider`].
    #[serde(default, deserialize_with = "provider_name")]
    pub execution_provider: Option<ExecutionProvider>,
    /// An LLM's micro -> macro escalation (docs/escalation.md); checked when
    /// the model loads. `--escalation-file` replaces it.
    pub escalation: Option<crate::cascade::EscalationConfig>,
}

/// An execution provider by the contract's name (`cpu`, `cuda`, `tensorrt`).
fn provider_name<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<ExecutionProvider>, D::Error> {
    let name = String::deserialize(deserializer)?;
    name.parse().map(Some).map_err(serde::de::Error::custom)
}

impl ModelSettingsFile {
    /// Reads `dir/ferrite.json`; a missing file means no overrides.
    pub fn read(dir: &Path) -> anyhow::Result<ModelSettingsFile> {
        let path = dir.join(MODEL_SETTINGS_FILE);
        match std::fs::read(&path) {
            Ok(text) => serde_json::from_slice(&text).map_err(|e| anyhow::anyhow!("invalid {}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ModelSettingsFile::default()),
            Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
        }
    }
}

/// The settings a model runs with, after defaults and overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSettings {
    /// Largest batch the dynamic batcher forms; 1 turns batching off.
    pub max_batch_size: usize,
    /// How long the batcher may hold the oldest request to grow a batch.
    pub max_queue_delay: Duration,
    /// Requests that may wait; beyond it requests are refused (queue full).
    pub max_queue_size: usize,
    /// ONNX Runtime sessions, each on its own thread.
    pub instance_count: usize,
    /// Threads per session; 0 means the available CPUs divided by instances.
    pub intra_op_threads: usize,
    /// Where the sessions run.
    pub execution_provider: ExecutionProvider,
    /// What one client may ask of an LLM (server-wide; not in `ferrite.json`).
    pub llm: LlmLimits,
}

/// Server-side limits on LLM requests (docs/security.md). A value of 0 (or
/// `None`) means "derived from the model and the container" (see
/// `llm::limits`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LlmLimits {
    /// Longest prompt, in bytes of text, checked before tokenizing; 0: the
    /// context length times 16 bytes (or the longest token's bytes, if
    /// shorter): text averages 3 to 5 bytes per token.
    pub max_prompt_bytes: usize,
    /// Most tokens one request may generate (`max_tokens`); 0: the context
    /// length. Larger requests are refused, as OpenAI does.
    pub max_tokens: usize,
    /// Whether requests may set `ignore_eos` (refused otherwise).
    pub allow_ignore_eos: bool,
    /// Bytes of KV cache the engine may hold for all its sequences; 0: the
    /// container's memory limit, less what the process holds after loading
    /// the model, less a margin. The prefix cache's bytes come out of it.
    pub kv_budget_bytes: u64,
    /// Bytes of the prefix cache (KV blocks of prompts seen, `llm::prefix_cache`),
    /// taken from the KV budget; 0 turns the cache off; `None`: an eighth of
    /// the KV budget, at most 1 GiB.
    pub prefix_cache_bytes: Option<u64>,
}

impl Default for ModelSettings {
    fn default() -> Self {
        ModelSettings {
            max_batch_size: 32,
            max_queue_delay: Duration::ZERO,
            max_queue_size: 1024,
            instance_count: 1,
            intra_op_threads: 0,
            execution_provider: ExecutionProvider::Cpu,
            llm: LlmLimits::default(),
        }
    }
}

impl ModelSettings {
    /// These settings with the file's overrides applied.
    pub fn with_overrides(self, file: &ModelSettingsFile) -> ModelSettings {
        ModelSettings {
            max_batch_size: file.max_batch_size.unwrap_or(self.max_batch_size).max(1),
            max_queue_delay: file
                .max_queue_delay_microseconds
                .map(Duration::from_micros)
                .unwrap_or(self.max_queue_delay),
            max_queue_size: file.max_queue_size.unwrap_or(self.max_queue_size).max(1),
            instance_count: file.instance_count.unwrap_or(self.instance_count).max(1),
            intra_op_threads: file.intra_op_threads.unwrap_or(self.intra_op_threads),
            execution_provider: file.execution_provider.unwrap_or(self.execution_provider),
            llm: self.llm,
        }
    }

    /// Threads per session: the configured count, or the CPUs this process
    /// may use (its cgroup quota included) shared among the instances.
    pub fn threads_per_instance(&self) -> usize {
        if self.intra_op_threads > 0 {
            return self.intra_op_threads;
        }
        (available_cpus() / self.instance_count).max(1)
    }
}

/// CPUs this process may use: the smaller of the CPUs it may run on and its
/// cgroup CPU quota (v2 `cpu.max` or v1 `cpu.cfs_quota_us`), rounded up.
pub fn available_cpus() -> usize {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    match cgroup_cpu_quota() {
        Some(quota) => cpus.min(quota.ceil().max(1.0) as usize),
        None => cpus,
    }
}

fn cgroup_cpu_quota() -> Option<f64> {
    if let Ok(text) = std::fs::read_to_string("/sys/fs/cgroup/cpu.max") {
        return parse_cpu_max(&text);
    }
    let quota = std::fs::read_to_string("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").ok()?;
    let period = std::fs::read_to_string("/sys/fs/cgroup/cpu/cpu.cfs_period_us").ok()?;
    parse_cfs(&quota, &period)
}

/// Parses cgroup v2 `cpu.max` ("max 100000" or "200000 100000").
fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut parts = text.split_whitespace();
    let quota: f64 = parts.next()?.parse().ok()?;
    let period: f64 = parts.next()?.parse().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// Parses cgroup v1 quota and period (-1 quota means unlimited).
fn parse_cfs(quota: &str, period: &str) -> Option<f64> {
    let quota: f64 = quota.trim().parse().ok()?;
    let period: f64 = period.trim().parse().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// Default budget of in-flight request bytes: 1/32 of the memory this
/// process may use. Decoding takes at most 24x the wire bytes, so even
/// degenerate requests that fill the budget stay within 3/4 of it.
pub fn default_inflight_bytes() -> usize {
    (memory_limit().unwrap_or(4 << 30) / 32) as usize
}

/// Bytes of memory this process may use: its cgroup's limit (v2
/// `memory.max`, v1 `memory.limit_in_bytes`) or the machine's memory,
/// whichever is smaller.
pub fn memory_limit() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .or_else(|_| std::fs::read_to_string("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
        .ok()
        .and_then(|text| parse_memory_limit(&text));
    let machine = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| parse_meminfo_total(&text));
    match (cgroup, machine) {
        (Some(limit), Some(total)) => Some(limit.min(total)),
        (limit, total) => limit.or(total),
    }
}

/// Bytes this process holds in memory now (`VmRSS`).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    kib_field(&status, "VmRSS:")
}

/// A cgroup memory limit: "max" (v2) or a huge number (v1, no limit) mean none.
fn parse_memory_limit(text: &str) -> Option<u64> {
    let bytes: u64 = text.trim().parse().ok()?;
    (bytes < 1 << 60).then_some(bytes)
}

fn parse_meminfo_total(text: &str) -> Option<u64> {
    kib_field(text, "MemTotal:")
}

/// A `Name:   1234 kB` line of a /proc file, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quota_parsing() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("250000 100000\n"), Some(2.5));
        assert_eq!(parse_cfs("-1\n", "100000\n"), None);
        assert_eq!(parse_cfs("50000\n", "100000\n"), Some(0.5));
    }

    #[test]
    fn memory_limit_parsing() {
        assert_eq!(parse_memory_limit("max\n"), None);
        assert_eq!(parse_memory_limit("2147483648\n"), Some(2 << 30));
        assert_eq!(parse_memory_limit("9223372036854771712\n"), None, "cgroup v1 without a limit");
        assert_eq!(parse_meminfo_total("MemTotal:       16318412 kB\nMemFree: 1 kB\n"), Some(16_318_412 * 1024));
        assert!(resident_bytes().is_some_and(|b| b > 0));
        assert!(default_inflight_bytes() > 0);
    }

    #[test]
    fn overrides_apply_and_clamp() {
        let file: ModelSettingsFile =
            serde_json::from_str(r#"{"max_batch_size": 0, "instance_count": 3, "execution_provider": "cuda"}"#)
                .unwrap();
        let settings = ModelSettings::default().with_overrides(&file);
        assert_eq!(settings.max_batch_size, 1);
        assert_eq!(settings.instance_count, 3);
        assert_eq!(settings.execution_provider, ExecutionProvider::Cuda);
        assert_eq!(settings.max_queue_size, 1024);
    }

    /// `ferrite.json` names providers as `--execution-provider` and the
    /// operator do (the contract's names).
    #[test]
    fn execution_provider_names_are_the_contracts() {
        for provider in ferrite_contract::ExecutionProvider::ALL {
            let json = format!(r#"{{"execution_provider": "{provider}"}}"#);
            let file: ModelSettingsFile = serde_json::from_str(&json).unwrap();
            assert_eq!(file.execution_provider, Some(provider));
        }
    }

    #[test]
    fn unknown_settings_are_refused() {
        assert!(serde_json::from_str::<ModelSettingsFile>(r#"{"max_batch": 4}"#).is_err());
        let typo = r#"{"escalation": {"target": {"url": "http://m/v1", "model": "m"}, "threshold": -1}}"#;
        let err = serde_json::from_str::<ModelSettingsFile>(typo).unwrap_err().to_string();
        assert!(err.contains("unknown field `threshold`"), "{err}");
        let file: ModelSettingsFile =
            serde_json::from_str(r#"{"max_queue_size": 4, "escalation": {"mode": "off"}}"#).unwrap();
        assert_eq!(file.escalation.unwrap().mode, crate::cascade::Mode::Off);
    }

    #[test]
    fn explicit_threads_win() {
        let settings = ModelSettings { intra_op_threads: 3, ..ModelSettings::default() };
        assert_eq!(settings.threads_per_instance(), 3);
        let shared = ModelSettings { instance_count: 1024, ..ModelSettings::default() };
        assert_eq!(shared.threads_per_instance(), 1);
    }
}
