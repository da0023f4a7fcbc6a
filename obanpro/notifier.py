"""LISTEN/NOTIFY on the ``<prefix>.oban_<channel>`` channels, with reconnection.

The notifier owns one dedicated connection. When it dies (a database restart,
``pg_terminate_backend``, a failover) the notifier reconnects with a jittered
backoff, listens on every channel again and calls ``on_reconnect``, because
notifications sent while it was away are lost: callers poll once at that point.

Payloads are read in all three forms Oban nodes send: plain JSON, gzip+base64
(oban-py, starting with ``H4sI``) and ``Z:`` + gzip+base64 (Elixir Oban 2.21 and
later). They are sent as plain JSON when small and as gzip+base64 otherwise,
which oban-py and Elixir Oban both read.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from .db import CONNECTION_ERRORS, Backoff, wake_retries
from .dsn import describe_dsn

log = logging.getLogger(__name__)

PLAIN_PAYLOAD_LIMIT = 512
HEARTBEAT_INTERVAL = 5.0
CONNECT_TIMEOUT = 5.0
RECONNECT_MAX_DELAY = 1.0
"""Longest wait in seconds between reconnection attempts, before jitter. A reconnection
ends the backoff of every retry loop in the process, so it sets how soon a node
resumes after an outage."""

Callback = Callable[[str, dict[str, Any]], Any]


def channel_name(prefix: str, channel: str) -> str:
    return f"{prefix}.oban_{channel}"


def encode_payload(payload: dict[str, Any]) -> str:
    """Encode a notification payload the way oban-py and Elixir Oban both read."""
    text = json.dumps(payload, separators=(",", ":"))
    if len(text) <= PLAIN_PAYLOAD_LIMIT:
        return text

    return base64.b64encode(gzip.compress(text.encode("utf-8"))).decode("ascii")


def decode_payload(payload: str) -> dict[str, Any]:
    """Decode a payload in any of the three forms; raise ValueError when it is none of them."""
    try:
        if payload.startswith("{"):
            decoded = json.loads(payload)
        elif payload.startswith("Z:"):
            decoded = json.loads(gzip.decompress(base64.b64decode(payload[2:])))
        else:
            decoded = json.loads(gzip.decompress(base64.b64decode(payload)))
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"undecodable notification payload {payload[:60]!r}: {error}") from error

    if not isinstance(decoded, dict):
        raise ValueError(f"notification payload is not a JSON object: {payload[:60]!r}")

    return decoded


class Notifier:
    """Listens on a set of channels over one connection and keeps it alive.

    Args:
        dsn: connection string; the connection is dedicated to LISTEN.
        prefix: schema whose channels to listen on.
        callbacks: channel short name (``"insert"``, ``"signal"``) to a function
            called with ``(channel, payload)`` for each decoded notification.
        on_reconnect: awaited after every reconnection, once listening again.
    """

    def __init__(
        self,
        dsn: str,
        prefix: str,
        callbacks: dict[str, Callback],
        *,
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
        connect_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self._dsn = dsn
        self._prefix = prefix
        self._callbacks = dict(callbacks)
        self._on_reconnect = on_reconnect
        self._connect_kwargs = connect_kwargs or {}
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the LISTEN connection, for diagnostics and fault tests."""
        return self._conn.get_server_pid() if self.connected else None

    async def start(self) -> None:
        """Connect and listen; raise the connection error when the first attempt fails."""
        await self._connect()
        self._task = asyncio.create_task(self._watch(), name="obanpro-notifier")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await asyncio.wait_for(conn.close(), timeout=2)
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError):
                conn.terminate()

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT, **self._connect_kwargs)
        self._lost.clear()
        conn.add_termination_listener(lambda _conn: self._lost.set())

        for channel in self._callbacks:
            await conn.add_listener(channel_name(self._prefix, channel), self._dispatch)

        self._conn = conn
        self._ready.set()

    def _dispatch(self, _conn: Any, _pid: int, full_channel: str, payload: str) -> None:
        channel = full_channel.rpartition(".oban_")[2]
        callback = self._callbacks.get(channel)
        if callback is None:
            return

        try:
            decoded = decode_payload(payload)
        except ValueError as error:
            log.warning("ignored a notification on %s: %s", full_channel, error)
            return

        try:
            result = callback(channel, decoded)
            if asyncio.iscoroutine(result):
                asyncio.ensure_future(result)
        except Exception:
            log.exception("notification handler for %s failed on payload %r", full_channel, decoded)

    async def _watch(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), timeout=HEARTBEAT_INTERVAL)
            except asyncio.TimeoutError:
                if await self._alive():
                    continue

            await self._reconnect()

    async def _alive(self) -> bool:
        conn = self._conn
        if conn is None or conn.is_closed():
            return False

        try:
            await asyncio.wait_for(conn.fetchval("SELECT 1"), timeout=CONNECT_TIMEOUT)
            return True
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as error:
            log.warning("LISTEN connection to %s failed its heartbeat: %r", describe_dsn(self._dsn), error)
            return False

    async def _reconnect(self) -> None:
        self._ready.clear()
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

        backoff = Backoff(maximum=RECONNECT_MAX_DELAY)
        while True:
            try:
                await self._connect()
                break
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as error:
                log.warning(
                    "LISTEN connection to %s failed: %r; retrying in %.2f s",
                    describe_dsn(self._dsn),
                    error,
                    backoff.delay,
                )
                await backoff.sleep()

        self.reconnects += 1
        log.info("LISTEN connection to %s re-established", describe_dsn(self._dsn))
        # The database answers again: fetches and acks waiting out a backoff retry now.
        wake_retries()

        if self._on_reconnect is not None:
            await self._on_reconnect()
