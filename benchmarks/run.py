"""`scripts/bench [--quick|--smoke] [--out FILE]`: the benchmark suite of mqtt-pairing.

Starts Redis and Mosquitto on free ports (owned by the harness, stopped at the end), runs
every measurement, writes the raw results to `benchmarks/results/<timestamp>.json` and
the Markdown report (`docs/benchmarks.md` for a full run; next to the JSON for --quick and
--smoke unless --out is given). Progress is shown with rich while it runs. A Redis Cluster
(3 masters) is started for its own step and stopped after it.

- full: the numbers of the report (about 10 minutes; run it on an otherwise idle machine).
- --quick: shorter runs, 100k instead of 1M live codes, a presence storm of 20k instead
  of 100k runners (about 3 minutes).
- --smoke: a second of load per step, a 1k-runner storm, to keep the suite working (CI;
  about 1 minute); asserts no timing.

Besides saturation, latency, live codes, instances, round trips and memory, it measures
(issue 15) the service's and Redis's CPU and Redis's commands per failed guess and per
heartbeat (closed loops on the same process, right after the saturation runs), "one
code, many phones" (10 apps claiming the 10 uses of one code at once) against the spread
mix, the events delivered per pair in both, and a presence storm: N runners' retained
statuses and some Last Wills replayed to one instance after a broker restart, with pair
requests answered meanwhile.

Before and after: --save-baseline FILE keeps this run's key figures (commit, date,
machine, ratios, round trips, bytes, profile summary); --baseline FILE (default
benchmarks/baseline.json when it exists) compares this run with such a file in the report.
A smoke run without a baseline compares the run with its own figures, to keep that code
working.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import redis
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from benchmarks import baseline, inproc, profile, report, storm
from benchmarks.loadgen import EndlessJobs, Job, JobQueue, LoadGenerator, RunResult
from benchmarks.stack import (
    CLUSTER_MASTERS,
    CLUSTER_SHARDS,
    REPO_ROOT,
    CodeFactory,
    Process,
    Servers,
    Stoppable,
    cluster_env,
    commandstats,
    commandstats_delta,
    embedded_redis_url,
    free_listen,
    launch_service,
    metric_sum,
    redis_cluster,
    scrape_metrics,
    start_echo,
    start_service,
    wait_ready,
    which,
)
from mqtt_pairing.store.keys import KeySchema
from tests.harness.servers import MosquittoBroker, RedisClusterServers

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
# The storm's broker: as the main one (benchmarks/stack.py), but with persistence, so that
# retained statuses survive its restart.
STORM_MOSQUITTO = "\n# benchmarks: presence storm\npersistence true\nmax_queued_messages 100000\n"
DEFAULT_REPORT = REPO_ROOT / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class Plan:
    """How long and how big each step is."""

    name: str
    warmup_s: float
    duration_s: float
    concurrency: tuple[int, ...]
    load_points: tuple[float, ...]
    rt_requests: int
    memory_full: int
    memory_bulk: int
    big_codes: int
    profile_s: float
    embedded_concurrency: int
    shared_multipliers: tuple[int, ...]
    cluster_multipliers: tuple[int, ...]
    cluster_max_concurrency: int = 1 << 20
    # The presence storm: runners whose retained status the broker replays after its
    # restart, and the longest the storm step waits for the service to record them all.
    storm_runners: int = 100_000
    storm_cap_s: float = 300.0


PLANS = {
    "full": Plan("full", 2.0, 10.0, (16, 64, 256), (0.25, 0.5, 0.9), 200, 10_000, 100_000,
                 1_000_000, 10.0, 32, (1, 2), (1, 3)),
    "quick": Plan("quick", 1.0, 4.0, (64,), (0.25, 0.5, 0.9), 50, 2_000, 100_000, 100_000,
                  4.0, 32, (1,), (1,), storm_runners=20_000, storm_cap_s=120.0),
    "smoke": Plan("smoke", 0.3, 1.0, (32,), (0.5,), 5, 100, 5_000, 10_000, 0.0, 16, (1,),
                  (1,), 8, storm_runners=1_000, storm_cap_s=60.0),
}  # fmt: skip

# "One code, many phones": apps claiming the uses of one code at once.
MANY_PHONES_USES = 10
# Apps of the failed-guess step (8 connections of 128): each app makes few guesses.
GUESS_APP_CONNECTIONS = 8
GUESS_APPS_PER_CONNECTION = 128
# Heartbeats outstanding in the heartbeat step, and how many runners take turns.
HEARTBEAT_CONCURRENCY = 256
# The presence storm: share of the runners whose Last Will (offline) fires before the
# restart (at most STORM_WILLS_MAX), pair requests per second during the storm, and the
# storm service's own topic and key prefixes (its own presence lease).
STORM_WILL_SHARE = 0.1
STORM_WILLS_MAX = 5_000
STORM_PAIR_RATE = 100.0
STORM_PREFIX = "bench-st"
STORM_KEY_PREFIX = "storm"

SMALL_CODES = 1_000
# The cluster step's instances: their own topic prefix and shared-subscription group, so
# that no instance on the single Redis (or its parked session) takes their requests.
CLUSTER_PREFIX = "bench-cl"
CLUSTER_INSTANCES = 3
# How long the cluster step waits, after a run's own drain, for replies still missing.
LATE_REPLIES_S = 30.0
STEPS = 13


class Ui:
    """Progress display: one bar for the suite, one for the current step."""

    def __init__(self, steps: int) -> None:
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            refresh_per_second=4,
        )
        self.suite: TaskID = self.progress.add_task("suite", total=steps, status="")
        self.step: TaskID = self.progress.add_task("", total=1.0, status="")

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[Callable[[float, str], None]]:
        self.progress.update(self.step, description=name, completed=0, status="")
        t = time.perf_counter()

        def update(fraction: float, status: str = "") -> None:
            self.progress.update(self.step, completed=min(1.0, fraction), status=status)

        yield update
        self.progress.update(self.step, completed=1.0)
        self.progress.advance(self.suite)
        self.log(f"{name}: done in {time.perf_counter() - t:.1f} s")

    def log(self, text: str) -> None:
        self.progress.console.log(text)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sub(step: Any, k: int, parts: int, label: str) -> Callable[[float, str], None]:
    """The progress of part `k` of `parts` of a step."""

    def update(f: float, st: str) -> None:
        step((k + f) / parts, f"{label} {st}")

    return update


def _lat(res: RunResult) -> str:
    d = res.reply_ms
    return f"p50 {d.get('p50', 0):.1f} ms, p99 {d.get('p99', 0):.1f} ms" if d else "no replies"


def machine_info(servers: Servers) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mosquitto = subprocess.run(
        [which("mosquitto"), "-h"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    with servers.redis_client() as r:
        redis_version = r.info("server")["redis_version"]

    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis": redis_version,
        "mosquitto": mosquitto[0].removeprefix("mosquitto version ") if mosquitto else "?",
        "packages": {
            p: version(p) for p in ("aiomqtt", "paho-mqtt", "redis", "amqtt", "fakeredis")
        },
        "load_average_at_start": os.getloadavg(),
    }


class Suite:
    def __init__(self, plan: Plan, ui: Ui, workdir: Path, stamp: str = "latest") -> None:
        self.stamp = stamp
        self.plan = plan
        self.ui = ui
        self.workdir = workdir
        self.servers = Servers(workdir)
        self.results: dict[str, Any] = {"plan": plan.__dict__}
        self._procs: list[Stoppable] = []
        self._paired_runners: dict[str, None] = {}  # in order, without duplicates

    # ---- helpers ------------------------------------------------------------------------

    def _gen(self, prefix: str, **kwargs: Any) -> LoadGenerator:
        gen = LoadGenerator(
            self.servers.mosquitto.host, self.servers.mosquitto.port, prefix, **kwargs
        )
        gen.start()
        return gen

    def _codes_for(self, factory: CodeFactory, rate: float) -> deque[Job]:
        n = int(rate * (self.plan.warmup_s + self.plan.duration_s) * 1.3) + 200
        return factory.issue(n)

    def _closed(
        self,
        gen: LoadGenerator,
        jobs: JobQueue,
        concurrency: int,
        step: Any,
        *,
        server: Process | None = None,
        cpu_of: dict[str, list[int]] | None = None,
        commands_of: redis.Redis | None = None,
    ) -> RunResult:
        """A closed-loop run, and the CPU time per answered request of `cpu_of` (name ->
        processes, summed; by default `server` if given, Mosquitto and Redis); with
        `commands_of`, also that Redis's commands (INFO commandstats, inside scripts
        too) per answered request."""
        pids = cpu_of if cpu_of is not None else self._cpu_of([server] if server else [])

        def cpu(group: list[int]) -> float:
            return sum(cpu_seconds(p) for p in group)

        stats0 = commandstats(commands_of) if commands_of is not None else None
        before = {k: cpu(p) for k, p in pids.items()}
        t = time.perf_counter()
        res = gen.run_closed(
            jobs,
            concurrency=concurrency,
            duration_s=self.plan.duration_s,
            warmup_s=self.plan.warmup_s,
            progress=step,
        )
        wall = time.perf_counter() - t
        answered = res.messages_in.get("reply", 0)
        if answered:
            used = {k: cpu(p) - before[k] for k, p in pids.items()}
            res.cpu_ms_per_request = {k: v * 1000 / answered for k, v in used.items()}
            res.cpu_share = {k: v / wall for k, v in used.items()}
            if commands_of is not None and stats0 is not None:
                delta = commandstats_delta(stats0, commandstats(commands_of))
                delta.pop("info", None)
                res.redis_commands_per_request = sum(delta.values()) / answered
        return res

    def _cpu_of(
        self, services: list[Process], redis_pids: list[int] | None = None
    ) -> dict[str, list[int]]:
        """What `_closed` measures: the service instances, Mosquitto, Redis and the load
        generator (this process)."""
        pids = {"server": [p.pid for p in services]} if services else {}
        pids["generator"] = [os.getpid()]
        proc = self.servers.mosquitto.process
        if proc is not None:
            pids["mosquitto"] = [proc.pid]
        if redis_pids is None:
            proc = self.servers.redis.process
            redis_pids = [proc.pid] if proc is not None else []
        if redis_pids:
            pids["redis"] = redis_pids
        return pids

    def _open(self, gen: LoadGenerator, jobs: deque[Job], rate: float, step: Any) -> RunResult:
        return gen.run_open(
            jobs, rate=rate, duration_s=self.plan.duration_s, warmup_s=self.plan.warmup_s,
            progress=step,
        )  # fmt: skip

    def _start(self, proc: Process) -> Process:
        self._procs.append(proc)
        return proc

    def _stop(self, proc: Stoppable) -> None:
        proc.stop()
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)

    def close(self) -> None:
        """Stop everything this suite started, newest first (services before their Redis)."""
        for proc in self._procs:
            if isinstance(proc, Process):
                with contextlib.suppress(Exception):
                    proc.terminate()  # all at once: each takes a while to shut down
        for proc in reversed(list(self._procs)):
            with contextlib.suppress(Exception):
                proc.stop()
        self._procs.clear()
        self.servers.stop()

    # ---- steps --------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        ui = self.ui
        with ui.stage("start Redis and Mosquitto"):
            self.servers.start()
            self.results["machine"] = machine_info(self.servers)
        self.results["started_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.single_service()
        self.presence_storm()
        self.cluster()
        self.round_trips()
        self.memory()
        self.embedded()
        return self.results

    def single_service(self) -> None:
        plan = self.plan
        s = self.servers
        factory = CodeFactory(s.redis_client())
        with self.ui.stage("start the service and the echo"):
            svc = self._start(
                start_service("svc-1", self.workdir, mqtt_url=s.mosquitto.url,
                              redis_url=s.redis.url, prefix="bench")
            )  # fmt: skip
            echo = self._start(start_echo(self.workdir, s.mosquitto.url, "echo"))
            gen = self._gen("bench")
            echo_gen = self._gen("echo", echo=True)
        echo_jobs = EndlessJobs()
        stats_client = s.redis_client()

        # Echo and pair runs alternate, so that each ratio compares runs seconds apart.
        with self.ui.stage("saturation: pair and echo (closed loop)") as step:
            runs, echo_runs = [], []
            parts = 2 * len(plan.concurrency)
            for i, c in enumerate(plan.concurrency):

                def sub(f: float, st: str, c: int = c, k: int = 2 * i) -> None:
                    step((k + f) / parts, f"echo c={c} {st}")

                res = self._closed(echo_gen, echo_jobs, c, sub, server=echo)
                echo_runs.append(res.as_dict())
                self.ui.log(f"echo c={c}: {res.throughput:.0f}/s, {_lat(res)}")
                jobs = self._codes_for(factory, max(res.throughput, 200))

                def sub2(f: float, st: str, c: int = c, k: int = 2 * i + 1) -> None:
                    step((k + f) / parts, f"pair c={c} {st}")

                res = self._closed(gen, jobs, c, sub2, server=svc, commands_of=stats_client)
                self._paired_runners.update(dict.fromkeys(gen.ok_runners()))
                runs.append(res.as_dict())
                self.ui.log(f"pair c={c}: {res.throughput:.0f}/s, {_lat(res)}, errors {res.errors}")
            best = max(runs, key=lambda r: r["throughput"])
            self.results["saturation"] = {"runs": runs, "best": best}
            echo_best = max(echo_runs, key=lambda r: r["throughput"])
            self.results["echo"] = {"runs": echo_runs, "best": echo_best}
        echo_gen.close()
        self._stop(echo)
        rate = best["throughput"]
        best_c = best["concurrency"]

        with self.ui.stage("many phones, failed guesses, heartbeats (closed loop)") as step:
            self._mixes(svc, gen, factory, best_c, max(rate, 200.0), stats_client, step)
        stats_client.close()

        with self.ui.stage("latency at 25/50/90% of saturation (open loop)") as step:
            points = []
            for share in plan.load_points:
                jobs = self._codes_for(factory, rate * share)
                res = self._open(gen, jobs, max(1.0, rate * share), step)
                d = res.as_dict()
                d["load_share"] = share
                points.append(d)
                self.ui.log(f"open {share:.0%} ({rate * share:.0f}/s): {_lat(res)}")
            self.results["latency"] = points

        if plan.profile_s > 0 and profile.py_spy() is not None:
            with self.ui.stage("profile the service (py-spy)") as step:
                self._profile(svc, gen, factory, best_c, rate, step)
        else:
            reason = "smoke run" if plan.profile_s <= 0 else "py-spy is not installed"
            self.results["profile"] = {"skipped": reason}

        with self.ui.stage("latency with 1k vs 1M live codes") as step:
            # At least 1/s: an overloaded machine can leave a smoke run without a pair.
            self._live_codes(gen, factory, max(1.0, rate * 0.5), step)

        # Last of the steps on this broker: a stopped instance keeps its share of the
        # group's messages parked in its session (MQTT_SESSION_EXPIRY_S) for a while.
        with self.ui.stage("two instances on a shared subscription") as step:
            self._shared(svc, gen, factory, best_c, rate, step)

        gen.close()
        self._stop(svc)
        factory.r.close()

    def _profile(
        self, svc: Process, gen: LoadGenerator, factory: CodeFactory, c: int, rate: float,
        step: Any,
    ) -> None:  # fmt: skip
        raw = self.workdir / "profile.raw"
        jobs = factory.issue(int(rate * (self.plan.profile_s + 3) * 1.3) + 200)
        rec = profile.start_recording(svc.pid, self.plan.profile_s + 1, raw)
        time.sleep(0.5)
        res = gen.run_closed(
            jobs, concurrency=c, duration_s=self.plan.profile_s, warmup_s=0.5, progress=step
        )
        _, err = rec.communicate(timeout=60)
        if rec.returncode != 0 or not raw.exists():
            self.results["profile"] = {"skipped": f"py-spy failed: {err.decode()[-300:]}"}
            return
        analysis = profile.analyse(raw)
        analysis["throughput_while_profiling"] = res.throughput
        analysis["concurrency"] = c
        self.results["profile"] = analysis
        kept = RESULTS_DIR / f"{self.stamp}-profile.raw"
        kept.write_bytes(raw.read_bytes())
        analysis["raw"] = str(_rel(kept))

    def _shared(
        self,
        svc1: Process,
        gen: LoadGenerator,
        factory: CodeFactory,
        c: int,
        rate: float,
        step: Any,
    ) -> None:
        s = self.servers
        rate = max(rate, 200.0)
        one = self._closed(gen, self._codes_for(factory, rate * 2.5), c, step, server=svc1)
        svc2 = self._start(
            start_service("svc-2", self.workdir, mqtt_url=s.mosquitto.url,
                          redis_url=s.redis.url, prefix="bench")
        )  # fmt: skip
        before = [p.log().count(" paired ") for p in (svc1, svc2)]
        runs = {}
        for conc in sorted({c * k for k in self.plan.shared_multipliers}):
            runs[conc] = self._closed(
                gen, self._codes_for(factory, rate * 2.5), conc, step,
                cpu_of=self._cpu_of([svc1, svc2]),
            )  # fmt: skip
        handled = [p.log().count(" paired ") - b for p, b in zip((svc1, svc2), before, strict=True)]
        self._stop(svc2)
        two = max(runs.values(), key=lambda r: r.throughput)
        handled_by_2, total = handled[1], sum(handled)
        self.results["shared"] = {
            "one": one.as_dict(),
            "two": two.as_dict(),
            "two_runs": [r.as_dict() for r in runs.values()],
            "ratio": two.throughput / one.throughput if one.throughput else 0.0,
            "second_instance_share": handled_by_2 / total if total else 0.0,
        }
        self.ui.log(f"shared: one {one.throughput:.0f}/s, two {two.throughput:.0f}/s")

    def _mixes(
        self,
        svc: Process,
        gen: LoadGenerator,
        factory: CodeFactory,
        c: int,
        rate: float,
        stats: redis.Redis,
        step: Any,
    ) -> None:
        """Right after the saturation runs, on the same service process and broker.

        - the spread mix again (one code, one runner per pair), then
        - many phones: codes of `MANY_PHONES_USES` uses, each claimed by that many apps at
          once (the code's jobs come in a row, sent from consecutive apps), closed loop at
          the spread mix's best concurrency;
        - failed guesses: never-issued codes from 1,024 apps, closed loop at the same
          concurrency;
        - heartbeats: the runners paired in the spread mix (one session each) send `{}`
          heartbeats, `HEARTBEAT_CONCURRENCY` outstanding, completions read from /metrics.
        Each with the service's CPU (/proc) and Redis's commands (commandstats) per operation.
        """
        out: dict[str, Any] = {}
        parts = 4
        # A spread-mix run right before, so that the many-phones ratio compares runs
        # seconds apart (as pair/echo does).
        res = self._closed(
            gen, self._codes_for(factory, rate), c, _sub(step, 0, parts, "spread mix"),
            server=svc, commands_of=stats,
        )  # fmt: skip
        out["spread"] = res.as_dict()
        self.ui.log(
            f"spread mix c={c}: {res.throughput:.0f} pairs/s, {_lat(res)}, "
            f"events/pair {res.events_per_pair or 0:.2f}"
        )
        n = int(rate * (self.plan.warmup_s + self.plan.duration_s) * 1.3 / MANY_PHONES_USES) + 20
        jobs = factory.issue(n, "mp", max_uses=MANY_PHONES_USES)
        res = self._closed(
            gen, jobs, c, _sub(step, 1, parts, "many phones"), server=svc, commands_of=stats
        )  # fmt: skip
        d = res.as_dict()
        d["uses_per_code"] = MANY_PHONES_USES
        out["many_phones"] = d
        self.ui.log(
            f"many phones c={c}: {res.throughput:.0f} pairs/s, {_lat(res)}, errors {res.errors}, "
            f"events/pair {res.events_per_pair or 0:.2f}"
        )

        guess_gen = self._gen(
            "bench", app_connections=GUESS_APP_CONNECTIONS,
            apps_per_connection=GUESS_APPS_PER_CONNECTION,
        )  # fmt: skip
        n = int(max(rate * 4, 1000) * (self.plan.warmup_s + self.plan.duration_s) * 1.3) + 200
        res = self._closed(
            guess_gen, factory.wrong_guesses(n), c, _sub(step, 2, parts, "failed guesses"),
            server=svc, commands_of=stats,
        )  # fmt: skip
        guess_gen.close()
        d = res.as_dict()
        d["apps"] = GUESS_APP_CONNECTIONS * GUESS_APPS_PER_CONNECTION
        out["failed_guess"] = d
        self.ui.log(
            f"failed guesses c={c}: {res.answered_per_s:.0f}/s, {_lat_any(res)}, "
            f"outcomes {res.errors}"
        )

        runners = list(self._paired_runners)[:4096] or [f"hb-{i}" for i in range(256)]
        port = svc.health_port
        assert port is not None

        def handled() -> int:
            return int(
                metric_sum(scrape_metrics(port), "mqtt_pairing_replies_total",
                           op="heartbeat", outcome="ok")
            )  # fmt: skip

        pids = self._cpu_of([svc])
        cpu0 = {k: sum(cpu_seconds(p) for p in g) for k, g in pids.items()}
        stats0 = commandstats(stats)
        t = time.perf_counter()
        hb = gen.run_heartbeats(
            runners, concurrency=HEARTBEAT_CONCURRENCY, duration_s=self.plan.duration_s,
            warmup_s=self.plan.warmup_s, handled=handled,
            progress=_sub(step, 3, parts, "heartbeats"),
        )  # fmt: skip
        wall = time.perf_counter() - t
        delta = commandstats_delta(stats0, commandstats(stats))
        delta.pop("info", None)
        done = hb["handled"]
        if done:
            used = {k: sum(cpu_seconds(p) for p in g) - cpu0[k] for k, g in pids.items()}
            hb["cpu_ms_per_request"] = {k: v * 1000 / done for k, v in used.items()}
            hb["cpu_share"] = {k: v / wall for k, v in used.items()}
            hb["redis_commands_per_request"] = sum(delta.values()) / done
            hb["commands_per_request"] = {k: v / done for k, v in sorted(delta.items())}
        out["heartbeat"] = hb
        self.ui.log(
            f"heartbeats: {hb['per_s']:.0f}/s, {hb['handled']}/{hb['sent']} handled, "
            f"{hb.get('cpu_ms_per_request', {}).get('server', 0):.3f} ms CPU each"
        )
        self.results["mixes"] = out

    # ---- the presence storm ---------------------------------------------------------------

    def presence_storm(self) -> None:
        """N runners' retained statuses (and some Last Wills) after a broker restart.

        Its own Mosquitto with persistence and its own service instance (topic prefix
        `STORM_PREFIX`, key prefix `STORM_KEY_PREFIX`, so its own presence lease on the
        same Redis; `MQTT_RECONNECT_MAX_S=1` so the reconnect backoff does not dominate).
        The service connects and subscribes; the broker is stopped (its database saved);
        while it is down the runners' statuses are written into that database through a
        loader broker on another port sharing the persistence directory (a few raw
        connections publish the retained `online` statuses, then one short connection per
        Last Will runner is dropped so that the broker publishes its retained `offline`);
        then the broker starts again on its port and replays every retained status to the
        service's presence subscription. Done when the service has counted N status
        messages (`mqtt_pairing_events_total{name="status"}` on /metrics) and Redis holds
        the expected presence of all N runners (one EVAL reading every runner hash).
        Meanwhile pair requests go out at `STORM_PAIR_RATE`/s (open loop).
        """
        plan = self.plan
        s = self.servers
        n = plan.storm_runners
        wills = min(STORM_WILLS_MAX, int(n * STORM_WILL_SHARE))
        tag = f"st{uuid.uuid4().hex[:4]}-"
        with self.ui.stage(
            f"presence storm: {n:,} retained statuses after a broker restart"
        ) as step:
            broker = MosquittoBroker(
                which("mosquitto"), self.workdir / "storm-mosquitto", extra_config=STORM_MOSQUITTO
            )  # fmt: skip
            self._procs.append(broker)
            broker.start()
            svc = self._start(
                start_service(
                    "storm", self.workdir, mqtt_url=broker.url, redis_url=s.redis.url,
                    prefix=STORM_PREFIX, group=STORM_PREFIX,
                    extra_env={"PAIRING_KEY_PREFIX": STORM_KEY_PREFIX,
                               "MQTT_RECONNECT_MAX_S": "1"},
                )
            )  # fmt: skip
            port = svc.health_port
            assert port is not None

            def metrics() -> dict[str, float]:
                return scrape_metrics(port)

            deadline = time.monotonic() + 30
            while metric_sum(metrics(), "mqtt_pairing_presence_connected") < 1:
                if time.monotonic() > deadline:
                    raise RuntimeError("storm service: no presence connection after 30 s")
                time.sleep(0.1)
            rclient = s.redis_client()
            factory = CodeFactory(rclient, key_prefix=STORM_KEY_PREFIX)
            jobs = factory.issue(int(STORM_PAIR_RATE * plan.storm_cap_s * 1.1) + 100, "sp")

            step(0.02, "stopping the broker")
            broker.stop()
            loader = MosquittoBroker(which("mosquitto"), self.workdir / "storm-loader")
            loader.config_path.write_text(
                loader.config_path.read_text().replace(
                    str(loader.persistence_dir), str(broker.persistence_dir)
                )
            )
            self._procs.append(loader)
            t = time.perf_counter()
            loader.start()
            ids = [f"{tag}{i}" for i in range(n)]
            topics = [f"{STORM_PREFIX}/runners/{r}/status" for r in ids]
            storm.publish_retained(
                loader.host, loader.port, [(t_, storm.ONLINE) for t_ in topics], tag=tag,
                progress=lambda f: step(0.02 + 0.2 * f, "loading retained statuses"),
            )  # fmt: skip
            storm.fire_wills(
                loader.host, loader.port, topics[:wills], tag=tag,
                progress=lambda f: step(0.22 + 0.05 * f, "firing Last Wills"),
            )  # fmt: skip
            time.sleep(0.5)  # let the broker take the last dropped connections in
            storm.ping(loader.host, loader.port, tag=tag)
            self._stop(loader)
            load_s = time.perf_counter() - t

            m0 = metrics()
            status0 = metric_sum(m0, "mqtt_pairing_events_total", name="status")
            pids = {"server": [svc.pid], "redis": self._cpu_of([])["redis"]}
            cpu0 = {k: sum(cpu_seconds(p) for p in g) for k, g in pids.items()}
            stats0 = commandstats(rclient)
            step(0.3, "restarting the broker")
            t0 = time.perf_counter()
            broker.start()
            broker_start_s = time.perf_counter() - t0
            wait_ready(svc)
            ready_s = time.perf_counter() - t0
            gen = LoadGenerator(broker.host, broker.port, STORM_PREFIX)
            gen.start()
            template = KeySchema(STORM_KEY_PREFIX).runner("\\x00")
            key_template = tuple(template.split("\\x00", 1))
            state: dict[str, Any] = {
                "verify_polls": 0, "done": None, "last_check": 0.0, "counted": -1.0,
                "changed": time.perf_counter(),
            }  # fmt: skip

            def done() -> bool:
                """Counted N statuses (or the count stalled 2 s: some were dropped and the
                service reconciles), and Redis holds every runner's expected presence."""
                now = time.perf_counter()
                counted = metric_sum(metrics(), "mqtt_pairing_events_total", name="status")
                counted -= status0
                step(0.35 + 0.6 * min(1.0, counted / n), f"{int(counted):,}/{n:,} statuses")
                if counted != state["counted"]:
                    state["counted"], state["changed"] = counted, now
                stalled = now - state["changed"] >= 2.0 and now - state["last_check"] >= 2.0
                if counted < n and not stalled:
                    return False
                snap = {
                    "t": now,
                    "cpu": {k: sum(cpu_seconds(p) for p in g) for k, g in pids.items()},
                    "stats": commandstats(rclient),
                    "counted": counted,
                    "polls_before": state["verify_polls"],
                    "pairs": gen.ok_so_far(),
                }
                state["last_check"] = now
                state["verify_polls"] += 1
                check = storm.count_recorded(rclient, key_template, tag, n, wills)  # type: ignore[arg-type]
                snap["check"] = check
                state["last"] = snap
                if check["ok"] == n:
                    state["done"] = snap
                    return True
                return False

            pairs = gen.run_open(
                jobs, rate=STORM_PAIR_RATE, duration_s=plan.storm_cap_s, warmup_s=0.0,
                until=done,
            )  # fmt: skip
            gen.close()
            end = state["done"] or state.get("last")
            m1 = metrics()
            self._stop(svc)
            problems = _log_problems(svc)
            self._stop(broker)
            with contextlib.suppress(ValueError):
                self._procs.remove(broker)
            with contextlib.suppress(ValueError):
                self._procs.remove(loader)
        out: dict[str, Any] = {
            "runners": n,
            "wills": wills,
            "load_s": load_s,
            "broker_start_s": broker_start_s,
            "service_ready_s": ready_s,
            "pair_rate": STORM_PAIR_RATE,
            "completed": state["done"] is not None,
            "completion_signal": (
                'mqtt_pairing_events_total{name="status"} on /metrics reaching N, then one '
                "EVAL in Redis finding every runner's expected status in its runner hash"
            ),
            "pairs": pairs.as_dict(),
            "counters": {
                k.split('name="', 1)[1].rstrip('"}'): v
                for k, v in m1.items()
                if k.startswith("mqtt_pairing_events_total")
                and any(w in k for w in ("status", "presence", "shed", "dropped", "reconcil"))
            },
            "log_problems": problems[:10],
            "log_problem_count": len(problems),
        }
        if end is not None:
            delta = commandstats_delta(stats0, end["stats"])
            delta.pop("info", None)
            # the completion checks made before the last snapshot: one EVAL of N HGETs each
            polls = end["polls_before"]
            if polls:
                for cmd, k in (("eval", polls), ("hget", polls * n)):
                    delta[cmd] = max(0, delta.get(cmd, 0) - k)
            total = sum(delta.values())
            pair_cmds = self._spread_commands_per_pair()
            pairs_done = end["pairs"]
            status_cmds = total - (pair_cmds or 0.0) * pairs_done
            out.update(
                {
                    "duration_s": end["t"] - t0,
                    "check": end["check"],
                    "statuses_counted": end["counted"],
                    "service_cpu_s": end["cpu"]["server"] - cpu0["server"],
                    "redis_cpu_s": end["cpu"]["redis"] - cpu0["redis"],
                    "redis_commands": total,
                    "pairs_during_storm": pairs_done,
                    "pair_commands_subtracted": (pair_cmds or 0.0) * pairs_done,
                    "redis_commands_per_status": status_cmds / n,
                    "commands": dict(sorted(delta.items())),
                }
            )
        self.results["presence_storm"] = out
        self.ui.log(
            f"presence storm: {n:,} statuses in {out.get('duration_s', float('nan')):.1f} s "
            f"(complete: {out['completed']}), pairs {_lat(pairs)}, errors {pairs.errors}, "
            f"lost {pairs.lost_replies}"
        )

    def _spread_commands_per_pair(self) -> float | None:
        """Redis commands per pair in the saturation runs (the spread mix), their mean."""
        runs = self.results.get("saturation", {}).get("runs", [])
        values = [
            r["redis_commands_per_request"] for r in runs if r.get("redis_commands_per_request")
        ]
        return sum(values) / len(values) if values else None

    # ---- Redis Cluster ------------------------------------------------------------------

    def _start_cluster(self, attempts: int = 3) -> RedisClusterServers:
        """A started 3-master cluster, registered for stopping before it starts."""
        for attempt in range(attempts):
            cluster = redis_cluster(self.workdir)
            self._procs.append(cluster)
            try:
                cluster.start()
            except RuntimeError:
                self._stop(cluster)  # ports taken meanwhile: new ones next time
                if attempt == attempts - 1:
                    raise
                continue
            return cluster
        raise AssertionError("unreachable")

    def _with_late_replies(self, gen: LoadGenerator, res: RunResult) -> dict[str, Any]:
        """`res` as a dict; with missing replies, also how many came late (`late_replies`)."""
        d = res.as_dict()
        if res.lost_replies:
            d["late_replies"] = gen.wait_late_replies(LATE_REPLIES_S)
            d["late_wait_s"] = LATE_REPLIES_S
            self.ui.log(
                f"{res.lost_replies} replies missing after the run; {d['late_replies']} came "
                f"within a further {LATE_REPLIES_S:.0f} s"
            )
        return d

    def cluster(self) -> None:
        """Closed-loop pairs with 1 and with 3 instances (one `$share` group) on a cluster.

        Same broker, same generator, the concurrency of the single-instance saturation; the
        instances use `REDIS_CLUSTER_URL` and spread the global keys over
        `CLUSTER_SHARDS` shards. The first instance runs alone, then two more join its
        group (started side by side) and all three run together.
        """
        plan = self.plan
        s = self.servers
        best = self.results["saturation"]["best"]
        rate = max(float(best["throughput"]), 200.0)
        c = min(int(best["concurrency"]), plan.cluster_max_concurrency)
        concs = sorted({c * k for k in plan.cluster_multipliers})
        parts = 1 + len(concs)
        title = f"Redis Cluster ({CLUSTER_MASTERS} masters): 1 vs {CLUSTER_INSTANCES} instances"
        with self.ui.stage(title) as step:
            step(0.0, "forming the cluster")
            t = time.perf_counter()
            cluster = self._start_cluster()
            formed_s = time.perf_counter() - t
            node_pids = [n.process.pid for n in cluster.nodes if n.process is not None]
            client = cluster.client(decode_responses=True)
            factory = CodeFactory(client)

            def launch(name: str) -> Process:
                return self._start(
                    launch_service(
                        name, self.workdir, mqtt_url=s.mosquitto.url, redis_url=None,
                        prefix=CLUSTER_PREFIX, group=CLUSTER_PREFIX,
                        extra_env=cluster_env(cluster),
                    )
                )  # fmt: skip

            step(0.0, "starting instance 1")
            svcs = [launch("cl-1")]
            wait_ready(svcs[0])
            gen = self._gen(CLUSTER_PREFIX)
            one = self._closed(
                gen, self._codes_for(factory, rate * 1.5), c, _sub(step, 0, parts, "1 instance"),
                cpu_of=self._cpu_of(svcs, node_pids),
            )  # fmt: skip
            one_d = self._with_late_replies(gen, one)
            self.ui.log(f"cluster, 1 instance c={c}: {one.throughput:.0f}/s, {_lat(one)}")
            step(1 / parts, f"starting {CLUSTER_INSTANCES - 1} more instances")
            more = [launch(f"cl-{i}") for i in range(2, CLUSTER_INSTANCES + 1)]
            for proc in more:
                wait_ready(proc)
            svcs += more
            before = [p.log().count(" paired ") for p in svcs]
            runs: list[RunResult] = []
            run_ds: list[dict[str, Any]] = []
            for k, conc in enumerate(concs, start=1):
                res = self._closed(
                    gen, self._codes_for(factory, rate * 2.5), conc,
                    _sub(step, k, parts, f"{CLUSTER_INSTANCES} instances"),
                    cpu_of=self._cpu_of(svcs, node_pids),
                )  # fmt: skip
                runs.append(res)
                run_ds.append(self._with_late_replies(gen, res))
                self.ui.log(
                    f"cluster, {CLUSTER_INSTANCES} instances c={conc}: {res.throughput:.0f}/s, "
                    f"{_lat(res)}, errors {res.errors}, no reply in time {res.lost_replies} "
                    f"(late {run_ds[-1].get('late_replies', 0)})"
                )
            handled = [p.log().count(" paired ") - b for p, b in zip(svcs, before, strict=True)]
            keys = []
            for node in cluster.masters():
                with node.client() as nc:
                    keys.append(int(nc.dbsize()))
            gen.close()
            for proc in svcs:
                proc.terminate()  # all at once: each takes a while to shut down
            for proc in svcs:
                self._stop(proc)
            problems = [line for p in svcs for line in _log_problems(p)]
            client.close()
            self._stop(cluster)
        best3 = max(range(len(runs)), key=lambda i: runs[i].throughput)
        three = runs[best3]
        total = sum(handled)
        self.results["cluster"] = {
            "masters": CLUSTER_MASTERS,
            "replicas": 0,
            "instances": CLUSTER_INSTANCES,
            "index_shards": CLUSTER_SHARDS,
            "global_fail_shards": CLUSTER_SHARDS,
            "formed_s": formed_s,
            "one": one_d,
            "three": run_ds[best3],
            "three_runs": run_ds,
            "ratio": three.throughput / one.throughput if one.throughput else 0.0,
            "instance_shares": [h / total if total else 0.0 for h in handled],
            "keys_per_master": keys,
            "log_problems": problems[:10],
            "log_problem_count": len(problems),
        }

    def _live_codes(
        self,
        gen: LoadGenerator,
        factory: CodeFactory,
        rate: float,
        step: Any,
    ) -> None:
        r = factory.r
        big = self.plan.big_codes
        out: dict[str, Any] = {"rate": rate, "big": big, "runs": []}

        def measure(label: str) -> None:
            live = int(r.info("keyspace").get("db0", {}).get("keys", 0))
            res = self._open(gen, self._codes_for(factory, rate), rate, step)
            d = res.as_dict()
            d["label"] = label
            d["keys_in_redis"] = live
            d["used_memory"] = int(r.info("memory")["used_memory"])
            out["runs"].append(d)
            self.ui.log(f"{label}: {_lat(res)} ({live} keys)")

        # Each live code comes with the tombstone records of the codes that expired
        # before it at the same issue rate, as in a steady state (the lookup reads them).
        r.flushall()
        factory.fill(SMALL_CODES)
        factory.fill_expired(SMALL_CODES)
        measure("1k")
        factory.fill(big - SMALL_CODES, progress=lambda f: step(f / 2, f"writing {big:,} codes"))
        out["expired_records"] = factory.fill_expired(
            big, progress=lambda f: step(0.5 + f / 2, "writing their expired codes' records")
        )
        time.sleep(2.0)  # let Redis finish rehashing its main table
        measure("big")
        r.flushall()
        if self.plan.name != "smoke":
            factory.fill(SMALL_CODES)
            factory.fill_expired(SMALL_CODES)
            measure("1k again")
            r.flushall()
        self.results["live_codes"] = out

    def round_trips(self) -> None:
        with self.ui.stage("Redis round trips and commands (in-process service)") as step:
            self.results["round_trips"] = asyncio.run(
                inproc.count_round_trips(
                    self.servers,
                    n_ok=self.plan.rt_requests,
                    n_fail=self.plan.rt_requests,
                    progress=step,
                )
            )
            step(1.0, "client CPU per round trip")
            self.results["round_trips"]["client_cpu"] = asyncio.run(
                inproc.round_trip_cpu(self.servers, batches=max(200, self.plan.rt_requests * 40))
            )

    def memory(self) -> None:
        with self.ui.stage("Redis memory per code and per session") as step:
            self.results["memory"] = asyncio.run(
                inproc.measure_memory(
                    self.servers,
                    n_full=self.plan.memory_full,
                    n_bulk=self.plan.memory_bulk,
                    progress=step,
                )
            )

    def embedded(self) -> None:
        with self.ui.stage("embedded default (amqtt + in-memory store)") as step:
            listen = free_listen()
            host, port = listen.split(":")
            svc = self._start(
                start_service("embedded", self.workdir, mqtt_url=None, redis_url=None,
                              prefix="bench-emb", listen=listen)
            )  # fmt: skip
            client = redis.Redis.from_url(embedded_redis_url(svc), decode_responses=True)
            factory = CodeFactory(client)
            gen = LoadGenerator(host, int(port), "bench-emb", protocol="3.1.1")
            gen.start()
            c = self.plan.embedded_concurrency
            jobs = self._codes_for(factory, 400)
            sat = self._closed(gen, jobs, c, step)
            rate = max(1.0, sat.throughput * 0.5)
            half = self._open(gen, self._codes_for(factory, rate), rate, step)
            gen.close()
            client.close()
            self._stop(svc)
            self.results["embedded"] = {"saturation": sat.as_dict(), "half": half.as_dict()}
            self.ui.log(f"embedded: {sat.throughput:.0f}/s; at 50%: {_lat(half)}")


def _lat_any(res: RunResult) -> str:
    """Latency of every answered request (failed guesses included)."""
    d = res.reply_ms_all
    return f"p50 {d.get('p50', 0):.1f} ms, p99 {d.get('p99', 0):.1f} ms" if d else "no replies"


def _log_problems(proc: Process) -> list[str]:
    """ERROR/CRITICAL lines and tracebacks in a service's log."""
    out = []
    for line in proc.log().splitlines():
        if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback"):
            out.append(f"{proc.name}: {line[:300]}")
    return out


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="shorter runs, 100k live codes")
    mode.add_argument("--smoke", action="store_true", help="a second per step (CI)")
    parser.add_argument("--out", type=Path, help="Markdown report to write")
    parser.add_argument("--keep", action="store_true", help="keep the servers' logs")
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="only write the report of earlier results"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="FILE",
        help="add a 'Before and after' section comparing with this baseline "
        f"(default: {_rel(baseline.DEFAULT_BASELINE)} when it exists)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="no 'Before and after' section")
    parser.add_argument(
        "--save-baseline",
        type=Path,
        metavar="FILE",
        help="also write this run's key figures as a baseline (JSON) for later runs",
    )
    return parser.parse_args(argv)


