//! Checks shared by the test files, each failing with the whole response so a
//! failure explains itself.

use std::ops::RangeInclusive;
use std::time::Duration;

use crate::clients::{Sdk, SdkCredentials};
use crate::fakes::eks_auth::IssuedCredentials;
use crate::fakes::CredentialIssuer;
use crate::http::RawResponse;
use crate::Agent;

/// The contract's deadline for a fresh request whose upstream call fails.
pub const UPSTREAM_FAILURE_DEADLINE: Duration = Duration::from_secs(5);

/// A fresh request whose upstream failed (`what`) got an error status in `allowed`, with the
/// JSON error body, within [`UPSTREAM_FAILURE_DEADLINE`] (`took`).
pub fn assert_failed_in_time(
    response: &RawResponse,
    allowed: RangeInclusive<u16>,
    took: Duration,
    what: &str,
) {
    assert!(
        allowed.contains(&response.status),
        "{what}: expected {allowed:?}: {response:?}"
    );
    assert_error_body(response);
    assert!(
        took < UPSTREAM_FAILURE_DEADLINE,
        "{what}: answered after {took:?}, contract deadline {UPSTREAM_FAILURE_DEADLINE:?}"
    );
}

/// A 200 carrying exactly `issued`, in the contract's shape:
/// `{"AccessKeyId","SecretAccessKey","Token","AccountId","Expiration"}` with
/// `Expiration` in RFC 3339 UTC (`Z`), `Content-Type: application/json` and
/// `Cache-Control: no-store`. `AccountId` is the account of the assumed-role
/// ARN the upstream returned.
pub fn assert_credentials(response: &RawResponse, issued: &IssuedCredentials) {
    assert_eq!(response.status, 200, "expected credentials: {response:?}");
    let content_type = response.header("content-type").unwrap_or_default();
    assert!(
        content_type
            .to_ascii_lowercase()
            .starts_with("application/json"),
        "Content-Type must be application/json: {response:?}"
    );
    let cache_control = response.header("cache-control").unwrap_or_default();
    assert!(
        cache_control.to_ascii_lowercase().contains("no-store"),
        "Cache-Control must be no-store: {response:?}"
    );
    let body = response.json();
    let field = |name: &str| -> &str {
        body.get(name)
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("{name} missing or not a string: {response:?}"))
    };
    assert_eq!(field("AccessKeyId"), issued.access_key_id, "{response:?}");
    assert_eq!(field("SecretAccessKey"), issued.secret_access_key);
    assert_eq!(field("Token"), issued.session_token);
    let account = issued.role_arn.split(':').nth(4).unwrap_or_default();
    assert_eq!(field("AccountId"), account, "{response:?}");
    let expiration = field("Expiration");
    let parsed = parse_rfc3339_utc(expiration).unwrap_or_else(|| {
        panic!("Expiration {expiration:?} is not RFC 3339 UTC ending in Z: {response:?}")
    });
    assert_eq!(
        parsed, issued.expiration as i64,
        "Expiration {expiration} differs from the upstream expiration {}",
        issued.expiration
    );
}

/// The only credentials the fake issued so far (there must be exactly one).
/// An SDK resolved exactly `issued`, which are `pod_uid`'s credentials; `account` is checked
/// where the SDK keeps it (the JS `fromHttp` provider drops `AccountId`).
pub fn assert_sdk_got(
    got: &SdkCredentials,
    sdk: Sdk,
    issued: &IssuedCredentials,
    pod_uid: &str,
    account: &str,
) {
    assert_eq!(got.access_key, issued.access_key_id, "{sdk:?}");
    assert_eq!(got.secret_key, issued.secret_access_key, "{sdk:?}");
    assert_eq!(
        got.token.as_deref(),
        Some(issued.session_token.as_str()),
        "{sdk:?}"
    );
    assert_eq!(issued.pod_uid, pod_uid, "{sdk:?}");
    if sdk != Sdk::JavaScript {
        assert_eq!(got.account_id.as_deref(), Some(account), "{sdk:?}");
    }
}

/// An AWS SDK client of the fake `upstream` parsed its one issuance: `parsed` is the access key
/// id, secret key and session token it read, `expiration` the epoch seconds.
pub fn assert_parsed_the_only_issuance(
    upstream: &impl CredentialIssuer,
    parsed: [&str; 3],
    expiration: i64,
) {
    let issued = only_issued(upstream);
    let expected = [
        issued.access_key_id.as_str(),
        &issued.secret_access_key,
        &issued.session_token,
    ];
    assert_eq!(parsed, expected);
    assert_eq!(expiration, issued.expiration as i64);
}

