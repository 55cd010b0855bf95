//! Log setup: JSON (one object per line, fields at the top level) or text, to stderr, with a
//! `RUST_LOG`-style filter. Nothing logged anywhere carries a token or a secret: those types
//! redact themselves, and `proto-tests` grep the captured output to hold the line.

use tracing_subscriber::EnvFilter;

use crate::config::{ConfigError, LogArgs, LogFormat};

pub fn init(args: &LogArgs) -> Result<(), ConfigError> {
    let filter = EnvFilter::try_new(&args.log_level).map_err(|e| ConfigError {
        flag: "log-level",
        message: format!("'{}': {e}", args.log_level),
    })?;
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
