//! Child processes of the load tool (the agent, the baseline): started with their stderr
//! drained into a short tail, stopped on every way out of the tool.
//!
//! A [`ChildProcess`] is stopped when dropped (SIGTERM, then SIGKILL after a grace period),
//! which covers returns, errors and panics that unwind through its owner. A panic in some
//! other task does not unwind the owner, so [`kill_children_on_panic`] installs a hook that
//! kills every live child first. Ctrl-C reaches the children directly: they are in the
//! terminal's foreground process group.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a child gets to exit after SIGTERM by default (the agent drains for at most 8 s,
/// but under a load tool nothing is in flight when it is stopped).
const TERM_GRACE: Duration = Duration::from_secs(3);
/// Lines of a child's stderr kept for an error report.
const TAIL_LINES: usize = 12;

fn live() -> &'static Mutex<Vec<u32>> {
    static LIVE: OnceLock<Mutex<Vec<u32>>> = OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(Vec::new()))
}

/// Kill every live child before the default panic message is printed.
pub fn kill_children_on_panic() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(pids) = live().lock() {
            for &pid in pids.iter() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        previous(info);
    }));
}

/// What a child wrote to stderr: a line count and the last few lines.
#[derive(Debug, Default)]
pub struct LogTail {
    pub lines: u64,
    pub last: VecDeque<String>,
}

/// A running child process, stopped when dropped.
pub struct ChildProcess {
    name: &'static str,
    child: Child,
    tail: Arc<Mutex<LogTail>>,
    grace: Duration,
}

impl ChildProcess {
    /// Start `cmd` with stderr captured (and stdin left to the caller's setting).
    pub fn spawn(name: &'static str, mut cmd: Command) -> std::io::Result<ChildProcess> {
        cmd.stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        if let Ok(mut pids) = live().lock() {
            pids.push(child.id());
        }
        let tail = Arc::new(Mutex::new(LogTail::default()));
        if let Some(stderr) = child.stderr.take() {
            let tail = tail.clone();
            // A thread, not a task: it blocks on the pipe until the child exits.
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut t) = tail.lock() {
                        t.lines += 1;
                        if t.last.len() == TAIL_LINES {
                            t.last.pop_front();
                        }
                        t.last.push_back(line);
                    }
                }
            });
        }
        Ok(ChildProcess {
            name,
            child,
            tail,
            grace: TERM_GRACE,
        })
    }

    /// Give the child longer to exit after SIGTERM (a profiler writes its data then).
    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory now, from `/proc/<pid>/status`.
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.pid())
    }

    /// Its anonymous resident memory in KiB (see [`anon_rss_kib`]).
    pub fn anon_rss_kib(&self) -> Option<u64> {
        anon_rss_kib(self.pid())
    }

    /// Its exit status, if it has already exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// Lines written to stderr so far, and the last few.
    pub fn log(&self) -> (u64, Vec<String>) {
        match self.tail.lock() {
            Ok(t) => (t.lines, t.last.iter().cloned().collect()),
            Err(_) => (0, Vec::new()),
        }
    }

    /// SIGTERM, wait up to the grace period, then SIGKILL; reap it either way.
    pub fn stop(&mut self) {
        if self.exited().is_none() {
            let _ = kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM);
            let until = Instant::now() + self.grace;
            while self.exited().is_none() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.exited().is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if let Ok(mut pids) = live().lock() {
            let pid = self.pid();
            pids.retain(|&p| p != pid);
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `VmRSS` of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS")
}

/// Anonymous resident memory of `pid` (heap, stacks) in KiB: RSS without the pages of the
/// binary and libraries, which grow as more of the code runs and are not the process's
/// own allocations.
pub fn anon_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "RssAnon")
}

