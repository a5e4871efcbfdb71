"""The Postgres schema as numbered, additive migration steps, and the routine that applies
them when several instances start at once: one takes ``pg_advisory_lock`` and migrates,
each step in its own transaction; the others wait on the lock (readyz says ``migrating``)
and then find the schema current.

Applied steps are recorded in ``gm_schema`` (version, name, when, by which release, and
``compatible_from``: the oldest schema version whose code can still run on the database).
Steps only add, so an older release keeps running on a newer schema during a rolling
deploy or after a rollback; only a step that declares itself incompatible raises
``compatible_from`` and makes older releases refuse to open the database.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from gm.errors import MigrationFailed, SchemaTooNew, StorageUnavailable

log = logging.getLogger(__name__)

MIGRATION_LOCK = 0x676D656D6F7279  # "gmemory": the pg_advisory_lock key migrations take
LOCK_WAIT = "1s"  # waits on the migration lock in slices this long, so a stop is heard meanwhile


@dataclass(frozen=True)
class Step:
    """One migration: brings the schema from ``version - 1`` to ``version``.

    ``statements`` run in order inside the step's transaction; ``optional`` ones are
    skipped (in a savepoint) when the server cannot run them, e.g. no pgvector.
    ``additive`` False marks a contract step that older releases cannot run on.
    """

    version: int
    name: str
    statements: tuple[str, ...]
    optional: tuple[str, ...] = ()
    additive: bool = True


V1_CORE = (
    """CREATE TABLE memories (
        rowid bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id text NOT NULL UNIQUE,
        namespace text NOT NULL,
        user_id text,
        agent_id text,
        session_id text,
        text text NOT NULL,
        metadata jsonb NOT NULL DEFAULT '{}',
        created_at bigint NOT NULL,
        updated_at bigint NOT NULL,
        expires_at bigint,
        embedding bytea NOT NULL,
        tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED
    )""",
    "CREATE INDEX memories_by_namespace ON memories (namespace, created_at, rowid)",
    "CREATE INDEX memories_by_user ON memories (namespace, user_id, created_at, rowid)",
    "CREATE INDEX memories_by_expiry ON memories (expires_at) WHERE expires_at IS NOT NULL",
    "CREATE INDEX memories_keywords ON memories USING gin (tsv)",
    """CREATE TABLE history (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        memory_id text NOT NULL,
        namespace text NOT NULL,
        op text NOT NULL,
        at bigint NOT NULL,
        text text,
        metadata jsonb
    )""",
    "CREATE INDEX history_by_memory ON history (memory_id, seq)",
    "CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)",
    # The change feed every instance's in-process index follows: one row per changed
    # memory, numbered in commit order (writers take a lock before numbering).
    """CREATE TABLE changes (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        rowid bigint NOT NULL,
        at bigint NOT NULL
    )""",
    "CREATE INDEX changes_by_time ON changes (at)",  # pruning: changes older than a day go
)

V2_SCOPES_AND_VECTORS = (
    "CREATE INDEX memories_by_agent ON memories (namespace, agent_id, created_at, rowid) WHERE agent_id IS NOT NULL",
    "CREATE INDEX memories_by_session ON memories (namespace, session_id, created_at, rowid) "
    "WHERE session_id IS NOT NULL",
)
V2_PGVECTOR = (
    "CREATE EXTENSION IF NOT EXISTS vector",
    "ALTER TABLE memories ADD COLUMN vec vector",
    # Keep `vec` inline and let `embedding` go out of line: an exact scan of a scope then
    # reads no TOAST (measured 7.4 -> 1.7 ms for 2,000 rows).
    "ALTER TABLE memories ALTER COLUMN vec SET STORAGE PLAIN",
    "ALTER TABLE memories ALTER COLUMN embedding SET STORAGE EXTERNAL",
    "CREATE INDEX memories_without_vec ON memories (rowid) WHERE vec IS NULL",
    # Expand/contract: a release that predates `vec` rewrites `embedding` without it; the
    # trigger clears the stale `vec` so the newer instances' backfill re-derives it.
    """CREATE FUNCTION gm_clear_stale_vec() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.embedding IS DISTINCT FROM OLD.embedding AND NEW.vec IS NOT DISTINCT FROM OLD.vec THEN
            NEW.vec := NULL;
        END IF;
        RETURN NEW;
    END $$""",
    "CREATE TRIGGER memories_clear_stale_vec BEFORE UPDATE ON memories "
    "FOR EACH ROW EXECUTE FUNCTION gm_clear_stale_vec()",
)

# Event time and session context, as on SQLite (see gm.context): `context` NULL is "not
# built yet" for the online backfill; `search_tsv` weighs the text A and its context B.
# Every statement is quick on a large table except the index builds (see docs/postgres.md).
V3_CONTEXT = (
    "ALTER TABLE memories ADD COLUMN occurred_at bigint",
    "ALTER TABLE memories ADD COLUMN context text",
    "ALTER TABLE memories ADD COLUMN search_embedding bytea",
    # Filled by a trigger, not a generated column: adding a stored generated column rewrites
    # the table under an exclusive lock, which would stop an older release's instances. Rows
    # from before it get it when the context backfill writes their context.
    "ALTER TABLE memories ADD COLUMN search_tsv tsvector",
    """CREATE FUNCTION gm_search_tsv() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        NEW.search_tsv := setweight(to_tsvector('english', NEW.text), 'A')
            || setweight(to_tsvector('english', coalesce(NEW.context, '')), 'B');
        RETURN NEW;
    END $$""",
    "CREATE TRIGGER memories_search_tsv BEFORE INSERT OR UPDATE OF text, context ON memories "
    "FOR EACH ROW EXECUTE FUNCTION gm_search_tsv()",
    "CREATE INDEX IF NOT EXISTS memories_search_keywords ON memories USING gin (search_tsv)",
    "CREATE INDEX IF NOT EXISTS memories_by_occurrence ON memories "
    "(namespace, (coalesce(occurred_at, created_at)), rowid)",
    "CREATE INDEX IF NOT EXISTS memories_by_session_order ON memories "
    "(namespace, session_id, (coalesce(occurred_at, created_at)), rowid) WHERE session_id IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS memories_without_context ON memories (rowid) WHERE context IS NULL",
    "CREATE INDEX IF NOT EXISTS memories_by_user_occurrence ON memories "
    "(namespace, user_id, (coalesce(occurred_at, created_at)), rowid)",
    # An older release still running beside this one (a rolling deploy) changes or deletes a
    # memory of a session without knowing its neighbours' context: the triggers clear the
    # context of the memories whose window held it (the one before it and the two after it,
    # gm.context's windows), which drops its old text from their index at once and hands them
    # to the context backfill. This release's own writes clear them too, then rebuild them
    # in the same transaction.
    """CREATE FUNCTION gm_context_stale(ns text, sess text, key bigint, row_id bigint) RETURNS void
    LANGUAGE sql AS $$
        UPDATE memories SET context = NULL, search_embedding = NULL WHERE rowid IN (
            (SELECT rowid FROM memories WHERE namespace = ns AND session_id = sess
                AND (coalesce(occurred_at, created_at), rowid) < (key, row_id)
                ORDER BY coalesce(occurred_at, created_at) DESC, rowid DESC LIMIT 1)
            UNION ALL
            (SELECT rowid FROM memories WHERE namespace = ns AND session_id = sess
                AND (coalesce(occurred_at, created_at), rowid) > (key, row_id)
                ORDER BY coalesce(occurred_at, created_at), rowid LIMIT 2))
    $$""",
    """CREATE FUNCTION gm_context_follow_update() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF OLD.session_id IS NOT NULL AND NEW.context IS NOT DISTINCT FROM OLD.context
                AND (NEW.text IS DISTINCT FROM OLD.text OR NEW.embedding IS DISTINCT FROM OLD.embedding) THEN
            NEW.context := NULL;
            NEW.search_embedding := NULL;
            PERFORM gm_context_stale(OLD.namespace, OLD.session_id, coalesce(OLD.occurred_at, OLD.created_at),
                                     OLD.rowid);
        END IF;
        RETURN NEW;
    END $$""",
    "CREATE TRIGGER memories_context_follow_update BEFORE UPDATE OF text, embedding ON memories "
    "FOR EACH ROW EXECUTE FUNCTION gm_context_follow_update()",
    """CREATE FUNCTION gm_context_follow_delete() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF OLD.session_id IS NOT NULL THEN
            PERFORM gm_context_stale(OLD.namespace, OLD.session_id, coalesce(OLD.occurred_at, OLD.created_at),
                                     OLD.rowid);
        END IF;
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER memories_context_follow_delete AFTER DELETE ON memories "
    "FOR EACH ROW EXECUTE FUNCTION gm_context_follow_delete()",
)

