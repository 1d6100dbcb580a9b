//! Shadow mode: the micro model answers every request, the target is asked
//! the same in the background, and both answers go to the shadow log, one
//! JSON object per line (`ferrite-server calibrate` reads it). Bounded
//! everywhere: at most [`MAX_IN_FLIGHT`] target calls at once and
//! [`QUEUE_RECORDS`] records waiting for the writer; beyond either, the
//! request is not recorded and `ferrite_escalation_shadow_dropped_total`
//! counts it. One thread writes the file, so lines never interleave.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::llm::logprobs::finite;
use crate::llm::request::Answer;

/// Target calls of shadowed requests at once.
pub(crate) const MAX_IN_FLIGHT: usize = 4;
/// Records waiting for the writer.
const QUEUE_RECORDS: usize = 1024;

/// The micro answer of a shadowed request (its first choice).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MicroAnswer {
    pub(crate) text: String,
    pub(crate) finish_reason: &'static str,
    pub(crate) completion_tokens: usize,
    pub(crate) prompt_tokens: usize,
    /// The sampled tokens' log-probabilities.
    pub(crate) logprobs: Vec<f32>,
}

/// What the target answered (first choice) and how long it took, or why not.
pub(crate) type MacroAnswer = Result<(Answer, f64), String>;

/// One record of the shadow log (the contract's format).
pub(crate) fn record(
    model: &str,
    kind: &str,
    micro: &MicroAnswer,
    confidence: Option<f32>,
    answer: &MacroAnswer,
) -> Value {
    let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let macro_answer = match answer {
        Ok((answer, seconds)) => json!({
            "text": answer.text,
            "finish_reason": answer.finish_reason.as_str(),
            "completion_tokens": answer.usage.completion_tokens,
            "seconds": seconds,
        }),
        Err(error) => json!({"error": error}),
    };
    json!({
        "time": time,
        "model": model,
        "kind": kind,
        "prompt_tokens": micro.prompt_tokens,
        "logprobs": micro.logprobs.iter().map(|&lp| finite(lp)).collect::<Vec<_>>(),
        "confidence": confidence.map(finite),
        "micro": {"text": micro.text, "finish_reason": micro.finish_reason, "completion_tokens": micro.completion_tokens},
        "macro": macro_answer,
    })
}

/// The shadow log of one model.
pub(crate) struct ShadowLog {
    records: mpsc::Sender<Value>,
    in_flight: Arc<Semaphore>,
}

impl ShadowLog {
    /// Opens `path` for appending (its directory created) and starts the
    /// writer thread, which ends when the log is dropped.
    pub(crate) fn open(model: &str, path: &Path) -> anyhow::Result<ShadowLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("escalation.shadowLog: cannot create {}: {e}", dir.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| anyhow::anyhow!("escalation.shadowLog: cannot open {}: {e}", path.display()))?;
        let (records, mut receiver) = mpsc::channel::<Value>(QUEUE_RECORDS);
        let (model, shown) = (model.to_string(), path.display().to_string());
        std::thread::Builder::new().name(format!("shadow-{model}")).spawn(move || {
            let mut out = std::io::BufWriter::new(file);
            while let Some(record) = receiver.blocking_recv() {
                let line = record.to_string();
                if let Err(error) = writeln!(out, "{line}").and_then(|_| out.flush()) {
                    tracing::warn!(model = %model, file = %shown, %error, "cannot write the shadow log");
                }
            }
        })?;
        Ok(ShadowLog { records, in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)) })
    }

    /// A slot for one more target call, if one is free.
    pub(crate) fn slot(&self) -> Option<OwnedSemaphorePermit> {
        self.in_flight.clone().try_acquire_owned().ok()
    }

    /// Queues a record; `false` when the writer is behind (dropped).
    pub(crate) fn write(&self, record: Value) -> bool {
        self.records.try_send(record).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::request::{FinishReason, Usage};

    #[test]
    fn records_have_the_contract_fields_and_reach_the_file() {
        let micro = MicroAnswer {
            text: "4".into(),
            finish_reason: "stop",
            completion_tokens: 1,
            prompt_tokens: 9,
            logprobs: vec![-0.5, f32::NEG_INFINITY],
        };
        let answer = Answer {
            text: "four".into(),
            logprobs: vec![],
            finish_reason: FinishReason::Stop,
            usage: Usage { prompt_tokens: 9, completion_tokens: 2, cached_tokens: 0 },
        };
        let record = record("m", "chat", &micro, Some(-0.5), &Ok((answer, 0.25)));
        assert_eq!(record["logprobs"], json!([-0.5, -9999.0]));
        assert_eq!(record["micro"], json!({"text": "4", "finish_reason": "stop", "completion_tokens": 1}));
        assert_eq!(
            record["macro"],
            json!({"text": "four", "finish_reason": "stop", "completion_tokens": 2, "seconds": 0.25})
        );
        assert_eq!((record["prompt_tokens"].as_u64(), record["kind"].as_str()), (Some(9), Some("chat")));
        assert!(record["time"].as_str().unwrap().ends_with('Z'));
        let failed = super::record("m", "oip", &micro, None, &Err("timeout".into()));
        assert_eq!(failed["macro"], json!({"error": "timeout"}));

        let dir = std::env::temp_dir().join(format!("ferrite-shadow-{}", std::process::id()));
        let path = dir.join("sub/shadow.jsonl");
        let log = ShadowLog::open("m", &path).unwrap();
        assert!(log.write(record.clone()) && log.write(failed));
        let slots: Vec<_> = (0..MAX_IN_FLIGHT).map_while(|_| log.slot()).collect();
        assert_eq!(slots.len(), MAX_IN_FLIGHT);
        assert!(log.slot().is_none(), "bounded");
        drop(log);
        // The writer thread ends after the queued records.
        let mut lines = Vec::new();
        for _ in 0..100 {
            lines = std::fs::read_to_string(&path).unwrap_or_default().lines().map(str::to_string).collect();
            if lines.len() == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(lines.len(), 2);
        assert_eq!(serde_json::from_str::<Value>(&lines[0]).unwrap(), record);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
