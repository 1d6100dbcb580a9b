//! What clients may do beyond inference, as the server's flags decide:
//! load and unload models (`--model-control-mode`), jump the queue
//! (`--allow-priority`). The frontends ask [`crate::state::ServerState`],
//! which applies the policy in one place for gRPC and HTTP alike.

use ferrite_contract::serve as flags;

use crate::error::{ErrorKind, InferError, InferResult};
use crate::inference::{InferRequest, Priority};

/// Whether the repository API may load and unload models (Triton's
/// `--model-control-mode`, with its names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModelControlMode {
    /// The models given at startup serve until the process ends; load and
    /// unload calls are refused.
    #[default]
    None,
    /// Clients may load and unload models.
    Explicit,
}

impl ModelControlMode {
    /// Both modes, in the order `--help` lists them.
    pub const ALL: [ModelControlMode; 2] = [ModelControlMode::None, ModelControlMode::Explicit];

    /// The contract's name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelControlMode::None => flags::MODEL_CONTROL_NONE,
            ModelControlMode::Explicit => flags::MODEL_CONTROL_EXPLICIT,
        }
    }
}

impl std::str::FromStr for ModelControlMode {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|mode| mode.as_str() == name).ok_or_else(|| {
            format!(
                "unknown model control mode '{name}' (expected {} or {})",
                flags::MODEL_CONTROL_NONE,
                flags::MODEL_CONTROL_EXPLICIT
            )
        })
    }
}

/// The server-wide switches of what clients may do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// Whether load and unload are allowed.
    pub model_control: ModelControlMode,
    /// Whether a request's `priority` parameter is honoured.
    pub allow_priority: bool,
}

impl Policy {
    /// Refuses a repository load or unload unless the mode allows it.
    pub(crate) fn check_model_control(&self, action: &str, model: &str) -> InferResult<()> {
        match self.model_control {
            ModelControlMode::Explicit => Ok(()),
            ModelControlMode::None => Err(InferError::new(
                ErrorKind::Disabled,
                format!(
                    "cannot {action} model '{model}': model control is disabled; start the server with --{} {} to allow it",
                    flags::MODEL_CONTROL_MODE.name(),
                    flags::MODEL_CONTROL_EXPLICIT
                ),
            )),
        }
    }

    /// Without `--allow-priority`, a request's priority is served as the
    /// default one (as Triton serves a priority outside the model's levels):
    /// any client could otherwise put itself ahead of every other.
    pub(crate) fn apply_priority(&self, request: &mut InferRequest) {
        if request.priority != Priority::Normal && !self.allow_priority {
            tracing::debug!(id = %request.id, "priority ignored: the server runs without --allow-priority");
            request.priority = Priority::Normal;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_names_are_the_contracts() {
        for mode in ModelControlMode::ALL {
            assert_eq!(mode.as_str().parse::<ModelControlMode>(), Ok(mode));
        }
        assert!("poll".parse::<ModelControlMode>().is_err());
        assert_eq!(ModelControlMode::default(), ModelControlMode::None);
    }

    #[test]
    fn model_control_none_refuses_naming_the_flag() {
        let error = Policy::default().check_model_control("unload", "m").unwrap_err();
        assert_eq!(error.kind, ErrorKind::Disabled);
        assert!(error.message.contains("--model-control-mode explicit"), "{}", error.message);
        let explicit = Policy { model_control: ModelControlMode::Explicit, ..Policy::default() };
        assert!(explicit.check_model_control("load", "m").is_ok());
    }

    #[test]
    fn priority_needs_the_flag() {
        let high = || InferRequest { priority: Priority::High, ..InferRequest::default() };
        let mut request = high();
        Policy::default().apply_priority(&mut request);
        assert_eq!(request.priority, Priority::Normal);
        let mut request = high();
        Policy { allow_priority: true, ..Policy::default() }.apply_priority(&mut request);
        assert_eq!(request.priority, Priority::High);
    }
}
