"""`scripts/bench [--quick|--smoke] [--out FILE]`: the benchmark suite of mqtt-pairing.

Starts Redis and Mosquitto on free ports (owned by the harness, stopped at the end), runs
every measurement, writes the raw results to `benchmarks/results/<timestamp>.json` and
the Markdown report (`docs/benchmarks.md` for a full run; next to the JSON for --quick and
--smoke unless --out is given). Progress is shown with rich while it runs.

- full: the numbers of the report (about 7 minutes; run it on an otherwise idle machine).
- --quick: shorter runs, 100k instead of 1M live codes (about 2 minutes).
- --smoke: a second of load per step, to keep the suite working (CI); asserts no timing.
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
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from benchmarks import inproc, profile, report
from benchmarks.loadgen import EndlessJobs, Job, JobQueue, LoadGenerator, RunResult
from benchmarks.stack import (
    REPO_ROOT,
    CodeFactory,
    Process,
    Servers,
    embedded_redis_url,
    free_listen,
    start_echo,
    start_service,
    which,
)

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


PLANS = {
    "full": Plan("full", 2.0, 10.0, (16, 64, 256), (0.25, 0.5, 0.9), 200, 10_000, 100_000,
                 1_000_000, 10.0, 32, (1, 2)),
    "quick": Plan("quick", 1.0, 4.0, (64,), (0.25, 0.5, 0.9), 50, 2_000, 100_000, 100_000,
                  4.0, 32, (1,)),
    "smoke": Plan("smoke", 0.3, 1.0, (32,), (0.5,), 5, 100, 5_000, 10_000, 0.0, 16, (1,)),
}  # fmt: skip

SMALL_CODES = 1_000


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
        self._procs: list[Process] = []

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
    ) -> RunResult:
        """A closed-loop run; with `server`, also its CPU time per answered request."""
        pids = {"server": server.pid} if server else {}
        for name in ("mosquitto", "redis"):
            proc = getattr(self.servers, name).process
            if proc is not None:
                pids[name] = proc.pid
        before = {k: cpu_seconds(p) for k, p in pids.items()}
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
            res.cpu_ms_per_request = {
                k: (cpu_seconds(p) - before[k]) * 1000 / answered for k, p in pids.items()
            }
            res.cpu_share = {k: (cpu_seconds(p) - before[k]) / wall for k, p in pids.items()}
        return res

    def _open(self, gen: LoadGenerator, jobs: deque[Job], rate: float, step: Any) -> RunResult:
        return gen.run_open(
            jobs, rate=rate, duration_s=self.plan.duration_s, warmup_s=self.plan.warmup_s,
            progress=step,
        )  # fmt: skip

    def _start(self, proc: Process) -> Process:
        self._procs.append(proc)
        return proc

    def _stop(self, proc: Process) -> None:
        proc.stop()
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)

    def close(self) -> None:
        for proc in list(self._procs):
            with contextlib.suppress(Exception):
                proc.stop()
        self.servers.stop()

    # ---- steps --------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        ui = self.ui
        with ui.stage("start Redis and Mosquitto"):
            self.servers.start()
            self.results["machine"] = machine_info(self.servers)
        self.results["started_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.single_service()
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
            self._live_codes(gen, factory, rate * 0.5, step)

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
        one = self._closed(gen, self._codes_for(factory, rate * 2.5), c, step)
        svc2 = self._start(
            start_service("svc-2", self.workdir, mqtt_url=s.mosquitto.url,
                          redis_url=s.redis.url, prefix="bench")
        )  # fmt: skip
        before = [p.log().count(" paired ") for p in (svc1, svc2)]
        runs = {}
        for conc in sorted({c * k for k in self.plan.shared_multipliers}):
            runs[conc] = self._closed(gen, self._codes_for(factory, rate * 2.5), conc, step)
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

        r.flushall()
        factory.fill(SMALL_CODES)
        measure("1k")
        factory.fill(big - SMALL_CODES, progress=lambda f: step(f, f"writing {big:,} codes"))
        time.sleep(2.0)  # let Redis finish rehashing its main table
        measure("big")
        r.flushall()
        if self.plan.name != "smoke":
            factory.fill(SMALL_CODES)
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
    return parser.parse_args(argv)


def _rel(path: Path) -> Path:
    try:
        return path.resolve().relative_to(REPO_ROOT)
    except ValueError:
        return path


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        out = args.out or DEFAULT_REPORT
        out.write_text(report.render(results, _rel(args.render)))
        print(f"report: {out}")
        return 0
    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS_DIR / f"{stamp}-{plan.name}.json"
    out = args.out or (
        DEFAULT_REPORT if plan.name == "full" else RESULTS_DIR / f"{stamp}-{plan.name}.md"
    )
    workdir = Path(tempfile.mkdtemp(prefix="mqtt-pairing-bench-"))
    ui = Ui(steps=10)
    suite = Suite(plan, ui, workdir, f"{stamp}-{plan.name}")
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
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report.render(results, _rel(json_path)))
        ok = True
    finally:
        suite.close()
        if ok and not args.keep:
            subprocess.run(["rm", "-rf", str(workdir)], check=False)
        else:
            ui.console.print(f"logs kept in {workdir}")
    ui.console.print(f"report: {out}\nraw results: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