# Keyword search within a scope (gm.storage.postgres_keywords): one GIN index over each memory's
# keyword vector (search_tsv, or tsv until its context is built) and lexemes naming its
# namespace, user, agent and session ("u <md5>": no word of a query stems to one with a space), so
# the index intersects a term's matches with a scope's before any row is read: at 1M memories a
# user's search reads that user's matches (14 vs 184-500 ms p50, bench/keyword_scope.py). An
# expression index: every release's writes keep it, with no column or trigger. Built while
# writes wait (65 s at 1M memories here); docs/postgres.md says how to build it beforehand.
SCOPED_KEYWORDS = (
    "(coalesce(search_tsv, tsv) || array_to_tsvector(ARRAY['n ' || md5(namespace), "
    "'u ' || md5(coalesce(user_id, '')), 'a ' || md5(coalesce(agent_id, '')), 's ' || md5(coalesce(session_id, ''))]))"
)
V4_SCOPED_KEYWORDS = (
    f"CREATE INDEX IF NOT EXISTS memories_scoped_keywords ON memories USING gin ({SCOPED_KEYWORDS})",
)

STEPS: tuple[Step, ...] = (
    Step(1, "core tables: memories (tsvector keywords), history, meta, changes", V1_CORE),
    Step(2, "agent and session indexes; pgvector column when the extension is available",
         V2_SCOPES_AND_VECTORS, optional=V2_PGVECTOR),
    Step(3, "event time and session context: occurred_at, context, search_embedding, weighted search_tsv",
         V3_CONTEXT),
    Step(4, "keyword index within scopes: memories_scoped_keywords (GIN over the keyword vector and scope lexemes)",
         V4_SCOPED_KEYWORDS),
)
LATEST = STEPS[-1].version

