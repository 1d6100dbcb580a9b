//! ferrite-operator: reconciles `ModelDeployment`s into ferrite-server pods
//! and scales them on the depth of their request queues.

pub mod activator;
pub mod autoscale;
pub mod crd;
pub mod escalation;
pub mod health;
pub mod leader;
pub mod policy;
pub mod reconcile;
pub mod resources;
pub mod run;
pub mod status;
pub mod telemetry;
