//! moto's standalone server as a second STS: an emulator written by other
//! people from the same service models, so a wire-format mistake shared by the
//! agent and [`super::sts`] (both written here) still shows up.
//!
//! moto is a Python package installed by `scripts/test` into the SDK clients'
//! virtualenv (`proto-tests/clients/.venv`, from
//! `clients/python/requirements.txt`). It routes an unsigned
//! `Action=AssumeRoleWithWebIdentity` body to its STS backend, takes the
//! account from the role ARN, and does not check the token.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::clients::python_interpreter;
use crate::http::{self, RawRequest};

/// An interpreter start plus moto's imports on a loaded two-core machine.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Another process may take the port between our probe and moto's bind.
const START_ATTEMPTS: usize = 3;

type Output = Arc<Mutex<Vec<String>>>;

/// A running `python -m moto.server`, killed when dropped.
pub struct Moto {
    child: Child,
    addr: SocketAddr,
    output: Output,
}

impl Moto {
    /// Start moto on a free loopback port and wait (bounded) until it answers.
    /// Panics, with what moto printed, if it cannot be started; panics with
    /// instructions if the virtualenv or moto is not installed.
    pub async fn start() -> Self {
        let python = python_interpreter();
        assert!(
            python.is_file(),
            "moto: no virtualenv at {}: run scripts/test from the repository root; it installs \
             moto[server] from proto-tests/clients/python/requirements.txt",
            python.display()
        );
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            match Self::try_start().await {
                Ok(moto) => return moto,
                Err(failure) => last_failure = failure,
            }
        }
        panic!(
            "moto did not start after {START_ATTEMPTS} attempts (if it is not installed, run \
             scripts/test: it installs moto[server] into the virtualenv): {last_failure}"
        );
    }

    async fn try_start() -> Result<Self, String> {
        let port = free_port().map_err(|e| format!("no free loopback port: {e}"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let python = python_interpreter();
        let mut cmd = Command::new(&python);
        cmd.args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .env_clear()
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        // moto's STS does not need these, but nothing may leak in from the
        // developer's shell either.
        .envs(crate::agent::NO_AMBIENT_AWS)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        for var in ["PATH", "HOME"] {
            if let Some(v) = std::env::var_os(var) {
                cmd.env(var, v);
            }
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawn {} -m moto.server: {e}", python.display()))?;
        let output: Output = Arc::default();
        if let Some(out) = child.stdout.take() {
            capture(out, output.clone());
        }
        if let Some(err) = child.stderr.take() {
            capture(err, output.clone());
        }
        let mut moto = Self {
            child,
            addr,
            output,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if moto.reset().await.is_ok() {
                return Ok(moto);
            }
            if let Ok(Some(status)) = moto.child.try_wait() {
                return Err(format!(
                    "moto exited ({status}) on port {port}\n{}",
                    moto.logs_text()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "moto did not answer on {addr} within {STARTUP_TIMEOUT:?}\n{}",
                    moto.logs_text()
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// `http://127.0.0.1:<port>`, for `--sts-endpoint` or an SDK's endpoint URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Forget every resource moto holds (`POST /moto-api/reset`).
    pub async fn reset(&self) -> Result<(), String> {
        let req = RawRequest::new("POST", "/moto-api/reset")
            .header("Host", self.addr.to_string())
            .header("Connection", "close")
            .body("");
        let response = http::send_bytes(self.addr, &req.to_bytes(), false, Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())?;
        if response.status == 200 {
            Ok(())
        } else {
            Err(format!("reset answered {response:?}"))
        }
    }

    /// What moto printed (its request log and any traceback).
    pub fn logs_text(&self) -> String {
        let lines = self.output.lock().unwrap_or_else(|e| e.into_inner());
        format!(
            "--- moto on {} ---\n{}\n--- end of moto output ---",
            self.addr,
            lines.join("\n")
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs_text());
        }
        // moto runs werkzeug without its reloader: one process, no children.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

fn capture(pipe: impl Read + Send + 'static, output: Output) {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).split(b'\n') {
            let Ok(bytes) = line else { break };
            output
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(String::from_utf8_lossy(&bytes).trim_end().to_owned());
        }
    });
}
