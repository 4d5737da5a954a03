"""Baselines: the key figures of one run, kept to compare a later run with.

`scripts/bench --save-baseline FILE` writes them (a small JSON: commit, date, machine and
the figures below); `scripts/bench --baseline FILE` (default `benchmarks/baseline.json`
when it exists) adds a "Before and after" section to the report. The figures:

- pairs/s and echo/s at saturation, their ratio, and the same ratio by CPU time;
- Redis round trips and commands per successful pair and per failed guess;
- bytes of Redis memory per live code;
- the profile summary: self time by library, inclusive time by phase (as the report's
  "Why" section names them);
- a few more ratios taken within the run (p99/p50 at 50% load, 2 vs 1 and 3 vs 1
  instances), when the run measured them;
- the service's CPU per successful pair, failed guess and heartbeat, Redis's CPU per
  pair and its commands per operation under load; events delivered per pair in the
  spread and the many-phones mixes and the many-phones / spread ratio; the presence
  storm's duration, CPU, commands per status and pair latency (`mix_figures`).

Ratios taken within one run, counts and bytes compare across runs; absolute rates and CPU
milliseconds depend on the machine and on whatever else ran at the time.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.stack import CODE_TTL_S, REPO_ROOT, TOMBSTONE_S

DEFAULT_BASELINE = REPO_ROOT / "benchmarks" / "baseline.json"
FORMAT = 1

# The service's functions whose inclusive share of the profile the report calls "phases"
# (what a pair spends its time on), with how the report names them. A phase is keyed by its
# first name; PHASE_ALIASES are the names the same work has in later code (the store's
# split: its round trips run in Transport._exchange, in a task of their own since
# auto-pipelining, no longer below PairingStore._guard).
PHASES = (
    ("PairingStore._guard", "Redis round trips (packing, awaiting, parsing)"),
    ("Dispatcher.handle", "the request up to the reply's content"),
    ("OutboxRelay.deliver", "outbox delivery after the reply"),
    ("PairingGateway.publish_events", "of which publishing the 3 events"),
    ("PairingStore.ack_outbox", "acknowledging the outbox"),
    ("OutboxRelay._record", "session.opened history"),
    ("PairingGateway._reply", "publishing the reply"),
)


PHASE_ALIASES = {
    "PairingStore._guard": ("Transport._exchange",),
    "PairingStore.ack_outbox": ("OutboxStore.ack_outbox",),
}


def phase_share(inclusive: dict[str, float], name: str) -> float | None:
    """The inclusive share of a phase: its function, or what it is called in later code."""
    for candidate in (name, *PHASE_ALIASES.get(name, ())):
        if inclusive.get(candidate) is not None:
            return inclusive[candidate]
    return None


def typical_round_trips(d: dict[str, Any], phase: str) -> int:
    """Round trips that every request makes in a phase (those made by at least half)."""
    made = [float(x["per_request"]) for x in d["round_trips"] if x["phase"] == phase]
    return round(sum(k for k in made if k >= 0.5))


def cpu_ratio(results: dict[str, Any]) -> float | None:
    """Echo CPU per request / pair CPU per pair, over all saturation runs."""
    pair = [
        x.get("cpu_ms_per_request", {}).get("server")
        for x in results.get("saturation", {}).get("runs", [])
    ]
    echo = [
        x.get("cpu_ms_per_request", {}).get("server")
        for x in results.get("echo", {}).get("runs", [])
    ]
    pair = [x for x in pair if x]
    echo = [x for x in echo if x]
    if not pair or not echo:
        return None
    return float((sum(echo) / len(echo)) / (sum(pair) / len(pair)))


def mean_server_cpu(runs: list[dict[str, Any]]) -> float | None:
    values = [x.get("cpu_ms_per_request", {}).get("server") for x in runs]
    values = [x for x in values if x]
    return float(sum(values) / len(values)) if values else None


def git_info() -> dict[str, Any]:
    """The commit checked out (`git rev-parse --short HEAD`), and whether the product code
    (`mqtt_pairing/`, `pyproject.toml`) has uncommitted changes: then the numbers are
    those of the working tree, not of the commit."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )

    try:
        head = git("rev-parse", "--short", "HEAD")
        status = git(
            "status", "--porcelain", "--untracked-files=no", "--", "mqtt_pairing", "pyproject.toml"
        )
    except OSError:
        return {"commit": "unknown", "uncommitted_product_changes": None}
    if head.returncode != 0:
        return {"commit": "unknown", "uncommitted_product_changes": None}
    return {
        "commit": head.stdout.strip(),
        "uncommitted_product_changes": bool(status.stdout.strip())
        if status.returncode == 0
        else None,
    }


