//! Runs the real AWS SDK credential providers against the agent, each in its
//! own process, configured only through the two environment variables EKS
//! injects into a pod:
//!
//! - Rust: `aws_config::ecs::EcsCredentialsProvider` (`clients/rust/`, built
//!   as the `fetch-creds-rust` binary of this package);
//! - Python: botocore's default chain (`clients/python/`, in the venv at
//!   `clients/.venv`);
//! - JavaScript: `fromHttp` from `@aws-sdk/credential-provider-http`
//!   (`clients/js/`, in `clients/js/node_modules`).
//!
//! `scripts/test` installs the Python and JS dependencies. When they are
//! missing a test fails (never skips) and says so.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::process::Command;

use crate::agent::target_binary;

/// botocore makes 3 attempts with 1 s sleeps, JS 4 with 1 s delays; an
/// interpreter start on a loaded machine adds seconds.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// One test per SDK client, each its own test (and so its own agent and fakes):
/// `for_each_sdk!(check: test_name => Sdk::Rust, ...)` makes `async fn test_name()` run
/// `check(Sdk::Rust).await`.
#[macro_export]
macro_rules! for_each_sdk {
    ($check:ident: $($test:ident => $sdk:expr),+ $(,)?) => {
        $(
            #[tokio::test]
            async fn $test() {
                $check($sdk).await;
            }
        )+
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sdk {
    Rust,
    Python,
    JavaScript,
}

/// What a client printed: the credentials its SDK resolved.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct SdkCredentials {
    pub access_key: String,
    pub secret_key: String,
    pub token: Option<String>,
    pub account_id: Option<String>,
}

pub fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients")
}

pub fn python_interpreter() -> PathBuf {
    clients_dir().join(".venv/bin/python")
}

pub fn node_modules() -> PathBuf {
    clients_dir().join("js/node_modules")
}

/// The program and arguments that run `sdk`'s client; panics with
/// instructions when its dependencies are not installed.
fn command_for(sdk: Sdk) -> (PathBuf, Vec<PathBuf>) {
    const HINT: &str = "run scripts/test from the repository root; it installs the SDK clients";
    match sdk {
        Sdk::Rust => {
            let bin = target_binary("fetch-creds-rust");
            assert!(
                bin.is_file(),
                "Rust SDK client not built at {} (cargo builds it with this package's tests; {HINT})",
                bin.display()
            );
            (bin, vec![])
        }
        Sdk::Python => {
            let python = python_interpreter();
            assert!(
                python.is_file(),
                "Python SDK client: no virtualenv at {}: {HINT}",
                python.display()
            );
            (python, vec![clients_dir().join("python/fetch_creds.py")])
        }
        Sdk::JavaScript => {
            let provider = node_modules().join("@aws-sdk/credential-provider-http");
            assert!(
                provider.is_dir(),
                "JS SDK client: {} is missing: {HINT}",
                provider.display()
            );
            (
                PathBuf::from("node"),
                vec![clients_dir().join("js/fetch-creds.mjs")],
            )
        }
    }
}

/// Write `token` where a pod's projected token would be (a file in `dir`), then run `sdk`'s
/// credential provider against `full_uri` with it, as [`fetch_credentials`] does.
pub async fn fetch_credentials_with_token(
    sdk: Sdk,
    full_uri: &str,
    dir: &Path,
    token: &str,
) -> Result<SdkCredentials, String> {
    let token_file = dir.join("eks-pod-identity-token");
    std::fs::write(&token_file, token)
        .map_err(|e| format!("write {}: {e}", token_file.display()))?;
    fetch_credentials(sdk, full_uri, &token_file).await
}

/// Run `sdk`'s credential provider with
/// `AWS_CONTAINER_CREDENTIALS_FULL_URI=full_uri` and
/// `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=token_file`.
///
/// `Err` carries the client's exit status and output when the SDK failed.
pub async fn fetch_credentials(
    sdk: Sdk,
    full_uri: &str,
    token_file: &Path,
) -> Result<SdkCredentials, String> {
    let (program, args) = command_for(sdk);
    let mut cmd = Command::new(&program);
    cmd.args(&args)
        .env_clear()
        .env("AWS_CONTAINER_CREDENTIALS_FULL_URI", full_uri)
        .env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", token_file)
        // Nothing but the container provider may answer.
        .envs(crate::agent::NO_AMBIENT_AWS)
        .env("AWS_REGION", crate::agent::REGION)
        .current_dir(clients_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for var in ["PATH", "HOME", "SYSTEMROOT"] {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("{sdk:?} client: cannot run {}: {e}", program.display()))?;
    let output = tokio::time::timeout(CLIENT_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("{sdk:?} client did not finish within {CLIENT_TIMEOUT:?}"))?
        .map_err(|e| format!("{sdk:?} client: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!(
            "{sdk:?} client failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
            output.status
        ));
    }
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    serde_json::from_str(last).map_err(|e| {
        format!(
            "{sdk:?} client printed no credentials JSON ({e}):\nstdout: {stdout}\nstderr: {stderr}"
        )
    })
}
