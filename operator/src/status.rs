//! Status of a ModelDeployment, derived from what its Deployment and pods
//! report: pure functions, unit-tested. Conditions say why a model is not
//! serving: image pull, fetch failure, model load failure, crash loop,
//! unschedulable.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{ModelDeployment, ModelDeploymentStatus};
use crate::policy::Violation;
use crate::resources::{desired_replicas, endpoints, selector_string};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
/// The reason of every condition of a ModelDeployment the policy refuses.
pub const POLICY_VIOLATION: &str = "PolicyViolation";
/// Condition of a `minReplicas: 0` ModelDeployment: whether it can scale to
/// zero (an activator holds its requests meanwhile).
pub const SCALE_TO_ZERO: &str = "ScaleToZero";
/// Ready=True at zero: idle, requests are held by the activator.
pub const SCALED_TO_ZERO: &str = "ScaledToZero";
/// Ready=True from zero until a pod is Ready: requests are held meanwhile.
pub const SCALING_FROM_ZERO: &str = "ScalingFromZero";
/// ScaleToZero=False: the operator runs without `--activator-service`.
pub const ACTIVATOR_MISSING: &str = "ActivatorMissing";
/// ScaleToZero=False: the activator has no ready endpoint.
pub const ACTIVATOR_UNAVAILABLE: &str = "ActivatorUnavailable";

/// Exit status of `ferrite-server serve --exit-on-load-failure` when a
/// model fails to load.
const LOAD_FAILURE_EXIT_CODE: i32 = ferrite_contract::exit::MODEL_LOAD_FAILED;

/// Why pods are not serving, read from one pod: `(reason, message)`.
pub fn pod_problem(pod: &Pod) -> Option<(&'static str, String)> {
    let status = pod.status.as_ref()?;
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    if let Some(unschedulable) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable"))
    {
        return Some((
            "Unschedulable",
            format!("pod {pod_name}: {}", unschedulable.message.clone().unwrap_or_default()),
        ));
    }
    let containers = status.init_container_statuses.iter().flatten().chain(status.container_statuses.iter().flatten());
    containers.filter_map(|c| container_problem(&pod_name, c)).next()
}

fn container_problem(pod: &str, container: &ContainerStatus) -> Option<(&'static str, String)> {
    let state = container.state.as_ref();
    let waiting = state.and_then(|s| s.waiting.as_ref());
    let waiting_reason = waiting.and_then(|w| w.reason.as_deref()).unwrap_or_default();
    // The latest exit: the current state if terminated, else the last one.
    let terminated = state
        .and_then(|s| s.terminated.as_ref())
        .or_else(|| container.last_state.as_ref().and_then(|s| s.terminated.as_ref()))
        .filter(|t| t.exit_code != 0);
    let exit_message = || {
        terminated
            .and_then(|t| t.message.clone().or_else(|| t.reason.clone()))
            .map(|m| m.trim().lines().last().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    if matches!(waiting_reason, "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName" | "ErrImageNeverPull") {
        let message = waiting.and_then(|w| w.message.clone()).unwrap_or_default();
        return Some((
            "ImagePullFailed",
            format!("pod {pod} container {}: {waiting_reason}: {message}", container.name),
        ));
    }
    if container.name == "fetch" && terminated.is_some() {
        return Some(("FetchFailed", format!("pod {pod}: model download failed: {}", exit_message())));
    }
    if container.name == "server" && terminated.is_some_and(|t| t.exit_code == LOAD_FAILURE_EXIT_CODE) {
        return Some(("ModelLoadFailed", format!("pod {pod}: {}", exit_message())));
    }
    if waiting_reason == "CrashLoopBackOff" {
        return Some((
            "CrashLoop",
            format!("pod {pod} container {} keeps crashing: {}", container.name, exit_message()),
        ));
    }
    if waiting_reason == "CreateContainerConfigError" {
        let message = waiting.and_then(|w| w.message.clone()).unwrap_or_default();
        return Some(("ConfigError", format!("pod {pod} container {}: {message}", container.name)));
    }
    None
}

fn condition(type_: &str, ok: bool, reason: &str, message: String, generation: Option<i64>) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
    }
}