def _round_trip_figures(d: dict[str, Any] | None) -> dict[str, Any] | None:
    if not d:
        return None
    request, after = typical_round_trips(d, "request"), typical_round_trips(d, "after")
    return {
        "round_trips": d["round_trips_per_request"],
        "request_path": d["request_path_per_request"],
        "after_reply": d["after_reply_per_request"],
        "typical_request_path": request,
        "typical_after_reply": after,
        "commands": sum(d["commands_per_request"].values()),
        "top_level_commands": d["top_level_commands_per_request"],
    }


def _profile_figures(p: dict[str, Any] | None) -> dict[str, Any]:
    if not p:
        return {"skipped": "not recorded"}
    if "skipped" in p:
        return {"skipped": p["skipped"]}
    if "areas" not in p:
        return {"skipped": "no busy samples"}
    inclusive = {x["name"].split(" (")[0]: x["share"] for x in p.get("service_inclusive", [])}
    return {
        "busy_share": p.get("busy_share"),
        "throughput_while_profiling": p.get("throughput_while_profiling"),
        "by_library": {x["name"]: x["share"] for x in p["areas"]},
        "by_phase": {name: phase_share(inclusive, name) for name, _ in PHASES},
    }


def key_figures(results: dict[str, Any]) -> dict[str, Any]:
    """The figures a baseline keeps, from the raw results of a run (None: not measured)."""
    pair = results.get("saturation", {}).get("best", {}).get("throughput")
    echo = results.get("echo", {}).get("best", {}).get("throughput")
    rt = results.get("round_trips", {})
    mem = results.get("memory")
    memory = None
    if mem:
        memory = {
            "code_hash_bytes": mem["code_hash_bytes"],
            # measured since tombstones are records; computed for older raw results
            "per_live_code_with_tombstones": mem.get("per_live_code")
            or mem["code_hash_bytes"] * (CODE_TTL_S + TOMBSTONE_S) / CODE_TTL_S,
            "code_request_bytes": mem.get("code_request_bytes"),
        }
    half = next((p for p in results.get("latency", []) if abs(p["load_share"] - 0.5) < 1e-9), None)
    p99_over_p50 = None
    if half and half.get("reply_ms") and half["reply_ms"].get("p50"):
        p99_over_p50 = half["reply_ms"]["p99"] / half["reply_ms"]["p50"]
    shared = results.get("shared") or {}
    cluster = results.get("cluster") or {}
    return {
        "pair_per_s": pair,
        "echo_per_s": echo,
        "pair_over_echo": pair / echo if pair is not None and echo else None,
        "pair_over_echo_by_cpu": cpu_ratio(results),
        "service_cpu_ms_per_pair": mean_server_cpu(results.get("saturation", {}).get("runs", [])),
        "echo_cpu_ms_per_request": mean_server_cpu(results.get("echo", {}).get("runs", [])),
        "success": _round_trip_figures(rt.get("success")),
        "failed_guess": _round_trip_figures(rt.get("failed_guess")),
        "memory": memory,
        "p99_over_p50_at_half_load": p99_over_p50,
        "two_over_one_instance": shared.get("ratio"),
        "cluster_three_over_one_instance": cluster.get("ratio"),
        "profile": _profile_figures(results.get("profile")),
        **mix_figures(results),
    }


def _mean_cpu(runs: list[dict[str, Any]], who: str) -> float | None:
    values = [x.get("cpu_ms_per_request", {}).get(who) for x in runs]
    values = [x for x in values if x]
    return float(sum(values) / len(values)) if values else None


def spread_at(results: dict[str, Any], concurrency: int | None) -> dict[str, Any] | None:
    """The spread-mix run the many-phones run compares with: the one run right before it
    (`mixes.spread`), else the saturation run at `concurrency`, else the best one."""
    spread = (results.get("mixes") or {}).get("spread")
    if spread:
        return dict(spread)
    sat = results.get("saturation", {})
    for run in sat.get("runs", []):
        if run.get("concurrency") == concurrency:
            return dict(run)
    return sat.get("best")


