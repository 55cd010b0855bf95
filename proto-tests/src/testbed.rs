//! The usual arrangements: a fake upstream (EKS Auth, or STS with an
//! associations file), trusted keys in a JWKS file, and an agent started
//! against them.

use std::path::PathBuf;
use std::time::Duration;

use tempfile::TempDir;

use crate::agent::{agent_options_methods, Agent, AgentBuilder, AgentOptions, Exited};
use crate::associations::{Association, AssociationsFile, Format};
use crate::fakes::eks_auth::FakeEksAuth;
use crate::fakes::kube_api::FakeKubeApi;
use crate::fakes::sts::FakeSts;
use crate::http::RawResponse;
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

    /// Agent started with `args` besides the defaults.
    pub async fn with_args<const N: usize>(args: [&str; N]) -> Self {
        Self::builder().args(args).start().await
    }

    /// Agent attesting callers (`--caller-attestation pod` on node `node`) against `api`,
    /// with its keys from a file.
    pub async fn attesting(api: &FakeKubeApi, node: &str) -> Self {
        Self::builder()
            .args(["--node-name", node, "--caller-attestation", "pod"])
            .env("KUBECONFIG", api.kubeconfig())
            .start()
            .await
    }

    pub fn builder() -> TestBedBuilder {
        TestBedBuilder {
            key_source: true,
            options: AgentOptions::default(),
        }
    }

    pub fn jwks_path(&self) -> PathBuf {
        self.dir.path().join("jwks.json")
    }

    /// A valid RS256 token for `pod`.
    pub fn token(&self, pod: &Pod) -> String {
        pod.token().sign(&self.keys.rsa)
    }

    /// A credentials request with a valid token of `pod`.
    pub async fn fetch_as(&self, pod: &Pod) -> RawResponse {
        self.agent.fetch_credentials(&self.token(pod)).await
    }
}

pub struct TestBedBuilder {
    key_source: bool,
    options: AgentOptions,
}

impl TestBedBuilder {
    /// Give the agent no key source at all (no `--jwks-file`, `--jwks-url`
    /// or `--issuer`).
    pub fn without_key_source(mut self) -> Self {
        self.key_source = false;
        self
    }

    agent_options_methods!();

    pub async fn start(self) -> TestBed {
        let keys = TestKeys::shared();
        let dir = tempfile::tempdir().expect("temp dir");
        let upstream = FakeEksAuth::start().await;
        let mut builder = AgentBuilder::new(upstream.url());
        if self.key_source {
            builder = builder
                .arg("--jwks-file")
                .arg(trusted_jwks_file(&dir, keys));
        }
        let agent = builder.options(self.options).start().await;
        TestBed {
            upstream,
            agent,
            keys,
            dir,
        }
    }
}

/// The sts backend's arrangement: a fake STS, trusted keys in a JWKS file, an
/// associations file, and an agent started with `--backend sts` against them.
pub struct StsTestBed {
    /// The fake STS. When the bed was started against another endpoint
    /// ([`StsTestBedBuilder::sts_endpoint`], e.g. moto) it is still running
    /// but the agent does not call it.
    pub sts: FakeSts,
    pub agent: Agent,
    pub keys: &'static TestKeys,
    /// Rewrite it to make the agent reload.
    pub associations: AssociationsFile,
    /// Holds the JWKS and associations files and anything else a test writes.
    pub dir: TempDir,
}

impl StsTestBed {
    /// An agent whose associations are exactly `associations`.
    pub async fn start(associations: &[Association]) -> Self {
        Self::builder()
            .associations(associations.iter().cloned())
            .start()
            .await
    }

    pub fn builder() -> StsTestBedBuilder {
        StsTestBedBuilder {
            associations: Vec::new(),
            raw: None,
            format: Format::Yaml,
            associations_flag: true,
            key_source: true,
            endpoint: None,
            options: AgentOptions::default(),
        }
    }

    /// A valid RS256 token for `pod`.
    pub fn token(&self, pod: &Pod) -> String {
        pod.token().sign(&self.keys.rsa)
    }

    /// A credentials request with a valid token of `pod`.
    pub async fn fetch_as(&self, pod: &Pod) -> RawResponse {
        self.agent.fetch_credentials(&self.token(pod)).await
    }
}

pub struct StsTestBedBuilder {
    associations: Vec<Association>,
    raw: Option<String>,
    format: Format,
    associations_flag: bool,
    key_source: bool,
    endpoint: Option<String>,
    options: AgentOptions,
}

impl StsTestBedBuilder {
    pub fn association(mut self, association: Association) -> Self {
        self.associations.push(association);
        self
    }

    pub fn associations(mut self, associations: impl IntoIterator<Item = Association>) -> Self {
        self.associations.extend(associations);
        self
    }

    /// Write the file in `format` (default: YAML under `associations:`).
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// Write `text` verbatim as the associations file instead (for malformed
    /// files); its extension still follows [`StsTestBedBuilder::format`].
    pub fn raw_associations(mut self, text: impl Into<String>) -> Self {
        self.raw = Some(text.into());
        self
    }

    /// Start the agent without `--associations` at all.
    pub fn without_associations_flag(mut self) -> Self {
        self.associations_flag = false;
        self
    }

    /// Give the agent no key source (no `--jwks-file`, `--jwks-url` or `--issuer`).
    pub fn without_key_source(mut self) -> Self {
        self.key_source = false;
        self
    }

    /// Point `--sts-endpoint` somewhere other than the bed's fake (moto).
    pub fn sts_endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoint = Some(url.into());
        self
    }

    agent_options_methods!();

    /// Write the files and return the agent's builder.
    fn prepare(self, sts: &FakeSts, dir: &TempDir) -> (AgentBuilder, AssociationsFile) {
        let keys = TestKeys::shared();
        let file = AssociationsFile::new(dir.path(), self.format);
        match &self.raw {
            Some(text) => file.write_raw(text),
            None => file.write(&self.associations),
        }
        let endpoint = self.endpoint.unwrap_or_else(|| sts.url());
        let mut builder = AgentBuilder::sts(endpoint);
        if self.associations_flag {
            builder = builder.associations(file.path());
        }
        if self.key_source {
            builder = builder.arg("--jwks-file").arg(trusted_jwks_file(dir, keys));
        }
        (builder.options(self.options), file)
    }

    pub async fn start(self) -> StsTestBed {
        let dir = tempfile::tempdir().expect("temp dir");
        let sts = FakeSts::start().await;
        let (builder, associations) = self.prepare(&sts, &dir);
        let agent = builder.start().await;
        StsTestBed {
            sts,
            agent,
            keys: TestKeys::shared(),
            associations,
            dir,
        }
    }

    /// Run an agent expected to refuse this configuration; see
    /// [`AgentBuilder::run_to_exit`].
    pub async fn run_to_exit(self, timeout: Duration) -> Exited {
        let dir = tempfile::tempdir().expect("temp dir");
        let sts = FakeSts::start().await;
        let (builder, _file) = self.prepare(&sts, &dir);
        builder.run_to_exit(timeout).await
    }
}

/// `jwks.json` in `dir`, trusting both shared test keys.
fn trusted_jwks_file(dir: &TempDir, keys: &TestKeys) -> PathBuf {
    let path = dir.path().join("jwks.json");
    write_jwks(&path, &[&keys.rsa, &keys.ec]).expect("write JWKS file");
    path
}
