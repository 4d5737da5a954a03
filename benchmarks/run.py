"""`scripts/bench [--quick|--smoke] [--out FILE]`: the benchmark suite of mqtt-pairing.

Starts Redis and Mosquitto on free ports (owned by the harness, stopped at the end), runs
every measurement, writes the raw results to `benchmarks/results/<timestamp>.json` and
the Markdown report (`docs/benchmarks.md` for a full run; next to the JSON for --quick and
--smoke unless --out is given). Progress is shown with rich while it runs. A Redis Cluster
(3 masters) is started for its own step and stopped after it.

- full: the numbers of the report (about 8 minutes; run it on an otherwise idle machine).
- --quick: shorter runs, 100k instead of 1M live codes (about 3 minutes).
- --smoke: a second of load per step, to keep the suite working (CI); asserts no timing.

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
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import redis
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from benchmarks import baseline, inproc, profile, report
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
    embedded_redis_url,
    free_listen,
    launch_service,
    redis_cluster,
    start_echo,
    start_service,
    wait_ready,
    which,
)
from tests.harness.servers import RedisClusterServers

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
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


PLANS = {
    "full": Plan("full", 2.0, 10.0, (16, 64, 256), (0.25, 0.5, 0.9), 200, 10_000, 100_000,
                 1_000_000, 10.0, 32, (1, 2), (1, 3)),
    "quick": Plan("quick", 1.0, 4.0, (64,), (0.25, 0.5, 0.9), 50, 2_000, 100_000, 100_000,
                  4.0, 32, (1,), (1,)),
    "smoke": Plan("smoke", 0.3, 1.0, (32,), (0.5,), 5, 100, 5_000, 10_000, 0.0, 16, (1,),
                  (1,), 8),
}  # fmt: skip

SMALL_CODES = 1_000
# The cluster step's instances: their own topic prefix and shared-subscription group, so
# that no instance on the single Redis (or its parked session) takes their requests.
CLUSTER_PREFIX = "bench-cl"
CLUSTER_INSTANCES = 3
# How long the cluster step waits, after a run's own drain, for replies still missing.
LATE_REPLIES_S = 30.0
STEPS = 11


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
    ) -> RunResult:
        """A closed-loop run, and the CPU time per answered request of `cpu_of` (name ->
        processes, summed; by default `server` if given, Mosquitto and Redis)."""
        pids = cpu_of if cpu_of is not None else self._cpu_of([server] if server else [])

        def cpu(group: list[int]) -> float:
            return sum(cpu_seconds(p) for p in group)

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

                res = self._closed(gen, jobs, c, sub2, server=svc)
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