/// A `kB` field of `/proc/<pid>/status`.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The 1, 5 and 15 minute load averages: on a shared 2-core machine, whatever else runs
/// during a measurement changes it, and a reader of the results should know.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// A loopback port that was free a moment ago. Another process could take it before the
/// child binds it; on a machine running only the load tool that does not happen, and the
/// child then fails loudly at bind.
pub fn free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// The first line of `stdout` that starts with `prefix`, within `limit`.
pub fn wait_for_line(stdout: ChildStdout, prefix: &str, limit: Duration) -> Option<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let prefix = prefix.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix(&prefix) {
                let _ = tx.send(rest.trim().to_owned());
                break;
            }
        }
    });
    rx.recv_timeout(limit).ok()
}

/// `explicit`, or the agent built next to the running executable by the same cargo profile.
pub fn locate_agent(explicit: Option<&Path>) -> Result<PathBuf, String> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .map_err(|e| format!("this executable's path: {e}"))?
            .parent()
            .ok_or("this executable has no directory")?
            .join("pod-identity-agent"),
    };
    if !path.is_file() {
        return Err(format!(
            "no agent binary at {}; build it first: cargo build --release -p pod-identity-agent",
            path.display()
        ));
    }
    Ok(path)
}

/// A command running `bin`, under `wrapper` (a command line split on spaces, e.g. a
/// profiler) when one is given.
pub fn wrapped_command(bin: &Path, wrapper: Option<&str>) -> Command {
    let mut words = wrapper.into_iter().flat_map(str::split_whitespace);
    match words.next() {
        Some(program) => {
            let mut cmd = Command::new(program);
            cmd.args(words).arg(bin);
            cmd
        }
        None => Command::new(bin),
    }
}

/// The environment of an agent child: dummy AWS credentials (the agent signs its EKS Auth
/// calls) that keep the SDK away from any real credentials, profile or instance metadata on
/// the machine; no `RUST_LOG`; and none of the `POD_IDENTITY_AGENT_*` variables the agent
/// reads its flags from. Standard input and output are closed.
pub fn isolate_agent(cmd: &mut Command) {
    cmd.env("AWS_ACCESS_KEY_ID", "AKIDBENCHFAKE")
        .env("AWS_SECRET_ACCESS_KEY", "bench-fake-secret")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("POD_IDENTITY_AGENT_") {
            cmd.env_remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_rss() {
        let rss = rss_kib(std::process::id()).unwrap();
        assert!(rss > 100, "{rss}");
    }

    #[test]
    fn a_dropped_child_is_gone() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let child = ChildProcess::spawn("sleep", cmd).unwrap();
        let pid = child.pid();
        drop(child);
        assert!(rss_kib(pid).is_none(), "process {pid} still exists");
    }
}

/// Where the load tool's pinned mode puts each side: the client (this process: its tokio
/// workers and the EKS Auth fake) on one CPU, the server under test (agent or baseline, one
/// at a time) on another, so the two never compete for a core and the ratio compares the
/// servers alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pinning {
    pub client_cpu: usize,
    pub server_cpu: usize,
}

impl Pinning {
    /// The first two CPUs this process may run on, if there are two.
    pub fn detect() -> Option<Pinning> {
        let allowed = nix::sched::sched_getaffinity(Pid::from_raw(0)).ok()?;
        let mut cpus =
            (0..nix::sched::CpuSet::count()).filter(|&c| allowed.is_set(c).unwrap_or(false));
        Some(Pinning {
            client_cpu: cpus.next()?,
            server_cpu: cpus.next()?,
        })
    }

    /// Pin the calling thread (and every thread it starts later) to the client CPU. Call it
    /// before the runtime starts.
    pub fn pin_client(&self) -> nix::Result<()> {
        pin_current_thread(self.client_cpu)
    }

    /// Start a child on the server CPU: the calling thread moves there for the spawn (the
    /// child inherits its affinity) and back to the client CPU after.
    pub fn spawn_on_server(
        &self,
        name: &'static str,
        cmd: Command,
    ) -> std::io::Result<ChildProcess> {
        pin_current_thread(self.server_cpu).map_err(std::io::Error::from)?;
        let spawned = ChildProcess::spawn(name, cmd);
        pin_current_thread(self.client_cpu).map_err(std::io::Error::from)?;
        spawned
    }
}

fn pin_current_thread(cpu: usize) -> nix::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(Pid::from_raw(0), &set)
}
