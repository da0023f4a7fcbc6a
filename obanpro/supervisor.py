"""The supervisor: one per node, it forks the worker processes and keeps them running.

The supervisor never runs an event loop or holds a connection while it forks:
its main loop is plain ``select`` on a signal pipe and the duties pipe, so no
loop, thread, pool or connection crosses a fork. What needs the database at the
node level (staging, rescuing a dead worker's jobs, queue-control signals,
producer rows) runs in a separate forked "duties" process, once per node.

It owns the slot table. When a worker dies it frees the worker's slots at
once, then asks the duties process to make that worker's jobs retryable with
an error saying how the process died, and respawns the worker with backoff. A
job past its timeout gets its worker killed. A worker whose setup hook fails
stops the node instead of being respawned in a loop.
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import inspect
import json
import logging
import os
import select
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import _core, process, slots
from .config import Config
from .process import EXIT_MEANINGS, EXIT_OK, EXIT_RECYCLED, EXIT_SETUP_FAILED, EXIT_START_FAILED, describe_status

log = logging.getLogger(__name__)

LOOP_INTERVAL = 0.05
HARD_TIMEOUT_GRACE = 1.0
"""Seconds past a job's deadline before its worker is killed; async jobs are cancelled at the deadline itself."""
KILL_MARGIN = 5.0
"""Seconds past the grace period, for storing the last acks, before stopping workers are killed."""
RESPAWN_MAX_DELAY = 10.0
FINAL_RESCUE_TIMEOUT = 2.0
"""Seconds the supervisor spends rescuing jobs itself, at start for killed nodes and at exit."""
SEGMENT_CHECK_INTERVAL = 5.0
EMBEDDED_CHECK_INTERVAL = 1.0
STABLE_AFTER = 5.0
"""A worker that ran this long resets its respawn backoff."""


class SetupError(ValueError):
    """Raised when a --setup or --teardown path cannot be used; the message names the path."""


def load_hook(path: str | None, option: str) -> Callable[[], Any] | None:
    """Import ``module.function`` and check that it is an async function taking no arguments."""
    if not path:
        return None

    module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise SetupError(f"invalid {option} {path!r}: expected module.function, as in app.worker_setup")

    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any import failure makes the hook unusable
        raise SetupError(f"invalid {option} {path!r}: importing {module_name!r} failed: {error!r}") from error

    hook = getattr(module, attribute, None)
    if hook is None:
        raise SetupError(f"invalid {option} {path!r}: module {module_name!r} has no attribute {attribute!r}")
    if not inspect.iscoroutinefunction(hook):
        raise SetupError(f"invalid {option} {path!r}: expected an async function (async def), got {hook!r}")

    try:
        inspect.signature(hook).bind()
    except TypeError:
        raise SetupError(f"invalid {option} {path!r}: the function must take no arguments") from None

    return hook


