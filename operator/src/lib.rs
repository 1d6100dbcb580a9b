//! ferrite-operator: reconciles `ModelDeployment`s into ferrite-server pods
//! and scales them on the depth of their request queues.

pub mod autoscale;
pub mod crd;
pub mod resources;
pub mod status;
pub mod reconcile;
pub mod telemetry;
pub mod run;
