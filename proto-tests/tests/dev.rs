//! The README's demo: `pod-identity-agent dev` prints export lines and a curl line, and that
//! curl line, run by a shell exactly as printed, returns (fake) credentials.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use proto_tests::agent::agent_binary;

/// The contract: the lines appear "within a few seconds".
const PRINT_DEADLINE: Duration = Duration::from_secs(15);

#[test]
fn dev_prints_a_curl_line_that_returns_credentials() {
    let mut child = Command::new(agent_binary())
        .args(["dev", "--log-format", "text"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pod-identity-agent dev");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut uri, mut token_file, mut curl) = (None, None, None);
    let deadline = std::time::Instant::now() + PRINT_DEADLINE;
    while curl.is_none() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("dev did not print its curl line within {PRINT_DEADLINE:?}");
            }
        };
        if let Some(v) = line.strip_prefix("export AWS_CONTAINER_CREDENTIALS_FULL_URI=") {
            uri = Some(v.to_owned());
        } else if let Some(v) = line.strip_prefix("export AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=")
        {
            token_file = Some(v.to_owned());
        } else if line.starts_with("curl ") {
            curl = Some(line);
        }
    }
    let (uri, token_file, curl) = (uri.unwrap(), token_file.unwrap(), curl.unwrap());
    assert!(
        uri.starts_with("http://127.0.0.1:") && uri.ends_with("/v1/credentials"),
        "{uri}"
    );
    assert!(std::path::Path::new(&token_file).is_file(), "{token_file}");

    let out = Command::new("sh")
        .args(["-c", &format!("{curl} --max-time 10")])
        .output()
        .expect("run the curl line");
    let body = String::from_utf8_lossy(&out.stdout);
    let creds: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert!(
        creds["AccessKeyId"]
            .as_str()
            .unwrap()
            .starts_with("ASIADEVFAKE"),
        "{creds}"
    );
    assert!(
        creds["SecretAccessKey"]
            .as_str()
            .unwrap()
            .starts_with("DEV-FAKE-"),
        "{creds}"
    );
    assert!(
        creds["Token"].as_str().unwrap().starts_with("DEV-FAKE-"),
        "{creds}"
    );
    assert!(
        creds["Expiration"].as_str().unwrap().ends_with('Z'),
        "{creds}"
    );

    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("dev did not stop after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(
        !std::path::Path::new(&token_file).exists(),
        "demo files are removed on exit"
    );
}
