//! Invalid configuration exits 64 with one line naming the flag, before anything is bound.

use std::process::Command;

use proto_tests::agent::{agent_binary, agent_command};

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = agent_command()
        .args(args)
        .output()
        .expect("run the agent binary");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_exit_64_naming_the_flag() {
    let base = [
        "server",
        "--bind-hosts",
        "127.0.0.1",
        "--port",
        "0",
        "--probe-port",
        "0",
        "--metrics-port",
        "0",
    ];
    let cases: &[(&[&str], &str)] = &[
        (&["--port", "http"], "--port"),
        (
            &["--cluster-name", "c", "--cache-scope", "node"],
            "--cache-scope",
        ),
        (
            &[
                "--cluster-name",
                "c",
                "--max-credential-retention-before-renewal",
                "soon",
            ],
            "--max-credential-retention-before-renewal",
        ),
        (
            &["--cluster-name", "c", "--bind-hosts", "localhost"],
            "--bind-hosts",
        ),
        (&[], "--cluster-name"),
        (
            &["--cluster-name", "c", "--endpoint", "not a url"],
            "--endpoint",
        ),
        (
            &["--cluster-name", "c", "--backend", "sts"],
            "--associations",
        ),
        (
            &["--backend", "sts", "--associations", "/a.yaml"],
            "--backend",
        ),
        (
            &["--cluster-name", "c", "--log-level", "info,=[="],
            "--log-level",
        ),
        (&["--cluster-name", "c", "--no-such-flag"], "--no-such-flag"),
        // Keys without an issuer would let a token of any issuer through.
        (
            &["--cluster-name", "c", "--jwks-file", "/k.json"],
            "--issuer",
        ),
        (
            &[
                "--cluster-name",
                "c",
                "--jwks-url",
                "https://keys.example/jwks",
            ],
            "--issuer",
        ),
        (&["--cluster-name", "c", "-v", "loud"], "--verbosity"),
        (
            &["--cluster-name", "c", "--require-node-claim"],
            "--require-node-claim",
        ),
        (
            &["--cluster-name", "c", "--node-name", "Node_A"],
            "--node-name",
        ),
        (
            &["--cluster-name", "c", "--max-cache-size", "lots"],
            "--max-cache-size",
        ),
        // No region anywhere (no flag, no env, IMDS disabled): named as --region.
        (&["--cluster-name", "c"], "--region"),
    ];
    for (extra, flag) in cases {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        let (code, stderr) = run(&args);
        assert_eq!(code, Some(64), "{args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line expected, got {stderr}");
        assert!(lines[0].contains(flag), "{args:?}: {stderr}");
    }
}

#[test]
fn dry_run_checks_flags_without_binding() {
    // Port 80 on a link-local address would need privileges and an interface: a dry run
    // must not try.
    let (code, stderr) = run(&["server", "--cluster-name", "c", "--dry-run"]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = run(&[
        "server",
        "--cluster-name",
        "c",
        "--dry-run",
        "--port",
        "eighty",
    ]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("--port"), "{stderr}");
}

/// What a DaemonSet does: flags given as `POD_IDENTITY_AGENT_<FLAG>` variables, checked as the
/// flags themselves are.
#[test]
fn flags_are_read_from_their_environment_variables() {
    let dry_run = |env: &[(&str, &str)]| {
        let out = agent_command()
            .args(["server", "--dry-run"])
            .envs(env.iter().copied())
            .output()
            .expect("run the agent binary");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = dry_run(&[]);
    assert_eq!(
        code,
        Some(64),
        "the eks-auth backend needs a cluster name: {stderr}"
    );
    let cluster = ("POD_IDENTITY_AGENT_CLUSTER_NAME", "c");
    let (code, stderr) = dry_run(&[cluster]);
    assert_eq!(code, Some(0), "{stderr}");
    for (var, flag) in [
        ("POD_IDENTITY_AGENT_PORT", "--port"),
        (
            "POD_IDENTITY_AGENT_MAX_CREDENTIAL_RETENTION_BEFORE_RENEWAL",
            "--max-credential-retention-before-renewal",
        ),
        (
            "POD_IDENTITY_AGENT_CALLER_ATTESTATION",
            "--caller-attestation",
        ),
    ] {
        let (code, stderr) = dry_run(&[cluster, (var, "eighty")]);
        assert_eq!(code, Some(64), "{var}: {stderr}");
        assert!(
            stderr.lines().next().unwrap_or("").contains(flag),
            "{var}: {stderr}"
        );
    }
}

#[test]
fn help_and_version_exit_zero() {
    for args in [
        &["--help"][..],
        &["--version"][..],
        &["server", "--help"][..],
    ] {
        let (code, _) = run(args);
        assert_eq!(code, Some(0), "{args:?}");
    }
}

#[test]
fn version_subcommand_prints_the_version() {
    let out = Command::new(agent_binary())
        .arg("version")
        .env_clear()
        .output()
        .expect("run the agent binary");
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.trim(),
        format!("pod-identity-agent {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn upstream_flag_values_are_accepted() {
    // Upstream's meanings: 0 turns caching off; any positive retention is accepted (a short
    // one with a warning if it would outrun --max-service-qps); -v takes logrus level names
    // before or after the subcommand.
    for line in [
        "server --cluster-name c --max-cache-size 0 --dry-run",
        "server --cluster-name c --max-credential-retention-before-renewal 0 --dry-run",
        "server --cluster-name c --max-credential-retention-before-renewal 5s --dry-run",
        "-v trace server --cluster-name c --dry-run",
        "server --cluster-name c --dry-run --verbosity warning",
        "--verbosity panic server --cluster-name c --dry-run",
        "server --cluster-name c --max-service-qps 0 --dry-run",
    ] {
        let args: Vec<&str> = line.split_whitespace().collect();
        let (code, stderr) = run(&args);
        assert_eq!(code, Some(0), "{line}: {stderr}");
    }
}
