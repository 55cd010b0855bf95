//! Log setup: JSON (one object per line, fields at the top level) or text, to stderr, with a
//! `RUST_LOG`-style filter. Nothing logged anywhere carries a token or a secret: those types
//! redact themselves, and `proto-tests` grep the captured output to hold the line.
//!
//! Every line is bounded as it is written ([`MAX_LINE_BYTES`]): what another party said can
//! reach a log line whole, in a dependency's line too (the Kubernetes client logs all of an
//! answer it could not parse), and a line of megabytes floods the log by itself.

use std::io::{self, Write};

use serde_json::{json, Map, Value};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{ConfigError, LogArgs, LogFormat, Verbosity};
use crate::defence::{self, Defence};

/// A log line longer than this is shortened before it is written: ten times the lines the
/// agent writes about itself (a refusal, a pod lookup: 250 to 350 bytes).
pub const MAX_LINE_BYTES: usize = 4096;
/// In a shortened JSON line every string keeps at most this many bytes, then fewer until the
/// line fits: a line has a handful of fields, so 1 KiB each keeps most of what was said.
const FIELD_LIMITS: [usize; 3] = [1024, 256, 64];

/// Install the subscriber; `-v/--verbosity`, when given, takes the place of `--log-level`.
pub fn init(args: &LogArgs, verbosity: Option<Verbosity>) -> Result<(), ConfigError> {
    let level: &str = match verbosity {
        Some(v) => v.filter(),
        None => &args.log_level,
    };
    let filter = EnvFilter::try_new(level)
        .map_err(|e| ConfigError::new("log-level", format!("'{level}': {e}")))?;
    let json = matches!(args.log_format, LogFormat::Json);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(BoundedStderr { json });
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

/// Stderr, each line at most [`MAX_LINE_BYTES`].
struct BoundedStderr {
    json: bool,
}

impl<'a> MakeWriter<'a> for BoundedStderr {
    type Writer = BoundedLine;

    fn make_writer(&'a self) -> BoundedLine {
        BoundedLine {
            json: self.json,
            out: io::stderr(),
        }
    }
}

/// The writer of one event: tracing's formatter writes each event's line with one
/// `write_all`, so one `write` sees the whole line.
struct BoundedLine {
    json: bool,
    out: io::Stderr,
}

impl Write for BoundedLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() <= MAX_LINE_BYTES || !defence::on(Defence::LogLineBound) {
            return self.out.write(buf);
        }
        self.out.write_all(&shorten(buf, self.json))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// `line`, at most [`MAX_LINE_BYTES`] with its newline: a JSON object stays one, with its
/// strings cut; anything else is cut at the end.
fn shorten(line: &[u8], json: bool) -> Vec<u8> {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches('\n');
    if json {
        if let Ok(Value::Object(record)) = serde_json::from_str::<Value>(text) {
            return shorten_record(&record, line.len());
        }
    }
    let marker = format!(" [{} bytes cut]\n", line.len());
    let mut out = prefix(text, MAX_LINE_BYTES - marker.len()).to_owned();
    out.push_str(&marker);
    out.into_bytes()
}

fn shorten_record(record: &Map<String, Value>, original: usize) -> Vec<u8> {
    for limit in FIELD_LIMITS {
        let mut value = Value::Object(record.clone());
        cut_strings(&mut value, limit);
        let mut out = value.to_string();
        out.push('\n');
        if out.len() <= MAX_LINE_BYTES {
            return out.into_bytes();
        }
    }
    // Too many fields for even the shortest cut: what the line was, without its fields.
    let kept = |key: &str| prefix(record.get(key).and_then(Value::as_str).unwrap_or(""), 64);
    let mut out = json!({
        "timestamp": kept("timestamp"),
        "level": kept("level"),
        "target": kept("target"),
        "message": format!("a log line of {original} bytes was too long to write"),
    })
    .to_string();
    out.push('\n');
    out.into_bytes()
}

fn cut_strings(value: &mut Value, limit: usize) {
    match value {
        Value::String(s) if s.len() > limit => {
            let whole = s.len();
            let kept = prefix(s, limit).len();
            s.truncate(kept);
            s.push_str(&format!(" [{} of {whole} bytes cut]", whole - kept));
        }
        Value::Array(items) => items.iter_mut().for_each(|v| cut_strings(v, limit)),
        Value::Object(fields) => fields.values_mut().for_each(|v| cut_strings(v, limit)),
        _ => {}
    }
}

/// The longest start of `s` of at most `max` bytes that ends on a character boundary.
fn prefix(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_json_line_stays_one_json_object_within_the_bound() {
        let line = format!(
            "{}\n",
            json!({"timestamp": "t", "level": "WARN", "message": "é".repeat(100_000), "target": "kube_client"})
        );
        let short = shorten(line.as_bytes(), true);
        assert!(short.len() <= MAX_LINE_BYTES, "{}", short.len());
        assert!(short.ends_with(b"\n"));
        let record: Value = serde_json::from_slice(&short).unwrap();
        assert_eq!(record["level"], "WARN");
        assert!(record["message"].as_str().unwrap().contains("bytes cut]"));
    }

    #[test]
    fn a_line_of_many_long_fields_still_fits() {
        let mut record = Map::new();
        for i in 0..200 {
            record.insert(format!("f{i}"), Value::from("\"".repeat(5000)));
        }
        record.insert("level".into(), Value::from("INFO"));
        let line = Value::Object(record).to_string();
        let short = shorten(line.as_bytes(), true);
        assert!(short.len() <= MAX_LINE_BYTES, "{}", short.len());
        let record: Value = serde_json::from_slice(&short).unwrap();
        assert_eq!(record["level"], "INFO");
    }

    #[test]
    fn a_long_text_line_is_cut_at_a_character_boundary() {
        let line = format!("WARN {}\n", "ü".repeat(10_000));
        let short = String::from_utf8(shorten(line.as_bytes(), false)).unwrap();
        assert!(short.len() <= MAX_LINE_BYTES);
        assert!(short.ends_with("bytes cut]\n"), "{short}");
    }
}
