//! The usual arrangement: a fake EKS Auth, trusted keys in a JWKS file, and an
//! agent started against both.

use std::ffi::OsString;
use std::path::PathBuf;

use tempfile::TempDir;

use crate::agent::{Agent, AgentBuilder};
use crate::fakes::eks_auth::FakeEksAuth;
use crate::keys::{write_jwks, Pod, TestKeys};

pub struct TestBed {
    pub upstream: FakeEksAuth,
    pub agent: Agent,
    pub keys: &'static TestKeys,
    /// Holds the JWKS file and anything else a test writes to disk.
    pub dir: TempDir,
}

impl TestBed {
    /// Agent with `--jwks-file` trusting [`TestKeys::shared`].
    pub async fn start() -> Self {
        Self::builder().start().await
    }

    pub fn builder() -> TestBedBuilder {
        TestBedBuilder {
            key_source: true,
            args: Vec::new(),
            wait_ready: true,
        }
    }

    pub fn jwks_path(&self) -> PathBuf {
        self.dir.path().join("jwks.json")
    }

    /// A valid RS256 token for `pod`.
    pub fn token(&self, pod: &Pod) -> String {
        pod.token().sign(&self.keys.rsa)
    }
}

pub struct TestBedBuilder {
    key_source: bool,
    args: Vec<OsString>,
    wait_ready: bool,
}

impl TestBedBuilder {
    /// Give the agent no key source at all (no `--jwks-file`, `--jwks-url`
    /// or `--issuer`).
    pub fn without_key_source(mut self) -> Self {
        self.key_source = false;
        self
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn wait_ready(mut self, wait: bool) -> Self {
        self.wait_ready = wait;
        self
    }

    pub async fn start(self) -> TestBed {
        let keys = TestKeys::shared();
        let dir = tempfile::tempdir().expect("temp dir");
        let upstream = FakeEksAuth::start().await;
        let mut builder = AgentBuilder::new(upstream.url()).wait_ready(self.wait_ready);
        if self.key_source {
            let path = dir.path().join("jwks.json");
            write_jwks(&path, &[&keys.rsa, &keys.ec]).expect("write JWKS file");
            builder = builder.arg("--jwks-file").arg(path);
        }
        let agent = builder.args(self.args).start().await;
        TestBed {
            upstream,
            agent,
            keys,
            dir,
        }
    }
}
