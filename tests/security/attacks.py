"""Pieces shared by the attack tests: legitimate traffic to measure, and attackers.

`legit_traffic` drives a set of runners and apps through the requests of a pairing
(code, pair, sessions, status) and reports which were answered: an attack succeeds when
one of them is not. The attackers are raw connections (`Sniffer`) with the credentials
of an ordinary runner or app, made by `mqtt-pairing credentials add`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from mqtt_pairing.client import AppClient, PairingClient, RunnerClient
from tests.security.harness import SecureBroker, Sniffer

REPLY_TIMEOUT_S = 5.0
"""How long a legitimate request may wait for its reply: far above the service's answer
time even on a loaded machine, and the bound that defines "answered"."""


@dataclass
class Traffic:
    """Outcome of `legit_traffic`: requests sent, and the ones never answered."""

    sent: int = 0
    lost: list[str] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return self.sent - len(self.lost)

    def summary(self) -> str:
        return f"{len(self.lost)} of {self.sent} requests never answered: {self.lost}"


async def _ask(
    traffic: Traffic, client: PairingClient, op: str, body: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    traffic.sent += 1
    try:
        return await client.request(op, body, timeout_s=REPLY_TIMEOUT_S)
    except TimeoutError:
        traffic.lost.append(f"{client.identity.kind.value} {client.identity.id} {op}")
        return None


async def legit_traffic(runners: list[RunnerClient], apps: list[AppClient]) -> Traffic:
    """Pair runner i with app i, concurrently, and list the sessions and status.

    Five requests per pair (runner `code`, app `pair`, runner `sessions`, app `sessions`,
    app `status`); a pair whose code never came counts its `pair` as lost too.
    """
    traffic = Traffic()
    codes = await asyncio.gather(*(_ask(traffic, r, "code") for r in runners))
    pairs = []
    for app, reply in zip(apps, codes, strict=True):
        if reply is None or not reply.get("ok"):
            traffic.sent += 1
            traffic.lost.append(f"app {app.identity.id} pair (no code to pair with)")
            continue
        pairs.append(_ask(traffic, app, "pair", {"code": reply["result"]["code"]}))
    paired = await asyncio.gather(*pairs)
    assert all(p is None or p["ok"] for p in paired), paired
    await asyncio.gather(
        *(_ask(traffic, r, "sessions") for r in runners),
        *(_ask(traffic, a, "sessions") for a in apps),
        *(_ask(traffic, a, "status") for a in apps),
    )
    return traffic


@contextlib.asynccontextmanager
async def peers(
    broker: SecureBroker, runner_ids: list[str], app_ids: list[str]
) -> AsyncIterator[tuple[list[RunnerClient], list[AppClient]]]:
    """Runner and app clients, each with its id as client id (docs/security.md)."""
    async with contextlib.AsyncExitStack() as stack:
        runners = [
            await stack.enter_async_context(
                RunnerClient(r, broker.address("runner", r), client_id=r)
            )
            for r in runner_ids
        ]
        apps = [
            await stack.enter_async_context(AppClient(a, broker.address("app", a), client_id=a))
            for a in app_ids
        ]
        yield runners, apps


@dataclass(frozen=True)
class Attacker:
    """An ordinary runner or app identity turned against the deployment."""

    kind: str  # runner or app
    ident: str
    listener: str  # runner, app, app-ws
    v311: bool

    @property
    def label(self) -> str:
        return f"{self.kind} {self.ident} on {self.listener}, MQTT {'3.1.1' if self.v311 else '5'}"

    def sniffer(self, broker: SecureBroker, *, persistent: bool = False, **kw: Any) -> Sniffer:
        address = broker.address(self.kind, self.ident, listener=self.listener)
        return Sniffer(address, self.ident, v311=self.v311, persistent=persistent, **kw)


def attackers_of_every_kind(uid: str) -> list[Attacker]:
    """A runner and an app on each of their listeners, speaking MQTT 5 and 3.1.1."""
    return [
        Attacker("runner", f"evil-r5-{uid}", "runner", v311=False),
        Attacker("runner", f"evil-r3-{uid}", "runner", v311=True),
        Attacker("app", f"evil-a5-{uid}", "app", v311=False),
        Attacker("app", f"evil-a3-{uid}", "app", v311=True),
        Attacker("app", f"evil-w5-{uid}", "app-ws", v311=False),
    ]
