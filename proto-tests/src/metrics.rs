//! Reading Prometheus text exposition without a client library: tests only
//! need "what is the value of this series" and "what do all series of this
//! metric add up to".

/// Metric name prefix of every agent metric.
pub const PREFIX: &str = "pod_identity_agent_";

/// `(series, value)` for every sample line, where `series` is the name plus
/// its label set as written (`name{a="b"}`).
pub fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let series_end = match (line.find('{'), line.find(' ')) {
                (Some(brace), Some(space)) if brace < space => line.rfind('}')? + 1,
                (_, Some(space)) => space,
                _ => return None,
            };
            let (series, rest) = line.split_at(series_end);
            let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
            Some((series.to_owned(), value))
        })
        .collect()
}

fn metric_name(series: &str) -> &str {
    series.split('{').next().unwrap_or(series)
}

/// The value of one exact series, e.g. `pod_identity_agent_verification_enabled`
/// or `pod_identity_agent_requests_total{code="200"}`.
pub fn value(text: &str, series: &str) -> Option<f64> {
    samples(text)
        .into_iter()
        .find(|(s, _)| s == series)
        .map(|(_, v)| v)
}

/// The sum over every label set of metric `name`; `None` if it has no series.
pub fn sum(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = samples(text)
        .into_iter()
        .filter(|(s, _)| metric_name(s) == name)
        .map(|(_, v)| v)
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Whether metric `name` has at least one series (or a `# TYPE` line).
pub fn has_metric(text: &str, name: &str) -> bool {
    sum(text, name).is_some()
        || text.lines().any(|l| {
            l.strip_prefix("# TYPE ")
                .and_then(|r| r.split_whitespace().next())
                .is_some_and(|n| n == name || format!("{n}_total") == name)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP pod_identity_agent_requests Requests.\n\
        # TYPE pod_identity_agent_requests counter\n\
        pod_identity_agent_requests_total{code=\"200\"} 3\n\
        pod_identity_agent_requests_total{code=\"403\",route=\"a b\"} 2\n\
        pod_identity_agent_verification_enabled 0\n\
        pod_identity_agent_verification_enabled_extra 5\n\
        # EOF\n";

    #[test]
    fn sums_and_values() {
        assert_eq!(sum(TEXT, "pod_identity_agent_requests_total"), Some(5.0));
        assert_eq!(
            sum(TEXT, "pod_identity_agent_verification_enabled"),
            Some(0.0)
        );
        assert_eq!(
            value(TEXT, "pod_identity_agent_requests_total{code=\"200\"}"),
            Some(3.0)
        );
        assert_eq!(sum(TEXT, "pod_identity_agent_missing"), None);
        assert!(has_metric(TEXT, "pod_identity_agent_requests_total"));
    }
}
