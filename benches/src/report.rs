//! The load tool's result table: one row per server and scenario.

use std::fmt::Write as _;
use std::time::Duration;

use crate::drive::Stats;

/// One measured run.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: &'static str,
    /// "agent" or "baseline".
    pub server: &'static str,
    pub connections: usize,
    pub requests: u64,
    pub per_second: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub p999: Duration,
    pub errors: u64,
    /// Calls the EKS Auth fake received during the run, and how many it should have.
    pub upstream: Option<(u64, u64)>,
    pub rss_kib: Option<u64>,
    pub note: String,
}

impl Row {
    pub fn from_stats(
        scenario: &'static str,
        server: &'static str,
        connections: usize,
        stats: &Stats,
    ) -> Row {
        Row {
            scenario,
            server,
            connections,
            requests: stats.ok,
            per_second: stats.per_second(),
            p50: stats.latency(0.50),
            p99: stats.latency(0.99),
            p999: stats.latency(0.999),
            errors: stats.errors,
            upstream: None,
            rss_kib: None,
            note: String::new(),
        }
    }
}

/// `1234567` -> `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// A latency with a unit that keeps three significant digits or so.
pub fn latency(d: Duration) -> String {
    let us = d.as_micros();
    if us < 1_000 {
        format!("{us}us")
    } else if us < 1_000_000 {
        format!("{:.2}ms", us as f64 / 1_000.0)
    } else {
        format!("{:.2}s", d.as_secs_f64())
    }
}

pub fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// The table, header included, as text.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<8} {:>5} {:>9} {:>9} {:>8} {:>8} {:>8} {:>6} {:>15} {:>7}  note",
        "scenario",
        "server",
        "conns",
        "requests",
        "req/s",
        "p50",
        "p99",
        "p99.9",
        "errors",
        "upstream/expect",
        "RSS MiB"
    );
    for r in rows {
        let upstream = match r.upstream {
            Some((seen, expected)) => format!("{}/{}", thousands(seen), thousands(expected)),
            None => "-".into(),
        };
        let rss = r.rss_kib.map(mib).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<12} {:<8} {:>5} {:>9} {:>9} {:>8} {:>8} {:>8} {:>6} {:>15} {:>7}  {}",
            r.scenario,
            r.server,
            r.connections,
            thousands(r.requests),
            thousands(r.per_second.round() as u64),
            latency(r.p50),
            latency(r.p99),
            latency(r.p999),
            thousands(r.errors),
            upstream,
            rss,
            r.note
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_numbers() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(latency(Duration::from_micros(812)), "812us");
        assert_eq!(latency(Duration::from_micros(1500)), "1.50ms");
        assert_eq!(latency(Duration::from_millis(2500)), "2.50s");
    }
}
