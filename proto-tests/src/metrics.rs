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

/// The label pairs of a series as written, `name{a="b",c="d"}` ->
/// `[("a","b"),("c","d")]`, with `\"`, `\\` and `\n` unescaped.
pub fn labels(series: &str) -> Vec<(String, String)> {
    let Some(body) = series
        .split_once('{')
        .and_then(|(_, rest)| rest.strip_suffix('}'))
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        while chars.next_if(|c| *c == ',' || c.is_whitespace()).is_some() {}
        let name: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if name.is_empty() || chars.next() != Some('=') || chars.next() != Some('"') {
            return out;
        }
        let mut value = String::new();
        loop {
            match chars.next() {
                None => return out,
                Some('"') => break,
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => return out,
                },
                Some(c) => value.push(c),
            }
        }
        out.push((name.trim().to_owned(), value));
    }
}

/// The sum over the series of metric `name` that carry every label in
/// `matching` (other labels may vary); `None` if no series matches.
pub fn sum_where(text: &str, name: &str, matching: &[(&str, &str)]) -> Option<f64> {
    let values: Vec<f64> = samples(text)
        .into_iter()
        .filter(|(s, _)| metric_name(s) == name)
        .filter(|(s, _)| {
            let labels = labels(s);
            matching
                .iter()
                .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
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

    #[test]
    fn label_matching() {
        assert_eq!(
            labels(r#"m{a="x y",b="q\"uote",c="back\\slash"}"#),
            vec![
                ("a".to_owned(), "x y".to_owned()),
                ("b".to_owned(), "q\"uote".to_owned()),
                ("c".to_owned(), "back\\slash".to_owned()),
            ]
        );
        assert!(labels("m").is_empty());
        let name = "pod_identity_agent_requests_total";
        assert_eq!(sum_where(TEXT, name, &[("code", "403")]), Some(2.0));
        assert_eq!(sum_where(TEXT, name, &[]), Some(5.0));
        assert_eq!(sum_where(TEXT, name, &[("code", "500")]), None);
    }
}