/// A 429 with a `Retry-After` an SDK can read (delay-seconds or an HTTP date) and the JSON
/// error body.
pub fn assert_throttled_with_retry_after(response: &RawResponse) {
    assert_eq!(response.status, 429, "{response:?}");
    let retry_after = response
        .header("retry-after")
        .unwrap_or_else(|| panic!("429 without Retry-After: {response:?}"));
    assert!(
        retry_after.trim().parse::<u64>().is_ok() || retry_after.ends_with("GMT"),
        "Retry-After must be delay-seconds or an HTTP date: {retry_after:?}"
    );
    assert_error_body(response);
}

/// Another request with `token` gets `issued` again, from the agent's cache: no upstream call.
pub async fn assert_answered_from_cache(
    agent: &Agent,
    token: &str,
    upstream: &impl CredentialIssuer,
    issued: &IssuedCredentials,
) {
    let calls = upstream.calls_received();
    assert_credentials(&agent.fetch_credentials(token).await, issued);
    assert_eq!(
        upstream.calls_received(),
        calls,
        "served from the cache, not upstream"
    );
}

/// How often [`wait_until`] looks again: short next to any wait it bounds.
const WAIT_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Wait until `done` holds, looking every [`WAIT_POLL_INTERVAL`]; panics naming `what` if it
/// does not within `timeout`. For a condition nothing signals (a log line, a file, a fake's
/// counter): a test waits for what it needs, bounded, instead of sleeping and hoping. (An
/// [`Agent`] dropped while panicking prints its logs.)
pub async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(WAIT_POLL_INTERVAL).await;
    }
}

pub fn only_issued(upstream: &impl CredentialIssuer) -> IssuedCredentials {
    let issued = upstream.issued_credentials();
    assert_eq!(
        issued.len(),
        1,
        "expected exactly one issuance, got {issued:#?}"
    );
    issued.into_iter().next().expect("one issuance")
}

/// An error in the contract's shape, `{"code": "...", "message": "..."}`;
/// returns the code.
pub fn assert_error_body(response: &RawResponse) -> String {
    let body: serde_json::Value = serde_json::from_slice(&response.body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {response:?}"));
    let code = body
        .get("code")
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("error body has no string \"code\": {response:?}"));
    assert!(
        body.get("message").is_some_and(|v| v.is_string()),
        "error body has no string \"message\": {response:?}"
    );
    code.to_owned()
}

/// A token rejection: 400, 401 or 403 (never 429, which would make SDKs
/// retry a token that can never succeed), with a JSON error body.
pub fn assert_token_rejected(response: &RawResponse, what: &str) {
    assert!(
        matches!(response.status, 400 | 401 | 403),
        "{what}: expected 400/401/403, got {response:?}"
    );
    assert_error_body(response);
}

/// Seconds since the epoch for `YYYY-MM-DDTHH:MM:SS[.fraction]Z`; `None` for
/// anything else (offsets included: the Rust and JS SDKs reject them).
pub fn parse_rfc3339_utc(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || *b.last()? != b'Z' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    let rest = s.get(19..s.len() - 1)?;
    let fraction_ok = match rest.strip_prefix('.') {
        None => rest.is_empty(),
        Some(digits) => !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit()),
    };
    if !fraction_ok {
        return None;
    }
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the epoch.
pub fn format_rfc3339_utc(epoch: i64) -> String {
    let days = epoch.div_euclid(86_400);
    let secs = epoch.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

// Howard Hinnant's days-from-civil algorithms (proleptic Gregorian calendar).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        assert_eq!(parse_rfc3339_utc("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_utc("2026-05-01T18:00:00Z"),
            Some(1_777_658_400)
        );
        assert_eq!(
            parse_rfc3339_utc("2026-05-01T18:00:00.000Z"),
            Some(1_777_658_400)
        );
        assert_eq!(parse_rfc3339_utc("2026-05-01T18:00:00+00:00"), None);
        assert_eq!(parse_rfc3339_utc("2026-05-01 18:00:00Z"), None);
        assert_eq!(format_rfc3339_utc(1_777_658_400), "2026-05-01T18:00:00Z");
        for t in [0, 951_782_400, 1_709_164_800, 4_102_444_799] {
            assert_eq!(parse_rfc3339_utc(&format_rfc3339_utc(t)), Some(t));
        }
    }
}
