//! Who applies the Deployment's `spec.replicas`, so that switching a
//! ModelDeployment between a fixed `replicas` and `autoscaling` keeps the
//! running count.
//!
//! Server-side apply removes a field that its only owner stops sending, and
//! the API server then defaults a Deployment's replicas to 1. So the
//! reconciler (field manager [`RECONCILER_FIELD_MANAGER`]) lets go of
//! the field only once the autoscaler ([`AUTOSCALER_FIELD_MANAGER`])
//! co-owns it; the autoscaler claims it at its first step by applying the
//! count it finds. Until then the reconciler keeps applying the current
//! count, on the condition that the Deployment is still the one it read (its
//! `resourceVersion`), so a scale the autoscaler writes in between is never
//! undone. Back to a fixed count, the reconciler applies the user's number
//! with force and takes the field over in the same write.

use k8s_openapi::api::apps::v1::Deployment;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{AUTOSCALER_FIELD_MANAGER, RECONCILER_FIELD_MANAGER};
use crate::crd::ModelDeployment;

/// Sets `deployment.spec.replicas` (built by
/// [`deployment`](super::deployment)) to what the reconciler applies, given
/// the Deployment that exists now (`None` before the first apply):
///
/// - a fixed count: the spec's number (as built);
/// - autoscaling, no Deployment yet: `minReplicas` (1 for 0), so it starts in range;
/// - autoscaling, the reconciler still the sole owner: the current count,
///   with the existing `resourceVersion` as a precondition;
/// - autoscaling, the autoscaler owns the field (or nobody does): left out.
pub fn set_replicas(deployment: &mut Deployment, md: &ModelDeployment, existing: Option<&Deployment>) {
    let Some(auto) = &md.spec.autoscaling else { return };
    let Some(spec) = deployment.spec.as_mut() else { return };
    match existing {
        // A scale-to-zero model starts at 1 (see `desired_replicas`).
        None => spec.replicas = Some(auto.min_replicas.max(1)),
        Some(existing) => {
            let held = owns_replicas(&existing.metadata, RECONCILER_FIELD_MANAGER)
                && !owns_replicas(&existing.metadata, AUTOSCALER_FIELD_MANAGER);
            if held {
                spec.replicas = existing.spec.as_ref().and_then(|s| s.replicas);
                deployment.metadata.resource_version = existing.metadata.resource_version.clone();
            } else {
                spec.replicas = None;
            }
        }
    }
}

/// Whether `manager` owns `spec.replicas` according to `managedFields`.
pub fn owns_replicas(meta: &ObjectMeta, manager: &str) -> bool {
    meta.managed_fields.iter().flatten().filter(|entry| entry.manager.as_deref() == Some(manager)).any(|entry| {
        entry.fields_v1.as_ref().and_then(|f| f.0.get("f:spec")).and_then(|spec| spec.get("f:replicas")).is_some()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{deployment, BuildConfig};
    use serde_json::json;

    fn md(spec: serde_json::Value) -> ModelDeployment {
        serde_json::from_value(json!({
            "apiVersion": "ferrite.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "m", "namespace": "ns", "uid": "u1"},
            "spec": spec,
        }))
        .unwrap()
    }

    /// An existing Deployment at `replicas`, `spec.replicas` owned by `managers`.
    fn existing(replicas: i32, managers: &[&str]) -> Deployment {
        let fields: Vec<_> = managers
            .iter()
            .map(|m| {
                json!({"manager": m, "operation": "Apply", "apiVersion": "apps/v1", "fieldsType": "FieldsV1",
                       "fieldsV1": {"f:spec": {"f:replicas": {}}}})
            })
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": "m", "namespace": "ns", "resourceVersion": "42", "managedFields": fields},
            "spec": {"replicas": replicas, "selector": {}, "template": {}},
        }))
        .unwrap()
    }

    fn applied(md: &ModelDeployment, existing: Option<&Deployment>) -> (Option<i32>, Option<String>) {
        let config = BuildConfig {
            server_image: "ferrite-server:test".into(),
            server_cuda_image: "ferrite-server-cuda:test".into(),
            server_image_pull_policy: None,
            policy: crate::policy::Policy::default(),
            scrapers: crate::resources::network_policy::MetricsScrapers::default(),
            model_cache: Default::default(),
        };
        let mut d = deployment(md, &config);
        set_replicas(&mut d, md, existing);
        (d.spec.unwrap().replicas, d.metadata.resource_version)
    }

    #[test]
    fn fixed_count_is_applied_as_written() {
        let fixed = md(json!({"model": {"uri": "s3://b/m"}, "replicas": 3}));
        let d = existing(5, &[AUTOSCALER_FIELD_MANAGER]);
        assert_eq!(applied(&fixed, Some(&d)), (Some(3), None), "force takes it back from the autoscaler");
        assert_eq!(applied(&fixed, None), (Some(3), None));
    }

    #[test]
    fn autoscaling_keeps_the_count_until_the_autoscaler_owns_it() {
        let auto = md(json!({"model": {"uri": "s3://b/m"}, "autoscaling": {"minReplicas": 2, "maxReplicas": 5}}));
        assert_eq!(applied(&auto, None), (Some(2), None), "created at minReplicas");
        let held = existing(3, &[RECONCILER_FIELD_MANAGER]);
        assert_eq!(applied(&auto, Some(&held)), (Some(3), Some("42".into())), "kept, on the read version");
        let shared = existing(3, &[RECONCILER_FIELD_MANAGER, AUTOSCALER_FIELD_MANAGER]);
        assert_eq!(applied(&auto, Some(&shared)), (None, None), "the autoscaler co-owns: let go");
        let taken = existing(4, &[AUTOSCALER_FIELD_MANAGER]);
        assert_eq!(applied(&auto, Some(&taken)), (None, None));
        let nobody = existing(4, &[]);
        assert_eq!(applied(&auto, Some(&nobody)), (None, None), "nothing to remove, nothing to claim");
    }
}
