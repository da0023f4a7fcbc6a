"""Process plumbing shared by the supervisor and its children: exit codes, death signals, signal names."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import sys
from typing import Any

EXIT_OK = 0
EXIT_CRASHED = 1
EXIT_SETUP_FAILED = 3
"""The worker's setup hook raised: the supervisor stops the node instead of respawning."""
EXIT_RECYCLED = 4
"""The worker reached its job or memory limit and asks to be replaced at once."""
EXIT_START_FAILED = 5
"""The worker could not connect at start; the supervisor respawns it with backoff."""

EXIT_MEANINGS = {
    EXIT_CRASHED: "crashed",
    EXIT_SETUP_FAILED: "its setup hook failed",
    EXIT_RECYCLED: "recycled",
    EXIT_START_FAILED: "could not start",
}

_PR_SET_PDEATHSIG = 1
_libc = None


def _load_libc() -> ctypes.CDLL:
    global _libc

    if _libc is None:
        # The process's own symbols include libc's; `ctypes.util.find_library`
        # would run `ldconfig -p` in every forked process.
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def set_parent_death_signal(signum: int) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent dies; return False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False

    return _load_libc().prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0


def release_free_memory() -> bool:
    """Return the C heap's free pages to the system with glibc's ``malloc_trim``; return False without glibc.

    glibc keeps freed memory inside its heaps, so a long-running process that
    allocates in bursts (rows, JSON, job threads) grows in resident size while
    its live objects do not.
    """
    if not sys.platform.startswith("linux"):
        return False

    trim = getattr(_load_libc(), "malloc_trim", None)
    if trim is None:
        return False

    trim(0)
    return True


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_status(status: int) -> tuple[str, int | None, int | None]:
    """Return (cause, exit code, signal number) for a ``waitpid`` status."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        return f"was killed by {signal_name(signum)}", None, signum

    code = os.waitstatus_to_exitcode(status)
    return f"exited with code {code}", code, None


_early_stops: list[int] = []


def defer_stop_signal() -> Any:
    """Record SIGTERM instead of dying by it until the supervisor installs its handlers; return the previous handler.

    Loading the settings, importing the worker modules and checking the
    database come before the supervisor, and a stop request sent meanwhile
    should end the node cleanly, not kill it.
    """
    _early_stops.clear()
    return signal.signal(signal.SIGTERM, lambda signum, _frame: _early_stops.append(signum))


def stop_requested_early() -> bool:
    """Return whether a SIGTERM arrived while `defer_stop_signal` was in effect, and forget it."""
    requested = bool(_early_stops)
    _early_stops.clear()
    return requested


FORK_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD})
"""Signals blocked across a fork, so none reaches the child while it still runs the parent's handlers."""


def reset_after_fork() -> None:
    """Give a forked child default signal handlers and fresh random state before anything else runs.

    SIGTERM stays blocked: the child unblocks it with `accept_sigterm` once its
    event loop handles it, so a stop request sent during start-up waits for the
    handler instead of being lost or killing the process mid-start.
    """
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_DFL)

    signal.set_wakeup_fd(-1)
    random.seed()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORK_SIGNALS - {signal.SIGTERM})


def accept_sigterm() -> None:
    """Unblock SIGTERM in a forked child; call it after installing the child's handler."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
