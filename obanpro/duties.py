"""The duties process: what a node does once, not once per worker process.

It runs the node services (see `obanpro.node`) and rescues the jobs of dead
workers on the supervisor's request. The supervisor sends requests as JSON lines over a
pipe and drops each one only when this process replies that it is stored, so a
request survives the duties process dying and being replaced.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import uuid
from typing import Any

import asyncpg

from . import _core, process
from .config import Config
from .db import CONNECTION_ERRORS, Backoff, create_pool, recover
from .process import EXIT_CRASHED, EXIT_OK
from .rescue import producer_uuids, rescue_jobs, rescue_node_orphans
from .node import NodeContext, NodeServices

log = logging.getLogger(__name__)

PREVIOUS_RUN_PASSES = (0.0, 5.0)
"""Seconds before each pass that rescues what a killed previous run of the node left executing."""


def run_duties(
    *,
    config: Config,
    dsn: str,
    table: _core.SlotTable,
    requests_fd: int,
    replies_fd: int,
    wake_fds: list[int],
    supervisor_pid: int,
) -> None:
    """Run the duties process and exit the process; never returns."""
    code = EXIT_CRASHED
    try:
        process.set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != supervisor_pid:
            os._exit(EXIT_OK)

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        code = asyncio.run(Duties(config, dsn, table, requests_fd, replies_fd, wake_fds).run())
    except BaseException:
        log.exception("duties process (pid %s) crashed", os.getpid())
    finally:
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)


class Duties:
    """The node-level loops of one ``obanpro start``."""

    def __init__(
        self,
        config: Config,
        dsn: str,
        table: _core.SlotTable,
        requests_fd: int,
        replies_fd: int,
        wake_fds: list[int],
    ) -> None:
        self.config = config
        self.dsn = dsn
        self.table = table
        self._requests_fd = requests_fd
        self._replies_fd = replies_fd
        self._wake_fds = wake_fds
        self._buffer = b""
        self._requests: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.pool: Any = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        process.accept_sigterm()

        self.pool = await self._connect(stop)
        if self.pool is None:
            return EXIT_OK

        os.set_blocking(self._requests_fd, False)
        loop.add_reader(self._requests_fd, self._read_requests)

        services = NodeServices(self._context())
        await services.start()
        rescuer = asyncio.create_task(self._rescue_loop(), name="obanpro-rescuer")
        previous_run = asyncio.create_task(self._rescue_previous_run(), name="obanpro-previous-run")

        await stop.wait()

        loop.remove_reader(self._requests_fd)
        await services.stop()
        rescuer.cancel()
        previous_run.cancel()
        await asyncio.gather(rescuer, previous_run, return_exceptions=True)
        await self.pool.close()
        return EXIT_OK

    async def _connect(self, stop: asyncio.Event) -> Any:
        backoff = Backoff(maximum=5.0)
        while not stop.is_set():
            try:
                return await create_pool(
                    self.dsn, min_size=1, max_size=3, internal=True, application_name=f"obanpro {self.config.node} duties"
                )
            except CONNECTION_ERRORS as error:
                log.warning("duties process could not connect: %r; retrying in %.2f s", error, backoff.delay)
                await backoff.sleep()
        return None

    def _context(self) -> NodeContext:
        config = self.config
        return NodeContext(
            pool=self.pool,
            dsn=self.dsn,
            prefix=config.prefix,
            name=config.name,
            node=config.node,
            table=self.table,
            wake_worker=self._wake_worker,
            request_queue=lambda request: self._reply({"type": "start_queue", **request}),
            options={
                "stager": config.stager,
                "lifeline": config.lifeline,
                "pruner": config.pruner,
                "refresher": config.refresher,
                "scheduler": config.scheduler,
                "vacuum_watch": config.vacuum_watch,
            },
            leadership=config.leadership is not False,
        )

    def _wake_worker(self, index: int) -> None:
        targets = self._wake_fds if index < 0 else self._wake_fds[index : index + 1]
        for fd in targets:
            try:
                os.write(fd, b"w")
            except OSError:
                pass

    async def _rescue_previous_run(self) -> None:
        """Rescue the jobs a killed previous run of this node left executing, now and once more shortly after.

        The second pass catches jobs that the first skipped as too recent.
        """
        max_age = float(self.config.refresher.get("max_age", 60.0))
        for delay in PREVIOUS_RUN_PASSES:
            await asyncio.sleep(delay)
            live = [
                producer
                for index in range(self.table.max_workers)
                for producer in producer_uuids(uuid.UUID(bytes=self.table.worker(index)["uuid"]), self.table.queues())
            ]
            try:
                await rescue_node_orphans(self.pool, self.config.prefix, self.config.node, live, max_age)
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as error:
                log.warning("rescuing the jobs of a previous run of node %s failed: %r", self.config.node, error)

    # Supervisor requests

    def _read_requests(self) -> None:
        try:
            while chunk := os.read(self._requests_fd, 65536):
                self._buffer += chunk
        except BlockingIOError:
            pass

        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            try:
                self._requests.put_nowait(json.loads(line))
            except ValueError:
                log.warning("ignored a malformed request from the supervisor: %r", line[:200])

    def _reply(self, message: dict[str, Any]) -> None:
        try:
            os.write(self._replies_fd, (json.dumps(message) + "\n").encode())
        except OSError as error:
            log.warning("could not reply to the supervisor: %r", error)

    async def _rescue_loop(self) -> None:
        while True:
            request = await self._requests.get()
            if request.get("type") != "rescue":
                log.warning("ignored an unknown request from the supervisor: %r", request)
                continue

            await self._rescue(request)
            self._reply({"type": "rescued", "id": request["id"]})

    async def _rescue(self, request: dict[str, Any]) -> None:
        worker_uuid = uuid.UUID(hex=request["uuid"])
        uuids = producer_uuids(worker_uuid, self.table.queues())
        timed_out = {int(job_id): timeout for job_id, timeout in request.get("timed_out", {}).items()}
        backoff = Backoff(maximum=5.0)

        while True:
            try:
                await rescue_jobs(self.pool, self.config.prefix, uuids, request["cause"], timed_out)
                return
            except CONNECTION_ERRORS as error:
                log.warning(
                    "rescuing the jobs of worker pid %s failed: %r; retrying in %.2f s",
                    request.get("pid"),
                    error,
                    backoff.delay,
                )
                recover(self.pool, error)
                await backoff.sleep()