SCHEMA_TABLE = """CREATE TABLE IF NOT EXISTS gm_schema (
    version int PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    release text NOT NULL,
    compatible_from int NOT NULL
)"""


async def read_version(conn: asyncpg.Connection) -> tuple[int, int]:
    """(schema version, oldest version whose code runs on it); (0, 0) for an empty database."""
    exists = await conn.fetchval("SELECT to_regclass('gm_schema') IS NOT NULL")
    if not exists:
        return 0, 0
    row = await conn.fetchrow("SELECT version, compatible_from FROM gm_schema ORDER BY version DESC LIMIT 1")
    return (row[0], row[1]) if row else (0, 0)


def guard(where: str, version: int, compatible_from: int, latest: int) -> None:
    if version > latest and compatible_from > latest:
        raise SchemaTooNew(
            f"{where} has schema version {version} but this release of greatmemory knows only up to "
            f"version {latest}, and a step after it is not backward compatible. It was migrated by a "
            "newer release: run that release, or restore a backup (pg_dump / your provider's snapshot) "
            "taken before the upgrade. The database was not changed."
        )


async def migrate(
    connect: Callable[[], Awaitable[asyncpg.Connection]],
    where: str,
    release: str,
    steps: tuple[Step, ...] = STEPS,
    target: int | None = None,
    on_phase: Callable[[str], None] = lambda phase: None,
    stopping: asyncio.Event | None = None,
) -> int:
    """Bring the database up to ``target`` (default: the last step); return its version.

    Cheap when current: one read, no lock. Otherwise takes the migration advisory lock
    (waiting, with phase ``migrating``, while another instance holds it, or until
    ``stopping`` is set), reads the version again and applies what is still pending, one
    transaction per step.
    """
    latest = steps[-1].version if steps else 0
    target = latest if target is None else min(target, latest)
    conn = await connect()
    try:
        version, compatible_from = await read_version(conn)
        guard(where, version, compatible_from, latest)
        if version >= target:
            return version
        on_phase("migrating")
        await _lock(conn, stopping)
        try:
            await conn.execute(SCHEMA_TABLE)
            version, compatible_from = await read_version(conn)  # another instance may have migrated meanwhile
            guard(where, version, compatible_from, latest)
            for step in steps:
                if not version < step.version <= target:
                    continue
                log.info("migrating %s to schema v%d: %s", where, step.version, step.name)
                try:
                    async with conn.transaction():
                        for statement in step.statements:
                            await conn.execute(statement)
                        await _optional(conn, step)
                        floor = compatible_from if step.additive else step.version
                        await conn.execute(
                            "INSERT INTO gm_schema (version, name, release, compatible_from) VALUES ($1, $2, $3, $4)",
                            step.version, step.name, release, max(floor, 1),
                        )
                except (asyncpg.PostgresError, OSError) as exc:
                    if isinstance(exc, (asyncpg.PostgresConnectionError, asyncpg.AdminShutdownError, OSError)):
                        raise  # the connection, not the step: the caller reports it as unavailable
                    raise MigrationFailed(
                        f"migration step {step.version} ({step.name}) failed and was rolled back: {exc}. "
                        f"{where} stays at schema version {version}; fix the cause and start again.",
                        step=step.version,
                        name=step.name,
                    ) from exc
                version, compatible_from = step.version, max(floor, 1)
            return version
        finally:
            if not conn.is_closed():
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    finally:
        await conn.close()


async def _lock(conn: asyncpg.Connection, stopping: asyncio.Event | None) -> None:
    """Take the migration lock, waiting while another instance holds it (unless stopped)."""
    await conn.execute(f"SET lock_timeout = '{LOCK_WAIT}'")
    while True:
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
            break
        except asyncpg.LockNotAvailableError:
            if stopping is not None and stopping.is_set():
                raise StorageUnavailable("stopped while waiting for another instance's migration") from None
    await conn.execute("SET lock_timeout = 0")


async def _optional(conn: asyncpg.Connection, step: Step) -> None:
    """Run a step's optional statements all or none, in a savepoint; log why if none."""
    if not step.optional:
        return
    try:
        async with conn.transaction():
            for statement in step.optional:
                await conn.execute(statement)
    except asyncpg.PostgresError as exc:
        log.info("schema v%d: optional part skipped (%s); vectors are searched in-process", step.version, exc)
