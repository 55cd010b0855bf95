#!/usr/bin/env python3
"""Prove that each abuse test guards its defence: run the test against an agent with that
defence switched off, and require it to FAIL.

A test that still passes with its defence removed proves nothing, so this script exits 1 if
any defence survives its removal. Each defence is guarded in the agent's source by
`defence::on(Defence::X)` (agent/src/defence.rs), which a debug build lets
POD_IDENTITY_AGENT_DISABLE_DEFENCE switch off. The script takes the debug binary the test
suite runs (a build here is a no-op after the suite), then runs each guarding test with
POD_IDENTITY_AGENT_DISABLE_DEFENCE naming the defence. The table below must name exactly the
defences that agent/src/defence.rs declares: a defence without a test, or a test for a
defence that no longer exists, fails the script instead of being skipped.

Run by `scripts/test` after the test suite (which has built the test binaries); by hand:
`python3 scripts/check_defences.py [name...]`.
"""

import concurrent.futures
import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFENCES_RS = ROOT / "agent/src/defence.rs"
DISABLE_ENV = "POD_IDENTITY_AGENT_DISABLE_DEFENCE"
# Guarding tests run this many at a time: most wait on timers, not on the CPU.
PARALLEL = 4

# Guarding tests that take longest (they hold a flood for a while): they start first.
SLOW = {
    "one_source_cannot_take_every_connection_slot",
    "a_flood_of_refused_requests_does_not_flood_the_log",
}

# defence name (agent/src/defence.rs) -> (test file in proto-tests/tests, test name)
TABLE = {
    "connection-limit": ("abuse", "connections_over_the_limit_get_503_and_slots_come_back"),
    "idle-timeout": ("abuse", "idle_keep_alive_connections_are_closed_after_the_idle_timeout"),
    "pipelining": ("abuse", "pipelined_requests_are_answered_in_order"),
    "host-required": ("abuse", "http10_without_host_is_400"),
    "single-authorization": ("abuse", "two_authorization_headers_are_400"),
    "head-size-limit": ("abuse", "a_megabyte_authorization_header_is_refused_and_others_are_served"),
    "non-ascii-authorization": ("abuse", "non_utf8_authorization_and_host_are_4xx"),
    "response-size-cap": ("abuse", "hostile_upstream_answers_never_reach_the_pod"),
    "eks-auth-identity-check": ("abuse", "hostile_upstream_answers_never_reach_the_pod"),
    "unknown-kid-pacing": ("security", "unknown_kid_floods_cause_at_most_one_jwks_refetch_per_interval"),
    "association-admission": ("sts", "associations_file_reloads_keep_the_last_good_set"),
    "refusal-cache": ("credentials", "a_pod_without_an_association_does_not_cost_an_upstream_call_per_request"),
    "generic-upstream-messages": ("abuse", "upstream_error_details_stay_in_the_log"),
    "refusal-log-limit": ("abuse", "a_flood_of_refused_requests_does_not_flood_the_log"),
    "secure-key-source": ("security", "keys_come_only_over_https_or_from_loopback"),
    "issuer-required": ("cli", "bad_flags_exit_64_naming_the_flag"),
    "role-in-cache-key": ("sts", "a_changed_role_takes_effect_at_the_next_request"),
    "sts-role-name-check": ("sts", "an_answer_for_another_role_is_refused"),
    "per-source-limit": ("abuse", "one_source_cannot_take_every_connection_slot"),
    "send-timeout": ("abuse", "a_client_that_never_reads_is_disconnected_after_the_send_timeout"),
    "admin-limits": ("abuse", "the_metrics_port_survives_a_connection_flood"),
    "node-binding": ("security", "tokens_bound_to_another_node_are_refused"),
    "caller-attestation": ("attestation", "a_pods_token_is_served_only_to_that_pod"),
    "pod-deletion-forgets": ("attestation", "a_deleted_pods_cached_credentials_are_dropped_at_once"),
    "edge-deadline": ("deadline", "a_slow_lookup_then_a_slow_upstream_share_one_deadline_and_the_retry_is_served"),
    "connection-reclaim": ("hardening", "a_few_sources_cannot_lock_out_another"),
    "fragment-target": ("hardening", "a_fragment_in_the_target_is_refused"),
    "servable-margin": ("hardening", "short_credentials_are_never_served_inside_the_15s_margin"),
    "closed-error-codes": ("hardening_upstream", "the_upstreams_error_type_reaches_the_pod_only_from_a_closed_set"),
    "strict-claims": ("hardening_upstream", "lenient_claims_are_refused_even_when_signed_by_the_real_key"),
    "kube-body-bound": ("hardening_kube", "an_unterminated_watch_event_is_dropped_and_memory_stays_bounded"),
    "lenient-pod-list": ("hardening_kube", "a_malformed_pod_is_skipped_and_the_others_are_served"),
    "log-line-bound": ("hardening_kube", "an_api_answer_that_is_not_json_reaches_the_log_shortened"),
    "pod-identity-match": ("hardening_kube", "a_token_pairing_a_pods_uid_with_another_identity_is_refused"),
}


