"""The load generator: many apps and runners over a few raw paho connections, one thread.

Why raw paho and not aiomqtt: the generator shares the machine's two cores with the service,
Mosquitto and Redis, so it must cost as little CPU per message as possible. One thread runs
an external paho loop (`loop_read` / `loop_write` over a selector) for every connection:
no asyncio, no extra threads, no locks.

Identities are multiplexed over connections, as a broker sees many clients in a few
processes: app connection `j` hosts apps `app-j-0 .. app-j-(k-1)` and subscribes to their
exact `res/+` and `events` topics; one runner connection subscribes to
`P/runners/+/events` for the single-use runners whose codes the harness issued (each code
belongs to its own runner, since a runner has one active code at a time).

Two ways to drive it:
- closed loop (`run_closed`): `concurrency` requests outstanding; each reply sends the next
  one at once. Gives throughput at saturation.
- open loop (`run_open`): requests at fixed times (`rate` per second), whatever the replies
  do. Latency is measured from the scheduled send time, so a late sender or a slow
  service cannot hide queueing (no coordinated omission); the worst send lag is reported.

Latency of a request: scheduled send → reply received, and → the runner's `session.opened`.
"""

from __future__ import annotations

import contextlib
import json
import re
import selectors
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

_RID = re.compile(rb'"request_id":"([^"]*)"')
_APP_ID = re.compile(rb'"app_id":"([^"]*)"')
_RUNNER_ID = re.compile(rb'"runner_id":"([^"]*)"')
_ERR = re.compile(rb'"error":\{"code":"([A-Z_]+)"')
_OPENED = b'"event":"session.opened"'
_CODE_USED = b'"event":"code.used"'
_OK = b'"ok":true'

DRAIN_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Job:
    """One pair to attempt: a code issued to a runner (or a wrong guess)."""

    runner_id: str
    code: str


class JobQueue(Protocol):
    """Where a run takes its jobs from (a deque, or an endless source)."""

    def popleft(self) -> Job: ...
    def __len__(self) -> int: ...


class EndlessJobs:
    """Jobs for the echo service: a new runner each time, any code."""

    def __init__(self) -> None:
        self._n = 0

    def popleft(self) -> Job:
        self._n += 1
        return Job(f"echo-r-{self._n}", "ABC-DEF-GHJ")

    def __len__(self) -> int:
        return 1 << 30


