"""The Markdown report, rendered from the raw results of one run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.baseline import (
    PHASES,
    cpu_ratio,
    key_figures,
    mean_server_cpu,
    mix_figures,
    phase_share,
    spread_at,
    typical_round_trips,
)
from benchmarks.loadgen import DRAIN_TIMEOUT_S
from benchmarks.stack import BENCH_ENV, CODE_TTL_S, TOMBSTONE_S

X = "\u00d7"
NA = "\u2013"

TARGET_ECHO_RATIO = 0.60
TARGET_RT_OK = 3
TARGET_RT_FAIL = 2
TARGET_BYTES_PER_CODE = 300
TARGET_P99_OVER_P50 = 3.0
TARGET_BIG_OVER_SMALL = 1.2
# Issue 15.
TARGET_CPU_PAIR_MS = 0.8
TARGET_CPU_GUESS_MS = 0.5
TARGET_CPU_HEARTBEAT_MS = 0.15
TARGET_CMDS_PAIR = 30
TARGET_CMDS_GUESS = 12
TARGET_REDIS_CPU_PAIR_MS = 0.25
TARGET_MANY_PHONES = 0.80
TARGET_EVENTS = 3


def _f(x: float | None, digits: int = 1) -> str:
    if x is None:
        return NA
    return f"{x:,.{digits}f}"


def _ms(d: dict[str, float], key: str) -> str:
    return _f(d.get(key)) if d else NA


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


_typical = typical_round_trips


def _occasional(d: dict[str, Any]) -> str:
    rare = [x for x in d["round_trips"] if x["per_request"] < 0.5]
    if not rare:
        return ""
    return "; now and then also " + ", ".join(
        f"`{x['what']}` ({x['per_request']:.1%} of requests)" for x in rare
    )


def _errors(run: dict[str, Any]) -> str:
    text = str(sum(run["errors"].values()) + run["lost_replies"])
    if run.get("late_replies"):
        text += f" ({run['late_replies']} late)"
    return text


def _pct(x: float | None) -> str:
    return NA if x is None else f"{x:.0%}"


def _load_label(share: float) -> str:
    return f"{share:.0%}"


def _big_label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k"


class _Report:
    def __init__(
        self,
        r: dict[str, Any],
        json_path: Path,
        before: dict[str, Any] | None = None,
        before_path: Path | None = None,
        self_compare: bool = False,
    ) -> None:
        self.r = r
        self.json_path = json_path
        self.before = before
        self.before_path = before_path
        self.self_compare = self_compare
        self.parts: list[str] = []

    def add(self, *texts: str) -> None:
        self.parts.extend(texts)

    # ---- numbers used in several places -------------------------------------------------

    @property
    def pair_rate(self) -> float:
        return float(self.r["saturation"]["best"]["throughput"])

    @property
    def echo_rate(self) -> float:
        return float(self.r["echo"]["best"]["throughput"])

    def latency_at(self, share: float) -> dict[str, Any] | None:
        for p in self.r.get("latency", []):
            if abs(p["load_share"] - share) < 1e-9:
                return p
        return None

    # ---- sections -----------------------------------------------------------------------

    def header(self) -> None:
        r = self.r
        m = r["machine"]
        load = m["load_average_at_start"]
        pk = m["packages"]
        self.add(
            "# Benchmarks",
            "",
            "Written by `scripts/bench` (`python -m benchmarks.run`) from one run; the raw "
            f"numbers are in `{self.json_path}` (not committed: `benchmarks/results/` is "
            "ignored). Every figure below comes from that single run, so ratios compare "
            "measurements taken minutes apart on the same machine.",
            "",
            "## How to rerun",
            "",
            "```",
            "scripts/bench            # full run, writes docs/benchmarks.md (~10 min)",
            "scripts/bench --quick    # shorter runs, 100k live codes, 20k-runner storm (~3 min)",
            "scripts/bench --smoke    # a second of load per step, 1k-runner storm; what .ci/run"
            " calls (~1 min)",
            "scripts/bench --out FILE # write the report elsewhere",
            "scripts/bench --save-baseline FILE  # also keep this run's key figures (JSON)",
            "scripts/bench --baseline FILE       # add 'Before and after' against a baseline",
            "scripts/bench --no-baseline         # no 'Before and after' section",
            "scripts/bench --render JSON         # only re-render the report of earlier "
            "raw results",
            "```",
            "",
            "**Before and after.** `--save-baseline FILE` writes a small JSON with the "
            "commit (`git rev-parse --short HEAD`, and whether `mqtt_pairing/` had "
            "uncommitted changes), the date, the machine and the key figures of the run: "
            "pairs/s and echo/s at saturation and their ratio (also by CPU time), Redis "
            "round trips and commands per successful pair and per failed guess, bytes per "
            "live code, the service's CPU per pair, failed guess and heartbeat, Redis CPU "
            "per pair, events per pair and the many-phones ratio, the presence storm's "
            "figures, and the profile summary by library and by phase. `--baseline FILE` "
            'adds a "Before and after" section comparing this run with it; without '
            "`--baseline`, `benchmarks/baseline.json` is used when it exists. To record a "
            "baseline of an older commit, run this suite against that commit's "
            "`mqtt_pairing/` with `--save-baseline`, or re-render its raw results: "
            "`scripts/bench --render JSON --save-baseline FILE` (both options work with "
            "`--render`). Compare ratios, counts and bytes across runs, not absolute "
            "rates: the machine is shared, and what else runs on it moves pairs/s and "
            "echo/s alike.",
            "",
            "It needs the venv with the test and bench extras (`.venv/bin/pip install -e "
            "'.[test,bench]'`: the harness reuses the test fixtures that start servers), "
            "and `redis-server`, `redis-cli` and `mosquitto` on the machine (Debian "
            "packages). It starts its own on free ports of 127.0.0.1, stopping them at the "
            "end; the Redis Cluster of section 6 (3 masters) only for its step, and the "
            "presence storm's Mosquitto (with persistence) and loader broker (section 9) "
            "only for theirs. The "
            "profile step uses `py-spy` from the venv and is skipped without it. Run it on "
            "an otherwise idle machine: the service, the broker, Redis and the load "
            "generator share the CPU.",
            "",
            "## Machine",
            "",
            *(
                [
                    f"**The machine was not idle during this run** (1-minute load average "
                    f"{load[0]:.1f} at the start, on {m['cores']} cores): other work took "
                    "CPU time from the service, the broker, Redis and the generator alike. "
                    "Absolute rates are lower and latencies noisier than on an idle machine; "
                    "ratios of runs taken seconds apart, and CPU time per request, are the "
                    "more robust figures.",
                    "",
                ]
                if load[0] > 1.0
                else []
            ),
            _table(
                ["", ""],
                [
                    [
                        "run",
                        f"`{r.get('command', 'scripts/bench')}`, {r.get('started_at', '?')}, "
                        f"{_f(r.get('elapsed_s'), 0)} s",
                    ],
                    ["CPU", f"{m['cpu']}, {m['cores']} cores (kernel {m['kernel']})"],
                    [
                        "load average at start",
                        " / ".join(f"{x:.2f}" for x in load) + " (1, 5, 15 min)",
                    ],
                    [
                        "load average at end",
                        " / ".join(f"{x:.2f}" for x in m.get("load_average_at_end", ()))
                        or "not recorded",
                    ],
                    ["commit", self._commit(r.get("git"))],
                    ["Python", m["python"]],
                    ["Redis", m["redis"]],
                    ["Mosquitto", m["mosquitto"]],
                    ["libraries", ", ".join(f"{k} {v}" for k, v in pk.items())],
                ],
            ),
            "",
        )

    @staticmethod
    def _commit(git: dict[str, Any] | None) -> str:
        if not git:
            return "not recorded"
        text = f"`{git.get('commit', 'unknown')}`"
        if git.get("uncommitted_product_changes"):
            text += " with uncommitted changes to `mqtt_pairing/` (the working tree was measured)"
        return text

    def summary(self) -> None:
        """The targets of issue 15, then the figures that must not regress."""
        r = self.r
        mf = mix_figures(r)
        rows = []
        sat_runs = r["saturation"]["runs"]
        cpu_pair = mean_server_cpu(sat_runs)
        rows.append(
            [
                f"service CPU per successful pair ≤ {TARGET_CPU_PAIR_MS} ms",
                f"**{_f(cpu_pair, 2)} ms** (mean over the saturation runs, the echo's run "
                "alternating; section 1)",
                _verdict(cpu_pair is not None and cpu_pair <= TARGET_CPU_PAIR_MS),
            ]
        )
        for key, label, target, where in (
            ("service_cpu_ms_per_failed_guess", "failed guess", TARGET_CPU_GUESS_MS, "section 8"),
            ("service_cpu_ms_per_heartbeat", "runner heartbeat", TARGET_CPU_HEARTBEAT_MS,
             "section 8"),
        ):  # fmt: skip
            x = mf.get(key)
            if x is None:
                continue
            rows.append(
                [
                    f"service CPU per {label} ≤ {target} ms",
                    f"**{_f(x, 3)} ms** ({where})",
                    _verdict(x <= target),
                ]
            )
        ratio = self.pair_rate / self.echo_rate if self.echo_rate else 0.0
        rows.append(
            [
                f"pair throughput of one process ≥ {TARGET_ECHO_RATIO:.0%} of the echo ceiling",
                f"{_f(self.pair_rate, 0)} / {_f(self.echo_rate, 0)} per s = **{ratio:.0%}**"
                + (
                    f"; by CPU time per request: {self.cpu_ratio():.0%}" if self.cpu_ratio() else ""
                ),
                _verdict(ratio >= TARGET_ECHO_RATIO),
            ]
        )
        rt = r.get("round_trips", {})
        for key, label, target in (
            ("success", "successful pair", TARGET_CMDS_PAIR),
            ("failed_guess", "failed guess", TARGET_CMDS_GUESS),
        ):
            d = rt.get(key)
            if not d:
                continue
            total = sum(d["commands_per_request"].values())
            under = mf.get(
                "redis_commands_per_pair_under_load"
                if key == "success"
                else "redis_commands_per_failed_guess_under_load"
            )
            rows.append(
                [
                    f"≤ {target} Redis commands per {label}, counting those inside Lua scripts",
                    f"**{_f(total, 1)}** (all, in scripts too, `INFO commandstats`; "
                    f"{_f(d['top_level_commands_per_request'], 1)} of them EVALSHA; "
                    "section 3, one request at a time)"
                    + (f"; under load: {_f(under, 1)} (commandstats over the closed-loop run)"
                       if under is not None else ""),
                    _verdict(total <= target),
                ]
            )  # fmt: skip
        redis_ms = mf.get("redis_cpu_ms_per_pair")
        if redis_ms is not None:
            rows.append(
                [
                    f"≤ {TARGET_REDIS_CPU_PAIR_MS} ms of Redis CPU per pair",
                    f"**{_f(redis_ms, 2)} ms** (Redis process, `/proc`, per answered pair in "
                    "the saturation runs)",
                    _verdict(redis_ms <= TARGET_REDIS_CPU_PAIR_MS),
                ]
            )
        mp = (r.get("mixes") or {}).get("many_phones")
        if mp:
            spread = spread_at(r, mp.get("concurrency")) or {}
            mratio = mf.get("many_phones_over_spread")
            rows.append(
                [
                    f"one code, many phones: pairs/s ≥ {TARGET_MANY_PHONES:.0%} of the spread mix",
                    f"{_f(mp['throughput'], 0)} / {_f(spread.get('throughput'), 0)} per s "
                    f"(c = {mp['concurrency']}) = **{_pct(mratio)}** (section 7)",
                    _verdict(mratio is not None and mratio >= TARGET_MANY_PHONES),
                ]
            )
        ev_s, ev_m = mf.get("events_per_pair_spread"), mf.get("events_per_pair_many_phones")
        if ev_s is not None or ev_m is not None:
            ok = all(x is not None and abs(x - TARGET_EVENTS) < 0.005 for x in (ev_s, ev_m))
            rows.append(
                [
                    f"events delivered per pair = {TARGET_EVENTS}, in both mixes",
                    f"spread mix **{_f(ev_s, 2)}**, many phones **{_f(ev_m, 2)}** (received on "
                    "the runners' and apps' `events` topics per successful pair; section 7)",
                    _verdict(ok),
                ]
            )
        mem = r.get("memory")
        if mem:
            per_code = mem["code_hash_bytes"]
            if "per_live_code" in mem:
                steady = mem["per_live_code"]
                measured = (
                    f"**{_f(steady, 0)} B** per live code with its tombstone share "
                    f"(used_memory over {mem['n_bulk']:,} live codes and the "
                    f"{mem['expired_records']:,} tombstone records of the codes that expired "
                    f"before them at the same issue rate, default TTL {CODE_TTL_S} s + "
                    f"tombstone {TOMBSTONE_S} s); code hash with its own record "
                    f"{_f(per_code, 0)} B; everything a `code` request leaves: "
                    f"{_f(mem['code_request_bytes'], 0)} B"
                )
            else:  # raw results of a build that kept whole hashes as tombstones
                steady = per_code * (CODE_TTL_S + TOMBSTONE_S) / CODE_TTL_S
                measured = (
                    f"code hash **{_f(per_code, 0)} B** (used_memory over "
                    f"{mem['n_bulk']:,} codes); with its tombstone share at the default "
                    f"TTL {CODE_TTL_S} s + tombstone {TOMBSTONE_S} s: **≥ {_f(steady, 0)} B**; "
                    f"everything a `code` request leaves: {_f(mem['code_request_bytes'], 0)} B"
                )
            rows.append(
                [
                    f"nothing regresses: ≤ {TARGET_BYTES_PER_CODE} bytes of Redis memory per "
                    "live code",
                    measured,
                    _verdict(steady <= TARGET_BYTES_PER_CODE),
                ]
            )
        half = self.latency_at(0.5)
        if half and half["reply_ms"]:
            p50, p99 = half["reply_ms"]["p50"], half["reply_ms"]["p99"]
            rows.append(
                [
                    f"nothing regresses: p99 ≤ {TARGET_P99_OVER_P50:.0f} {X} p50 at 50% load",
                    f"p50 {_f(p50)} ms, p99 {_f(p99)} ms: **{p99 / p50:.2f} {X}**",
                    _verdict(p99 <= TARGET_P99_OVER_P50 * p50),
                ]
            )
        lc = r.get("live_codes")
        if lc:
            small, big = self._live_pair()
            if small and big:
                ratio_big = big / small
                rows.append(
                    [
                        f"nothing regresses: latency with {_big_label(lc['big'])} live codes ≤ "
                        f"{TARGET_BIG_OVER_SMALL} {X} with 1k",
                        f"p50 {_f(big, 2)} ms vs {_f(small, 2)} ms: **{ratio_big:.2f} {X}**",
                        _verdict(ratio_big <= TARGET_BIG_OVER_SMALL),
                    ]
                )
        self.add(
            "## Targets",
            "",
            "The targets of issue 15; the last rows are figures that must not regress. The "
            "failed-guess and heartbeat rates and the presence storm have no target of their "
            "own: sections 8 and 9.",
            "",
            _table(["target", "measured", "verdict"], rows),
            "",
        )

    def before_after(self) -> None:
        """This run against a baseline (`--baseline`): ratios, counts, bytes, profile."""
        b = self.before
        if not b:
            return
        bf: dict[str, Any] = b.get("figures", {})
        af = key_figures(self.r)
        mb, ma = b.get("machine", {}), self.r["machine"]
        a_git = self.r.get("git") or {}
        lines = ["## Before and after", ""]
        if self.self_compare:
            lines += [
                "*Smoke run without a baseline: it is compared with its own figures, saved "
                "and read back as a baseline, only to keep this section working. Every "
                "change is zero by construction.*",
                "",
            ]

        def who(commit: Any, changed: Any, command: Any, date: Any, m: dict[str, Any]) -> str:
            text = f"commit `{commit or 'unknown'}`"
            if changed:
                text += " (with uncommitted changes to `mqtt_pairing/`)"
            load = m.get("load_average_at_start") or ()
            return (
                text + f", `{command or '?'}` on {date or '?'}, {m.get('cpu', '?')} "
                f"({m.get('cores', '?')} cores"
                + (f", load {load[0]:.1f} at the start" if load else "")
                + ")"
            )

        lines += [
            f"**Before**: `{self.before_path}`: "
            + who(b.get("commit"), b.get("uncommitted_product_changes"), b.get("command"),
                  b.get("date"), mb)
            + (
                " (the run recorded no commit: this is the one checked out when the "
                "baseline was written)"
                if b.get("commit_recorded_by_run") is False
                else ""
            )
            + ".  ",
            "**After**: this run: "
            + who(a_git.get("commit"), a_git.get("uncommitted_product_changes"),
                  self.r.get("command"), self.r.get("started_at"), ma)
            + ".",
            "",
            "Absolute rates (pairs/s, echo/s) and CPU milliseconds depend on the machine "
            "and on whatever else ran at the same time; on a shared machine they move "
            "between runs for reasons that have nothing to do with the code. Ratios "
            "measured within one run (pair/echo: both measured seconds apart under the "
            "same conditions), counts (round trips, commands), bytes and the profile's "
            "shares are what compare across runs: judge the change by those. The absolute "
            "rows are there for context.",
            "",
        ]  # fmt: skip
        notes = []
        if b.get("plan") and b.get("plan") != self.r.get("plan", {}).get("name"):
            notes.append(
                f"the baseline is a `{b.get('plan')}` run and this one a "
                f"`{self.r.get('plan', {}).get('name')}` run: shorter runs and fewer "
                "requests make noisier figures"
            )
        if (mb.get("cpu"), mb.get("cores")) != (ma.get("cpu"), ma.get("cores")):
            notes.append("the two runs are on different CPUs: only ratios and counts compare")
        if notes:
            lines += ["Note: " + "; ".join(notes) + ".", ""]

        def get(d: dict[str, Any] | None, *path: str) -> Any:
            for k in path:
                if not isinstance(d, dict):
                    return None
                d = d.get(k)
            return d

        def pct(x: Any) -> str:
            return NA if x is None else f"{x:.0%}"

        def pp(x: Any, y: Any) -> str:
            return NA if x is None or y is None else f"{(y - x) * 100:+.0f} pp"

        def times(x: Any, y: Any) -> str:
            return NA if x is None or y is None or not x else f"{y / x:.2f} {X}"

        def diff(x: Any, y: Any, digits: int = 2) -> str:
            return NA if x is None or y is None else f"{y - x:+,.{digits}f}"

        def rts(f: dict[str, Any] | None) -> str:
            if not f:
                return NA
            return f"{f['request_path']:.2f} + {f['after_reply']:.2f} = **{f['round_trips']:.2f}**"

        def cmds(f: dict[str, Any] | None) -> str:
            if not f:
                return NA
            return f"{f['top_level_commands']:.1f} / **{f['commands']:.1f}**"

        rows = [
            ["pair / echo ceiling, by throughput", pct(bf.get("pair_over_echo")),
             pct(af["pair_over_echo"]), pp(bf.get("pair_over_echo"), af["pair_over_echo"])],
            ["pair / echo, by CPU time per request", pct(bf.get("pair_over_echo_by_cpu")),
             pct(af["pair_over_echo_by_cpu"]),
             pp(bf.get("pair_over_echo_by_cpu"), af["pair_over_echo_by_cpu"])],
        ]  # fmt: skip
        for key, label in (("success", "successful pair"), ("failed_guess", "failed guess")):
            fb, fa = bf.get(key), af[key]
            rows += [
                [f"Redis round trips per {label} (before + after the reply)", rts(fb), rts(fa),
                 diff(get(fb, "round_trips"), get(fa, "round_trips"))],
                [f"Redis commands per {label} (EVALSHA / all, in scripts too)", cmds(fb),
                 cmds(fa), diff(get(fb, "commands"), get(fa, "commands"), 1)],
            ]  # fmt: skip
        for key, label in (
            ("code_hash_bytes", "bytes per code hash"),
            ("per_live_code_with_tombstones", "bytes per live code, with its tombstone share"),
            ("code_request_bytes", "bytes a `code` request leaves"),
        ):
            x, y = get(bf, "memory", key), get(af, "memory", key)
            rows.append([label, _f(x, 0), _f(y, 0), diff(x, y, 0)])
        for key, label in (
            ("p99_over_p50_at_half_load", "p99 / p50 at 50% load"),
            ("two_over_one_instance", "2 vs 1 instance, one Redis"),
            ("cluster_three_over_one_instance", "3 vs 1 instance, Redis Cluster"),
        ):
            x, y = bf.get(key), af[key]
            rows.append(
                [label, NA if x is None else f"{x:.2f} {X}", NA if y is None else f"{y:.2f} {X}",
                 diff(x, y)]
            )  # fmt: skip
        for key, label, digits in (
            ("events_per_pair_spread", "events delivered per pair, spread mix", 2),
            ("events_per_pair_many_phones", "events delivered per pair, many phones", 2),
            ("redis_commands_per_pair_under_load", "Redis commands per pair, under load", 1),
            ("redis_commands_per_failed_guess_under_load",
             "Redis commands per failed guess, under load", 1),
            ("redis_commands_per_heartbeat", "Redis commands per heartbeat", 1),
        ):  # fmt: skip
            x, y = bf.get(key), af.get(key)
            rows.append([label, _f(x, digits), _f(y, digits), diff(x, y, digits)])
        x, y = bf.get("many_phones_over_spread"), af.get("many_phones_over_spread")
        rows.append(["many phones / spread mix, pairs/s", pct(x), pct(y), pp(x, y)])
        sb, sa = bf.get("storm") or {}, af.get("storm") or {}
        if sb or sa:
            x, y = sb.get("redis_commands_per_status"), sa.get("redis_commands_per_status")
            rows.append(["Redis commands per status, presence storm", _f(x, 1), _f(y, 1),
                         diff(x, y, 1)])  # fmt: skip

            def runners(f: dict[str, Any]) -> str:
                return f"{f['runners']:,} runners" if f.get("runners") else NA

            for key, label, digits in (
                ("duration_s", "presence storm: seconds until all recorded", 1),
                ("service_cpu_s", "presence storm: service CPU seconds", 2),
                ("service_cpu_us_per_status", "presence storm: service CPU µs per status", 0),
                ("pair_p50_ms", "presence storm: pair reply p50 ms", 1),
                ("pair_p99_ms", "presence storm: pair reply p99 ms", 1),
            ):
                x, y = sb.get(key), sa.get(key)
                rows.append(
                    [f"{label} (machine-dependent; before {runners(sb)}, after {runners(sa)})",
                     _f(x, digits), _f(y, digits), times(x, y)]
                )  # fmt: skip
        for key, label, digits in (
            ("service_cpu_ms_per_failed_guess",
             "service CPU ms per failed guess (machine-dependent)", 3),
            ("service_cpu_ms_per_heartbeat", "service CPU ms per heartbeat (machine-dependent)",
             3),
            ("redis_cpu_ms_per_pair", "Redis CPU ms per pair (machine-dependent)", 2),
            ("many_phones_per_s", "pairs/s, many phones (machine-dependent)", 0),
            ("failed_guesses_per_s", "failed guesses/s (machine-dependent)", 0),
            ("heartbeats_per_s", "heartbeats/s (machine-dependent)", 0),
            ("pair_per_s", "pairs/s at saturation (machine-dependent)", 0),
            ("echo_per_s", "echo/s at saturation (machine-dependent)", 0),
            ("service_cpu_ms_per_pair", "service CPU ms per pair (machine-dependent)", 2),
            ("echo_cpu_ms_per_request", "echo CPU ms per request (machine-dependent)", 2),
        ):  # fmt: skip
            x, y = bf.get(key), af.get(key)
            rows.append([label, _f(x, digits), _f(y, digits), times(x, y)])
        lines += [_table(["figure", "before", "after", "change"], rows), ""]
        lines += self._profile_before_after(bf.get("profile") or {}, af["profile"])
        self.add(*lines)

    @staticmethod
    def _profile_before_after(pb: dict[str, Any], pa: dict[str, Any]) -> list[str]:
        if "skipped" in pb or "skipped" in pa:
            return [
                "Profile: "
                + "; ".join(
                    f"{side} skipped ({p['skipped']})"
                    for side, p in (("before", pb), ("after", pa))
                    if "skipped" in p
                )
                + ", so there is no profile to compare.",
                "",
            ]

        def share(x: Any) -> str:
            return NA if x is None else f"{x:.1%}"

        def pp(x: Any, y: Any) -> str:
            return NA if x is None or y is None else f"{(y - x) * 100:+.1f} pp"

        lib_b, lib_a = pb.get("by_library", {}), pa.get("by_library", {})
        names = sorted(
            set(lib_b) | set(lib_a), key=lambda k: -max(lib_b.get(k, 0), lib_a.get(k, 0))
        )
        libs = [
            [k, share(lib_b.get(k)), share(lib_a.get(k)), pp(lib_b.get(k, 0.0), lib_a.get(k, 0.0))]
            for k in names
        ]
        ph_b, ph_a = pb.get("by_phase", {}), pa.get("by_phase", {})
        phases = [
            [
                f"{what} (`{name}`)",
                share(ph_b.get(name)),
                share(ph_a.get(name)),
                pp(ph_b.get(name), ph_a.get(name)),
            ]
            for name, what in PHASES
        ]
        return [
            "Profile at saturation, shares of the busy samples (busy "
            f"{share(pb.get('busy_share'))} before, {share(pa.get('busy_share'))} after). "
            "**Self time by library:**",
            "",
            _table(["library", "before", "after", "change"], libs),
            "",
            '**Inclusive time by phase** (the service\'s functions, as in the "Why" section; '
            "a function that no longer exists or fell out of the top 25 shows as "
            f"{NA}):",
            "",
            _table(["phase", "before", "after", "change"], phases),
            "",
        ]

    def _live_pair(self) -> tuple[float | None, float | None]:
        runs = self.r["live_codes"]["runs"]
        small = [
            x["reply_ms"]["p50"] for x in runs if x["label"].startswith("1k") and x["reply_ms"]
        ]
        big = [x["reply_ms"]["p50"] for x in runs if x["label"] == "big" and x["reply_ms"]]
        if not small or not big:
            return None, None
        return sum(small) / len(small), big[0]

    def throughput(self) -> None:
        r = self.r
        echo = {x["concurrency"]: x for x in r["echo"]["runs"]}
        rows = []
        for run in r["saturation"]["runs"]:
            c = run["concurrency"]
            e = echo.get(c, {})
            rows.append(
                [
                    str(c),
                    _f(run["throughput"], 0),
                    _ms(run["reply_ms"], "p50"),
                    _ms(run["reply_ms"], "p99"),
                    _f(e.get("throughput"), 0),
                    _ms(e.get("reply_ms", {}), "p50"),
                    f"{run['throughput'] / e['throughput']:.0%}" if e.get("throughput") else NA,
                    str(sum(run["errors"].values()) + run["lost_replies"]),
                ]
            )
        self.add(
            "## 1. Throughput of one service process, and the echo ceiling (2)",
            "",
            "Closed loop: the load generator keeps `c` pair requests outstanding and sends "
            "the next one as each reply arrives. Each request uses a fresh code issued to "
            "its own runner beforehand, so every pair succeeds and does the full work (3 "
            "Redis round trips before the reply, 4 publishes). The service runs as a "
            "subprocess (`python -m mqtt_pairing serve`, log level INFO as shipped), so the "
            "generator does not share its event loop. The echo service "
            "(`benchmarks/echo.py`) is built like the gateway with the same client library "
            "(aiomqtt 2.5 on paho), subscription, manual acknowledgement and in-flight bound, "
            "and answers each request with the same 4 QoS 1 publishes of the same size, "
            "without Redis. Both run side by side on the same broker (different topic "
            "prefixes), and their runs alternate, so each ratio compares runs seconds apart.",
            "",
            _table(
                [
                    "c",
                    "pairs/s",
                    "p50 ms",
                    "p99 ms",
                    "echo/s",
                    "echo p50 ms",
                    "pair/echo",
                    "errors+lost",
                ],
                rows,
            ),
            "",
            self._cpu_table(),
            f"Saturation of one process: **{_f(self.pair_rate, 0)} pairs/s** "
            f"(c = {r['saturation']['best']['concurrency']}); echo ceiling "
            f"**{_f(self.echo_rate, 0)}/s** (c = {r['echo']['best']['concurrency']}); ratio "
            f"**{self.pair_rate / self.echo_rate:.0%}**."
            if self.echo_rate
            else "",
            "",
        )

    def cpu_ratio(self) -> float | None:
        """Echo CPU per request / pair CPU per pair, over all saturation runs."""
        return cpu_ratio(self.r)

    def _cpu_table(self) -> str:
        runs = self.r["saturation"]["runs"]
        if not runs or not runs[0].get("cpu_ms_per_request"):
            return ""
        echo = {x["concurrency"]: x for x in self.r["echo"]["runs"]}
        rows = []
        for run in runs:
            e = echo.get(run["concurrency"], {}).get("cpu_ms_per_request", {})
            cpu = run["cpu_ms_per_request"]
            share = run.get("cpu_share", {})
            rows.append(
                [
                    str(run["concurrency"]),
                    _f(cpu.get("server"), 2),
                    f"{share.get('server', 0):.0%}",
                    _f(e.get("server"), 2),
                    _f(cpu.get("mosquitto"), 2),
                    _f(cpu.get("redis"), 2),
                ]
            )
        ratio = self.cpu_ratio()
        return "\n".join(
            [
                "CPU time per answered request, from `/proc/<pid>/stat` over each run "
                "(this is far less sensitive to other load on the machine than throughput "
                "is):",
                "",
                _table(
                    [
                        "c",
                        "service ms/pair",
                        "service CPU use",
                        "echo ms/request",
                        "Mosquitto ms/pair",
                        "Redis ms/pair",
                    ],
                    rows,
                ),
                "",
                f"By CPU cost, a pair costs the service {1 / ratio:.1f} {X} what an echo "
                f"costs the echo service: a CPU-bound ratio of **{ratio:.0%}**."
                if ratio
                else "",
                "",
            ]
        )

    def latency(self) -> None:
        rows = []
        for p in self.r.get("latency", []):
            rows.append(
                [
                    _load_label(p["load_share"]),
                    _f(p["target_rate"], 0),
                    _f(p["achieved_rate"], 0),
                    _ms(p["reply_ms"], "p50"),
                    _ms(p["reply_ms"], "p95"),
                    _ms(p["reply_ms"], "p99"),
                    _ms(p["runner_opened_ms"], "p50"),
                    _ms(p["runner_opened_ms"], "p95"),
                    _ms(p["runner_opened_ms"], "p99"),
                    str(p["lost_replies"] + sum(p["errors"].values())),
                    _f(p["send_lag_max_ms"]),
                ]
            )
        self.add(
            "### Latency at 25%, 50% and 90% of saturation (open loop)",
            "",
            "Requests are sent on a fixed schedule whatever the replies do; latency runs "
            "from the scheduled send time to the reply reaching the app, and to the runner's "
            "`session.opened` event reaching the runner (no coordinated omission: a late "
            "sender would count against the service; its worst lag is the last column).",
            "",
            _table(
                [
                    "load",
                    "target/s",
                    "sent/s",
                    "reply p50",
                    "p95",
                    "p99",
                    "runner session.opened p50",
                    "p95",
                    "p99",
                    "errors+lost",
                    "send lag max",
                ],
                rows,
            ),
            "",
            "All times in ms.",
            "",
        )

    def round_trips(self) -> None:
        rt = self.r.get("round_trips")
        if not rt:
            return
        self.add(
            "## 3. Redis round trips and commands",
            "",
            "The service runs in the harness process here (`build_service`, the real "
            "gateway on the same Mosquitto and Redis), one request at a time, with the "
            "outbox sweep set to hourly so that only requests talk to Redis. Round trips "
            "are `PairingStore.round_trips` deltas (a pipeline counts as one); each is "
            "labelled with what it ran and whether it came before the reply was published "
            "(request path) or after (outbox acknowledgement, history). Commands are "
            "`INFO commandstats` deltas, which count the commands run inside Lua scripts "
            "too. Limits were raised (see Method), so no guess ran into a penalty; a guess "
            "that starts one adds one round trip (its history record).",
            "",
        )
        for kind, title in (("success", "Successful pair"), ("failed_guess", "Failed guess")):
            d = rt[kind]
            rows = [
                [x["phase"], f"`{x['what']}`", _f(x["per_request"], 2)] for x in d["round_trips"]
            ]
            cmds = ", ".join(f"{c} {_f(v, 1)}" for c, v in d["commands_per_request"].items())
            self.add(
                f"### {title} ({d['requests']} requests: "
                + ", ".join(f"{k} {v}" for k, v in d["outcomes"].items())
                + ")",
                "",
                _table(["phase", "round trip", "per request"], rows),
                "",
                f"Round trips per request: **{_f(d['round_trips_per_request'], 2)}** "
                f"({_f(d['request_path_per_request'], 2)} before the reply, "
                f"{_f(d['after_reply_per_request'], 2)} after). Commands per request "
                f"(EVALSHA and direct commands {_f(d['top_level_commands_per_request'], 1)} "
                f"of them at top level): {cmds}.",
                "",
            )

    def _cpu_per_request_ms(self) -> tuple[float, float] | None:
        """(pair, echo) service CPU ms per request, first saturation run, or None."""
        runs = self.r.get("saturation", {}).get("runs") or []
        echo = {x["concurrency"]: x for x in self.r.get("echo", {}).get("runs", [])}
        for run in runs:
            pair = run.get("cpu_ms_per_request", {}).get("server")
            e = echo.get(run["concurrency"], {}).get("cpu_ms_per_request", {}).get("server")
            if pair and e:
                return float(pair), float(e)
        return None

    def _round_trip_budget(self) -> str:
        """What the round trips alone cost the service per pair, against the target."""
        rt = self.r.get("round_trips", {})
        cpu, ok = rt.get("client_cpu"), rt.get("success")
        if not cpu or not ok:
            return ""
        fixed = cpu["evalsha"]["batch_of_1_us"] - cpu["evalsha"]["per_command_us"]
        per_cmd = cpu["evalsha"]["per_command_us"]
        n_rt, n_cmd = ok["round_trips_per_request"], ok["top_level_commands_per_request"]
        redis_us = n_rt * fixed + n_cmd * per_cmd
        text = (
            f"**The service's CPU per Redis round trip** (in-process, "
            f"{cpu['batches']:,} batches each, `time.process_time`): a batch of one GET "
            f"{_f(cpu['get']['batch_of_1_us'], 0)} µs, of one EVALSHA "
            f"{_f(cpu['evalsha']['batch_of_1_us'], 0)} µs; each further command in the "
            f"batch {_f(cpu['get']['per_command_us'], 1)} µs (GET) or {_f(per_cmd, 1)} µs "
            f"(EVALSHA). So a round trip costs about {_f(fixed, 0)} µs before its commands "
            "(the queue, the pool, the write, the event loop's wake-ups), and "
            f"a successful pair's {_f(n_rt, 0)} round trips with {_f(n_cmd, 0)} commands "
            f"about **{_f(redis_us, 0)} µs** of client CPU when it is alone. These batches "
            "go one at a time; under load the batches of concurrent requests share "
            'exchanges (auto-pipelining, docs/design.md "Redis connections"), so the '
            "fixed part is spread over them."
        )
        cpu_ms = self._cpu_per_request_ms()
        if cpu_ms:
            pair_ms, echo_ms = cpu_ms
            target_ms = echo_ms / (TARGET_ECHO_RATIO)
            text += (
                f" In section 1 the echo costs {_f(echo_ms * 1000, 0)} µs per request; at "
                f"{TARGET_ECHO_RATIO:.0%} of it a pair may cost {_f(target_ms * 1000, 0)} µs, "
                f"so everything a pair does beyond the echo's work must fit in "
                f"{_f((target_ms - echo_ms) * 1000, 0)} µs, of which the round trips alone "
                f"take {_f(redis_us, 0)}. A pair costs {_f(pair_ms * 1000, 0)} µs here."
            )
        return text

    def memory(self) -> None:
        mem = self.r.get("memory")
        if not mem:
            return

        def fam_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
            # A family that shrank lost keys to their TTL meanwhile (request-rate windows).
            return [
                [f"`{x['family']}`", _f(x["keys_per_item"], 3), _f(x["bytes_per_item"], 0)]
                for x in rows
                if x["bytes_per_item"] >= 0
            ]

        if "per_live_code" in mem:
            per_live = (
                f"**Per live code**: {_f(mem['per_live_code'], 0)} bytes of `used_memory`, "
                "its tombstone share counted. Measured, not computed: "
                f"{mem['n_bulk']:,} live codes written by the filler script as the service "
                "writes them (`issue_code.lua`: a hash with the code's TTL, expiries spread "
                "over the next TTL; `add_tombstone.lua`: its 6-byte record), "
                f"{_f(mem['code_hash_bytes'], 0)} bytes each; then the records of the "
                f"{mem['expired_records']:,} codes that expired before them at the same "
                f"issue rate and are still kept, {_f(mem['tombstone_record_bytes'], 1)} bytes "
                f"each in {mem['tombstone_strings']:,} strings (`mqtt_pairing/tombstones.py`: "
                "a code hash lives only its TTL; what answers `CODE_EXPIRED` for the "
                f"{TOMBSTONE_S} s after is its record, 6 bytes added to the string of its "
                "group (256 of them) and expiry window). `MEMORY USAGE` of one code hash: "
                f"{_f(mem['code_hash_memory_usage'], 0)} bytes (the rest is the main and "
                "expires tables). The service's own lookup found the filler's records: "
                f"{mem.get('tombstone_lookup_check', 'not run')}."
            )
        else:
            steady = mem["code_hash_bytes"] * (CODE_TTL_S + TOMBSTONE_S) / CODE_TTL_S
            per_live = (
                f"**Per code hash**: {_f(mem['code_hash_bytes'], 0)} bytes of `used_memory` "
                f"per code over {mem['n_bulk']:,} code hashes; a code hash lived TTL + "
                f"tombstone, so **at least {_f(steady, 0)} bytes per live code** with the "
                "tombstone share."
            )
        self.add(
            "## 4. Redis memory",
            "",
            per_live,
            "",
            f"**Everything a `code` request leaves** ({mem['n_full']:,} requests through the "
            "dispatcher and outbox relay, each from a new runner): "
            f"**{_f(mem['code_request_bytes'], 0)} bytes** of `used_memory` each; by key "
            "family (`MEMORY USAGE` deltas):",
            "",
            _table(
                ["key family", "keys per code", "bytes per code"],
                fam_rows(mem["code_request_families"]),
            ),
            "",
            f"**Per session** (pairing each of those codes, 100 apps): "
            f"**{_f(mem['pair_bytes'], 0)} bytes** of `used_memory` each:",
            "",
            _table(
                ["key family", "keys per session", "bytes per session"],
                fam_rows(mem["pair_families"]),
            ),
            "",
        )
        variants = mem.get("code_hash_variants")
        if variants:
            self.add(
                f"Where a code hash's bytes go ({mem.get('code_hash_variants_n', 20_000):,} "
                "hashes per layout, same TTL):",
                "",
                _table(
                    ["layout", "used_memory per code", "MEMORY USAGE"],
                    [
                        [v["layout"], _f(v["used_memory_per_code"], 0), str(v["memory_usage"])]
                        for v in variants
                    ],
                ),
                "",
            )
        streams = mem.get("stream_prealloc")
        if streams:
            self.add(
                "A stream with a single entry (as a new runner's or app's history is) takes "
                f"{_f(streams['default'], 0)} bytes with Redis's default "
                f"`stream-node-max-bytes` ({streams['default_setting']}) and "
                f"{_f(streams['small'], 0)} bytes with `stream-node-max-bytes "
                f"{streams['small_setting']}`: Redis 7 preallocates a stream's first "
                "listpack node.",
                "",
            )
        lc = self.r.get("live_codes")
        if lc:
            rows = []
            for x in lc["runs"]:
                label = _big_label(lc["big"]) if x["label"] == "big" else x["label"]
                rows.append(
                    [
                        label,
                        f"{x['keys_in_redis']:,}",
                        _f(x["used_memory"] / 2**20, 0),
                        _ms(x["reply_ms"], "p50"),
                        _ms(x["reply_ms"], "p95"),
                        _ms(x["reply_ms"], "p99"),
                        _ms(x["runner_opened_ms"], "p50"),
                    ]
                )
            small, big = self._live_pair()
            self.add(
                f"### Latency with 1k vs {_big_label(lc['big'])} live codes",
                "",
                f"Open loop at {_f(lc['rate'], 0)} pairs/s (50% of saturation). The live codes "
                "are code hashes written 10,000 per Lua call; the 1k case runs before and "
                "after the big one, and the ratio uses their mean.",
                "",
                _table(
                    [
                        "live codes",
                        "keys in Redis",
                        "used_memory MiB",
                        "reply p50 ms",
                        "p95",
                        "p99",
                        "session.opened p50",
                    ],
                    rows,
                ),
                "",
                f"Ratio of p50: **{big / small:.2f} {X}**." if small and big else "",
                "",
            )

    def embedded(self) -> None:
        e = self.r.get("embedded")
        if not e:
            return
        sat, half = e["saturation"], e["half"]
        self.add(
            "## 5. Embedded default (amqtt + in-memory store), for reference",
            "",
            "`mqtt-pairing serve` with no `MQTT_URL` and no Redis setting: the amqtt broker "
            "(MQTT 3.1.1) and fakeredis (running the same Lua scripts) inside the service "
            "process. Same generator, same requests.",
            "",
            _table(
                ["", "pairs/s", "reply p50 ms", "p95", "p99", "session.opened p50"],
                [
                    [
                        f"closed loop, c = {sat['concurrency']}",
                        _f(sat["throughput"], 0),
                        _ms(sat["reply_ms"], "p50"),
                        _ms(sat["reply_ms"], "p95"),
                        _ms(sat["reply_ms"], "p99"),
                        _ms(sat["runner_opened_ms"], "p50"),
                    ],
                    [
                        f"open loop at 50% ({_f(half['target_rate'], 0)}/s)",
                        _f(half["throughput"], 0),
                        _ms(half["reply_ms"], "p50"),
                        _ms(half["reply_ms"], "p95"),
                        _ms(half["reply_ms"], "p99"),
                        _ms(half["runner_opened_ms"], "p50"),
                    ],
                ],
            ),
            "",
            f"The embedded default reaches {sat['throughput'] / self.pair_rate:.0%} of one "
            "process on Mosquitto + Redis."
            if self.pair_rate
            else "",
            "",
        )

    def shared(self) -> None:
        s = self.r.get("shared")
        cl = self.r.get("cluster")
        if not s and not cl:
            return
        cores = self.r["machine"]["cores"]
        cols: list[tuple[str, dict[str, Any], list[float], float]] = []
        runs: list[list[str]] = []
        if s:
            second = s["second_instance_share"]
            cols += [
                ("one Redis, 1 instance", s["one"], [1.0], 1.0),
                ("one Redis, 2 instances", s["two"], [1 - second, second], s["ratio"]),
            ]
            runs.append(self._run_row("one Redis", 1, s["one"]))
            runs += [self._run_row("one Redis", 2, r) for r in s["two_runs"]]
        if cl:
            n = cl["instances"]
            cols += [
                ("Redis Cluster, 1 instance", cl["one"], [1.0], 1.0),
                (f"Redis Cluster, {n} instances", cl["three"], cl["instance_shares"], cl["ratio"]),
            ]
            runs.append(self._run_row("Redis Cluster", 1, cl["one"]))
            runs += [self._run_row("Redis Cluster", n, r) for r in cl["three_runs"]]

        def cpu(run: dict[str, Any], key: str) -> str:
            return _f(run.get("cpu_ms_per_request", {}).get(key), 2)

        rows = [
            ["c"] + [str(run["concurrency"]) for _, run, _, _ in cols],
            ["pairs/s"] + [f"**{_f(run['throughput'], 0)}**" for _, run, _, _ in cols],
            [f"{X} 1 instance (same Redis)"] + [f"{ratio:.2f} {X}" for *_, ratio in cols],
            ["reply p50 ms"] + [_ms(run["reply_ms"], "p50") for _, run, _, _ in cols],
            ["reply p99 ms"] + [_ms(run["reply_ms"], "p99") for _, run, _, _ in cols],
            ["errors + lost replies"] + [_errors(run) for _, run, _, _ in cols],
            ["service CPU ms/pair (all instances)"] + [cpu(run, "server") for _, run, _, _ in cols],
            ["Redis CPU ms/pair (all nodes)"] + [cpu(run, "redis") for _, run, _, _ in cols],
            ["Mosquitto CPU ms/pair"] + [cpu(run, "mosquitto") for _, run, _, _ in cols],
            ["cores busy (instances, broker, Redis, generator)"]
            + [
                _f(sum(run["cpu_share"].values()), 2) if run.get("cpu_share") else NA
                for _, run, _, _ in cols
            ],
            ["pairs handled per instance"]
            + [" / ".join(f"{x:.0%}" for x in shares) for _, _, shares, _ in cols],
        ]
        self.add(
            "## 6. More instances: a shared subscription on one Redis and on a Redis Cluster",
            "",
            "More `serve` processes join the same `$share` group (`PAIRING_SHARED_GROUP`) "
            "on the same broker; closed loop at the best concurrency of one instance (and, "
            "in a full run, at a multiple of it). On one Redis: one instance, then a second "
            "one. On a Redis Cluster: one instance, then three. Columns of the same Redis "
            "are runs a few seconds apart; the ratio compares each pair of columns. CPU time "
            "per pair is summed over the instances and over the Redis nodes.",
            "",
            _table([""] + [title for title, *_ in cols], rows),
            "",
            "Every run:",
            "",
            _table(["Redis", "instances", "c", "pairs/s", "p50 ms", "p99 ms", "errors+lost"], runs),
            "",
        )
        if s:
            self.add(
                f"**One Redis.** Two instances: **{s['ratio']:.2f} {X}** one instance; the "
                f"second instance handled {s['second_instance_share']:.0%} of the pairs. "
                + (
                    "One service process is one event loop, so it uses at most one core; a "
                    "second process can use CPU time the first cannot (on a machine shared "
                    "with other work, two processes also get a larger share of it)."
                    if s["ratio"] >= 1.3
                    else f"On {cores} cores shared with Mosquitto, Redis and the load "
                    "generator, a second process mostly competes for the same CPU; the "
                    "shared subscription spreads the load, it cannot add cores."
                ),
                "",
            )
        if cl:
            self._cluster_notes(cl, cores)

    @staticmethod
    def _run_row(where: str, instances: int, run: dict[str, Any]) -> list[str]:
        return [
            where,
            str(instances),
            str(run["concurrency"]),
            _f(run["throughput"], 0)
            + (" (ran out of codes)" if run.get("ran_out_of_jobs") else ""),
            _ms(run["reply_ms"], "p50"),
            _ms(run["reply_ms"], "p99"),
            _errors(run),
        ]

    def _cluster_notes(self, cl: dict[str, Any], cores: int) -> None:
        n, masters, shards = cl["instances"], cl["masters"], cl["index_shards"]
        one, three = cl["one"], cl["three"]
        busy = sum(three.get("cpu_share", {}).values())

        def cpu(run: dict[str, Any] | None, key: str) -> float | None:
            v = (run or {}).get("cpu_ms_per_request", {}).get(key)
            return float(v) if v else None

        def times(a: float | None, b: float | None) -> str | None:
            return f"{b / a:.2f} {X}" if a and b else None

        text = (
            f"**Redis Cluster.** {masters} masters without replicas "
            "(`redis-server --cluster-enabled yes` on free ports, formed by `redis-cli "
            f"--cluster create ... --cluster-replicas 0`) on this same machine. The "
            f"instances use `REDIS_CLUSTER_URL`, `PAIRING_INDEX_SHARDS={shards}` and "
            f"`PAIRING_GLOBAL_FAIL_SHARDS={cl['global_fail_shards']}` "
            f"({shards / masters:.0f} shards per master), with their own topic prefix and "
            "`$share` group; codes are issued straight into the cluster beforehand, as in "
            f"section 1. {n} instances: **{cl['ratio']:.2f} {X}** one instance on the "
            "cluster"
        )
        if cl.get("keys_per_master"):
            keys = " / ".join(f"{k:,}" for k in cl["keys_per_master"])
            text += f"; keys per master after the runs: {keys}"
        text += "."
        single = (self.r.get("shared") or {}).get("one")
        svc_cost = times(cpu(single, "server"), cpu(one, "server"))
        if single and single["throughput"] and one["throughput"]:
            text += (
                f" One instance on the cluster makes {one['throughput'] / single['throughput']:.0%}"
                " of the pairs one instance makes on a single Redis (first column, a minute "
                "earlier)"
                + (f" and needs {svc_cost} its CPU time per pair" if svc_cost else "")
                + ": what cluster routing costs the client (the CPU time is the steadier "
                "figure on a shared machine)."
            )
        svc, red = (
            times(cpu(one, "server"), cpu(three, "server")),
            times(cpu(one, "redis"), cpu(three, "redis")),
        )
        self.add(
            text,
            "",
            f"**Read the {n} vs 1 ratio as coordination overhead, not scale-out headroom.** "
            f"This machine has {cores} cores, and the {n} instances, Mosquitto, the "
            f"{masters} Redis masters and the load generator all share them"
            + (
                f" (together they kept {busy:.1f} cores busy in the {n}-instance run)"
                if busy
                else ""
            )
            + ". More instances cannot bring CPU that is not there: "
            + (
                f"where {n} do more than 1 here, it is because one instance is one event loop, "
                "which uses at most one core, and because on a machine shared with other work "
                "more processes get a larger share of it. "
                if cl["ratio"] >= 1.1
                else f"here {n} do no more than 1, because the instances and the masters "
                "compete with each other (and with whatever else runs) for the same cores. "
            )
            + "What the runs do show is what coordination "
            "costs (the shared subscription's round robin, more connections, each instance's "
            "cluster routing)"
            + (
                f": CPU time per pair with {n} instances vs 1 is {svc} for the instances"
                + (f" and {red} for the masters" if red else "")
                if svc
                else ""
            )
            + ". How far the service scales when each instance and each master has its own "
            "cores is sized from CPU time per pair (`docs/scaling.md`), not from this ratio."
            + (
                " (A run with requests still unanswered at its end overstates CPU time per "
                "pair: the work on those requests is counted, they are not.)"
                if any(r["lost_replies"] for r in [one, *cl["three_runs"]])
                else ""
            ),
            "",
        )
        runs = [one, *cl["three_runs"]]
        problems = cl.get("log_problem_count", 0)
        kinds: dict[str, int] = {}
        for r in runs:
            for k, v in r["errors"].items():
                kinds[k] = kinds.get(k, 0) + v
        missing = sum(r["lost_replies"] for r in runs)
        if not (kinds or missing or problems):
            return
        late = sum(r.get("late_replies", 0) for r in runs)
        wait = max((r.get("late_wait_s", 0) for r in runs), default=0)
        text = f"**Errors and missing replies on the cluster:** {sum(kinds.values())} error replies"
        if kinds:
            text += " (" + ", ".join(f"`{k}` {v}" for k, v in kinds.items()) + ")"
        text += (
            f"; {missing} requests without a reply {DRAIN_TIMEOUT_S:.0f} s after the end of "
            "their run (counted as lost in the tables)"
        )
        if missing and any("late_wait_s" in r for r in runs):
            text += (
                f", of which {late} got one within a further {wait:.0f} s (late, not lost: a "
                f"backlog on starved instances) and {missing - late} never did"
            )
        text += f"; {problems} ERROR lines or tracebacks in the instances' logs"
        first = cl.get("log_problems", [])[:3]
        if first:
            text += ": " + "; ".join(f"`{x}`" for x in first)
        self.add(text + ".", "")

    def many_phones(self) -> None:
        mixes = self.r.get("mixes") or {}
        mp = mixes.get("many_phones")
        if not mp:
            return
        spread = spread_at(self.r, mp.get("concurrency")) or {}
        uses = mp.get("uses_per_code", 10)

        def events(run: dict[str, Any]) -> list[str]:
            m = run.get("messages_in", {})
            ok = m.get("reply.ok", 0)

            def per(name: str) -> str:
                return _f(m.get(name, 0) / ok, 2) if ok else NA

            return [
                per("runner.session.opened"),
                per("runner.code.used"),
                per("app.session.opened"),
                per("runner.other"),
                per("app.other"),
                f"**{_f(run.get('events_per_pair'), 2)}**",
            ]

        def row(name: str, run: dict[str, Any]) -> list[str]:
            cpu = run.get("cpu_ms_per_request", {})
            return [
                name,
                str(run.get("concurrency")),
                _f(run.get("throughput"), 0),
                _ms(run.get("reply_ms", {}), "p50"),
                _ms(run.get("reply_ms", {}), "p99"),
                _errors(run),
                _f(cpu.get("server"), 2),
                _f(cpu.get("redis"), 2),
                _f(run.get("redis_commands_per_request"), 1),
            ]

        ratio = mp["throughput"] / spread["throughput"] if spread.get("throughput") else None
        self.add(
            "## 7. One code, many phones; events per pair",
            "",
            f"Each code is issued with {uses} uses (`max_uses` {uses}, the most a code may "
            f"have) to its own runner, and its {uses} pair requests go out one after the "
            f"other from {uses} different apps, so the apps claim the uses of one code at "
            "once; many such codes follow in turn, closed loop at the spread mix's "
            "concurrency on the same service process, right after the saturation runs of "
            "section 1 and right after a run of the spread mix (one code and one runner per "
            "pair, as in section 1), so that the two runs compare seconds apart. Every use "
            "succeeds (a runner holds at most 10 sessions). Commands are `INFO "
            "commandstats` deltas over the run (inside scripts too) per answered request; "
            "the background work of the idle instances (sweeps, leases) is counted with them.",
            "",
            _table(
                [
                    "mix",
                    "c",
                    "pairs/s",
                    "p50 ms",
                    "p99 ms",
                    "errors+lost",
                    "service ms/pair",
                    "Redis ms/pair",
                    "Redis commands/pair",
                ],
                [
                    row("spread (one code per runner)", spread),
                    row(f"many phones ({uses} per code)", mp),
                ],
            ),
            "",
            f"Many phones reach **{_pct(ratio)}** of the spread mix's pairs/s.",
            "",
            "**Events delivered per pair**: every message the runners and the apps received "
            "on their `events` topics during the run (warm-up and drain included), divided by "
            "the successful replies of the run. The generator's runner connection subscribes "
            "to `P/runners/+/events` and each app to its own `events` topic, so each event is "
            "counted once per copy the broker delivers, duplicates included.",
            "",
            _table(
                [
                    "mix",
                    "runner session.opened",
                    "runner code.used",
                    "app session.opened",
                    "runner other",
                    "app other",
                    "total per pair",
                ],
                [["spread", *events(spread)], ["many phones", *events(mp)]],
            ),
            "",
        )

    def guesses_heartbeats(self) -> None:
        mixes = self.r.get("mixes") or {}
        fg, hb = mixes.get("failed_guess"), mixes.get("heartbeat")
        if not fg and not hb:
            return
        lines = ["## 8. Failed guesses and heartbeats", ""]
        rows = []
        if fg:
            cpu = fg.get("cpu_ms_per_request", {})
            rows.append(
                [
                    "failed guess (CODE_NOT_FOUND)",
                    str(fg.get("concurrency")),
                    _f(fg.get("answered_per_s"), 0),
                    _ms(fg.get("reply_ms_all", {}), "p50"),
                    _ms(fg.get("reply_ms_all", {}), "p99"),
                    _f(cpu.get("server"), 3),
                    _f(cpu.get("redis"), 3),
                    _f(fg.get("redis_commands_per_request"), 1),
                ]
            )
        if hb:
            cpu = hb.get("cpu_ms_per_request", {})
            rows.append(
                [
                    "runner heartbeat",
                    str(hb.get("concurrency")),
                    _f(hb.get("per_s"), 0),
                    NA,
                    NA,
                    _f(cpu.get("server"), 3),
                    _f(cpu.get("redis"), 3),
                    _f(hb.get("redis_commands_per_request"), 1),
                ]
            )
        outcomes = ", ".join(f"{k} {v}" for k, v in (fg or {}).get("errors", {}).items())
        lines += [
            "Same service process, right after section 7. **Failed guesses**: closed loop of "
            "`pair` requests with well-formed codes that were never issued, from "
            f"{(fg or {}).get('apps', 0):,} apps taking turns (each app makes only a few "
            'guesses a second, far from the per-client bounds of docs/protocol.md, "Default '
            'limits"; the failure limits are raised as in Method, so no guess runs into a '
            "penalty and every one does the full lookup), at the concurrency of section 1."
            + (f" Outcomes in the window: {outcomes}." if outcomes else ""),
            "",
            "**Heartbeats**: the runners paired in section 1 (one active session each; "
            f"{(hb or {}).get('runners', 0):,} of them take turns) send `{{}}` on "
            "`P/runners/{id}/req/heartbeat`. A successful heartbeat has no reply, so the "
            "loop reads completions from the service's "
            '`mqtt_pairing_replies_total{op="heartbeat",outcome="ok"}` (`/metrics`, about '
            "20 scrapes a second, their CPU counted with the heartbeats) and keeps "
            f"{(hb or {}).get('concurrency', 0)} heartbeats outstanding"
            + (f"; {hb['handled']:,} of {hb['sent']:,} sent were handled" if hb else "")
            + ".",
            "",
            "Service and Redis CPU from `/proc/<pid>/stat` over the run, per operation; "
            "Redis commands from `INFO commandstats` deltas (inside scripts too) per "
            "operation. Latency of failed guesses is over every answered request.",
            "",
            _table(
                [
                    "operation",
                    "c",
                    "per s",
                    "p50 ms",
                    "p99 ms",
                    "service ms/op",
                    "Redis ms/op",
                    "Redis commands/op",
                ],
                rows,
            ),
            "",
        ]
        if hb and hb.get("commands_per_request"):
            cmds = ", ".join(
                f"{k} {v:.1f}" for k, v in hb["commands_per_request"].items() if v >= 0.05
            )
            lines += [f"Commands per heartbeat: {cmds}.", ""]
        self.add(*lines)

    def _storm_cpu(self, st: dict[str, Any]) -> str:
        """The storm's service CPU per status, less the pairs' share at the spread mix's."""
        cpu, n = st.get("service_cpu_s"), st["runners"]
        if cpu is None:
            return ""
        per_pair = mean_server_cpu(self.r["saturation"]["runs"])
        pairs = st.get("pairs_during_storm", 0)
        if not per_pair:
            return f" ({_f(cpu * 1e6 / n, 0)} µs per status, pairs included)"
        rest = cpu - per_pair / 1000 * pairs
        return (
            f" ({_f(cpu * 1e6 / n, 0)} µs per status with the pairs; less the "
            f"{pairs:,} pairs at {_f(per_pair, 2)} ms each, **{_f(rest * 1e6 / n, 0)} µs** "
            "per status)"
        )

    def presence_storm(self) -> None:
        st = self.r.get("presence_storm")
        if not st:
            return
        pairs = st.get("pairs", {})
        check = st.get("check", {})
        counters = ", ".join(f"`{k}` {v:,.0f}" for k, v in sorted(st.get("counters", {}).items()))
        n = st["runners"]
        rows = [
            ["runners (retained statuses replayed)", f"{n:,}"],
            ["of which Last Wills (`offline`)", f"{st['wills']:,}"],
            ["loading them (broker down meanwhile)", f"{_f(st.get('load_s'), 1)} s"],
            ["broker start, with its database", f"{_f(st.get('broker_start_s'), 2)} s"],
            ["service ready again (`/readyz`)", f"{_f(st.get('service_ready_s'), 2)} s"],
            ["**all N recorded**", f"**{_f(st.get('duration_s'), 2)} s**"
             + ("" if st.get("completed") else " (not complete: the step's cap)")],
            ["statuses counted by the service", _f(st.get("statuses_counted"), 0)],
            ["Redis check (ok / missing / wrong)",
             f"{check.get('ok', 0):,} / {check.get('missing', 0):,} / {check.get('wrong', 0):,}"],
            ["service CPU", f"{_f(st.get('service_cpu_s'), 2)} s" + self._storm_cpu(st)],
            ["Redis CPU (pairs included)", f"{_f(st.get('redis_cpu_s'), 2)} s"],
            ["Redis commands per status",
             f"**{_f(st.get('redis_commands_per_status'), 1)}** ({_f(st.get('redis_commands'), 0)} "
             f"in all, less {_f(st.get('pair_commands_subtracted'), 0)} for the "
             f"{st.get('pairs_during_storm', 0):,} pairs at the spread mix's commands per pair)"],
            [f"pair requests meanwhile ({_f(st.get('pair_rate'), 0)}/s, open loop)",
             f"p50 {_ms(pairs.get('reply_ms', {}), 'p50')} ms, p95 "
             f"{_ms(pairs.get('reply_ms', {}), 'p95')} ms, p99 "
             f"{_ms(pairs.get('reply_ms', {}), 'p99')} ms; {pairs.get('sent', 0):,} sent, "
             f"errors + lost {_errors(pairs) if pairs else NA}"],
        ]  # fmt: skip
        self.add(
            "## 9. Presence storm after a broker restart",
            "",
            "One service instance with its own Mosquitto (the bench configuration with "
            "persistence on), its own topic prefix and its own key prefix (so its own "
            "presence lease on the same Redis), `MQTT_RECONNECT_MAX_S=1`. Once it is "
            "connected and holds the presence lease, the broker is stopped (its database "
            'saved). While it is down, N runners\' retained `{"state":"online"}` statuses '
            "(QoS 1, on `P/runners/{id}/status`) are written into its database through a "
            "loader broker on another port sharing the persistence directory (4 raw MQTT "
            "connections), and for a part of them a connection carrying a retained Last Will "
            '`{"state":"offline"}` is opened and dropped without DISCONNECT, so the '
            "broker publishes the Will. The broker then starts again on its port: the "
            "service reconnects, and the broker replays every retained status to its "
            "presence subscription. Times run from the broker's start. **Done** when the "
            "service has counted N status messages "
            '(`mqtt_pairing_events_total{name="status"}` on `/metrics`, polled 4 times a '
            "second; or as soon as that count stalls for 2 s) and one EVAL finds the "
            "expected state (online, or offline for the Wills) "
            "in every runner's hash in Redis. Meanwhile, from the moment the service is "
            "ready, pair requests go out at a fixed rate (fresh codes, open loop) and their "
            "latency runs from the scheduled send. Service CPU from `/proc` over the storm; "
            "Redis commands are `INFO commandstats` deltas over it, less the pairs' share "
            "and the completion checks'.",
            "",
            _table(["", ""], rows),
            "",
            f"The service's counters after the storm: {counters}." if counters else "",
            "",
        )

    def profile(self) -> None:
        p = self.r.get("profile", {})
        if "skipped" in p:
            self.add("## Profile", "", f"Skipped: {p['skipped']}.", "")
            return
        areas = [[x["name"], f"{x['share']:.1%}"] for x in p["areas"]]
        selfs = [[f"`{x['name']}`", f"{x['share']:.1%}"] for x in p["self"][:20]]
        svc = [[f"`{x['name']}`", f"{x['share']:.1%}"] for x in p["service_inclusive"][:20]]
        self.add(
            "## Profile of the hot path",
            "",
            f"py-spy sampled the single service process at 200 Hz for the length of a "
            f"closed-loop run (c = {p['concurrency']}, "
            f"{_f(p['throughput_while_profiling'], 0)} pairs/s while sampled). The process "
            f"was busy in **{p['busy_share']:.0%}** of the samples (the rest waiting in "
            "`select`); shares below are of the busy samples. The raw collapsed stacks are "
            f"in `{p.get('raw', 'benchmarks/results/profile-latest.raw')}` (feed them to "
            "flamegraph.pl or "
            "speedscope).",
            "",
            "**Self time by library** (innermost frame; time in C calls counts for the "
            "Python function that made them):",
            "",
            _table(["library", "share"], areas),
            "",
            "**Top functions by self time:**",
            "",
            _table(["function", "self"], selfs),
            "",
            "**The service's own functions, inclusive** (time anywhere below them):",
            "",
            _table(["function", "inclusive"], svc),
            "",
        )

    def method(self) -> None:
        env = ", ".join(f"`{k}={v}`" for k, v in BENCH_ENV.items() if k != "PAIRING_SECRET")
        self.add(
            "## Method",
            "",
            "- **Load generator** (`benchmarks/loadgen.py`): raw paho-mqtt 2 driven from a "
            "single thread (an external `loop_read`/`loop_write` loop over a selector), not "
            "aiomqtt: it runs on the same two cores as everything else and has to cost as "
            "little CPU per message as possible. Apps and runners are multiplexed over a "
            f"few connections: 4 app connections {X} 64 apps, each app subscribed to its own "
            "`res/+` and `events` topics, and one runner connection subscribed to "
            "`P/runners/+/events` for the single-use runners (a runner has one active code "
            "at a time, so each measured pair has its own runner). Requests are QoS 1, "
            "subscriptions QoS 1, TCP_NODELAY on every socket. Replies are matched by "
            "`request_id`, events by the (runner, app) pair they name (a code with several "
            "uses pairs one runner with several apps at once).",
            "- **Codes** are issued before each run straight into Redis with the service's "
            "own scripts (`issue_code.lua`, `set_runner_code.lua`) and digests "
            "(`PairingCodeService.digest`, same `PAIRING_SECRET`), 1,000 per pipeline: the "
            "runs measure pairs only. Failed guesses use well-formed codes never issued.",
            f"- **Settings of the service**: defaults, except {env}: the per-app request "
            "rate, failure window and global failure budget would otherwise refuse a "
            "benchmark's load. The checks still run (the same scripts, the same commands); "
            "only their verdicts change.",
            "- **Mosquitto** 2.0 from the test configuration (`set_tcp_nodelay true`), "
            "without persistence and with `max_queued_messages 100000`. **Redis** without "
            "persistence.",
            "- **Percentiles** are nearest-rank over every request sent in the measurement "
            "window (after a warm-up); throughput counts successful replies received in the "
            "window.",
            "",
        )

    def _svc_share(self, name: str) -> float | None:
        p = self.r.get("profile", {})
        inclusive = {
            x["name"].split(" (")[0]: float(x["share"]) for x in p.get("service_inclusive", [])
        }
        return phase_share(inclusive, name)

    def _area_share(self, name: str) -> float:
        p = self.r.get("profile", {})
        return float(next((x["share"] for x in p.get("areas", []) if x["name"] == name), 0.0))

    def findings(self) -> None:
        """Why each target is or is not met, from this run's numbers and profile."""
        r = self.r
        lines = ["## Why: what the numbers and the profile say", ""]
        rt = r.get("round_trips", {}).get("success")
        p = r.get("profile", {})
        if self.echo_rate:
            ratio = self.pair_rate / self.echo_rate
            text = (
                f"**Throughput ({ratio:.0%} of the echo ceiling).** Both answer each request "
                "with the same 4 publishes; on top of that a pair parses and validates the "
                "request, makes "
            )
            if rt:
                cmds = sum(rt["commands_per_request"].values())
                text += (
                    f"{_f(rt['round_trips_per_request'], 0)} Redis round trips "
                    f"({_f(rt['request_path_per_request'], 0)} before the reply, "
                    f"{_f(rt['after_reply_per_request'], 0)} after) with "
                    f"{_f(rt['top_level_commands_per_request'], 0)} EVALSHA "
                    f"({_f(cmds, 0)} Redis commands counting those inside the scripts), "
                )
            else:
                text += "its Redis round trips, "
            text += "renders the events from the outbox entries and writes history records."
            if "areas" in p:
                parts = []
                for name, what in PHASES:
                    share = self._svc_share(name)
                    if share is not None:
                        parts.append(f"{what} {share:.0%}")
                text += (
                    " In the profile at saturation (shares of the busy time, inclusive): "
                    + "; ".join(parts)
                    + ". By library (self time): redis-py "
                    f"{self._area_share('redis-py'):.0%}, asyncio "
                    f"{self._area_share('asyncio'):.0%}, paho-mqtt "
                    f"{self._area_share('paho-mqtt'):.0%}, aiomqtt "
                    f"{self._area_share('aiomqtt'):.0%}, the service's own code "
                    f"{self._area_share('mqtt_pairing (the service)'):.0%}, json "
                    f"{self._area_share('json'):.0%}, pydantic "
                    f"{self._area_share('pydantic'):.0%}, logging "
                    f"{self._area_share('logging'):.0%}. Each Redis round trip costs the "
                    "single event loop about as much as a publish (a write, a wake-up, a "
                    "parse); the echo has none, so the ratio is set mostly by how many round "
                    "trips and commands a pair makes and how much Python redis-py runs per "
                    "command."
                )
            lines += [text, ""]
            budget = self._round_trip_budget()
            if budget:
                lines += [budget, ""]
        if rt:
            after = [x for x in rt["round_trips"] if x["phase"] == "after"]
            text = (
                f"**Round trips.** The request path of a successful pair makes "
                f"{_f(rt['request_path_per_request'], 0)} (a pipeline with the app-slot check, "
                "the budget and the claim; a pipeline with the outbox due mark, the app's "
                "index, the by-id lookup, `open_session` and the idle deadline)."
            )
            if after:
                text += (
                    f" After the reply and the events it makes "
                    f"{_f(rt['after_reply_per_request'], 0)} more: "
                    + ", ".join(f"`{x['what']}`" for x in after)
                    + " (one pipeline: the outbox relay deleting the entries it published "
                    "and dropping the due mark, with the pair's own closing calls: remember "
                    "the reply, settle the claim, refund the budget unit, history; "
                    "`docs/operations.md`). It does not delay the reply, but it counts "
                    "against the target and takes event-loop time from the next requests."
                )
            rare = _occasional(rt)
            if rare:
                text += f" Not on every request: {rare.removeprefix('; now and then also ')}."
            fail = r["round_trips"].get("failed_guess")
            if fail:
                text += (
                    f" A failed guess makes {_f(fail['round_trips_per_request'], 0)}, both "
                    "before the reply, and nothing after."
                )
            lines += [text, ""]
        mem = r.get("memory")
        if mem:
            if "per_live_code" in mem:
                text = (
                    f"**Memory.** A live code costs {_f(mem['per_live_code'], 0)} bytes with "
                    f"its tombstone share: its hash and record ({_f(mem['code_hash_bytes'], 0)}"
                    " bytes: 7 fields with one-letter names, a 44-character key name, the "
                    "main and expires table entries, and 6 bytes of record) plus about "
                    f"{mem['expired_records'] / mem['n_bulk']:.1f} records of expired codes "
                    f"at {_f(mem['tombstone_record_bytes'], 1)} bytes. Before, a code hash "
                    "stayed for the tombstone hour, about 7 hashes per live code."
                )
            else:
                text = (
                    f"**Memory.** A code hash costs {_f(mem['code_hash_bytes'], 0)} bytes "
                    "and stayed TTL + tombstone from its issue."
                )
            text += (
                " Beyond the code itself, a `code` request leaves the runner's own history "
                "stream and the remembered (sealed) reply, and a pair the app's history "
                "stream and its remembered reply; see section 4."
            )
            if mem.get("stream_prealloc"):
                sp = mem["stream_prealloc"]
                text += (
                    f" A history stream with one entry takes {_f(sp['default'], 0)} bytes "
                    "because Redis 7 preallocates the first listpack node to "
                    "`stream-node-max-bytes`."
                )
            lines += [text, ""]
        half = self.latency_at(0.5)
        if half and half["reply_ms"]:
            p50, p99 = half["reply_ms"]["p50"], half["reply_ms"]["p99"]
            lines += [
                f"**Tail latency.** At 50% load p99 is {p99 / p50:.1f} {X} p50 "
                f"({_f(p50)} and {_f(p99)} ms): requests arriving while the single event loop "
                "is busy with another pair's round trips and publishes wait their turn; at "
                "90% load the queue builds up (section 1).",
                "",
            ]
        lc = r.get("live_codes")
        if lc:
            small, big = self._live_pair()
            if small and big:
                lines += [
                    f"**Live codes.** With {_big_label(lc['big'])} live codes the p50 is "
                    f"{big / small:.2f} {X} that with 1k: a code lookup is one hash read in a "
                    "Lua script, O(1) whatever the number of keys (the tombstone strings of "
                    "its group are read only when the code's hash is gone, by a failed "
                    "guess); what remains is cache misses in a bigger Redis and run-to-run noise "
                    "(the two 1k runs differ too: see section 4).",
                    "",
                ]
        self.add(*lines)

    def render(self) -> str:
        self.header()
        self.summary()
        self.before_after()
        self.findings()
        self.throughput()
        self.latency()
        self.round_trips()
        self.memory()
        self.embedded()
        self.shared()
        self.many_phones()
        self.guesses_heartbeats()
        self.presence_storm()
        self.profile()
        self.method()
        return "\n".join(self.parts).rstrip() + "\n"


def render(
    results: dict[str, Any],
    json_path: Path,
    *,
    before: dict[str, Any] | None = None,
    before_path: Path | None = None,
    self_compare: bool = False,
) -> str:
    """The report of one run; with `before` (a baseline), also "Before and after"."""
    return _Report(results, json_path, before, before_path, self_compare).render()
