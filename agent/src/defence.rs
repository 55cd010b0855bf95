//! Named guards for the abuse defences.
//!
//! Every defence that has a black-box test guarding it is written as
//! `if defence::on(Defence::X) { ... }` at the spot that enforces it. In an optimised build
//! (release, the only kind shipped) [`on`] is a constant `true` that the compiler folds
//! away. A debug build, the binary the test suite runs, reads
//! `POD_IDENTITY_AGENT_DISABLE_DEFENCE` at start and turns the named defence off, so
//! `scripts/check_defences.py` can prove that the test guarding each defence fails without
//! it, with the binary the tests already use and without editing source text.

/// Environment variable naming the defence to turn off (debug builds only).
pub const DISABLE_ENV: &str = "POD_IDENTITY_AGENT_DISABLE_DEFENCE";

macro_rules! defences {
    ($($variant:ident => $name:literal,)*) => {
        /// The defences that can be switched off in a debug build.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Defence {
            $($variant,)*
        }

        impl Defence {
            /// Every defence, in the order of `scripts/check_defences.py`'s table.
            pub const ALL: &'static [Defence] = &[$(Defence::$variant,)*];

            /// The name used by the environment variable and the script.
            pub fn name(self) -> &'static str {
                match self {
                    $(Defence::$variant => $name,)*
                }
            }
        }
    };
}

defences! {
    ConnectionLimit => "connection-limit",
    IdleTimeout => "idle-timeout",
    Pipelining => "pipelining",
    HostRequired => "host-required",
    SingleAuthorization => "single-authorization",
    HeadSizeLimit => "head-size-limit",
    NonAsciiAuthorization => "non-ascii-authorization",
    ResponseSizeCap => "response-size-cap",
    EksAuthIdentityCheck => "eks-auth-identity-check",
    UnknownKidPacing => "unknown-kid-pacing",
    AssociationAdmission => "association-admission",
    RefusalCache => "refusal-cache",
    GenericUpstreamMessages => "generic-upstream-messages",
    RefusalLogLimit => "refusal-log-limit",
    SecureKeySource => "secure-key-source",
    IssuerRequired => "issuer-required",
    RoleInCacheKey => "role-in-cache-key",
    StsRoleNameCheck => "sts-role-name-check",
    PerSourceLimit => "per-source-limit",
    SendTimeout => "send-timeout",
    AdminLimits => "admin-limits",
    NodeBinding => "node-binding",
    CallerAttestation => "caller-attestation",
    PodDeletionForgets => "pod-deletion-forgets",
    EdgeDeadline => "edge-deadline",
    ConnectionReclaim => "connection-reclaim",
    FragmentTarget => "fragment-target",
    ServableMargin => "servable-margin",
    ClosedErrorCodes => "closed-error-codes",
    StrictClaims => "strict-claims",
    KubeBodyBound => "kube-body-bound",
    LenientPodList => "lenient-pod-list",
    LogLineBound => "log-line-bound",
    PodIdentityMatch => "pod-identity-match",
}

impl Defence {
    /// The defence called `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Defence> {
        Defence::ALL.iter().copied().find(|d| d.name() == name)
    }
}

/// Whether `defence` is in force. Always true unless the binary was built with the
/// debug build started with [`DISABLE_ENV`] naming it.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn on(_defence: Defence) -> bool {
    true
}

#[cfg(debug_assertions)]
pub fn on(defence: Defence) -> bool {
    disabled() != Some(defence)
}

#[cfg(debug_assertions)]
fn disabled() -> Option<Defence> {
    static DISABLED: std::sync::OnceLock<Option<Defence>> = std::sync::OnceLock::new();
    *DISABLED.get_or_init(|| {
        std::env::var(DISABLE_ENV)
            .ok()
            .and_then(|n| Defence::from_name(&n))
    })
}

/// Check [`DISABLE_ENV`] at start: in a debug build an unknown name is an error, so a renamed
/// defence makes the script fail instead of testing nothing; in an optimised build the
/// variable is refused outright, so nobody believes they turned a defence off.
pub fn check_environment() -> Result<Option<Defence>, String> {
    let Some(name) = std::env::var_os(DISABLE_ENV) else {
        return Ok(None);
    };
    if !cfg!(debug_assertions) {
        return Err(format!(
            "{DISABLE_ENV} is set, but this build cannot turn defences off"
        ));
    }
    let name = name.to_string_lossy();
    Defence::from_name(&name)
        .map(Some)
        .ok_or_else(|| format!("{DISABLE_ENV}: no defence is called {name:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        for d in Defence::ALL {
            assert_eq!(Defence::from_name(d.name()), Some(*d));
        }
        let mut names: Vec<_> = Defence::ALL.iter().map(|d| d.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Defence::ALL.len());
    }

    #[test]
    fn every_defence_has_a_guard_in_the_source() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut text = String::new();
        let mut stack = vec![src];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs")
                    && !path.ends_with("defence.rs")
                {
                    text.push_str(&std::fs::read_to_string(&path).unwrap());
                }
            }
        }
        for d in Defence::ALL {
            let guard = format!("defence::on(Defence::{d:?})");
            assert!(text.contains(&guard), "no `{guard}` in agent/src");
        }
    }
}