@dataclass(slots=True)
class _Req:
    rid: str
    runner: str
    app: str
    t_sched: float
    t_pub: float = 0.0
    t_reply: float = 0.0
    t_runner: float = 0.0
    t_app_event: float = 0.0
    ok: bool = False
    error: str = ""
    measured: bool = False


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99/max/mean of `values` (nearest rank), in the unit given; {} if empty."""
    if not values:
        return {}
    s = sorted(values)

    def rank(p: float) -> float:
        return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]

    return {
        "p50": rank(50),
        "p95": rank(95),
        "p99": rank(99),
        "max": s[-1],
        "mean": sum(s) / len(s),
        "n": float(len(s)),
    }


@dataclass
class RunResult:
    """What one load run measured (times in ms, rates per second)."""

    mode: Literal["closed", "open"]
    duration_s: float
    target_rate: float | None = None
    concurrency: int | None = None
    sent: int = 0
    replies: int = 0
    ok: int = 0
    throughput: float = 0.0
    achieved_rate: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    reply_ms: dict[str, float] = field(default_factory=dict)
    # Latency of every answered request, whatever its outcome (failed guesses included).
    reply_ms_all: dict[str, float] = field(default_factory=dict)
    runner_opened_ms: dict[str, float] = field(default_factory=dict)
    app_event_ms: dict[str, float] = field(default_factory=dict)
    lost_replies: int = 0
    lost_runner_events: int = 0
    messages_in: dict[str, int] = field(default_factory=dict)
    send_lag_max_ms: float = 0.0
    ran_out_of_jobs: bool = False
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)
    cpu_share: dict[str, float] = field(default_factory=dict)
    # Replies of any outcome received in the window, per second (failed guesses too).
    answered_per_s: float = 0.0
    # Every message received on the runners' and apps' `events` topics during the run
    # (warm-up and drain included), per successful reply of the run.
    events_per_pair: float | None = None
    # Redis commands (INFO commandstats, those inside scripts too) per answered request.
    redis_commands_per_request: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dict(self.__dict__)


Progress = Callable[[float, str], None]
"""Called about 4 times a second with (fraction done, status text)."""


class LoadGenerator:
    """Apps and runners on `app_connections + 1` paho connections, driven from one thread.

    Args:
        host, port: the broker.
        prefix: topic prefix of the service under test.
        protocol: "5" or "3.1.1" (the embedded amqtt broker speaks 3.1.1 only).
        app_connections: connections carrying apps.
        apps_per_connection: apps per connection (each has its own topics).
        echo: add the runner id to each request, for the echo service (it has no Redis
            to look the code up in).
    """

    def __init__(
        self,
        host: str,
        port: int,
        prefix: str,
        *,
        protocol: Literal["5", "3.1.1"] = "5",
        app_connections: int = 4,
        apps_per_connection: int = 64,
        echo: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.prefix = prefix
        self.protocol = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        self.echo = echo
        self._sel = selectors.DefaultSelector()
        self._tag = uuid.uuid4().hex[:6]
        self._app_clients: list[tuple[mqtt.Client, list[str]]] = []
        for j in range(app_connections):
            apps = [f"app-{self._tag}-{j}-{k}" for k in range(apps_per_connection)]
            self._app_clients.append((self._client(f"bench-apps-{self._tag}-{j}"), apps))
        self._runner_client = self._client(f"bench-runners-{self._tag}")
        self._clients = [c for c, _ in self._app_clients] + [self._runner_client]
        self._app_cycle = self._apps_round_robin()
        self._reqs: dict[str, _Req] = {}
        # (runner_id, app_id) -> the request: a code with several uses pairs one runner
        # with several apps at once, and each party's session.opened names both.
        self._by_pair: dict[tuple[str, str], _Req] = {}
        self._counts: Counter[str] = Counter()
        self._closed_next: Callable[[], None] | None = None
        self._connected = 0
        self._subacks = 0
        self._last_misc = 0.0

    # ---- connections --------------------------------------------------------------------

    def _client(self, client_id: str) -> mqtt.Client:
        kwargs: dict[str, Any] = {}
        if self.protocol == mqtt.MQTTv311:
            kwargs["clean_session"] = True
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=self.protocol, **kwargs
        )
        # The generator must not be what limits the run: no cap on QoS 1 in flight.
        c.max_inflight_messages_set(0)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        return c

    def _on_connect(self, *_args: Any) -> None:
        self._connected += 1

    def _on_subscribe(self, *_args: Any) -> None:
        self._subacks += 1

    def _apps_round_robin(self) -> Iterator[tuple[mqtt.Client, str]]:
        while True:
            for k in range(max(len(a) for _, a in self._app_clients)):
                for client, apps in self._app_clients:
                    if k < len(apps):
                        yield client, apps[k]

    def start(self, timeout_s: float = 15.0) -> None:
        """Connect every client and subscribe; returns when all SUBACKs are in.

        Raises:
            TimeoutError: the broker did not answer in time.
        """
        for c in self._clients:
            c.connect(self.host, self.port, keepalive=60)
            sock = c.socket()
            assert sock is not None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sel.register(sock, selectors.EVENT_READ, c)
        self._wait(lambda: self._connected == len(self._clients), timeout_s, "CONNACK")
        expected = 0
        for c, apps in self._app_clients:
            # Batches keep each SUBSCRIBE packet small.
            topics = []
            for app in apps:
                topics += [
                    (f"{self.prefix}/apps/{app}/res/+", 1),
                    (f"{self.prefix}/apps/{app}/events", 1),
                ]
            for i in range(0, len(topics), 50):
                c.subscribe(topics[i : i + 50])
                expected += 1
        self._runner_client.subscribe(f"{self.prefix}/runners/+/events", qos=1)
        expected += 1
        self._wait(lambda: self._subacks >= expected, timeout_s, "SUBACK")

    def close(self) -> None:
        """Disconnect every client."""
        for c in self._clients:
            try:
                c.disconnect()
                c.loop_write()
            except (OSError, ValueError):
                pass
            sock = c.socket()
            if sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(sock)
                sock.close()
        self._sel.close()

    def _wait(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"load generator: no {what} from the broker in {timeout_s} s")
            self._pump(0.05)

    def _pump(self, timeout_s: float) -> None:
        for c in self._clients:
            if c.want_write():
                c.loop_write()
        for key, _mask in self._sel.select(max(0.0, timeout_s)):
            key.data.loop_read()
        now = time.monotonic()
        if now - self._last_misc > 1.0:
            self._last_misc = now
            for c in self._clients:
                c.loop_misc()

    # ---- messages -----------------------------------------------------------------------

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        payload: bytes = msg.payload
        topic: str = msg.topic
        if topic.endswith("/events"):
            if topic.startswith(f"{self.prefix}/runners/"):
                runner = topic[len(self.prefix) + 9 : -7]
                if _OPENED in payload:
                    self._counts["runner.session.opened"] += 1
                    m = _APP_ID.search(payload)
                    req = self._by_pair.get((runner, m.group(1).decode())) if m else None
                    if req is not None and not req.t_runner:
                        req.t_runner = now
                elif _CODE_USED in payload:
                    self._counts["runner.code.used"] += 1
                else:
                    self._counts["runner.other"] += 1
            elif _OPENED in payload:
                self._counts["app.session.opened"] += 1
                app = topic[len(self.prefix) + 6 : -7]
                m = _RUNNER_ID.search(payload)
                req = self._by_pair.get((m.group(1).decode(), app)) if m else None
                if req is not None and not req.t_app_event:
                    req.t_app_event = now
            else:
                self._counts["app.other"] += 1
            return
        self._counts["reply"] += 1
        m = _RID.search(payload)
        req = self._reqs.get(m.group(1).decode()) if m else None
        if req is None or req.t_reply:
            self._counts["reply.unmatched"] += 1
            return
        req.t_reply = now
        if _OK in payload:
            req.ok = True
            self._counts["reply.ok"] += 1
        else:
            e = _ERR.search(payload)
            req.error = e.group(1).decode() if e else "UNPARSED"
        if self._closed_next is not None:
            self._closed_next()

    def _send(self, job: Job, t_sched: float, measured: bool) -> None:
        client, app = next(self._app_cycle)
        rid = uuid.uuid4().hex
        body: dict[str, Any] = {"request_id": rid, "code": job.code}
        if self.echo:
            body["runner"] = job.runner_id
        req = _Req(rid, job.runner_id, app, t_sched, measured=measured)
        self._reqs[rid] = req
        self._by_pair[(job.runner_id, app)] = req
        req.t_pub = time.perf_counter()
        client.publish(f"{self.prefix}/apps/{app}/req/pair", json.dumps(body), qos=1)

    # ---- runs ---------------------------------------------------------------------------

    def _reset(self) -> None:
        self._reqs.clear()
        self._by_pair.clear()
        self._counts.clear()

    def run_closed(
        self,
        jobs: JobQueue,
        *,
        concurrency: int,
        duration_s: float,
        warmup_s: float,
        progress: Progress | None = None,
        expect_events: bool = True,
    ) -> RunResult:
        """Keep `concurrency` requests outstanding for `warmup_s + duration_s`."""
        self._reset()
        t0 = time.perf_counter()
        m_start, m_end = t0 + warmup_s, t0 + warmup_s + duration_s
        state = {"stop": False, "out_of_jobs": False}

        def next_one() -> None:
            if state["stop"]:
                return
            if not jobs:
                state["out_of_jobs"] = True
                return
            now = time.perf_counter()
            self._send(jobs.popleft(), now, m_start <= now < m_end)

        self._closed_next = next_one
        try:
            for _ in range(concurrency):
                next_one()
            self._loop_until(m_end, t0, progress, "closed loop")
            state["stop"] = True
        finally:
            self._closed_next = None
        self._drain(expect_events)
        res = self._result("closed", duration_s, m_start, m_end)
        res.concurrency = concurrency
        res.ran_out_of_jobs = state["out_of_jobs"]
        done_in_window = sum(
            1 for r in self._reqs.values() if r.ok and m_start <= r.t_reply < m_end
        )
        res.throughput = done_in_window / duration_s
        res.answered_per_s = (
            sum(1 for r in self._reqs.values() if r.t_reply and m_start <= r.t_reply < m_end)
            / duration_s
        )
        return res

    def run_open(
        self,
        jobs: JobQueue,
        *,
        rate: float,
        duration_s: float,
        warmup_s: float,
        progress: Progress | None = None,
        expect_events: bool = True,
        until: Callable[[], bool] | None = None,
    ) -> RunResult:
        """Send at `rate` per second, on schedule, for `warmup_s + duration_s`.

        With `until`, also stop as soon as it returns true (it is called about 4 times a
        second); `duration_s` is then the longest the run may take, and the result's
        `duration_s` how long it measured.
        """
        self._reset()
        t0 = time.perf_counter()
        m_start, m_end = t0 + warmup_s, t0 + warmup_s + duration_s
        interval = 1.0 / rate
        i = 0
        lag_max = 0.0
        out_of_jobs = False
        last_report = 0.0
        while True:
            t_next = t0 + i * interval
            if t_next >= m_end:
                break
            now = time.perf_counter()
            if now >= t_next:
                if not jobs:
                    out_of_jobs = True
                    break
                lag_max = max(lag_max, now - t_next) if t_next >= m_start else lag_max
                self._send(jobs.popleft(), t_next, m_start <= t_next < m_end)
                i += 1
                if i % 16:
                    continue  # keep to the schedule; the broker reads in the next pump
                self._pump(0)
            else:
                self._pump(min(t_next - now, 0.05))
            if now - last_report > 0.25:
                last_report = now
                if progress is not None:
                    progress((now - t0) / (m_end - t0), f"open loop {rate:.0f}/s")
                if until is not None and until():
                    m_end = max(m_start, time.perf_counter())
                    break
        duration_s = max(1e-9, m_end - m_start)
        self._drain(expect_events)
        res = self._result("open", duration_s, m_start, m_end)
        res.target_rate = rate
        res.send_lag_max_ms = lag_max * 1000
        res.ran_out_of_jobs = out_of_jobs
        sent = sum(1 for r in self._reqs.values() if r.measured)
        res.achieved_rate = sent / duration_s
        res.throughput = sum(1 for r in self._reqs.values() if r.measured and r.ok) / duration_s
        return res

    def _loop_until(self, end: float, t0: float, progress: Progress | None, label: str) -> None:
        last_report = 0.0
        while True:
            now = time.perf_counter()
            if now >= end:
                return
            self._pump(min(0.05, end - now))
            if progress is not None and now - last_report > 0.25:
                last_report = now
                done = sum(1 for r in self._reqs.values() if r.t_reply)
                progress((now - t0) / (end - t0), f"{label}: {done} replies")

    def _drain(self, expect_events: bool) -> None:
        """Wait for outstanding replies (and runners' session.opened), bounded."""

        def settled() -> bool:
            for r in self._reqs.values():
                if not r.t_reply:
                    return False
                if expect_events and r.ok and not r.t_runner:
                    return False
            return True

        deadline = time.perf_counter() + DRAIN_TIMEOUT_S
        while time.perf_counter() < deadline and not settled():
            self._pump(0.02)
        # Let late events and acknowledgements go out.
        end = time.perf_counter() + 0.1
        while time.perf_counter() < end:
            self._pump(0.02)

    def _result(
        self, mode: Literal["closed", "open"], duration_s: float, m_start: float, m_end: float
    ) -> RunResult:
        measured = [r for r in self._reqs.values() if r.measured]
        res = RunResult(mode=mode, duration_s=duration_s)
        res.sent = len(measured)
        res.replies = sum(1 for r in measured if r.t_reply)
        res.ok = sum(1 for r in measured if r.ok)
        res.lost_replies = res.sent - res.replies
        res.errors = dict(Counter(r.error for r in measured if r.t_reply and not r.ok))
        res.reply_ms = percentiles([(r.t_reply - r.t_sched) * 1000 for r in measured if r.ok])
        res.reply_ms_all = percentiles(
            [(r.t_reply - r.t_sched) * 1000 for r in measured if r.t_reply]
        )
        runner = [(r.t_runner - r.t_sched) * 1000 for r in measured if r.ok and r.t_runner]
        res.runner_opened_ms = percentiles(runner)
        res.lost_runner_events = res.ok - len(runner)
        app = [(r.t_app_event - r.t_sched) * 1000 for r in measured if r.ok and r.t_app_event]
        res.app_event_ms = percentiles(app)
        res.messages_in = dict(self._counts)
        events = sum(k for name, k in self._counts.items() if name.startswith(("runner.", "app.")))
        if self._counts["reply.ok"]:
            res.events_per_pair = events / self._counts["reply.ok"]
        return res

    def ok_runners(self) -> list[str]:
        """The runners of the last run's successful pairs."""
        return [r.runner for r in self._reqs.values() if r.ok]

    def ok_so_far(self) -> int:
        """Successful replies received since the current run began."""
        return self._counts["reply.ok"]

    def wait_late_replies(self, timeout_s: float) -> int:
        """After a run: wait up to `timeout_s` more for the measured requests that had no
        reply when the run ended (its drain gives up after `DRAIN_TIMEOUT_S`); returns how
        many got one meanwhile: late, not lost. Also lets a backlog clear before the next run.
        """
        missing = [r for r in self._reqs.values() if r.measured and not r.t_reply]
        deadline = time.perf_counter() + timeout_s
        while missing and time.perf_counter() < deadline and any(not r.t_reply for r in missing):
            self._pump(0.05)
        return sum(1 for r in missing if r.t_reply)

    def run_heartbeats(
        self,
        runners: list[str],
        *,
        concurrency: int,
        duration_s: float,
        warmup_s: float,
        handled: Callable[[], int],
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Runners' heartbeats (`{}` on `P/runners/{id}/req/heartbeat`, QoS 1) in a closed loop.

        A successful heartbeat has no reply, so completions are read from the service:
        `handled()` (its count of successful heartbeats, from `/metrics`), polled about
        20 times a second; after each poll, as many heartbeats are sent as keep
        `concurrency` outstanding. The runners take turns. Returns sent, handled and the
        rate in the measured window (`per_s`), and whether all were handled in the end.
        """
        t0 = time.perf_counter()
        m_start, m_end = t0 + warmup_s, t0 + warmup_s + duration_s
        base = handled()
        sent = 0
        i = 0
        done = 0
        done_at_start: int | None = None
        done_at_end: int | None = None
        last_poll = 0.0
        last_report = 0.0
        while True:
            now = time.perf_counter()
            if now - last_poll >= 0.05:
                last_poll = now
                done = handled() - base
                if done_at_start is None and now >= m_start:
                    done_at_start = done
                if now >= m_end:
                    done_at_end = done
                    break
                for _ in range(max(0, concurrency - (sent - done))):
                    runner = runners[i % len(runners)]
                    i += 1
                    self._runner_client.publish(
                        f"{self.prefix}/runners/{runner}/req/heartbeat", b"{}", qos=1
                    )
                    sent += 1
            self._pump(0.01)
            if progress is not None and now - last_report > 0.25:
                last_report = now
                progress((now - t0) / (m_end - t0), f"heartbeats: {done} handled")
        deadline = time.perf_counter() + DRAIN_TIMEOUT_S
        while done < sent and time.perf_counter() < deadline:
            self._pump(0.05)
            done = handled() - base
        window = (done_at_end or 0) - (done_at_start or 0)
        return {
            "concurrency": concurrency,
            "duration_s": duration_s,
            "sent": sent,
            "handled": done,
            "all_handled": done >= sent,
            "per_s": window / duration_s,
            "runners": len(runners),
        }

    def send_one(self, job: Job, timeout_s: float = 10.0) -> tuple[bool, str]:
        """Send one request and wait for its reply and (on success) the runner's event.

        Returns:
            (ok, error code or "").
        """
        self._reset()
        self._send(job, time.perf_counter(), True)
        req = next(iter(self._reqs.values()))
        self._wait(lambda: bool(req.t_reply), timeout_s, "reply")
        if req.ok:
            self._wait(lambda: bool(req.t_runner), timeout_s, "session.opened")
        return req.ok, req.error

    def pump_for(self, seconds: float) -> None:
        """Keep the connections serviced (acks, keepalive) for a while."""
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            self._pump(0.02)
