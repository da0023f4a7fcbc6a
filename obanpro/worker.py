"""Workers: the ``@worker`` and ``@job`` decorators and the registry behind them.

A job row names its worker as ``module.QualName``. Decorating a class or a
function registers it under that name when its module is imported, which is
what ``obanpro start --import app.workers`` does. A row may be written by anyone
with INSERT rights on ``oban_jobs``, so a name missing from the registry is
imported only when its module lies under one of the imported packages; any
other name fails with "unknown worker" instead of importing arbitrary code.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Protocol

from .job import Job

_registry: dict[str, type] = {}
_cron_entries: dict[str, tuple[type, str | Mapping[str, Any]]] = {}

# Options a decorator accepts that become fields of every new job.
JOB_OPTIONS = frozenset(
    {"queue", "priority", "max_attempts", "tags", "meta", "scheduled_at", "schedule_in", "scheduled_in"}
)
# Options that shape execution rather than the row.
WORKER_OPTIONS = frozenset({"timeout"})

_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class UnknownWorkerError(LookupError):
    """Raised when a job names a worker that is not registered and may not be imported."""


class Worker(Protocol):
    """What ``@worker`` and ``@job`` add to a class, for type checkers."""

    __obanpro_name__: ClassVar[str]
    __obanpro_opts__: ClassVar[dict[str, Any]]
    __obanpro_async__: ClassVar[bool]

    @classmethod
    def new(cls, args: Mapping[str, Any] | None = None, /, **params: Any) -> Job: ...

    @classmethod
    async def enqueue(
        cls, args: Mapping[str, Any] | None = None, /, conn: Any = None, **params: Any
    ) -> Job: ...

    def process(self, job: Job) -> Any: ...


def worker_name(target: Any) -> str:
    return f"{target.__module__}.{target.__qualname__}"


def register(cls: type) -> None:
    _registry[cls.__obanpro_name__] = cls


def lookup(name: str) -> type | None:
    """Return the worker registered as ``name``, or None, without importing anything."""
    return _registry.get(name)


def registered() -> dict[str, type]:
    """Return a copy of the registry: worker name to class."""
    return dict(_registry)


def cron_entries() -> dict[str, tuple[type, str | Mapping[str, Any]]]:
    """Return the periodic workers: worker name to (class, cron option)."""
    return dict(_cron_entries)


def worker(*, oban: str = "Oban", cron: str | Mapping[str, Any] | None = None, **options: Any):
    """Make a class with a ``process(self, job)`` method a worker.

    ``process`` may be async or sync. A sync ``process`` runs in a thread of the
    worker process, so the event loop keeps fetching, acking and listening.

    Args:
        oban: name of the `Oban` instance that ``enqueue`` uses.
        cron: a cron expression, or ``{"expr": ..., "timezone": ...}``, to enqueue
            the worker periodically.
        queue, priority, max_attempts, tags, meta, scheduled_at, scheduled_in:
            defaults for every job of this worker.
        timeout: seconds a job may run before it fails with "timed out after N s".
        Other keyword options are kept in ``job.extra`` for extensions.

    Raises:
        TypeError: when the class has no ``process`` method or an option has the wrong type.
    """

    def decorate(cls: type) -> type:
        process = getattr(cls, "process", None)
        if not callable(process):
            raise TypeError(f"worker {cls.__qualname__} must define process(self, job)")

        _attach(cls, worker_name(cls), oban, options, inspect.iscoroutinefunction(process), cron)
        return cls

    return decorate


def job(*, oban: str = "Oban", cron: str | Mapping[str, Any] | None = None, **options: Any):
    """Make a function a worker; its arguments become the job's args by parameter name.

    The function may be async or sync, and takes the same options as `worker`.
    ``new`` and ``enqueue`` accept the function's own arguments, which must be
    JSON-serialisable. Inside the function, `obanpro.current_job()` returns the job.
    """

    def decorate(function: Callable[..., Any]) -> type:
        if not callable(function):
            raise TypeError(f"@job needs a function, got {function!r}")

        signature = inspect.signature(function)
        is_async = inspect.iscoroutinefunction(function)

        def process(self: Any, job: Job) -> Any:
            return function(**job.args)

        async def process_async(self: Any, job: Job) -> Any:
            return await function(**job.args)

        namespace = {
            "__module__": function.__module__,
            "__qualname__": function.__qualname__,
            "__doc__": function.__doc__,
            "process": process_async if is_async else process,
            "__wrapped__": function,
            "__signature__": signature,
        }
        cls = type(function.__name__, (), namespace)
        _attach(cls, worker_name(function), oban, options, is_async, cron)

        def new(cls: type, *args: Any, **kwargs: Any) -> Job:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as error:
                raise TypeError(f"invalid arguments for job {cls.__obanpro_name__}: {error}") from None

            return _new_job(cls, dict(bound.arguments), {})

        async def enqueue(cls: type, *args: Any, conn: Any = None, **kwargs: Any) -> Job:
            return await _instance(cls).enqueue(cls.new(*args, **kwargs), conn=conn)

        cls.new = classmethod(new)
        cls.enqueue = classmethod(enqueue)
        cls.__call__ = staticmethod(function)
        return cls

    return decorate


def _attach(
    cls: type,
    name: str,
    oban: str,
    options: Mapping[str, Any],
    is_async: bool,
    cron: str | Mapping[str, Any] | None,
) -> None:
    opts = dict(options)
    _check_timeout(name, opts.get("timeout"))

    cls.__obanpro_name__ = name
    cls.__obanpro_oban__ = oban
    cls.__obanpro_opts__ = opts
    cls.__obanpro_async__ = is_async
    cls.__obanpro_cron__ = cron

    if "new" not in cls.__dict__:
        cls.new = classmethod(lambda cls, args=None, /, **params: _new_job(cls, args, params))

    if "enqueue" not in cls.__dict__:

        async def enqueue(cls: type, args: Any = None, /, conn: Any = None, **params: Any) -> Job:
            return await _instance(cls).enqueue(cls.new(args, **params), conn=conn)

        cls.enqueue = classmethod(enqueue)

    if cron is not None:
        # Raises ValueError at import time for a bad expression or time zone.
        from .scheduler import parse_cron_option

        parse_cron_option(name, cls, cron)

    register(cls)

    if cron is not None:
        _cron_entries[name] = (cls, cron)


def _check_timeout(name: str, timeout: Any) -> None:
    if timeout is None:
        return

    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"invalid timeout {timeout!r} for worker {name}: expected seconds as a number")

    if not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"invalid timeout {timeout!r} for worker {name}: must be a positive number")


def _new_job(cls: type, args: Mapping[str, Any] | None, params: Mapping[str, Any]) -> Job:
    merged = {**cls.__obanpro_opts__, **params}
    fields = {key: value for key, value in merged.items() if key in JOB_OPTIONS}
    extra = {
        key: value
        for key, value in merged.items()
        if key not in JOB_OPTIONS and key not in WORKER_OPTIONS
    }

    return Job(cls.__obanpro_name__, {} if args is None else args, extra=extra, **fields)


def _instance(cls: type) -> Any:
    from .oban import Oban

    return Oban.get_instance(cls.__obanpro_oban__)


def timeout_for(cls: type, job: Job, instance: Any) -> float | None:
    """Return the job's timeout in seconds: the worker's ``timeout(job)`` method, else its option."""
    method = getattr(instance, "timeout", None)
    if callable(method):
        value = method(job)
        _check_timeout(cls.__obanpro_name__, value)
        return value

    return cls.__obanpro_opts__.get("timeout")


def resolve(name: str, import_roots: Iterable[str] = ()) -> type:
    """Return the worker class registered as ``name``.

    A name that is not registered is imported by its module path only when that
    module is one of ``import_roots`` or lies under one of them.

    Raises:
        UnknownWorkerError: with a message that says why the name was not resolved.
    """
    cls = _registry.get(name)
    if cls is not None:
        return cls

    module_name, _, _ = name.rpartition(".")
    roots = tuple(import_roots)

    if not module_name or not _MODULE_PATH.fullmatch(name):
        raise UnknownWorkerError(f"unknown worker {name!r}: not a module.Name path")

    if not any(module_name == root or module_name.startswith(root + ".") for root in roots):
        raise UnknownWorkerError(
            f"unknown worker {name!r}: not registered on this node and its module "
            f"{module_name!r} is outside the imported packages {list(roots)}; "
            "pass its package to obanpro start --import"
        )

    try:
        importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any import failure makes the worker unknown
        raise UnknownWorkerError(
            f"unknown worker {name!r}: importing {module_name!r} failed: {error!r}"
        ) from error

    cls = _registry.get(name)
    if cls is None:
        raise UnknownWorkerError(
            f"unknown worker {name!r}: module {module_name!r} has no @worker or @job by that name"
        )

    return cls
