//! Log setup: JSON (one object per line, fields at the top level) or text, to stderr, with a
//! `RUST_LOG`-style filter. Nothing logged anywhere carries a token or a secret: those types
//! redact themselves, and `proto-tests` grep the captured output to hold the line.

use tracing_subscriber::EnvFilter;

use crate::config::{ConfigError, LogArgs, LogFormat, Verbosity};

/// Install the subscriber; `-v/--verbosity`, when given, takes the place of `--log-level`.
pub fn init(args: &LogArgs, verbosity: Option<Verbosity>) -> Result<(), ConfigError> {
    let level: &str = match verbosity {
        Some(v) => v.filter(),
        None => &args.log_level,
    };
    let filter = EnvFilter::try_new(level)
        .map_err(|e| ConfigError::new("log-level", format!("'{level}': {e}")))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) keeps the first subscriber.
    let _ = match args.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
    Ok(())
}