/// Keeps `lastTransitionTime` of conditions whose status did not change.
pub fn carry_transition_times(new: &mut [Condition], old: &[Condition]) {
    for condition in new {
        if let Some(previous) = old.iter().find(|c| c.type_ == condition.type_ && c.status == condition.status) {
            condition.last_transition_time = previous.last_transition_time.clone();
        }
    }
}

/// The reconciler's part of the status, from the Deployment and the pods:
/// every field but the autoscaler's `queueDepth` and `lastScaleTime`.
/// `desiredReplicas` is the fixed count or, with autoscaling, the replicas
/// the autoscaler set on the Deployment.
pub fn compute(md: &ModelDeployment, deployment: Option<&Deployment>, pods: &[Pod]) -> ModelDeploymentStatus {
    let generation = md.metadata.generation;
    let previous = md.status.clone().unwrap_or_default();
    let desired = desired_replicas(md, deployment);
    let deployment_status = deployment.and_then(|d| d.status.clone()).unwrap_or_default();
    let replicas = deployment_status.replicas.unwrap_or(0);
    let ready = deployment_status.ready_replicas.unwrap_or(0);
    let updated = deployment_status.updated_replicas.unwrap_or(0);
    let deployment_current = deployment
        .and_then(|d| d.status.as_ref()?.observed_generation.zip(d.metadata.generation))
        .is_some_and(|(observed, generation)| observed >= generation);

    let problem = pods.iter().filter_map(pod_problem).next();
    let serving = ready > 0;
    // Scale to zero: Ready stays True at zero and on the way up from it,
    // since the activator holds requests and the first one scales up; only
    // a pod problem makes it False (see docs/scale-to-zero.md).
    let to_zero = crate::resources::activation::scales_to_zero(md);
    let previous_ready = previous.conditions.iter().find(|c| c.type_ == READY);
    let was_at_zero = previous_ready.is_some_and(|c| c.reason == SCALED_TO_ZERO || c.reason == SCALING_FROM_ZERO);
    let ready_condition = match (&problem, serving) {
        (_, true) => condition(READY, true, "ModelServing", format!("{ready}/{desired} replicas serving"), generation),
        (_, false) if to_zero && desired == 0 => condition(
            READY,
            true,
            SCALED_TO_ZERO,
            "scaled to zero while idle: requests are held by the activator, and the first one scales the model up"
                .into(),
            generation,
        ),
        (None, false) if to_zero && was_at_zero => condition(
            READY,
            true,
            SCALING_FROM_ZERO,
            format!(
                "scaling up from zero, 0/{desired} replicas ready: requests are held by the activator until one is"
            ),
            generation,
        ),
        (Some((reason, message)), false) => condition(READY, false, reason, message.clone(), generation),
        (None, false) if desired == 0 => {
            condition(READY, false, "ScaledToZero", "no replicas wanted".into(), generation)
        }
        (None, false) => condition(READY, false, "Starting", format!("0/{desired} replicas ready"), generation),
    };
    let rolling = !deployment_current || updated < desired || ready < desired || replicas > desired;
    let progressing_condition = if rolling {
        let reason = if updated < desired || replicas > desired { "RollingOut" } else { "WaitingForReplicas" };
        condition(PROGRESSING, true, reason, format!("{ready}/{desired} ready, {updated} up to date"), generation)
    } else {
        condition(PROGRESSING, false, "Stable", format!("{ready}/{desired} replicas up to date and ready"), generation)
    };
    let degraded_condition = match &problem {
        Some((reason, message)) => condition(DEGRADED, true, reason, message.clone(), generation),
        None => condition(DEGRADED, false, "Healthy", "no pod reports a problem".into(), generation),
    };
    let mut conditions = vec![ready_condition, progressing_condition, degraded_condition];
    carry_transition_times(&mut conditions, &previous.conditions);

    ModelDeploymentStatus {
        observed_generation: generation,
        replicas,
        ready_replicas: ready,
        desired_replicas: desired,
        // Written by the autoscaler alone (`autoscale::status`); `None` is
        // left out of what the reconciler applies, so that server-side apply
        // leaves them to it.
        queue_depth: None,
        last_scale_time: None,
        selector: Some(selector_string(md)),
        endpoints: Some(endpoints(md)),
        // With spec.escalation, added by `escalation::status::apply`.
        escalation: None,
        conditions,
    }
}

