//! Micro -> macro escalation (issue 14): the cascade backend and its calibration.

pub mod calibrate;
