//! The autoscaler's part of a ModelDeployment's status, and how it is
//! written: a typed server-side apply under the autoscaler's own field
//! manager ([`FIELD_MANAGER`]), so `managedFields` names one writer for
//! every status field.
//!
//! Who writes what (each field has exactly one writer):
//!
//! | status field | writer | field manager |
//! |---|---|---|
//! | `queueDepth`, `lastScaleTime` | the autoscaler ([`write_status`]) | `ferrite-operator-autoscaler` |
//! | `observedGeneration`, `replicas`, `readyReplicas`, `desiredReplicas`, `selector`, `endpoints`, `conditions` | the reconciler ([`crate::reconcile::write_status`]) | `ferrite-operator` |
//!
//! `desiredReplicas` is the reconciler's: it is the fixed count, or, with
//! autoscaling, the Deployment's `spec.replicas` (which the autoscaler
//! applies) within `minReplicas..maxReplicas`. The
//! reconciler's conditions count against the same number, so the two always
//! agree; a scale write changes the Deployment, which the controller
//! watches, so the new count reaches the status within a reconciliation.
//!
//! With server-side apply a manager that leaves out a field it set before
//! removes it, so each apply carries all of its manager's fields: the
//! autoscaler sends `lastScaleTime` again on every write (from its memory,
//! [`StatusMemory`]), and leaves `queueDepth` out exactly when no pod
//! answered - the field is then removed, as before. The reconciler's apply
//! never carries `queueDepth` or `lastScaleTime` (both `None`, skipped when
//! serialized), so it neither owns nor removes them.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Serialize};

use super::{ScaleOutcome, FIELD_MANAGER};
use crate::crd::{ModelDeployment, ModelDeploymentStatus};

/// The status fields the autoscaler owns: the same names and types as in
/// [`ModelDeploymentStatus`], and nothing else, so an apply of it touches
/// only these.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalerStatus {
    /// `status.queueDepth`: queued plus in-flight requests at the last
    /// scrape; `None` (left out, so removed) when no pod answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<i64>,
    /// `status.lastScaleTime`: when the autoscaler last changed the replica
    /// count (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<String>,
}

impl AutoscalerStatus {
    /// The autoscaler's fields of a ModelDeployment's status.
    pub fn of(status: Option<&ModelDeploymentStatus>) -> AutoscalerStatus {
        status.map_or_else(AutoscalerStatus::default, |s| AutoscalerStatus {
            queue_depth: s.queue_depth,
            last_scale_time: s.last_scale_time.clone(),
        })
    }

    /// The fields after a step: the observed queue depth, and `now` as the
    /// scale time when the step changed the replica count, else the
    /// previous one.
    pub fn after(&self, outcome: &ScaleOutcome, now: DateTime<Utc>) -> AutoscalerStatus {
        AutoscalerStatus {
            queue_depth: outcome.queue_depth.map(|q| i64::try_from(q).unwrap_or(i64::MAX)),
            last_scale_time: if outcome.changed { Some(now.to_rfc3339()) } else { self.last_scale_time.clone() },
        }
    }
}

/// What the autoscaler last wrote into one ModelDeployment's status (per
/// object, kept by the caller next to its [`super::Recommendations`]).
///
/// The next apply starts from it rather than from the watch cache, which may
/// not show the last write yet: a stale `lastScaleTime` sent back would move
/// it into the past, a missing one would remove it.
#[derive(Clone, Debug, Default)]
pub struct StatusMemory {
    /// The uid of the object written, so a ModelDeployment deleted and
    /// created again under the same name starts afresh.
    uid: Option<String>,
    written: Option<AutoscalerStatus>,
}

impl StatusMemory {
    /// What to apply after a step, or `None` when the status already says
    /// it (no write, as for a steady queue). Pure.
    pub fn next(&self, md: &ModelDeployment, outcome: &ScaleOutcome, now: DateTime<Utc>) -> Option<AutoscalerStatus> {
        let previous = match &self.written {
            Some(written) if self.uid == md.metadata.uid => Cow::Borrowed(written),
            _ => Cow::Owned(AutoscalerStatus::of(md.status.as_ref())),
        };
        let next = previous.after(outcome, now);
        (outcome.changed || next != *previous).then_some(next)
    }