@dataclass
class Child:
    """A forked process the supervisor watches."""

    kind: str
    index: int
    pid: int = 0
    started: float = 0.0
    failures: int = 0
    respawn_at: float = 0.0
    stopping: bool = False
    timed_out: dict[int, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return "duties process" if self.kind == "duties" else f"worker process {self.index}"


class Supervisor:
    """Runs one node: ``Supervisor(config, dsn).run()`` blocks until the node stops and returns the exit code."""

    def __init__(self, config: Config, dsn: str, embedded: Any = None) -> None:
        self.config = config
        self.dsn = dsn
        self.embedded = embedded
        """The embedded PostgreSQL the node uses, if any: the node restarts it when it stops."""
        self._embedded_checked_at = 0.0
        self.segment: slots.Segment | None = None
        self.exit_code = EXIT_OK
        self._workers = [Child("worker", index) for index in range(config.processes)]
        self._duties = Child("duties", -1)
        self._signals: list[int] = []
        self._shutdown_at: float | None = None
        self._forced = False
        self._rescues: dict[int, dict[str, Any]] = {}
        self._next_rescue = 1
        self._to_duties = -1
        self._from_duties = -1
        self._signal_read = -1
        self._signal_write = -1
        self._segment_checked_at = 0.0
        self._segment_missing = False
        self._duties_buffer = b""
        self._wake_pipes: list[tuple[int, int]] = []
        self._setup = load_hook(config.setup, "--setup")
        self._teardown = load_hook(config.teardown, "--teardown")

    # Main loop

    def run(self) -> int:
        """Create the slot table, start every process, supervise until stopped; return the exit code."""
        self._rescue_stale(slots.remove_stale())
        self.segment = slots.create(self.config.node, self.config.queues, self.config.processes, self.config.prefix)
        signal_read, signal_write = _nonblocking_pipe()
        self._signal_read, self._signal_write = signal_read, signal_write
        previous = self._install_signals(signal_write)

        try:
            self._wake_pipes = [_nonblocking_pipe() for _ in self._workers]
            if process.stop_requested_early():
                log.info("node %s received SIGTERM while starting; stopping before any process starts", self.config.node)
                return self.exit_code
            log.info(
                "node %s starting %d worker processes for queues %s (slot table %s)",
                self.config.node,
                len(self._workers),
                ", ".join(f"{name}:{options['limit']}" for name, options in self.config.queues.items()),
                self.segment.name,
            )
            # Imported here, in the parent, so every forked child inherits the modules.
            from . import duties, worker_process  # noqa: F401

            # Workers first: the first job waits for them, not for the duties process.
            for child in self._workers:
                self._spawn_worker(child)
            self._spawn_duties()

            while not self._finished():
                self._wait(signal_read)
                self._handle_signals()
                self._reap()
                self._read_duties()
                self._enforce_deadlines()
                self._respawn_due()
                self._advance_shutdown()
                self._check_segment()
                self._check_embedded()
        finally:
            self._kill_all()
            self._rescue_remaining()
            self._restore_signals(previous)
            for fd in (signal_read, signal_write, self._to_duties, self._from_duties, *sum(self._wake_pipes, ())):
                _close(fd)
            self.segment.unlink()
            self.segment.close()

        log.info("node %s stopped", self.config.node)
        return self.exit_code

    def _wait(self, signal_read: int) -> None:
        fds = [signal_read] + ([self._from_duties] if self._from_duties >= 0 else [])
        try:
            readable, _, _ = select.select(fds, [], [], LOOP_INTERVAL)
        except InterruptedError:
            return

        if signal_read in readable:
            try:
                while os.read(signal_read, 1024):
                    pass
            except BlockingIOError:
                pass

    def _finished(self) -> bool:
        if self._shutdown_at is None:
            return False

        alive = [child for child in (*self._workers, self._duties) if child.pid]
        return not alive

    # Signals

    def _install_signals(self, signal_write: int) -> dict[int, Any]:
        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            previous[signum] = signal.signal(signum, self._on_signal)
        previous[-1] = signal.set_wakeup_fd(signal_write, warn_on_full_buffer=False)
        return previous

    def _restore_signals(self, previous: dict[int, Any]) -> None:
        signal.set_wakeup_fd(previous.pop(-1))
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # Handlers only record the signal; the main loop acts on it.
        self._signals.append(signum)

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGCHLD:
                continue

            if signum == signal.SIGINT and self._shutdown_at is not None:
                log.warning("second interrupt: stopping every process of node %s now", self.config.node)
                self._forced = True
                self.exit_code = 130
                self._kill_all()
                continue

            if self._shutdown_at is None:
                log.info(
                    "received %s: stopping intake, waiting up to %.1f s for running jobs",
                    process.signal_name(signum),
                    self.config.grace_period,
                )
                self.shutdown()
            else:
                left = max(0.0, self._shutdown_at + self.config.grace_period - time.monotonic())
                log.info(
                    "received %s again: node %s is already stopping, with %.1f s of its grace period left; "
                    "a second Ctrl-C (SIGINT) stops it now",
                    process.signal_name(signum),
                    self.config.node,
                    left,
                )

    def shutdown(self, exit_code: int | None = None) -> None:
        """Stop intake and ask every worker to finish its running jobs within the grace period."""
        if exit_code is not None and self.exit_code == EXIT_OK:
            self.exit_code = exit_code
        if self._shutdown_at is not None:
            return

        self._shutdown_at = time.monotonic()
        self.segment.table.set_stopping()

        for child in self._workers:
            if child.pid:
                child.stopping = True
                _signal(child.pid, signal.SIGTERM)

    def _advance_shutdown(self) -> None:
        if self._shutdown_at is None:
            return

        elapsed = time.monotonic() - self._shutdown_at
        workers_alive = [child for child in self._workers if child.pid]

        if workers_alive and elapsed > self.config.grace_period + KILL_MARGIN:
            for child in workers_alive:
                if child.pid and not child.timed_out.get(-1):
                    log.warning("%s (pid %s) is still running after the grace period; killing it", child.label, child.pid)
                    child.timed_out[-1] = 1
                    _signal(child.pid, signal.SIGKILL)
            return

        if workers_alive or not self._duties.pid or self._duties.stopping:
            if self._duties.pid and self._duties.stopping and elapsed > self.config.grace_period + 2 * KILL_MARGIN:
                _signal(self._duties.pid, signal.SIGKILL)
            return

        # Workers are gone: let the duties process store the last rescues, then stop it.
        if self._rescues and elapsed < self.config.grace_period + 2 * KILL_MARGIN:
            return

        self._duties.stopping = True
        _signal(self._duties.pid, signal.SIGTERM)

    def _kill_all(self) -> None:
        for child in (*self._workers, self._duties):
            if child.pid:
                _signal(child.pid, signal.SIGKILL)

        deadline = time.monotonic() + 5
        while any(child.pid for child in (*self._workers, self._duties)) and time.monotonic() < deadline:
            self._reap(block=True)

    def _rescue_stale(self, stale: list[slots.StaleSegment]) -> None:
        """Rescue the jobs of nodes killed on this host, whose segments were left behind.

        Runs before the first fork, and its loop closes before it returns.
        """
        requests = [
            {
                "uuid": worker_uuid.hex,
                "cause": f"node {segment.node} was killed with its supervisor (pid {segment.supervisor_pid}) "
                "before this job's result was stored",
                "timed_out": {},
                "queues": segment.queues,
            }
            for segment in stale
            for worker_uuid in segment.worker_uuids
        ]
        if not requests:
            return

        try:
            asyncio.run(asyncio.wait_for(self._store_rescues(requests), FINAL_RESCUE_TIMEOUT))
        except Exception as error:  # noqa: BLE001 - the lifeline rescues these jobs later
            log.error("could not rescue the jobs of killed nodes on this host (%r); a lifeline will", error)

    def _rescue_remaining(self) -> None:
        """Store the rescues the duties process did not confirm, from here, before the node exits.

        After a forced stop, or when the duties process died first, the jobs of
        killed workers would otherwise stay executing until a lifeline rescues
        them minutes later. No process is forked after this point, so a loop and
        a connection in the supervisor are safe.
        """
        if not self._rescues:
            return

        requests = list(self._rescues.values())
        log.warning("storing the rescue of %d worker processes' jobs before node %s exits", len(requests), self.config.node)
        try:
            asyncio.run(asyncio.wait_for(self._store_rescues(requests), FINAL_RESCUE_TIMEOUT))
        except Exception as error:  # noqa: BLE001 - the node exits either way; the lifeline is the fallback
            log.error(
                "could not rescue the jobs of stopped workers of node %s (%r); a lifeline makes them available after "
                "its rescue_after, or the next start of this node does",
                self.config.node,
                error,
            )
            return
        self._rescues.clear()

    async def _store_rescues(self, requests: list[dict[str, Any]]) -> None:
        from .db import create_pool
        from .rescue import producer_uuids, rescue_jobs

        pool = await create_pool(self.dsn, min_size=1, max_size=1, internal=True, application_name=f"obanpro {self.config.node} supervisor")
        try:
            for request in requests:
                queues = request.get("queues") or list(self.segment.table.queues())
                uuids = producer_uuids(uuid.UUID(hex=request["uuid"]), queues)
                timed_out = {int(job_id): timeout for job_id, timeout in request["timed_out"].items()}
                await rescue_jobs(pool, self.config.prefix, uuids, request["cause"], timed_out)
        finally:
            await pool.close()

    # Children

    def _spawn_worker(self, child: Child) -> None:
        from .worker_process import run_worker

        read_fd = self._wake_pipes[child.index][0]
        sibling_fds = [write for index, (_read, write) in enumerate(self._wake_pipes) if index != child.index]
        close_fds = [
            fd
            for fd in (self._signal_read, self._signal_write, self._to_duties, self._from_duties)
            if fd >= 0
        ] + [read for index, (read, _write) in enumerate(self._wake_pipes) if index != child.index]
        close_fds.append(self._wake_pipes[child.index][1])
        supervisor_pid = os.getpid()
        worker_uuid = uuid.uuid4()
        self._fork(child, lambda: run_worker(
            child.index,
            config=self.config,
            dsn=self.dsn,
            table=self.segment.table,
            wake_fd=read_fd,
            sibling_fds=sibling_fds,
            supervisor_pid=supervisor_pid,
            setup=self._setup,
            teardown=self._teardown,
            close_fds=close_fds,
            worker_uuid=worker_uuid,
        ), worker_uuid)

    def _spawn_duties(self) -> None:
        from .duties import run_duties

        to_child_read, to_child_write = os.pipe()
        from_child_read, from_child_write = os.pipe()
        wake_fds = [write for _read, write in self._wake_pipes]

        def main() -> None:
            for fd in (to_child_write, from_child_read, self._signal_read, self._signal_write, self._to_duties, self._from_duties):
                _close(fd)
            for read, _write in self._wake_pipes:
                _close(read)
            run_duties(
                config=self.config,
                dsn=self.dsn,
                table=self.segment.table,
                requests_fd=to_child_read,
                replies_fd=from_child_write,
                wake_fds=wake_fds,
                supervisor_pid=os.getppid(),
            )

        self._fork(self._duties, main)
        os.close(to_child_read)
        os.close(from_child_write)
        _close(self._to_duties)
        _close(self._from_duties)
        self._to_duties, self._from_duties = to_child_write, from_child_read
        self._duties_buffer = b""
        os.set_blocking(self._from_duties, False)

        for request in self._rescues.values():
            self._send_duties(request)

    def _fork(self, child: Child, main: Callable[[], None], worker_uuid: uuid.UUID | None = None) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for handler in logging.getLogger().handlers:
            handler.flush()

        # The record is written before the fork, so the child never reads a half-written one.
        if worker_uuid is not None:
            self.segment.table.register_worker(child.index, 0, worker_uuid.bytes)

        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, process.FORK_SIGNALS)
        pid = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        else:
            code = 1
            try:
                process.reset_after_fork()
                main()
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException:
                log.exception("%s failed to start", child.label)
            finally:
                os._exit(code)

        child.pid = pid
        child.started = time.monotonic()
        child.stopping = self._shutdown_at is not None
        child.timed_out = {}
        if worker_uuid is not None:
            self.segment.table.set_worker_pid(child.index, pid)
        log.debug("started %s as pid %s", child.label, pid)

    def _reap(self, block: bool = False) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

            child = self._child_by_pid(pid)
            if child is not None:
                self._on_exit(child, status)
            if block:
                return

    def _child_by_pid(self, pid: int) -> Child | None:
        for child in (*self._workers, self._duties):
            if child.pid == pid:
                return child
        return None

    def _on_exit(self, child: Child, status: int) -> None:
        pid = child.pid
        cause, code, signum = describe_status(status)
        lifetime = time.monotonic() - child.started
        child.pid = 0

        if child.kind == "worker":
            state = self.segment.table.worker_state(child.index)
            if code is not None and not _exit_code_confirmed(code, state, child.stopping):
                # A job ended the process with a code of its own (os._exit). That
                # is a crash, whatever the code means when obanpro exits with it.
                code = None
                cause += " while running jobs, not at obanpro's request (a job may have called os._exit)"
            self._on_worker_exit(child, pid, cause, code, signum)
        else:
            level = logging.ERROR
            if code == EXIT_OK:
                level = logging.INFO if child.stopping else logging.WARNING
            log.log(level, "duties process (pid %s) %s", pid, cause)

        if self._shutdown_at is not None or self._forced:
            return

        child.failures = child.failures + 1 if lifetime < STABLE_AFTER and code != EXIT_RECYCLED else 0
        delay = 0.0 if child.failures == 0 else min(RESPAWN_MAX_DELAY, 0.1 * 2 ** (child.failures - 1))
        child.respawn_at = time.monotonic() + delay
        if delay:
            log.info("restarting %s in %.1f s", child.label, delay)

    def _on_worker_exit(self, child: Child, pid: int, cause: str, code: int | None, signum: int | None) -> None:
        table = self.segment.table
        record = table.worker(child.index)
        held = table.reclaim(pid)
        table.clear_worker(child.index)
        timed_out = {job_id: timeout for job_id, timeout in child.timed_out.items() if job_id > 0}

        if code == EXIT_SETUP_FAILED:
            if self._shutdown_at is None:
                log.error("stopping node %s: the setup hook %s failed in worker process %s", self.config.node, self.config.setup, pid)
            self.shutdown(exit_code=EXIT_SETUP_FAILED)
        elif code == EXIT_RECYCLED:
            log.info("worker process %s (pid %s) recycled after %d jobs", child.index, pid, record["jobs_run"])
        elif code == EXIT_OK and child.stopping:
            log.info("worker process %s (pid %s) stopped", child.index, pid)
        elif code == EXIT_OK:
            log.warning(
                "worker process %s (pid %s) stopped without a request from the supervisor, "
                "likely on a SIGTERM sent to it directly; restarting it",
                child.index,
                pid,
            )
        else:
            self._log_death(child, pid, cause, code, signum, held, timed_out)

        if not held and code in (EXIT_OK, EXIT_RECYCLED):
            return

        message = f"worker process {pid} {cause}"
        if self._forced:
            message += " when a second interrupt stopped the node"
        elif timed_out:
            message += f" after job {', '.join(map(str, timed_out))} timed out"
        elif code in EXIT_MEANINGS and code != EXIT_RECYCLED:
            message += f" ({EXIT_MEANINGS[code]})"
        elif child.stopping and code == EXIT_OK:
            message = f"worker process {pid} stopped at shutdown with the job still running"

        self._request_rescue(pid, record["uuid"].hex(), message, timed_out, [job_id for _e, _q, job_id, _a in held if job_id])

    def _log_death(
        self,
        child: Child,
        pid: int,
        cause: str,
        code: int | None,
        signum: int | None,
        held: list[tuple[int, int, int, int]],
        timed_out: dict[int, float],
    ) -> None:
        jobs = [job_id for _entry, _queue, job_id, _attempt in held if job_id]
        hint = ""
        if signum == signal.SIGKILL and not timed_out and not child.stopping:
            hint = " (SIGKILL from outside obanpro often means the kernel's out-of-memory killer; check dmesg)"
        if timed_out:
            hint = f" because job {', '.join(map(str, timed_out))} ran past its timeout"

        running = f"; rescuing its jobs {', '.join(map(str, jobs))}" if jobs else ""
        if self._forced:
            # The second interrupt asked for these kills; they are no crash.
            log.warning("worker process %s (pid %s) %s on the second interrupt%s", child.index, pid, cause, running)
            return
        log.error("worker process %s (pid %s) %s%s%s", child.index, pid, cause, hint, running)

    def _respawn_due(self) -> None:
        if self._shutdown_at is not None:
            return

        now = time.monotonic()
        if not self._duties.pid and now >= self._duties.respawn_at:
            self._spawn_duties()

        for child in self._workers:
            if not child.pid and now >= child.respawn_at:
                self._spawn_worker(child)

    def _check_embedded(self) -> None:
        """Restart the embedded PostgreSQL when it stopped under the node.

        Its owner may be another process, such as a script that enqueued jobs
        and exited. This node then starts it again and owns it from then on.
        """
        now = time.monotonic()
        if self.embedded is None or self._shutdown_at is not None or now < self._embedded_checked_at + EMBEDDED_CHECK_INTERVAL:
            return

        self._embedded_checked_at = now
        before = self.embedded.postmaster_pid
        try:
            self.embedded.ensure_running()
        except Exception as error:  # noqa: BLE001 - the node keeps running and tries again
            log.error("the embedded PostgreSQL of node %s is down and could not be started: %s", self.config.node, error)
            return

        if self.embedded.postmaster_pid != before:
            log.warning(
                "the embedded PostgreSQL had stopped (postmaster pid %s); node %s started it again as pid %s and "
                "now owns it",
                before,
                self.config.node,
                self.embedded.postmaster_pid,
            )

    def _check_segment(self) -> None:
        now = time.monotonic()
        if self._segment_missing or now < self._segment_checked_at + SEGMENT_CHECK_INTERVAL:
            return

        self._segment_checked_at = now
        if self.segment.name in slots.segment_names():
            return

        # Nothing breaks: every process keeps its mapping, and a new node gets a new name.
        self._segment_missing = True
        log.error(
            "the slot table %s of node %s was removed from /dev/shm while the node runs; systemd-logind does this "
            "with RemoveIPC=yes when the user's last session ends. The node keeps running on its mapping, but "
            "obanpro status cannot see it: run obanpro as a system user or set RemoveIPC=no in logind.conf",
            self.segment.name,
            self.config.node,
        )

    # Deadlines

    def _enforce_deadlines(self) -> None:
        for _entry, pid, job_id, timeout in self.segment.table.overdue(int(HARD_TIMEOUT_GRACE * 1e9)):
            child = self._child_by_pid(pid)
            if child is None or child.kind != "worker" or job_id in child.timed_out:
                continue

            log.error(
                "job %s timed out after %g s and does not yield; killing worker process %s (pid %s)",
                job_id,
                timeout,
                child.index,
                pid,
            )
            child.timed_out[job_id] = timeout
            _signal(pid, signal.SIGKILL)

    # Duties process

    def _request_rescue(self, pid: int, worker_uuid: str, cause: str, timed_out: dict[int, float], jobs: list[int]) -> None:
        request = {
            "type": "rescue",
            "id": self._next_rescue,
            "pid": pid,
            "uuid": worker_uuid,
            "cause": cause,
            "timed_out": {str(job_id): timeout for job_id, timeout in timed_out.items()},
            "jobs": jobs,
        }
        self._next_rescue += 1
        self._rescues[request["id"]] = request
        self._send_duties(request)

    def _send_duties(self, message: dict[str, Any]) -> None:
        if self._to_duties < 0 or not self._duties.pid:
            return

        data = (json.dumps(message) + "\n").encode()
        try:
            os.write(self._to_duties, data)
        except OSError as error:
            if error.errno not in (errno.EPIPE, errno.EBADF):
                raise
            log.warning("duties process is gone; request %s waits for its replacement", message.get("id"))

    def _read_duties(self) -> None:
        if self._from_duties < 0:
            return

        try:
            while chunk := os.read(self._from_duties, 65536):
                self._duties_buffer += chunk
        except BlockingIOError:
            pass

        *lines, self._duties_buffer = self._duties_buffer.split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                log.warning("ignored a malformed message from the duties process: %r", line[:200])
                continue
            if message.get("type") == "rescued":
                self._rescues.pop(message.get("id"), None)
            elif message.get("type") == "start_queue":
                self._add_queue(message)

    def _add_queue(self, request: dict[str, Any]) -> None:
        """Add a queue that a start signal asked for; every worker starts a producer for it."""
        table = self.segment.table
        name, limit = request.get("queue"), request.get("limit")
        if not isinstance(name, str) or isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            log.error("ignored a request to start queue %r with limit %r: expected a name and a positive limit", name, limit)
            return

        index = table.queue_index(name)
        try:
            if index >= 0:
                table.scale(index, limit)
                table.set_paused(index, bool(request.get("paused", False)))
                table.set_queue_state(index, _core.QUEUE_RUNNING)
            else:
                table.add_queue(name, limit, slots.queue_capacity(limit), bool(request.get("paused", False)))
        except ValueError as error:
            log.error("cannot start queue %s on node %s: %s", name, self.config.node, error)
            return

        log.info("started queue %s with limit %s on node %s", name, limit, self.config.node)