/// What the operator knows of the activator, for [`scale_to_zero_condition`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActivatorState {
    /// No `--activator-service`.
    Missing,
    /// Configured as `namespace/name`, with this many ready endpoints.
    Configured { service: String, ready_endpoints: usize },
}

/// The ScaleToZero condition of a `minReplicas: 0` ModelDeployment (`None`
/// for the others): True when an activator can hold its requests at zero,
/// False with [`ACTIVATOR_MISSING`] or [`ACTIVATOR_UNAVAILABLE`] (it is then
/// kept at one replica, or not taken to zero, until one can).
pub fn scale_to_zero_condition(md: &ModelDeployment, activator: &ActivatorState) -> Option<Condition> {
    let auto = md.spec.autoscaling.as_ref().filter(|a| a.scales_to_zero())?;
    let generation = md.metadata.generation;
    let after = auto.scale_to_zero_after().map_or(0, |d| d.as_secs());
    Some(match activator {
        ActivatorState::Missing => condition(
            SCALE_TO_ZERO,
            false,
            ACTIVATOR_MISSING,
            "spec.autoscaling.minReplicas is 0, but the operator runs without --activator-service (chart value \
             activator.enabled): nothing would hold the model's requests at zero, so it is kept at 1 replica"
                .into(),
            generation,
        ),
        ActivatorState::Configured { service, ready_endpoints: 0 } => condition(
            SCALE_TO_ZERO,
            false,
            ACTIVATOR_UNAVAILABLE,
            format!("the activator {service} has no ready endpoint: the model is not scaled to zero until it has one"),
            generation,
        ),
        ActivatorState::Configured { service, .. } => condition(
            SCALE_TO_ZERO,
            true,
            "ActivatorReady",
            format!(
                "scales to zero after {after}s without a request; the activator {service} holds requests meanwhile"
            ),
            generation,
        ),
    })
}