def _rel(path: Path) -> Path:
    try:
        return path.resolve().relative_to(REPO_ROOT)
    except ValueError:
        return path


def _load_baseline(args: argparse.Namespace) -> tuple[dict[str, Any] | None, Path | None]:
    """The baseline to compare with: --baseline, else the default file if it exists."""
    if args.no_baseline:
        return None, None
    path = args.baseline
    if path is None and baseline.DEFAULT_BASELINE.exists():
        path = baseline.DEFAULT_BASELINE
    if path is None:
        return None, None
    return baseline.load(path), path


def _render(
    results: dict[str, Any],
    json_path: Path,
    out: Path,
    args: argparse.Namespace,
    before: dict[str, Any] | None,
    before_path: Path | None,
    scratch: Path,
) -> None:
    """Write the report (and the baseline, with --save-baseline).

    A smoke run without a baseline compares itself with its own figures, saved and read
    back like any baseline, so that CI runs that code too.
    """
    self_compare = False
    if before is None and results.get("plan", {}).get("name") == "smoke" and not args.no_baseline:
        before_path = scratch / "smoke-baseline.json"
        baseline.save(before_path, results)
        before = baseline.load(before_path)
        self_compare = True
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        report.render(
            results, _rel(json_path), before=before,
            before_path=_rel(before_path) if before_path else None, self_compare=self_compare,
        )
    )  # fmt: skip
    if args.save_baseline:
        baseline.save(args.save_baseline, results)