def run(
    queues: dict[str, Any] | str,
    *,
    processes: int | None = None,
    setup: str | None = None,
    teardown: str | None = None,
    dsn: str | None = None,
    **options: Any,
) -> int:
    """Run a node in this process until SIGTERM or Ctrl-C, as ``obanpro start`` does; return its exit code.

    Call it from the main thread of a script, with no event loop running. Other
    keyword options are `Config` fields (prefix, node, imports, grace_period,
    max_jobs_per_process, max_memory_per_process, pool sizes).
    """
    if _loop_running():
        raise RuntimeError("obanpro.run blocks and forks processes: call it from a script, not from async code")

    previous = process.defer_stop_signal()
    try:
        return _run(queues, processes, setup, teardown, dsn, options)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(
    queues: dict[str, Any] | str,
    processes: int | None,
    setup: str | None,
    teardown: str | None,
    dsn: str | None,
    options: dict[str, Any],
) -> int:
    from . import config as config_module
    from .embedded import resolve_dsn

    flags = {"queues": queues, "processes": processes, "setup": setup, "teardown": teardown, **options}
    config = config_module.load(flags=flags)
    if not logging.getLogger().handlers:
        # A script that set up no logging still gets the node's log, as obanpro start prints it.
        from .log import configure

        configure(config.log_level, config.log_format)

    resolved, server = resolve_dsn(dsn or config.dsn)

    try:
        preflight(resolved, config.prefix, config)
        return Supervisor(config, resolved, server).run()
    finally:
        if server is not None:
            server.stop()