/// The status of a ModelDeployment outside the operator's policy: no pods
/// (its Deployment, if any, is held at zero replicas) and every condition
/// naming the broken rule, so that `kubectl get` and `describe` say why.
pub fn policy_violation(md: &ModelDeployment, violation: &Violation) -> ModelDeploymentStatus {
    let generation = md.metadata.generation;
    let previous = md.status.clone().unwrap_or_default();
    let message = violation.to_string();
    let mut conditions = vec![
        condition(READY, false, POLICY_VIOLATION, message.clone(), generation),
        condition(PROGRESSING, false, POLICY_VIOLATION, message.clone(), generation),
        condition(DEGRADED, true, POLICY_VIOLATION, message, generation),
    ];
    carry_transition_times(&mut conditions, &previous.conditions);
    ModelDeploymentStatus {
        observed_generation: generation,
        replicas: 0,
        ready_replicas: 0,
        desired_replicas: 0,
        queue_depth: None,
        last_scale_time: None,
        selector: Some(selector_string(md)),
        endpoints: None,
        escalation: None,
        conditions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ModelDeploymentSpec;
    use k8s_openapi::api::apps::v1::DeploymentStatus;
    use serde_json::json;

    fn md() -> ModelDeployment {
        let spec: ModelDeploymentSpec =
            serde_json::from_value(json!({"model": {"uri": "s3://b/m.onnx"}, "replicas": 2})).unwrap();
        let mut md = ModelDeployment::new("m", spec);
        md.metadata.generation = Some(3);
        md
    }

    fn deployment(ready: i32, updated: i32) -> Deployment {
        let mut d = Deployment::default();
        d.metadata.generation = Some(1);
        d.status = Some(DeploymentStatus {
            observed_generation: Some(1),
            replicas: Some(2),
            ready_replicas: Some(ready),
            updated_replicas: Some(updated),
            ..Default::default()
        });
        d
    }

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "m-1"}, "status": status})).unwrap()
    }

    fn get<'a>(status: &'a ModelDeploymentStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn all_ready_is_serving_and_stable() {
        let status = compute(&md(), Some(&deployment(2, 2)), &[]);
        assert_eq!(get(&status, READY).status, "True");
        assert_eq!(get(&status, READY).message, "2/2 replicas serving");
        assert_eq!(get(&status, PROGRESSING).status, "False");
        assert_eq!(get(&status, DEGRADED).status, "False");
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.ready_replicas, 2);
    }

    #[test]
    fn rollout_in_progress() {
        let status = compute(&md(), Some(&deployment(2, 1)), &[]);
        assert_eq!(get(&status, PROGRESSING).reason, "RollingOut");
        assert_eq!(get(&status, READY).status, "True");
    }

    #[test]
    fn reasons_from_pods() {
        let cases = [
            (
                json!({"initContainerStatuses": [{"name": "fetch", "image": "i", "imageID": "", "ready": false, "restartCount": 2,
                "lastState": {"terminated": {"exitCode": 1, "message": "error: cannot fetch s3://b/m.onnx: 404"}},
                "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}),
                "FetchFailed",
                "404",
            ),
            (
                json!({"containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": false, "restartCount": 1,
                "lastState": {"terminated": {"exitCode": 3, "message": "model load failed: m: bad protobuf"}},
                "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}),
                "ModelLoadFailed",
                "bad protobuf",
            ),
            (
                json!({"containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}]}),
                "ImagePullFailed",
                "not found",
            ),
            (
                json!({"containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": false, "restartCount": 4,
                "lastState": {"terminated": {"exitCode": 139, "reason": "Error"}},
                "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}),
                "CrashLoop",
                "keeps crashing",
            ),
            (
                json!({"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/1 nodes have enough nvidia.com/gpu"}]}),
                "Unschedulable",
                "nvidia.com/gpu",
            ),
        ];
        for (pod_status, reason, text) in cases {
            let status = compute(&md(), Some(&deployment(0, 2)), &[pod(pod_status)]);
            let ready = get(&status, READY);
            assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", reason));
            assert!(ready.message.contains(text), "{}", ready.message);
            assert_eq!(get(&status, DEGRADED).reason, reason);
        }
    }

    #[test]
    fn transition_time_kept_while_status_unchanged() {
        let mut m = md();
        let first = compute(&m, Some(&deployment(2, 2)), &[]);
        let mut old = first.clone();
        old.conditions[0].last_transition_time = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        m.status = Some(old);
        let second = compute(&m, Some(&deployment(2, 2)), &[]);
        assert_eq!(get(&second, READY).last_transition_time.0, k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    }

    fn zero_md(previous_ready_reason: Option<&str>) -> ModelDeployment {
        let spec: ModelDeploymentSpec = serde_json::from_value(
            json!({"model": {"uri": "s3://b/m.onnx"}, "autoscaling": {"minReplicas": 0, "maxReplicas": 3}}),
        )
        .unwrap();
        let mut md = ModelDeployment::new("m", spec);
        md.metadata.generation = Some(3);
        if let Some(reason) = previous_ready_reason {
            md.status = Some(ModelDeploymentStatus {
                conditions: vec![condition(READY, true, reason, String::new(), Some(3))],
                ..Default::default()
            });
        }
        md
    }

    fn scaled(replicas: i32, ready: i32) -> Deployment {
        let mut d = deployment(ready, replicas);
        d.spec = Some(serde_json::from_value(json!({"replicas": replicas, "selector": {}, "template": {}})).unwrap());
        d.status.as_mut().unwrap().replicas = Some(replicas);
        d
    }

    #[test]
    fn ready_stays_true_at_zero_and_on_the_way_up() {
        let at_zero = compute(&zero_md(Some("ModelServing")), Some(&scaled(0, 0)), &[]);
        let ready = get(&at_zero, READY);
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", SCALED_TO_ZERO));
        assert!(ready.message.contains("held by the activator"), "{}", ready.message);
        assert_eq!((at_zero.replicas, at_zero.desired_replicas), (0, 0));
        assert_eq!(get(&at_zero, PROGRESSING).status, "False");

        let rising = compute(&zero_md(Some(SCALED_TO_ZERO)), Some(&scaled(1, 0)), &[]);
        let ready = get(&rising, READY);
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", SCALING_FROM_ZERO));

        let served = compute(&zero_md(Some(SCALING_FROM_ZERO)), Some(&scaled(1, 1)), &[]);
        assert_eq!(get(&served, READY).reason, "ModelServing");

        // A new model is Starting, not ScalingFromZero; a broken pod is a problem.
        assert_eq!(get(&compute(&zero_md(None), Some(&scaled(1, 0)), &[]), READY).reason, "Starting");
        let crash = pod(json!({"containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": false,
            "restartCount": 1, "lastState": {"terminated": {"exitCode": 3, "message": "bad model"}},
            "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}));
        let broken = compute(&zero_md(Some(SCALED_TO_ZERO)), Some(&scaled(1, 0)), &[crash]);
        assert_eq!(
            (get(&broken, READY).status.as_str(), get(&broken, READY).reason.as_str()),
            ("False", "ModelLoadFailed")
        );
    }

    #[test]
    fn the_scale_to_zero_condition_says_why_not() {
        assert!(scale_to_zero_condition(&md(), &ActivatorState::Missing).is_none(), "not minReplicas 0");
        let m = zero_md(None);
        let missing = scale_to_zero_condition(&m, &ActivatorState::Missing).unwrap();
        assert_eq!((missing.status.as_str(), missing.reason.as_str()), ("False", ACTIVATOR_MISSING));
        assert!(missing.message.contains("--activator-service") && missing.message.contains("kept at 1 replica"));
        let service = "ferrite-system/ferrite-activator".to_string();
        let down =
            scale_to_zero_condition(&m, &ActivatorState::Configured { service: service.clone(), ready_endpoints: 0 });
        assert_eq!(down.unwrap().reason, ACTIVATOR_UNAVAILABLE);
        let up = scale_to_zero_condition(&m, &ActivatorState::Configured { service, ready_endpoints: 2 }).unwrap();
        assert_eq!(up.status, "True");
        assert!(up.message.contains("after 300s"), "{}", up.message);
    }

    #[test]
    fn a_policy_violation_names_the_rule_in_every_condition() {
        let violation =
            Violation { rule: "--max-replicas", message: "spec.replicas 9 exceeds the maximum of 4".into() };
        let status = policy_violation(&md(), &violation);
        assert_eq!((status.replicas, status.desired_replicas, status.observed_generation), (0, 0, Some(3)));
        for (type_, expected) in [(READY, "False"), (PROGRESSING, "False"), (DEGRADED, "True")] {
            let c = get(&status, type_);
            assert_eq!((c.status.as_str(), c.reason.as_str()), (expected, POLICY_VIOLATION));
            assert!(c.message.contains("--max-replicas") && c.message.contains("spec.replicas 9"), "{}", c.message);
        }
    }
}
