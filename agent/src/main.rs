//! Thin entry point: parse flags, set up logging, run, map failures to exit codes.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;
use pod_identity_agent::config::{AuditArgs, Cli, Command, Environment, ProbeArgs, EXIT_USAGE};
use pod_identity_agent::lifecycle::shutdown;
use pod_identity_agent::node::{netlink, runtime_dir};
use pod_identity_agent::{defence, logging, Agent};

/// Overall bound on a graceful stop (the contract says exit within 10 s of SIGTERM).
const SHUTDOWN_LIMIT: Duration = Duration::from_millis(9500);
/// A node agent should not take every core of a busy node.
const MAX_WORKER_THREADS: usize = 4;

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn usage_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("pod-identity-agent: {message}");
    exit(EXIT_USAGE)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse_with_env(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's first line names the flag; the rest is usage noise.
            let rendered = e.to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            return usage_error(first.trim_start_matches("error: "));
        }
    };
    // The kubelet runs the exec probe every few seconds: one thread, nothing else set up.
    if let Command::Probe(args) = &cli.command {
        return probe(args);
    }
    if let Command::Audit(args) = &cli.command {
        return audit(args);
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .min(MAX_WORKER_THREADS);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pod-identity-agent: cannot start the async runtime: {e}");
            return exit(1);
        }
    };
    let verbosity = cli.verbosity;
    match cli.command {
        Command::CopyCredentials(args) => {
            if let Err(e) = logging::init(&args.log, verbosity) {
                return usage_error(e);
            }
            let interval = match args.checked_interval() {
                Ok(interval) => interval,
                Err(e) => return usage_error(e),
            };
            runtime.block_on(async move {
                tokio::select! {
                    result = pod_identity_agent::node::copy::run(&args.from, &args.to, &args.file, interval) => {
                        if let Err(e) = result {
                            eprintln!("pod-identity-agent copy-credentials: {e}");
                            return exit(1);
                        }
                        ExitCode::SUCCESS
                    }
                    _ = shutdown::wait_for_signal() => ExitCode::SUCCESS,
                }
            })
        }
        Command::Probe(args) => probe(&args),
        Command::Audit(args) => audit(&args),
        Command::Version => {
            println!("pod-identity-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Server(args) => {
            if let Err(e) = logging::init(&args.log, verbosity) {
                return usage_error(e);
            }
            match defence::check_environment() {
                Ok(Some(d)) => tracing::warn!(
                    defence = d.name(),
                    "a defence is switched off (debug builds only, for scripts/check_defences.py)"
                ),
                Ok(None) => {}
                Err(e) => return usage_error(e),
            }
            let dry_run = args.dry_run;
            let config = match args.into_config(&Environment::of_process()) {
                Ok(c) => c,
                Err(e) => return usage_error(e),
            };
            if dry_run {
                println!("pod-identity-agent: configuration is valid");
                return ExitCode::SUCCESS;
            }
            runtime.block_on(async move {
                let agent = match Agent::start(config).await {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("pod-identity-agent: {e}");
                        return exit(e.exit_code());
                    }
                };
                match shutdown::wait_for_signal().await {
                    Ok(signal) => {
                        tracing::info!(signal, "shutting down: draining in-flight requests")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot install signal handlers");
                        return exit(1);
                    }
                }
                agent.shutdown(SHUTDOWN_LIMIT).await;
                tracing::info!("stopped");
                ExitCode::SUCCESS
            })
        }
        Command::Dev(args) => {
            if let Err(e) = logging::init(&args.log, verbosity) {
                return usage_error(e);
            }
            match runtime.block_on(pod_identity_agent::dev::run(args.port)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pod-identity-agent dev: {e}");
                    exit(1)
                }
            }
        }
        Command::Initialize(args) => {
            if let Err(e) = logging::init(&args.log, verbosity) {
                return usage_error(e);
            }
            match runtime.block_on(netlink::initialize(&args.link_name, &args.addresses)) {
                Ok(report) => {
                    let list = |ips: &[std::net::IpAddr]| {
                        ips.iter()
                            .map(|i| i.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    let how = if report.fell_back_to_loopback {
                        "fell back to lo: the kernel has no dummy link driver"
                    } else if report.link_created {
                        "created the dummy link"
                    } else {
                        "link already existed"
                    };
                    println!(
                        "pod-identity-agent initialize: link {} ({how}); added [{}]; already present [{}]",
                        report.link,
                        list(&report.added),
                        list(&report.already_present)
                    );
                    prepare_runtime_dirs(&args.runtime_dir, args.runtime_dir_owner)
                }
                Err(e) => {
                    eprintln!("pod-identity-agent initialize: {e}");
                    exit(e.exit_code())
                }
            }
        }
    }
}

/// `initialize --runtime-dir`: each directory created if missing and given to its owner
/// alone; the first that cannot be is the error (exit 73, `EX_CANTCREAT`).
fn prepare_runtime_dirs(dirs: &[std::path::PathBuf], owner: Option<(u32, u32)>) -> ExitCode {
    const EXIT_CANT_CREATE: i32 = 73;
    let owner = owner.unwrap_or_else(|| {
        (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        )
    });
    for dir in dirs {
        match runtime_dir::prepare(dir, owner) {
            Ok(done) => println!(
                "pod-identity-agent initialize: directory {} for {}:{} mode 0700 (created: {}, owner changed: {}, mode changed: {})",
                dir.display(),
                owner.0,
                owner.1,
                done.created,
                done.chowned,
                done.chmodded
            ),
            Err(e) => {
                eprintln!("pod-identity-agent initialize: --runtime-dir: {e}");
                return exit(EXIT_CANT_CREATE);
            }
        }
    }
    ExitCode::SUCCESS
}

/// `probe SOCKET PATH`: 0 when the agent behind SOCKET answers 200, else 1, with what it said
/// (the kubelet shows an exec probe's output in the pod's events).
fn probe(args: &ProbeArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pod-identity-agent probe: cannot start the async runtime: {e}");
            return exit(1);
        }
    };
    match runtime.block_on(pod_identity_agent::edge::probe::ask(
        &args.socket,
        &args.path,
    )) {
        Ok(answer) => {
            println!("{} {}: {}", args.path, answer.status, answer.body);
            if answer.status == 200 {
                ExitCode::SUCCESS
            } else {
                exit(1)
            }
        }
        Err(e) => {
            println!("{}: {e}", args.path);
            exit(1)
        }
    }
}

/// `audit PATH [filters]`: the matching records on stdout, one JSON object per line; exit 0
/// when some matched, 1 when none did, 2 when the log cannot be read (grep's convention).
fn audit(args: &AuditArgs) -> ExitCode {
    let filter = pod_identity_agent::lifecycle::audit::Filter {
        access_key_id: args.access_key_id.clone(),
        pod_uid: args.pod_uid.clone(),
        namespace: args.namespace.clone(),
    };
    match pod_identity_agent::lifecycle::audit::search(&args.path, &filter) {
        Ok(found) => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            for line in &found.lines {
                if writeln!(out, "{line}").is_err() {
                    return exit(2);
                }
            }
            if found.unreadable > 0 {
                eprintln!(
                    "pod-identity-agent audit: {} line(s) that are not records were skipped",
                    found.unreadable
                );
            }
            if found.lines.is_empty() {
                exit(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!(
                "pod-identity-agent audit: cannot read {}: {e}",
                args.path.display()
            );
            exit(2)
        }
    }
}
