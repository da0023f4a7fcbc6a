"""obanpro: multi-process job processing on PostgreSQL, compatible with Oban's data model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The decorators share their names with the modules obanpro.job and obanpro.worker,
# so they are bound here after those modules load. The rest loads on first use,
# so importing a worker module does not pay for asyncpg and the runtime.
from .job import Cancel, Job, JobState, Record, Snooze
from .worker import job, worker

_EXPORTS = {
    "current_job": "obanpro.executor",
    "Oban": "obanpro.oban",
    "run": "obanpro.supervisor",
}

__all__ = ["Cancel", "Job", "JobState", "Record", "Snooze", "job", "worker", *_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from .executor import current_job  # noqa: F401 - exported lazily by __getattr__
    from .oban import Oban  # noqa: F401
    from .supervisor import run  # noqa: F401


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'obanpro' has no attribute {name!r}")

    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
