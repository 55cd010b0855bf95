#!/usr/bin/env python3
"""Prove that each abuse test guards its defence: take the defence out of the agent's source,
rebuild, run the test, and expect it to FAIL; then put the source back.

A test that still passes with its defence removed proves nothing, so this script exits 1 if
any mutation survives. It edits files in place and restores them in a `finally`, and checks
that every mutation still applies (the source moved on: update the table). Run by
`scripts/test` after the test suite; by hand: `python3 scripts/check_defences.py [name...]`.
"""

import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
HTTP = "agent/src/http.rs"
KEYS = "agent/src/keys.rs"
UPSTREAM = "agent/src/upstream/mod.rs"
EKS_AUTH = "agent/src/upstream/eks_auth.rs"
CACHE = "agent/src/cache.rs"

# (defence, file, source with the defence, source without it, test file, test name filter)
MUTATIONS = [
    (
        "connection limit",
        HTTP,
        "let slots = limits.max_connections.map(|n| Arc::new(Semaphore::new(n)));",
        "let slots: Option<Arc<Semaphore>> = None;",
        "abuse",
        "connections_over_the_limit_get_503_and_slots_come_back",
    ),
    (
        "idle keep-alive timeout",
        HTTP,
        ".header_read_timeout(limits.idle_timeout)",
        ".header_read_timeout(Duration::from_secs(3600))",
        "abuse",
        "idle_keep_alive_connections_are_closed_after_the_idle_timeout",
    ),
    (
        "pipelined requests answered on one connection",
        HTTP,
        ".keep_alive(true);",
        ".keep_alive(false);",
        "abuse",
        "pipelined_requests_are_answered_in_order",
    ),
    (
        "a Host header is required (HTTP/1.0 too)",
        HTTP,
        """        (None, _) if req.version() == Version::HTTP_10 => {
            return Err(ApiError::BadRequest(
                "MissingHost",
                "HTTP/1.0 requests must carry a Host header".into(),
            ))
        }
        (None, _) => {
            return Err(ApiError::BadRequest(
                "MissingHost",
                "the request has no Host header".into(),
            ))
        }""",
        """        (None, _) => "127.0.0.1",""",
        "abuse",
        "http10_without_host_is_400",
    ),
    (
        "two Authorization headers refused",
        HTTP,
        """        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "DuplicateAuthorization",""",
        """        (Some(v), Some(_)) => v.to_str().unwrap_or_default(),
        #[allow(unreachable_patterns)]
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "DuplicateAuthorization",""",
        "abuse",
        "two_authorization_headers_are_400",
    ),
    (
        "16 KiB request head limit",
        HTTP,
        ".max_buf_size(MAX_HEADER_BYTES)",
        "",
        "abuse",
        "a_megabyte_authorization_header_is_refused_and_others_are_served",
    ),
    (
        "non-ASCII Authorization is an error, not a panic",
        HTTP,
        """            .to_str()
            .map_err(|_| TokenError::Malformed("token has non-ASCII bytes".into()))?,""",
        """            .to_str()
            .expect("ASCII"),""",
        "abuse",
        "non_utf8_authorization_and_host_are_4xx",
    ),
    (
        "upstream response size cap",
        UPSTREAM,
        "*body = SdkBody::from_body_1_x(http_body_util::Limited::new(inner, MAX_RESPONSE_BYTES));",
        "*body = inner;",
        "abuse",
        "hostile_upstream_answers_never_reach_the_pod",
    ),
    (
        "EKS Auth answer must name the token's service account",
        EKS_AUTH,
        "            return Err(invalid(\"names a different service account than the token\"));",
        "",
        "abuse",
        "hostile_upstream_answers_never_reach_the_pod",
    ),
    (
        "unknown-kid JWKS refetch pacing",
        KEYS,
        "pub const UNKNOWN_KID_REFRESH_INTERVAL: Duration = Duration::from_secs(10);",
        "pub const UNKNOWN_KID_REFRESH_INTERVAL: Duration = Duration::from_secs(0);",
        "security",
        "unknown_kid_floods_cause_at_most_one_jwks_refetch_per_interval",
    ),
    (
        "a removed association stops cached credentials",
        CACHE,
        "        self.backend.admit(identity)?;\n",
        "",
        "sts",
        "associations_file_reloads_keep_the_last_good_set",
    ),
    (
        "association refusals answered from the cache",
        CACHE,
        "                        state.refused = Some((e.clone(), now + REFUSAL_TTL));",
        "",
        "credentials",
        "a_pod_without_an_association_does_not_cost_an_upstream_call_per_request",
    ),
]


def run(cmd, timeout):
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def main():
    only = set(sys.argv[1:])
    survived = []
    checked = 0
    started = time.monotonic()
    for name, rel, defended, undefended, test, case in MUTATIONS:
        if only and name not in only:
            continue
        checked += 1
        path = ROOT / rel
        original = path.read_text()
        if original.count(defended) != 1:
            print(f"check_defences: '{name}': the defence is no longer found in {rel}; update the table")
            survived.append(name)
            continue
        try:
            path.write_text(original.replace(defended, undefended, 1))
            build = run(["cargo", "build", "-q", "-p", "pod-identity-agent"], 900)
            if build.returncode != 0:
                print(f"check_defences: '{name}': the mutated agent does not build:\n{build.stderr[-3000:]}")
                survived.append(name)
                continue
            result = run(
                ["cargo", "test", "-q", "-p", "proto-tests", "--test", test, "--", "--exact", case],
                900,
            )
            ran = "1 failed" in result.stdout or "1 passed" in result.stdout
            if result.returncode != 0 and ran:
                print(f"check_defences: '{name}': {test}::{case} fails without it (good)")
            else:
                print(f"check_defences: '{name}': {test}::{case} PASSES without it{'' if ran else ' (or did not run)'}")
                survived.append(name)
        finally:
            path.write_text(original)
    # Leave the agent binary built from the real source for whatever runs next.
    rebuilt = run(["cargo", "build", "-q", "-p", "pod-identity-agent"], 900)
    if rebuilt.returncode != 0:
        print(rebuilt.stderr[-3000:])
        return 1
    print(f"check_defences: {checked} defences checked in {time.monotonic() - started:.0f}s")
    if survived:
        print("check_defences: FAILED: " + "; ".join(survived))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
