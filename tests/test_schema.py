"""Installing the tables, and accepting schemas that oban-py or Elixir Oban created."""

from __future__ import annotations

import json
import secrets

import asyncpg
import pytest

from obanpro import schema
from obanpro.oban import COPY_MIN_BATCH, Oban

from . import workers
from .conftest import wait_for

# The Elixir Oban schema at migration version 14, written from its documented
# columns: bigserial id, integer counters, jsonb[] errors, no oban_leaders or
# oban_producers table, oban_peers for its own leadership, and the version
# stored as a comment on oban_jobs.
ELIXIR_DDL = """
CREATE SCHEMA {p};
CREATE TYPE {p}.oban_job_state AS ENUM
    ('available', 'suspended', 'scheduled', 'executing', 'retryable', 'completed', 'discarded', 'cancelled');
CREATE TABLE {p}.oban_jobs (
    id bigserial PRIMARY KEY,
    state {p}.oban_job_state NOT NULL DEFAULT 'available',
    queue text NOT NULL DEFAULT 'default',
    worker text NOT NULL,
    args jsonb NOT NULL DEFAULT '{{}}',
    errors jsonb[] NOT NULL DEFAULT ARRAY[]::jsonb[],
    attempt integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL DEFAULT 20,
    inserted_at timestamp without time zone NOT NULL DEFAULT timezone('UTC', now()),
    scheduled_at timestamp without time zone NOT NULL DEFAULT timezone('UTC', now()),
    attempted_at timestamp without time zone,
    completed_at timestamp without time zone,
    attempted_by text[],
    discarded_at timestamp without time zone,
    priority integer NOT NULL DEFAULT 0,
    tags text[] DEFAULT ARRAY[]::text[],
    meta jsonb DEFAULT '{{}}',
    cancelled_at timestamp without time zone,
    CONSTRAINT attempt_range CHECK (attempt >= 0 AND attempt <= max_attempts),
    CONSTRAINT positive_max_attempts CHECK (max_attempts > 0),
    CONSTRAINT queue_length CHECK (char_length(queue) > 0 AND char_length(queue) < 128),
    CONSTRAINT worker_length CHECK (char_length(worker) > 0 AND char_length(worker) < 128),
    CONSTRAINT non_negative_priority CHECK (priority >= 0)
);
CREATE INDEX oban_jobs_state_queue_priority_scheduled_at_id_index
    ON {p}.oban_jobs (state, queue, priority, scheduled_at, id);
CREATE INDEX oban_jobs_args_index ON {p}.oban_jobs USING gin (args);
CREATE INDEX oban_jobs_meta_index ON {p}.oban_jobs USING gin (meta);
CREATE UNLOGGED TABLE {p}.oban_peers (
    name text PRIMARY KEY,
    node text NOT NULL,
    started_at timestamp without time zone NOT NULL,
    expires_at timestamp without time zone NOT NULL
);
COMMENT ON TABLE {p}.oban_jobs IS '14';
"""

# oban-py 0.6 and later, from its documented install: smallint counters,
# jsonb errors, the enum created without 'suspended' and extended after 'scheduled'.
OBAN_PY_DDL = """
CREATE SCHEMA {p};
CREATE TYPE {p}.oban_job_state AS ENUM
    ('available', 'scheduled', 'executing', 'retryable', 'completed', 'discarded', 'cancelled');
ALTER TYPE {p}.oban_job_state ADD VALUE 'suspended' AFTER 'scheduled';
CREATE TABLE {p}.oban_jobs (
    id bigint PRIMARY KEY GENERATED ALWAYS AS IDENTITY,
    state {p}.oban_job_state NOT NULL DEFAULT 'available',
    queue text NOT NULL DEFAULT 'default',
    worker text NOT NULL,
    attempt smallint NOT NULL DEFAULT 0,
    max_attempts smallint NOT NULL DEFAULT 20,
    priority smallint NOT NULL DEFAULT 0,
    args jsonb NOT NULL DEFAULT '{{}}',
    meta jsonb NOT NULL DEFAULT '{{}}',
    tags text[] NOT NULL DEFAULT ARRAY[]::text[],
    errors jsonb NOT NULL DEFAULT '[]',
    attempted_by text[] NOT NULL DEFAULT ARRAY[]::text[],
    inserted_at timestamp without time zone NOT NULL DEFAULT timezone('UTC', now()),
    scheduled_at timestamp without time zone NOT NULL DEFAULT timezone('UTC', now()),
    attempted_at timestamp without time zone,
    cancelled_at timestamp without time zone,
    completed_at timestamp without time zone,
    discarded_at timestamp without time zone,
    CONSTRAINT attempt_range CHECK (attempt >= 0 AND attempt <= max_attempts),
    CONSTRAINT queue_length CHECK (char_length(queue) > 0),
    CONSTRAINT worker_length CHECK (char_length(worker) > 0),
    CONSTRAINT positive_max_attempts CHECK (max_attempts > 0),
    CONSTRAINT non_negative_priority CHECK (priority >= 0)
);
CREATE UNLOGGED TABLE {p}.oban_leaders (
    name text PRIMARY KEY DEFAULT 'oban', node text NOT NULL,
    elected_at timestamp without time zone NOT NULL, expires_at timestamp without time zone NOT NULL
);
CREATE UNLOGGED TABLE {p}.oban_producers (
    uuid uuid PRIMARY KEY, name text NOT NULL DEFAULT 'oban', node text NOT NULL, queue text NOT NULL,
    meta jsonb NOT NULL DEFAULT '{{}}',
    started_at timestamp without time zone NOT NULL DEFAULT timezone('UTC', now()),
    updated_at timestamp without time zone NOT NULL DEFAULT timezone('UTC', now())
);
CREATE INDEX oban_jobs_state_queue_priority_scheduled_at_id_index
    ON {p}.oban_jobs (state, queue, priority, scheduled_at, id);
"""