    fn remember(&mut self, md: &ModelDeployment, written: AutoscalerStatus) {
        self.uid = md.metadata.uid.clone();
        self.written = Some(written);
    }
}

/// The body of the autoscaler's apply: a ModelDeployment with its name and
/// the autoscaler's status fields only.
#[derive(Serialize, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatusApply<'a> {
    api_version: Cow<'static, str>,
    kind: Cow<'static, str>,
    metadata: ApplyMetadata<'a>,
    status: &'a AutoscalerStatus,
}

#[derive(Serialize, Debug, PartialEq)]
struct ApplyMetadata<'a> {
    name: &'a str,
}

impl<'a> StatusApply<'a> {
    pub fn new(name: &'a str, status: &'a AutoscalerStatus) -> StatusApply<'a> {
        StatusApply {
            api_version: ModelDeployment::api_version(&()),
            kind: ModelDeployment::kind(&()),
            metadata: ApplyMetadata { name },
            status,
        }
    }
}

/// Records one step's outcome in the ModelDeployment's status: the fields
/// [`StatusMemory::next`] gives, by server-side apply under [`FIELD_MANAGER`]
/// (forced: the fields are the autoscaler's alone, whoever touched them
/// last). Returns whether it wrote. A failed write leaves `memory` as it
/// was, so the next step tries again.
pub async fn write_status(
    client: &kube::Client,
    md: &ModelDeployment,
    outcome: &ScaleOutcome,
    memory: &mut StatusMemory,
    now: DateTime<Utc>,
) -> Result<bool, kube::Error> {
    let Some(status) = memory.next(md, outcome, now) else {
        return Ok(false);
    };
    let name = md.name_any();
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &md.namespace().unwrap_or_default());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(&name, &params, &Patch::Apply(StatusApply::new(&name, &status))).await?;
    memory.remember(md, status);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use kube::CustomResourceExt;
    use serde_json::{json, Value};

    use super::*;
    use crate::autoscale::Direction;

    fn outcome(queue_depth: Option<u64>, changed: bool) -> ScaleOutcome {
        ScaleOutcome {
            old_replicas: 2,
            new_replicas: if changed { 3 } else { 2 },
            changed,
            direction: if changed { Direction::Up } else { Direction::Hold },
            reason: String::new(),
            queue_depth,
            pods_scraped: u32::from(queue_depth.is_some()),
            pods_failed: 0,
        }
    }

    fn md(uid: &str, status: Value) -> ModelDeployment {
        serde_json::from_value(json!({
            "apiVersion": "ferrite.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "m", "namespace": "ns", "uid": uid, "generation": 1},
            "spec": {"model": {"uri": "s3://b/m.onnx"}, "autoscaling": {"maxReplicas": 4}},
            "status": status,
        }))
        .unwrap()
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn written(queue_depth: Option<i64>, last_scale_time: Option<&str>) -> AutoscalerStatus {
        AutoscalerStatus { queue_depth, last_scale_time: last_scale_time.map(str::to_string) }
    }

    #[test]
    fn what_a_step_writes() {
        let t0 = at(0).to_rfc3339();
        let t9 = at(9).to_rfc3339();
        let remembered =
            |uid: &str, status: AutoscalerStatus| StatusMemory { uid: Some(uid.into()), written: Some(status) };
        // (case, memory, object's status, outcome, what is applied)
        let cases: Vec<(&str, StatusMemory, Value, ScaleOutcome, Option<AutoscalerStatus>)> = vec![
            (
                "first step, a queue: written",
                StatusMemory::default(),
                json!({}),
                outcome(Some(12), false),
                Some(written(Some(12), None)),
            ),
            (
                "same queue as the object shows: no write",
                StatusMemory::default(),
                json!({"queueDepth": 12, "lastScaleTime": t0}),
                outcome(Some(12), false),
                None,
            ),
            (
                "queue moves: written, scale time carried",
                StatusMemory::default(),
                json!({"queueDepth": 12, "lastScaleTime": t0}),
                outcome(Some(5), false),
                Some(written(Some(5), Some(&t0))),
            ),
            (
                "a scale: new scale time even with the same queue",
                remembered("u1", written(Some(12), Some(&t0))),
                json!({"queueDepth": 12, "lastScaleTime": t0}),
                outcome(Some(12), true),
                Some(written(Some(12), Some(&t9))),
            ),
            (
                "no pod answered: queue depth left out (removed)",
                remembered("u1", written(Some(12), Some(&t0))),
                json!({"queueDepth": 12, "lastScaleTime": t0}),
                outcome(None, false),
                Some(written(None, Some(&t0))),
            ),
            (
                "still no answer: no write",
                remembered("u1", written(None, Some(&t0))),
                json!({"lastScaleTime": t0}),
                outcome(None, false),
                None,
            ),
            (
                "the cache lags behind the last write: memory wins",
                remembered("u1", written(Some(7), Some(&t9))),
                json!({"queueDepth": 12}),
                outcome(Some(7), false),
                None,
            ),
            (
                "memory of a deleted namesake is ignored",
                remembered("old", written(Some(7), Some(&t0))),
                json!({}),
                outcome(Some(7), false),
                Some(written(Some(7), None)),
            ),
        ];
        for (case, memory, status, outcome, want) in cases {
            assert_eq!(memory.next(&md("u1", status), &outcome, at(9)), want, "{case}");
        }
    }

    #[test]
    fn the_apply_carries_apiversion_kind_name_and_only_the_autoscalers_fields() {
        let status = written(Some(3), None);
        let body = serde_json::to_value(StatusApply::new("m", &status)).unwrap();
        assert_eq!(
            body,
            json!({
                "apiVersion": "ferrite.dev/v1alpha1", "kind": "ModelDeployment",
                "metadata": {"name": "m"}, "status": {"queueDepth": 3},
            })
        );
    }

    fn keys(value: Value) -> BTreeSet<String> {
        value.as_object().unwrap().keys().cloned().collect()
    }

    /// Every status field in the CRD has exactly one writer: the
    /// autoscaler's fields and the reconciler's are disjoint and together
    /// cover the schema, under the CRD's own field names.
    #[test]
    fn each_status_field_has_one_writer() {
        let full = written(Some(1), Some("2026-01-01T00:00:00+00:00"));
        let autoscaler = keys(serde_json::to_value(&full).unwrap());
        // The names are the CRD's: a round trip through the CRD's status type
        // keeps the values.
        let status: ModelDeploymentStatus = serde_json::from_value(serde_json::to_value(&full).unwrap()).unwrap();
        assert_eq!(AutoscalerStatus::of(Some(&status)), full);

        // The reconciler's apply, for an object whose status carries the
        // autoscaler's fields.
        let mut md = md("u1", json!({"queueDepth": 9, "lastScaleTime": "2026-01-01T00:00:00+00:00"}));
        md.spec.escalation = Some(serde_json::from_value(json!({"target": {"modelDeployment": "macro"}})).unwrap());
        let mut status = crate::status::compute(&md, None, &[]);
        crate::escalation::apply(&mut status, &md, &Default::default(), Some(true));
        let reconciler = keys(serde_json::to_value(status).unwrap());
        assert!(autoscaler.is_disjoint(&reconciler), "both write {:?}", autoscaler.intersection(&reconciler));

        let crd = serde_json::to_value(ModelDeployment::crd()).unwrap();
        let schema =
            keys(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"].clone());
        let written: BTreeSet<String> = autoscaler.union(&reconciler).cloned().collect();
        assert_eq!(written, schema, "every status field has a writer");
    }
}