def preflight(dsn: str, prefix: str, config: Config | None = None) -> None:
    """Check that the database accepts connections and has the tables, before anything forks."""
    from .preflight import check

    asyncio.run(check(dsn, prefix, connections_needed(config) if config else 0))


def connections_needed(config: Config) -> int:
    """Estimate the connections a node opens: per worker one fetch, up to two ack and one LISTEN
    connection plus the job-code pool's minimum, and four for the duties process (a pool of up
    to three and one LISTEN connection)."""
    return config.processes * (4 + config.pool_min_size) + 4


def _exit_code_confirmed(code: int, state: int, stopping: bool) -> bool:
    """Return whether a worker's exit ``code`` means what obanpro uses it for, judged by the state it reached.

    Jobs can end their process with any code. So a code counts as a failed
    setup or start only before the process ran jobs, and as a recycle only
    after it began to drain. It counts as a clean stop only when the process
    drained or was asked to stop.
    """
    if code in (EXIT_SETUP_FAILED, EXIT_START_FAILED):
        return state == _core.WORKER_STARTING
    if code == EXIT_RECYCLED:
        return state == _core.WORKER_DRAINING
    if code == EXIT_OK:
        return stopping or state in (_core.WORKER_DRAINING, _core.WORKER_EXITING)
    return True


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _nonblocking_pipe() -> tuple[int, int]:
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    return read_fd, write_fd


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _close(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass
