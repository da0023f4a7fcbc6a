"""Runs one job and turns its outcome into an `AckAction`, the state change to persist.

Async ``process`` functions run as tasks on the worker's loop; sync ones run in
the worker's thread pool, so the loop keeps fetching, acking and listening
while CPU work runs. Under a supervisor, a sync job that overruns its timeout
keeps its slot until the supervisor kills the process, because a thread cannot
be stopped from outside; without one (an `Oban` embedded in an application)
the job is failed at its timeout and its thread is left to finish on its own.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import Executor as ThreadPool
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from . import telemetry
from .backoff import clamp_backoff, default_backoff
from .job import Cancel, Job, Record, Snooze
from .thread_gate import JobThread, NotStarted, ThreadGate
from .worker import UnknownWorkerError, resolve, timeout_for

log = logging.getLogger(__name__)

_current_job: contextvars.ContextVar[Job | None] = contextvars.ContextVar("obanpro_current_job", default=None)


def current_job() -> Job | None:
    """Return the job running in this context (also inside a sync job's thread), or None."""
    return _current_job.get()


class JobTimeoutError(TimeoutError):
    """Raised into a job's record when it ran past its timeout."""


class InvalidArgsError(TypeError):
    """Raised for a row whose args are not a JSON object: no attempt can succeed, so the job is discarded."""


class JobCancelledError(Exception):
    """Recorded when a running job was cancelled through `cancel_job`."""


@dataclass(slots=True)
class AckAction:
    """The state change that finishing one job writes to its row."""

    job: Job
    entry: int
    state: str
    attempt_change: int = 0
    schedule_in: float | None = None
    error: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None


def error_entry(job: Job, message: str) -> dict[str, Any]:
    return {"attempt": job.attempt, "at": datetime.now(UTC).isoformat(), "error": message}


def _in_thread(thread: JobThread, process: Callable[[Job], Any], job: Job) -> Any:
    thread.enter()
    return process(job)


def timeout_message(seconds: float) -> str:
    return f"timed out after {seconds:g} s"


class Executor:
    """Runs jobs for one worker process.

    Args:
        threads: pool for sync ``process`` functions.
        import_roots: packages from which unknown worker names may be imported.
        supervised: True when a supervisor enforces deadlines by killing the process.
        cancel_check: returns whether cancelling the job in a slot entry was requested.
        on_deadline: records a job's timeout in its slot entry, for the supervisor.
    """

    def __init__(
        self,
        *,
        threads: ThreadPool,
        import_roots: Iterable[str],
        supervised: bool,
        cancel_check: Callable[[int], bool],
        on_deadline: Callable[[int, float], None],
    ) -> None:
        self._threads = threads
        self._import_roots = tuple(import_roots)
        self._supervised = supervised
        self._cancel_check = cancel_check
        self._on_deadline = on_deadline
        self.waiting: set[int] = set()
        """Slot entries of the sync jobs waiting in a thread gate, not started yet."""

    async def run(self, job: Job, entry: int, gate: ThreadGate | None = None) -> AckAction:
        """Run ``job`` held in slot ``entry`` and return how to ack it; never raises for job errors.

        With ``gate``, a sync job of a CPU-bound queue first waits for its
        process's CPU lane, and its timeout and duration count from its start.
        A job still waiting when the process drains is acked back to
        ``available`` with its attempt returned.
        """
        token = _current_job.set(job)
        start = time.monotonic_ns()
        worker_instance: Any = None
        timeout: float | None = None
        started = False

        try:
            cls = resolve(job.worker, self._import_roots)
            worker_instance = cls()
            timeout = timeout_for(cls, job, worker_instance)
            self._check_args(job)
            job._cancel_check = lambda: self._cancel_check(entry)
            thread = None
            if gate is not None and not cls.__obanpro_async__:
                thread = await self._wait_in_gate(gate, entry)
                start = time.monotonic_ns()
                if self._cancel_check(entry):
                    gate.leave(thread)
                    raise JobCancelledError("cancelled before it started")
            started = True
            if timeout:
                self._on_deadline(entry, timeout)
            telemetry.execute(telemetry.JOB_START, {"job": job, "monotonic_time": start})
            result, tb = await self._perform(cls, worker_instance, job, timeout, gate, thread), None
        except NotStarted:
            log.info("job %s (%s) goes back to queue %s unstarted: its process is stopping", job.id, job.worker, job.queue)
            return AckAction(job, entry, "available", attempt_change=-1)
        except asyncio.CancelledError:
            if not self._cancel_check(entry):
                raise
            result, tb = JobCancelledError("cancelled while executing" if started else "cancelled before it started"), None
        except UnknownWorkerError as error:
            result, tb = error, str(error)
        except (Exception, SystemExit) as error:
            result, tb = error, _format_error(error)
        finally:
            _current_job.reset(token)

        action = self._ack_for(job, entry, result, tb, worker_instance)
        self._report(job, action, result, tb, start)
        return action

    async def _wait_in_gate(self, gate: ThreadGate, entry: int) -> JobThread:
        self.waiting.add(entry)
        try:
            return await gate.enter()
        finally:
            self.waiting.discard(entry)

    def _check_args(self, job: Job) -> None:
        if not isinstance(job.args, dict):
            raise InvalidArgsError(
                f"invalid args for job {job.id}: expected a JSON object, got {type(job.args).__name__} "
                f"{str(job.args)[:200]}"
            )

    async def _perform(
        self,
        cls: type,
        instance: Any,
        job: Job,
        timeout: float | None,
        gate: ThreadGate | None = None,
        thread: JobThread | None = None,
    ) -> Any:
        if cls.__obanpro_async__:
            try:
                async with asyncio.timeout(timeout):
                    return await instance.process(job)
            except TimeoutError as error:
                raise JobTimeoutError(timeout_message(timeout)) from error

        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        if thread is None:
            future = loop.run_in_executor(self._threads, context.run, instance.process, job)
        else:
            assert gate is not None  # a thread comes only from a gate
            try:
                future = loop.run_in_executor(self._threads, context.run, _in_thread, thread, instance.process, job)
            except BaseException:
                gate.leave(thread)
                raise
            # The thread leaves the gate when it returns, even when a timeout stopped waiting for it.
            future.add_done_callback(lambda _future: gate.leave(thread))

        if timeout is None or self._supervised:
            result = await future
        else:
            try:
                result = await asyncio.wait_for(asyncio.shield(future), timeout)
            except TimeoutError as error:
                raise JobTimeoutError(timeout_message(timeout)) from error

        # A sync function may hand back a coroutine, as @job on an async callable does.
        if asyncio.iscoroutine(result):
            result = await result
        return result

    def _ack_for(self, job: Job, entry: int, result: Any, tb: str | None, instance: Any) -> AckAction:
        if isinstance(result, JobCancelledError):
            return AckAction(job, entry, "cancelled", error=error_entry(job, str(result)))

        if isinstance(result, BaseException):
            message = tb or repr(result)
            if job.attempt >= job.max_attempts or isinstance(result, InvalidArgsError):
                return AckAction(job, entry, "discarded", error=error_entry(job, message))

            return AckAction(
                job, entry, "retryable", error=error_entry(job, message), schedule_in=retry_delay(job, instance)
            )

        if isinstance(result, Snooze):
            meta = {"snoozed": int(job.meta.get("snoozed", 0) or 0) + 1} if isinstance(job.meta, dict) else {"snoozed": 1}
            if result.meta:
                meta.update(result.meta)
            return AckAction(job, entry, "scheduled", attempt_change=-1, schedule_in=float(result.seconds), meta=meta)

        if isinstance(result, Cancel):
            return AckAction(job, entry, "cancelled", error=error_entry(job, str(result.reason)))

        if isinstance(result, Record):
            return AckAction(job, entry, "completed", meta={"recorded": True, "return": result.encoded})

        return AckAction(job, entry, "completed")

    def _report(self, job: Job, action: AckAction, result: Any, tb: str | None, start: int) -> None:
        stop = time.monotonic_ns()
        queue_time = 0
        if job.attempted_at and job.scheduled_at:
            queue_time = int((job.attempted_at - job.scheduled_at).total_seconds() * 1e9)

        metadata = {
            "job": job,
            "state": action.state,
            "duration": stop - start,
            "queue_time": queue_time,
            "monotonic_time": stop,
        }

        if action.state in ("retryable", "discarded"):
            log.debug("job %s (%s) failed on attempt %s: %r", job.id, job.worker, job.attempt, result)
            telemetry.execute(
                telemetry.JOB_EXCEPTION,
                {
                    **metadata,
                    "error_message": str(result),
                    "error_type": type(result).__name__,
                    "traceback": tb,
                },
            )
        else:
            telemetry.execute(telemetry.JOB_STOP, metadata)


def retry_delay(job: Job, instance: Any) -> float:
    """Return seconds until a failed job runs again: the worker's ``backoff(job)``, else Oban's default."""
    method = getattr(instance, "backoff", None)
    if callable(method):
        try:
            return clamp_backoff(method(job))
        except Exception:
            log.exception("backoff() of worker %s failed for job %s; using the default", job.worker, job.id)

    return float(default_backoff(job.attempt, job.max_attempts))


def _format_error(error: BaseException) -> str:
    if isinstance(error, JobTimeoutError):
        return str(error)

    return "".join(traceback.format_exception(error))
