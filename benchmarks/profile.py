"""Profiling the service process with py-spy (sampling, from outside: no code changes).

`py-spy record --format raw --idle --threads` gives collapsed stacks per thread. The
service is one asyncio loop in the main thread: its samples whose innermost frame is the
event loop waiting in `select` are idle time, the rest is where the CPU goes.
Functions are ranked by self time (innermost frame) and by inclusive time (anywhere on the
stack), and self time is grouped by library.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

AREAS = (
    ("mqtt_pairing/", "mqtt_pairing (the service)"),
    ("redis/", "redis-py"),
    ("paho/", "paho-mqtt"),
    ("aiomqtt/", "aiomqtt"),
    ("pydantic", "pydantic"),
    ("json/", "json"),
    ("logging/", "logging"),
    ("asyncio/", "asyncio"),
    ("uuid.py", "uuid"),
    ("hmac.py", "hmac/hashlib"),
    ("hashlib", "hmac/hashlib"),
    ("socket.py", "socket"),
    ("selectors.py", "selectors"),
)


def py_spy() -> str | None:
    """The py-spy executable next to this Python, or on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


def start_recording(pid: int, duration_s: float, output: Path) -> subprocess.Popen[bytes]:
    """Sample `pid` for `duration_s` seconds at 200 Hz.

    py-spy pauses the process for each sample (no --nonblocking), which keeps the stacks of
    coroutines whole.
    """
    exe = py_spy()
    assert exe is not None
    return subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(duration_s))),
            "--rate",
            "200",
            "--format",
            "raw",
            "--idle",
            "--threads",
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _split(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame)
    if not m:
        return frame, ""
    return m.group("func"), m.group("file")


def _area(file: str) -> str:
    for needle, name in AREAS:
        if needle in file:
            return name
    return "other (stdlib, C calls)"


def _is_idle(stack: list[str]) -> bool:
    func, file = _split(stack[-1])
    return "selectors.py" in file and "select" in func


def analyse(raw: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive shares (of busy samples), by function and by library."""
    total = idle = 0
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    service_incl: Counter[str] = Counter()
    other_threads: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack_s, _, count_s = line.rpartition(" ")
        if not stack_s:
            continue
        count = int(count_s)
        thread, _, rest = stack_s.partition(";")
        stack = rest.split(";")
        if not thread.endswith(": MainThread"):
            # aiomqtt connects from the default executor, whose worker then waits.
            leaf = _split(stack[-1])[0]
            if leaf not in ("_worker", "Condition.wait", "Thread._wait_for_tstate_lock"):
                other_threads[thread.partition(": ")[2]] += count
            continue
        total += count
        if _is_idle(stack):
            idle += count
            continue
        funcs = []
        for frame in stack:
            func, file = _split(frame)
            funcs.append((f"{func} ({file})", file))
        self_t[funcs[-1][0]] += count
        areas[_area(funcs[-1][1])] += count
        for name in {f for f, _ in funcs}:
            incl[name] += count
        for name in {f for f, file in funcs if file.startswith("mqtt_pairing/")}:
            service_incl[name] += count
    busy = total - idle
    if busy <= 0:
        return {"samples": total, "busy_share": 0.0}

    def rows(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"name": n, "share": c / busy} for n, c in counter.most_common(top)]

    return {
        "samples": total,
        "busy_share": busy / total,
        "other_threads_busy": {k: v / total for k, v in other_threads.items()},
        "self": rows(self_t),
        "inclusive": rows(incl),
        "service_inclusive": rows(service_incl),
        "areas": [{"name": n, "share": c / busy} for n, c in areas.most_common()],
    }
