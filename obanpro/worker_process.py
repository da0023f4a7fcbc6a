"""The main function of a forked worker process.

The supervisor imports this module, and so the runtime, before it forks, so
children start without importing anything. After the fork the process resets
its signal handlers and random state, asks
Linux to send it SIGTERM when the supervisor dies, then builds its own event
loop, runs the ``--setup`` hook, and runs a `Runtime` until SIGTERM (drain and
exit 0) or until it recycles itself. SIGINT is ignored: Ctrl-C in a terminal
reaches every process of the group, and the supervisor alone decides what it
means.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from . import _core, process
from .config import Config
from .db import CONNECTION_ERRORS
from .oban import Oban
from .process import EXIT_CRASHED, EXIT_OK, EXIT_RECYCLED, EXIT_SETUP_FAILED, EXIT_START_FAILED
from .runtime import Runtime

log = logging.getLogger(__name__)

ORPHAN_GRACE = 2.0
"""Seconds an orphaned worker spends storing acks before it exits, when its supervisor died."""
ORPHAN_EXIT_MARGIN = 1.0


def run_worker(
    index: int,
    *,
    config: Config,
    dsn: str,
    table: _core.SlotTable,
    wake_fd: int,
    sibling_fds: list[int],
    supervisor_pid: int,
    setup: Callable[[], Any] | None,
    teardown: Callable[[], Any] | None,
    close_fds: Iterable[int],
    worker_uuid: uuid.UUID,
) -> None:
    """Run worker process ``index`` and exit the process with its exit code; never returns."""
    code = EXIT_CRASHED
    try:
        process.set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != supervisor_pid:
            os._exit(EXIT_OK)

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for fd in close_fds:
            _close(fd)
        _start_orphan_watchdog(supervisor_pid)
        code = asyncio.run(
            _main(index, config, dsn, table, wake_fd, sibling_fds, supervisor_pid, setup, teardown, worker_uuid)
        )
    except BaseException:
        log.exception("worker process %s (pid %s) crashed", index, os.getpid())
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


async def _main(
    index: int,
    config: Config,
    dsn: str,
    table: _core.SlotTable,
    wake_fd: int,
    sibling_fds: list[int],
    supervisor_pid: int,
    setup: Callable[[], Any] | None,
    teardown: Callable[[], Any] | None,
    worker_uuid: uuid.UUID,
) -> int:
    pid = os.getpid()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    process.accept_sigterm()

    if setup is not None:
        try:
            await setup()
        except Exception as error:
            # With the traceback, as for the teardown hook: the error alone does not say where it came from.
            log.exception("setup hook %s failed in worker process %s (pid %s): %r", config.setup, index, pid, error)
            return EXIT_SETUP_FAILED

    oban = Oban(
        dsn=dsn,
        name=config.name,
        node=config.node,
        prefix=config.prefix,
        pool_min_size=config.pool_min_size,
        pool_max_size=config.pool_max_size,
    )
    runtime = Runtime(
        dsn=dsn,
        prefix=config.prefix,
        node=config.node,
        slots=table,
        worker_index=index,
        import_roots=config.imports,
        supervised=True,
        wake_fd=wake_fd,
        sibling_fds=sibling_fds,
        max_jobs=config.max_jobs_per_process,
        max_memory=config.max_memory_per_process * 1024 * 1024,
        worker_uuid=worker_uuid,
    )

    try:
        await oban.start()
        await runtime.start()
    except CONNECTION_ERRORS as error:
        log.error("worker process %s (pid %s) could not connect: %r", index, pid, error)
        await runtime.stop()
        await oban.stop()
        return EXIT_START_FAILED

    log.debug("worker process %s (pid %s) running", index, pid)
    await _first(stop.wait(), runtime.finished.wait(), _watch_parent(supervisor_pid))

    grace = config.grace_period
    if os.getppid() != supervisor_pid:
        log.warning("worker process %s (pid %s) lost its supervisor; stopping", index, pid)
        grace = min(grace, ORPHAN_GRACE)

    if runtime.recycle_reason is None:
        table.set_worker_state(index, _core.WORKER_EXITING)
    await runtime.drain(grace)
    await runtime.stop()
    await oban.stop()
    await _run_teardown(teardown, config.teardown, index, pid)

    return EXIT_RECYCLED if runtime.recycle_reason else EXIT_OK


def _start_orphan_watchdog(supervisor_pid: int) -> None:
    """Exit from a thread when the supervisor is gone and the event loop cannot stop the process.

    The death signal reaches the loop's SIGTERM handler, but a job that blocks
    the loop (CPU work in an async function) would keep an orphan alive forever.
    """

    def watch() -> None:
        while os.getppid() == supervisor_pid:
            time.sleep(1.0)

        time.sleep(ORPHAN_GRACE + ORPHAN_EXIT_MARGIN)
        log.error("worker process (pid %s) lost its supervisor and did not stop in time; exiting now", os.getpid())
        os._exit(EXIT_CRASHED)

    threading.Thread(target=watch, name="obanpro-orphan-watchdog", daemon=True).start()


async def _first(*awaitables: Any) -> None:
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def _watch_parent(supervisor_pid: int) -> None:
    # The death signal covers Linux; this covers systems without it.
    while os.getppid() == supervisor_pid:
        await asyncio.sleep(1.0)


async def _run_teardown(teardown: Callable[[], Any] | None, path: str | None, index: int, pid: int) -> None:
    if teardown is None:
        return

    try:
        await teardown()
    except Exception:
        log.exception("teardown hook %s failed in worker process %s (pid %s)", path, index, pid)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