def mix_figures(results: dict[str, Any]) -> dict[str, Any]:
    """The figures of issue 15's targets (None: not measured by that run)."""
    runs = results.get("saturation", {}).get("runs", [])
    best = results.get("saturation", {}).get("best") or {}
    mixes = results.get("mixes") or {}
    mp = mixes.get("many_phones") or {}
    fg = mixes.get("failed_guess") or {}
    hb = mixes.get("heartbeat") or {}
    spread = spread_at(results, mp.get("concurrency")) or {}
    storm = results.get("presence_storm") or {}
    pairs = storm.get("pairs") or {}
    cmds = [
        x.get("redis_commands_per_request") for x in runs if x.get("redis_commands_per_request")
    ]
    return {
        "service_cpu_ms_per_failed_guess": fg.get("cpu_ms_per_request", {}).get("server"),
        "service_cpu_ms_per_heartbeat": hb.get("cpu_ms_per_request", {}).get("server"),
        "redis_cpu_ms_per_pair": _mean_cpu(runs, "redis"),
        "redis_commands_per_pair_under_load": sum(cmds) / len(cmds) if cmds else None,
        "redis_commands_per_failed_guess_under_load": fg.get("redis_commands_per_request"),
        "redis_commands_per_heartbeat": hb.get("redis_commands_per_request"),
        "failed_guesses_per_s": fg.get("answered_per_s"),
        "heartbeats_per_s": hb.get("per_s"),
        "events_per_pair_spread": spread.get("events_per_pair", best.get("events_per_pair")),
        "events_per_pair_many_phones": mp.get("events_per_pair"),
        "many_phones_per_s": mp.get("throughput"),
        "many_phones_over_spread": mp["throughput"] / spread["throughput"]
        if mp.get("throughput") is not None and spread.get("throughput")
        else None,
        "storm": {
            "runners": storm.get("runners"),
            "wills": storm.get("wills"),
            "completed": storm.get("completed"),
            "duration_s": storm.get("duration_s"),
            "service_cpu_s": storm.get("service_cpu_s"),
            # less the pairs sent meanwhile, at the spread mix's service CPU per pair
            "service_cpu_us_per_status": (
                storm["service_cpu_s"]
                - (mean_server_cpu(runs) or 0.0) / 1000 * storm.get("pairs_during_storm", 0)
            )
            * 1e6
            / storm["runners"]
            if storm.get("service_cpu_s") is not None and storm.get("runners")
            else None,
            "redis_commands_per_status": storm.get("redis_commands_per_status"),
            "pair_p50_ms": (pairs.get("reply_ms") or {}).get("p50"),
            "pair_p99_ms": (pairs.get("reply_ms") or {}).get("p99"),
            "pair_errors": sum((pairs.get("errors") or {}).values()) + pairs.get("lost_replies", 0)
            if pairs
            else None,
        }
        if storm
        else None,
    }


def make(results: dict[str, Any]) -> dict[str, Any]:
    """A baseline from the raw results of a run."""
    m = results.get("machine", {})
    git = results.get("git")
    recorded = git is not None  # older raw results: the commit checked out now, flagged
    git = git or git_info()
    return {
        "format": FORMAT,
        "commit": git.get("commit", "unknown"),
        "commit_recorded_by_run": recorded,
        "uncommitted_product_changes": git.get("uncommitted_product_changes"),
        "date": results.get("started_at") or dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": results.get("command", "scripts/bench"),
        "plan": results.get("plan", {}).get("name"),
        "machine": {
            k: m.get(k)
            for k in (
                "cpu",
                "cores",
                "kernel",
                "python",
                "redis",
                "mosquitto",
                "load_average_at_start",
                "load_average_at_end",
            )
        },
        "figures": key_figures(results),
    }


def save(path: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Write the baseline of `results` to `path`; returns it."""
    data = make(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return data


def load(path: Path) -> dict[str, Any]:
    """Read a baseline written by `save`.

    Raises:
        SystemExit: the file is missing, not JSON, or not a baseline of this format.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"bench: cannot read the baseline {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "figures" not in data:
        raise SystemExit(
            f"bench: {path} is not a baseline of format {FORMAT} "
            "(write one with scripts/bench --save-baseline FILE)"
        )
    return data