@pytest.fixture
async def foreign_prefix(conn: asyncpg.Connection):
    name = f"f_{secrets.token_hex(5)}"
    yield name
    await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


async def _comment(conn: asyncpg.Connection, prefix: str) -> str | None:
    return await conn.fetchval(f"SELECT obj_description('{prefix}.oban_jobs'::regclass, 'pg_class')")


async def _enum_labels(conn: asyncpg.Connection, prefix: str) -> list[str]:
    rows = await conn.fetch(
        """
        SELECT e.enumlabel FROM pg_enum e
        JOIN pg_type t ON t.oid = e.enumtypid JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE t.typname = 'oban_job_state' AND n.nspname = $1 ORDER BY e.enumsortorder
        """,
        prefix,
    )
    return [row[0] for row in rows]


async def test_install_is_idempotent_and_writes_no_comment(conn: asyncpg.Connection, foreign_prefix: str) -> None:
    await schema.install(conn, foreign_prefix)
    await schema.install(conn, foreign_prefix)

    assert await schema.missing_tables(conn, foreign_prefix) == []
    assert await _comment(conn, foreign_prefix) is None
    assert "suspended" in await _enum_labels(conn, foreign_prefix)


async def test_uninstall_removes_tables_and_schema(conn: asyncpg.Connection, foreign_prefix: str) -> None:
    await schema.install(conn, foreign_prefix)

    await schema.uninstall(conn, foreign_prefix)

    assert await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", foreign_prefix) == 0


async def test_verify_names_install_command(conn: asyncpg.Connection, foreign_prefix: str) -> None:
    await conn.execute(f"CREATE SCHEMA {foreign_prefix}")

    with pytest.raises(schema.SchemaError) as raised:
        await schema.verify(conn, foreign_prefix)

    assert f"obanpro install --prefix {foreign_prefix}" in str(raised.value)
    assert "oban_jobs, oban_leaders, oban_producers" in str(raised.value)


def test_invalid_prefix_is_rejected() -> None:
    with pytest.raises(ValueError, match="invalid prefix 'bad;drop'"):
        schema.install_sql("bad;drop")


async def test_elixir_schema_is_accepted(dsn: str, conn: asyncpg.Connection, foreign_prefix: str) -> None:
    await conn.execute(ELIXIR_DDL.format(p=foreign_prefix))
    labels = await _enum_labels(conn, foreign_prefix)

    await schema.install(conn, foreign_prefix)

    assert await _comment(conn, foreign_prefix) == "14"
    assert await _enum_labels(conn, foreign_prefix) == labels
    assert await conn.fetchval(
        "SELECT data_type FROM information_schema.columns WHERE table_schema = $1 AND table_name = 'oban_jobs' AND column_name = 'errors'",
        foreign_prefix,
    ) == "ARRAY"
    await _run_failing_and_passing_jobs(dsn, conn, foreign_prefix)
    assert await _comment(conn, foreign_prefix) == "14"


async def test_oban_py_schema_is_accepted(dsn: str, conn: asyncpg.Connection, foreign_prefix: str) -> None:
    await conn.execute(OBAN_PY_DDL.format(p=foreign_prefix))

    await schema.install(conn, foreign_prefix)

    assert await _comment(conn, foreign_prefix) is None
    await _run_failing_and_passing_jobs(dsn, conn, foreign_prefix)


async def _run_failing_and_passing_jobs(dsn: str, conn: asyncpg.Connection, prefix: str) -> None:
    async with Oban(dsn=dsn, prefix=prefix, queues={"default": 2}) as oban:
        passing = await workers.Noop.enqueue()
        failing = await workers.Fail.enqueue({"note": "compat"}, max_attempts=1)
        # A batch this large is written with COPY, which has to fit the foreign table too.
        batch = await oban.enqueue_many([workers.Noop.new({"i": i}, tags=["Bulk"]) for i in range(COPY_MIN_BATCH)])
        expected = {passing.id: "completed", failing.id: "discarded", **{job.id: "completed" for job in batch}}

        async def settled() -> bool:
            states = await conn.fetch(f"SELECT id, state::text FROM {prefix}.oban_jobs")
            return {row["id"]: row["state"] for row in states} == expected

        await wait_for(settled)

    errors = await conn.fetchval(f"SELECT to_jsonb(errors)::text FROM {prefix}.oban_jobs WHERE id = $1", failing.id)
    assert "failing on purpose: compat" in json.loads(errors)[0]["error"]