# Defences that live in the manifests, checked by scripts/validate-deploy: (name, file under
# the repository, text marking the spot, text that takes the defence out). A marker that is no
# longer found fails the script, as a missing binary defence does.
MANIFEST_MUTATIONS = [
    (
        "hybrid server as root",
        "deploy/overlays/hybrid/credentials.yaml",
        "        - name: pod-identity-agent\n          env:\n",
        "        - name: pod-identity-agent\n          securityContext:\n"
        "            runAsUser: 0\n            runAsNonRoot: false\n          env:\n",
    ),
]


def check_manifest(name, rel, marker, mutated):
    """Copy the manifests, take the defence out, and require validate-deploy to refuse them."""
    with tempfile.TemporaryDirectory(prefix="check-defences-") as tmp:
        root = pathlib.Path(tmp)
        shutil.copy2(ROOT / "daemonset.yaml", root / "daemonset.yaml")
        shutil.copytree(ROOT / "deploy", root / "deploy")
        target = root / rel
        text = target.read_text()
        if text.count(marker) != 1:
            return False, f"'{name}': its marker is no longer in {rel}; update MANIFEST_MUTATIONS"
        target.write_text(text.replace(marker, mutated, 1))
        result = run(["scripts/validate-deploy", "--root", str(root)], 600)
        if result.returncode != 0 and "runs as a non-root user" in result.stdout + result.stderr:
            return True, f"'{name}': validate-deploy refuses it (good)"
        return False, f"'{name}': validate-deploy ACCEPTS it\n{result.stdout[-2000:]}"


def declared_defences():
    """The names agent/src/defence.rs declares, in order."""
    text = DEFENCES_RS.read_text()
    block = re.search(r"defences! \{(.*?)\n\}", text, re.S)
    if not block:
        sys.exit("check_defences: no `defences! { ... }` block in agent/src/defence.rs")
    return re.findall(r'=>\s*"([a-z0-9-]+)"', block.group(1))


def run(cmd, timeout, env=None):
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def agent_binary():
    """The agent's debug build (the test suite's binary, whose defences can be switched off),
    copied aside so that a build started meanwhile cannot swap it under the running tests."""
    build = run(
        ["cargo", "build", "-q", "-p", "pod-identity-agent", "--message-format", "json"], 900
    )
    if build.returncode != 0:
        sys.exit(f"check_defences: building the agent failed:\n{build.stderr[-3000:]}")
    executable = None
    for line in build.stdout.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") and \
                msg["target"]["name"] == "pod-identity-agent":
            executable = pathlib.Path(msg["executable"])
    if executable is None:
        sys.exit("check_defences: cargo did not report the agent binary")
    copy = executable.parent / "defence-switches" / executable.name
    copy.parent.mkdir(exist_ok=True)
    shutil.copy2(executable, copy)
    return copy


def test_binaries():
    """Test target name -> executable, for proto-tests (built already by the test suite; a
    build here is only for a run by hand). The binaries run directly, not through cargo,
    so that several can run at once without waiting for cargo's build-directory lock."""
    build = run(
        ["cargo", "test", "-q", "-p", "proto-tests", "--no-run", "--message-format", "json"],
        900,
    )
    if build.returncode != 0:
        sys.exit(f"check_defences: building the tests failed:\n{build.stderr[-3000:]}")
    found = {}
    for line in build.stdout.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") and \
                msg["target"]["kind"] == ["test"]:
            found[msg["target"]["name"]] = msg["executable"]
    return found


