//! How the agent itself reaches the upstream: hybrid nodes' rotating shared credentials file
//! (`--rotate-credentials`) and proxies from `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`.

use std::time::Duration;

use proto_tests::{Agent, FakeEksAuth, Pod, TestKeys};

fn write_credentials(path: &std::path::Path, key_id: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        format!(
            "[default]\naws_access_key_id = {key_id}\naws_secret_access_key = secret-{key_id}\n"
        ),
    )
    .unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn rotate_credentials_rereads_the_shared_credentials_file() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    write_credentials(&creds, "AKIDFIRST");
    let jwks = dir.path().join("jwks.json");
    let keys = TestKeys::shared();
    proto_tests::keys::write_jwks(&jwks, &[&keys.rsa]).unwrap();
    let upstream = FakeEksAuth::start().await;
    let agent = Agent::builder(upstream.url())
        .args([
            "--rotate-credentials",
            "--rotate-credentials-interval",
            "1s",
            "--jwks-file",
        ])
        .arg(&jwks)
        .env("AWS_SHARED_CREDENTIALS_FILE", &creds)
        .start()
        .await;

    let first = Pod::new("team-a", "app", "app-0").token().sign(&keys.rsa);
    assert_eq!(agent.fetch_credentials(&first).await.status, 200);
    // The node's credentials rotate on disk; a later upstream call is signed with the new ones.
    write_credentials(&creds, "AKIDSECOND");
    // Not synchronisation: the 1 s rotation interval must pass. The file is read again only by
    // the next upstream call, so until then there is nothing to observe.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = Pod::new("team-a", "app", "app-1").token().sign(&keys.rsa);
    assert_eq!(agent.fetch_credentials(&second).await.status, 200);

    let signers: Vec<Option<String>> = upstream
        .call_log()
        .into_iter()
        .map(|c| c.signing_key_id)
        .collect();
    assert_eq!(
        signers,
        [Some("AKIDFIRST".to_owned()), Some("AKIDSECOND".to_owned())],
        "{}",
        agent.logs_text()
    );
}

#[tokio::test]
async fn upstream_calls_go_through_the_proxy_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    let keys = TestKeys::shared();
    proto_tests::keys::write_jwks(&jwks, &[&keys.rsa]).unwrap();
    let upstream = FakeEksAuth::start().await;
    // A forward proxy for plain HTTP receives the request in absolute form and answers it; the
    // fake serves any absolute-form request by its path, so it can stand in for the proxy.
    let proxy = FakeEksAuth::start().await;
    for (no_proxy, via_proxy) in [("", true), ("127.0.0.1", false)] {
        let agent = Agent::builder(upstream.url())
            .arg("--jwks-file")
            .arg(&jwks)
            .env("HTTP_PROXY", proxy.url())
            .env("HTTPS_PROXY", proxy.url())
            .env("NO_PROXY", no_proxy)
            .start()
            .await;
        let token = Pod::new("team-a", "app", &format!("app-{via_proxy}"))
            .token()
            .sign(&keys.rsa);
        let response = agent.fetch_credentials(&token).await;
        assert_eq!(response.status, 200, "{response:?}\n{}", agent.logs_text());
        let (through_proxy, direct) = (proxy.calls(), upstream.calls());
        if via_proxy {
            assert_eq!((through_proxy, direct), (1, 0), "HTTP_PROXY was not used");
        } else {
            assert_eq!((through_proxy, direct), (1, 1), "NO_PROXY was not honoured");
        }
    }
}

/// The hybrid overlay's sidecar: copies of the node's credential files, mode 0640, kept
/// current as the files rotate, and a clean exit on SIGTERM.
#[tokio::test]
async fn copy_credentials_keeps_readable_copies_current() {
    use std::os::unix::fs::PermissionsExt;
    let from = tempfile::tempdir().unwrap();
    let to = tempfile::tempdir().unwrap();
    write_credentials(&from.path().join("credentials"), "AKIDFIRST");
    let mut child = proto_tests::agent::agent_command()
        .args(["copy-credentials", "--interval", "200ms", "--from"])
        .arg(from.path())
        .arg("--to")
        .arg(to.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start copy-credentials");
    let copy = to.path().join("credentials");
    let wait_for = |key: &'static str| {
        let copy = copy.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                if std::fs::read_to_string(&copy).is_ok_and(|c| c.contains(key)) {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{key} was not copied"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_for("AKIDFIRST").await;
    let mode = std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "{mode:o}");
    write_credentials(&from.path().join("credentials"), "AKIDROTATED");
    wait_for("AKIDROTATED").await;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}
