"""The Python SDK for runners and apps (docs/sdk.md).

    from mqtt_pairing.sdk import AppClient, BrokerAddress

    async with AppClient("phone-1", BrokerAddress.from_url("mqtt://phone-1:pw@host:1884")) as app:
        pairing = await app.pair("7KQ-M2X-9PZ")
        print(pairing.session.runner_id, pairing.sas)

Modules, one idea each: `connection` (persistent session, reconnect), `peer` (requests,
replies, events), `runner`, `app`, `wire` (typed results and events), `errors`, `retry`,
`e2e` (X25519 keys; the derivation is `mqtt_pairing.sas`).
"""

from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.sas import Sas
from mqtt_pairing.sdk.app import AppClient, PairingUri
from mqtt_pairing.sdk.errors import (
    ConnectFailed,
    E2eFailed,
    KeyMismatch,
    NoReply,
    NotConnected,
    ReplyError,
    SdkError,
)
from mqtt_pairing.sdk.retry import retry
from mqtt_pairing.sdk.runner import RunnerClient
from mqtt_pairing.sdk.wire import (
    CodeResult,
    CodeUsed,
    E2eState,
    Event,
    PairResult,
    RunnerPresence,
    Session,
    SessionClosed,
    SessionMessage,
    SessionOpened,
    StatusResult,
)

__all__ = [
    "AppClient",
    "BrokerAddress",
    "CodeResult",
    "CodeUsed",
    "ConnectFailed",
    "E2eFailed",
    "E2eState",
    "Event",
    "KeyMismatch",
    "NoReply",
    "NotConnected",
    "PairResult",
    "PairingUri",
    "ReplyError",
    "RunnerClient",
    "RunnerPresence",
    "Sas",
    "SdkError",
    "Session",
    "SessionClosed",
    "SessionMessage",
    "SessionOpened",
    "StatusResult",
    "retry",
]
