//! Signals: the first SIGTERM or SIGINT starts a graceful drain, a second one exits at once
//! (an operator pressing Ctrl-C twice means it).

use tokio::signal::unix::{signal, SignalKind};

/// Exit status after a second signal: 128 + SIGTERM, as a shell would report it.
const FORCED_EXIT_CODE: i32 = 143;

/// Wait for the first SIGTERM or SIGINT, then arm the forced exit for the next one.
pub async fn wait_for_signal() -> std::io::Result<&'static str> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(FORCED_EXIT_CODE);
    });
    Ok(name)
}