def _terminate(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM (a CI timeout, `kill`): unwind like Ctrl-C, so that `finally` stops servers."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    before, before_path = _load_baseline(args)  # a bad file fails now, not after the run
    if args.render:
        results = json.loads(args.render.read_text())
        out = args.out or DEFAULT_REPORT
        with tempfile.TemporaryDirectory(prefix="mqtt-pairing-bench-") as scratch:
            _render(results, args.render, out, args, before, before_path, Path(scratch))
        print(f"report: {out}")
        if args.save_baseline:
            print(f"baseline: {args.save_baseline}")
        return 0
    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS_DIR / f"{stamp}-{plan.name}.json"
    out = args.out or (
        DEFAULT_REPORT if plan.name == "full" else RESULTS_DIR / f"{stamp}-{plan.name}.md"
    )
    workdir = Path(tempfile.mkdtemp(prefix="mqtt-pairing-bench-"))
    ui = Ui(steps=STEPS)
    suite = Suite(plan, ui, workdir, f"{stamp}-{plan.name}")
    suite.results["git"] = baseline.git_info()
    t0 = time.perf_counter()
    ok = False
    try:
        with ui.progress:
            results = suite.run()
        results["elapsed_s"] = time.perf_counter() - t0
        results["machine"]["load_average_at_end"] = os.getloadavg()
        results["command"] = (
            "scripts/bench" + {"full": "", "quick": " --quick", "smoke": " --smoke"}[plan.name]
        )
        json_path.write_text(json.dumps(results, indent=1, default=str))
        _render(results, json_path, out, args, before, before_path, workdir)
        ok = True
    finally:
        suite.close()
        if ok and not args.keep:
            subprocess.run(["rm", "-rf", str(workdir)], check=False)
        else:
            ui.console.print(f"logs kept in {workdir}")
    ui.console.print(f"report: {out}\nraw results: {json_path}")
    if args.save_baseline:
        ui.console.print(f"baseline: {args.save_baseline}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