def run_test(binary, tests, test, case, disabled=None):
    env = dict(os.environ, POD_IDENTITY_AGENT_BIN=str(binary))
    env.pop(DISABLE_ENV, None)
    if disabled:
        env[DISABLE_ENV] = disabled
    return subprocess.run(
        [tests[test], "--exact", case, "--test-threads", "1"],
        cwd=ROOT / "proto-tests", capture_output=True, text=True, timeout=900, env=env,
    )


def failure(result):
    """What a failed test said: its panic message first (the agent's log, which the harness
    prints too, can be long), then the ends of its output."""
    lines = (result.stdout + "\n" + result.stderr).splitlines()
    panics = [i for i, line in enumerate(lines) if "panicked at" in line]
    said = "\n".join("\n".join(lines[i:i + 6]) for i in panics[:2])
    return f"{said}\n{result.stdout[-2000:]}{result.stderr[-1500:]}"


def control(binary, tests, test, case):
    if test not in tests:
        return False, f"no test file {test}.rs in proto-tests/tests"
    result = run_test(binary, tests, test, case)
    if result.returncode == 0 and "1 passed" in result.stdout:
        return True, ""
    return False, f"{test}::{case}\n{failure(result)}"


def check(binary, tests, name):
    test, case = TABLE[name]
    if test not in tests:
        return False, f"'{name}': no test file {test}.rs in proto-tests/tests"
    started = time.monotonic()
    result = run_test(binary, tests, test, case, disabled=name)
    took = time.monotonic() - started
    ran = "1 failed" in result.stdout or "1 passed" in result.stdout
    if result.returncode != 0 and ran:
        return True, f"'{name}': {test}::{case} fails without it (good, {took:.0f}s)"
    why = "PASSES without it" if ran else "did not run"
    return False, f"'{name}': {test}::{case} {why}\n{failure(result)}"


def main():
    started = time.monotonic()
    declared = declared_defences()
    missing = [d for d in declared if d not in TABLE]
    unknown = [d for d in TABLE if d not in declared]
    if missing or unknown:
        print(f"check_defences: the table and agent/src/defence.rs disagree: "
              f"no test for {missing}; no such defence {unknown}")
        return 1
    only = sys.argv[1:]
    for name in only:
        if name not in TABLE:
            print(f"check_defences: no defence is called {name!r}; known: {', '.join(declared)}")
            return 64
    names = only or declared
    binary = agent_binary()
    tests = test_binaries()
    # One pool for the controls (every guarding test once with nothing off: all must pass,
    # so a failure below is the missing defence's doing and not the build's) and the checks
    # (each test with its defence off: each must fail). The long tests go first.
    cases = sorted({TABLE[n] for n in names})
    jobs = [("control", tc) for tc in cases] + [("check", n) for n in names]

    def is_slow(job):
        kind, what = job
        case = what[1] if kind == "control" else TABLE[what][1]
        return case in SLOW

    jobs.sort(key=lambda job: not is_slow(job))

    def run_job(job):
        kind, what = job
        if kind == "control":
            return job, control(binary, tests, *what)
        return job, check(binary, tests, what)

    survived = []
    broken = []
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        for (kind, what), (ok, line) in pool.map(run_job, jobs):
            if kind == "control":
                if not ok:
                    broken.append(line)
                continue
            print(f"check_defences: {line}")
            if not ok:
                survived.append(what)
    if not only:
        for mutation in MANIFEST_MUTATIONS:
            ok, line = check_manifest(*mutation)
            print(f"check_defences: {line}")
            if not ok:
                survived.append(mutation[0])
    if broken:
        print("check_defences: the guarding tests fail with every defence on:")
        print("\n".join(broken))
        return 1
    print(f"check_defences: {len(names)} defences checked in {time.monotonic() - started:.0f}s")
    if survived:
        print("check_defences: FAILED: " + "; ".join(survived))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
