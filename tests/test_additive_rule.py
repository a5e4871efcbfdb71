"""The additive (expand/contract) rule as a build gate: no migration step of either backend
drops, renames or retypes a table or column, or adds a column an older release could not
write. Checked twice: the SQL of each step is scanned, and the real steps are applied one
at a time while the schema is compared before and after each.

A contract step (the second release of an expand/contract change) is allowed only when it
is listed in REVIEWED_CONTRACTS and, on Postgres, declares ``additive=False`` so that older
releases refuse the database. Self-checks feed the checker violating steps, so the rule
cannot pass by checking nothing.
"""

from __future__ import annotations

import inspect
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gm.storage import postgres_migrations, sqlite_migrations
from gm.storage.postgres_migrations import Step as PgStep
from gm.storage.sqlite_migrations import Step as SqliteStep

# ("postgres" | "sqlite", version) of contract steps reviewed as the second release of an expand.
REVIEWED_CONTRACTS: frozenset[tuple[str, int]] = frozenset()

# What an older release running on the new schema would trip over, found in a step's SQL.
FORBIDDEN = (
    (re.compile(r"\bDROP\s+(TABLE|COLUMN|SCHEMA)\b", re.I), "drops a table or column"),
    (re.compile(r"\bALTER\s+TABLE\b[^;]*?\bDROP\s+(?!CONSTRAINT\b|NOT\s+NULL\b)", re.I | re.S),
     "drops a column or part of one (ALTER TABLE ... DROP)"),
    (re.compile(r"\bRENAME\b", re.I), "renames a table or column"),
    (re.compile(r"\bALTER\s+(COLUMN\s+)?(\"[^\"]+\"|\w+)\s+(SET\s+DATA\s+)?TYPE\b", re.I), "retypes a column"),
    (re.compile(r"\bSET\s+NOT\s+NULL\b", re.I), "makes an existing column NOT NULL"),
)

Columns = dict[tuple[str, str], tuple[str, bool]]  # (table, column) -> (type, nullable)


def _without_comments_and_literals(sql: str) -> str:
    sql = re.sub(r"--[^\n]*", " ", sql)
    sql = re.sub(r"/\*.*?\*/", " ", sql, flags=re.S)
    return re.sub(r"'(?:[^']|'')*'", "''", sql)


def scan(where: str, sql_texts: list[str], *, sql: bool = True) -> list[str]:
    """The rule's breaches written in ``sql_texts`` (SQL, or Python source when ``sql`` is
    False: its quotes are not SQL literals), each naming ``where`` (the step)."""
    found = []
    for text in sql_texts:
        bare = _without_comments_and_literals(text) if sql else text
        for pattern, what in FORBIDDEN:
            match = pattern.search(bare)
            if match:
                shown = " ".join(text.split())[:160]
                found.append(f"{where} {what}: {' '.join(match.group(0).split())!r} in {shown!r}")
    return found


def compare(where: str, before: Columns, after: Columns, tables_before: set[str], tables_after: set[str]) -> list[str]:
    """What a step did to the schema that an older release could not live with."""
    found = [f"{where} dropped or renamed table {t}" for t in sorted(tables_before - tables_after)]
    for (table, column), (kind, nullable) in sorted(before.items()):
        now = after.get((table, column))
        if now is None:
            found.append(f"{where} dropped or renamed column {table}.{column}")
        elif now[0] != kind:
            found.append(f"{where} retyped column {table}.{column} from {kind} to {now[0]}")
        elif nullable and not now[1]:
            found.append(f"{where} made column {table}.{column} NOT NULL")
    return found


def label(step: Any) -> str:
    return f"step {step.version} ({step.name})"


def allowed(backend: str, step: Any) -> bool:
    return (backend, step.version) in REVIEWED_CONTRACTS and getattr(step, "additive", False) is False


# -- Postgres -------------------------------------------------------------------------------------


async def pg_schema(conn: asyncpg.Connection) -> tuple[Columns, set[str], dict[tuple[str, str], bool]]:
    """Columns (with type and nullability), tables, and which columns need no value on INSERT."""
    rows = await conn.fetch(
        "SELECT table_name, column_name, data_type, udt_name, is_nullable, column_default, is_identity, "
        "is_generated FROM information_schema.columns WHERE table_schema = current_schema()"
    )
    columns = {(r["table_name"], r["column_name"]): (f"{r['data_type']}/{r['udt_name']}", r["is_nullable"] == "YES")
               for r in rows}
    optional = {
        (r["table_name"], r["column_name"]): r["is_nullable"] == "YES" or r["column_default"] is not None
        or r["is_identity"] == "YES" or r["is_generated"] == "ALWAYS"
        for r in rows
    }
    tables = {r[0] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
    return columns, tables, optional


def pg_static(step: PgStep) -> list[str]:
    return scan(label(step), [*step.statements, *step.optional])


async def pg_applied(url: str, steps: tuple[PgStep, ...]) -> list[str]:
    """Apply ``steps`` one at a time to the empty database at ``url``; what each broke."""
    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(url)

    found: list[str] = []
    conn = await connect()
    try:
        before, tables_before, _ = await pg_schema(conn)
        assert not tables_before, f"{url} is not empty"
        for step in steps:
            done = await postgres_migrations.migrate(connect, url, "additive-rule", steps, target=step.version)
            assert done == step.version
            after, tables_after, optional = await pg_schema(conn)
            breaches = compare(label(step), before, after, tables_before, tables_after)
            breaches += [
                f"{label(step)} added {table}.{column} NOT NULL without a default: older releases cannot insert"
                for (table, column) in sorted(set(after) - set(before))
                if table in tables_before and not optional[(table, column)]
            ]
            if not allowed("postgres", step):
                found += breaches
            before, tables_before = after, tables_after
    finally:
        await conn.close()
    return found


def pg_scanned(steps: tuple[PgStep, ...]) -> list[str]:
    return [breach for step in steps if not allowed("postgres", step) for breach in pg_static(step)]


async def test_postgres_steps_are_additive(pg_url: str) -> None:
    breaches = pg_scanned(postgres_migrations.STEPS) + await pg_applied(pg_url, postgres_migrations.STEPS)
    assert not breaches, "the additive rule is broken:\n" + "\n".join(breaches)


def test_postgres_contract_steps_are_declared() -> None:
    """A reviewed contract step must make older releases refuse the database."""
    for backend, version in REVIEWED_CONTRACTS:
        if backend == "postgres":
            step = next(s for s in postgres_migrations.STEPS if s.version == version)
            assert step.additive is False, f"{label(step)} contracts the schema but is declared additive"


# -- SQLite -------------------------------------------------------------------------------------


def sqlite_schema(db: Path) -> tuple[Columns, set[str], dict[tuple[str, str], bool]]:
    conn = sqlite3.connect(db)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns: Columns = {}
        optional: dict[tuple[str, str], bool] = {}
        for table in tables:
            for _, name, kind, notnull, default, pk in conn.execute(f'PRAGMA table_info("{table}")'):
                columns[(table, name)] = (kind.upper(), not notnull)
                optional[(table, name)] = not notnull or default is not None or pk > 0
        return columns, tables, optional
    finally:
        conn.close()


def script_statements(step: SqliteStep) -> list[str] | None:
    """The statements of a step made by ``_script``; None for a step that is a function of its own."""
    statements = inspect.getclosurevars(step.apply).nonlocals.get("statements")
    if isinstance(statements, list) and statements and all(isinstance(s, str) for s in statements):
        return statements
    return None


def sqlite_sql(step: SqliteStep) -> list[str]:
    """What a SQLite step runs: a script step's statements; for any other function, its
    source and the strings it closes over or reads from its module."""
    statements = script_statements(step)
    if statements is not None:
        return statements
    found = inspect.getclosurevars(step.apply)
    texts = [inspect.getsource(step.apply)]
    for value in [*found.nonlocals.values(), *found.globals.values()]:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list | tuple):
            texts += [v for v in value if isinstance(v, str)]
    return texts


def sqlite_scanned(steps: tuple[SqliteStep, ...]) -> list[str]:
    return [
        breach for step in steps if not allowed("sqlite", step)
        for breach in scan(label(step), sqlite_sql(step), sql=script_statements(step) is not None)
    ]


def sqlite_applied(db: Path, steps: tuple[SqliteStep, ...]) -> list[str]:
    found: list[str] = []
    before: Columns = {}
    tables_before: set[str] = set()
    for step in steps:
        assert sqlite_migrations.migrate(db, steps, target=step.version) == step.version
        after, tables_after, optional = sqlite_schema(db)
        breaches = compare(label(step), before, after, tables_before, tables_after)
        breaches += [
            f"{label(step)} added {table}.{column} NOT NULL without a default: older releases cannot insert"
            for (table, column) in sorted(set(after) - set(before))
            if table in tables_before and not optional[(table, column)]
        ]
        if not allowed("sqlite", step):
            found += breaches
        before, tables_before = after, tables_after
    return found


def test_sqlite_steps_are_additive(tmp_path: Path) -> None:
    steps = sqlite_migrations.STEPS
    breaches = sqlite_scanned(steps) + sqlite_applied(tmp_path / "rule.db", steps)
    assert not breaches, "the additive rule is broken:\n" + "\n".join(breaches)


def test_every_sqlite_script_constant_is_used_by_a_step() -> None:
    """The static scan reads each step's statements; a V<N>_ script no step runs is a sign
    that steps are built some other way the scan would not see."""
    scripts = {name: value for name, value in vars(sqlite_migrations).items()
               if re.fullmatch(r"V\d+_\w+", name) and isinstance(value, str)}
    assert scripts, "no V<N>_ scripts found in sqlite_migrations"
    used = " ".join(" ".join(sqlite_sql(step)) for step in sqlite_migrations.STEPS)
    for name, script in scripts.items():
        assert " ".join(script.split()[:6]) in " ".join(used.split()), f"{name} is run by no step"
        assert not scan(name, [script]), scan(name, [script])


# -- self-checks: the checker catches what it must, and only that -----------------------------------

PG_NEXT = postgres_migrations.LATEST + 1
PG_BREACHES = {
    "drop column": PgStep(PG_NEXT, "drop memories.text", ("ALTER TABLE memories DROP COLUMN text CASCADE",)),
    "drop without COLUMN": PgStep(PG_NEXT, "drop session_id", ("alter table memories drop session_id",)),
    "rename column": PgStep(PG_NEXT, "rename user_id", ("ALTER TABLE memories RENAME COLUMN user_id TO owner_id",)),
    "rename table": PgStep(PG_NEXT, "rename history", ("ALTER TABLE history RENAME TO memory_history",)),
    "drop table": PgStep(PG_NEXT, "drop changes", ("DROP TABLE changes",)),
    "retype": PgStep(PG_NEXT, "created_at as numeric", ("ALTER TABLE memories ALTER created_at TYPE numeric",)),
    "retype with COLUMN": PgStep(PG_NEXT, "meta value as bytea",
                                 ("ALTER TABLE meta ALTER COLUMN value SET DATA TYPE bytea USING value::bytea",)),
    "tighten": PgStep(PG_NEXT, "user_id required", ("ALTER TABLE memories ALTER COLUMN user_id SET NOT NULL",)),
    "in optional": PgStep(PG_NEXT, "optional drop", (), optional=("ALTER TABLE memories DROP COLUMN agent_id",)),
}
PG_ONLY_APPLIED = {
    # Nothing in the SQL names a drop, yet an older release can no longer insert a memory.
    "required column": PgStep(PG_NEXT, "mood required", ("ALTER TABLE memories ADD COLUMN mood text NOT NULL",)),
}
PG_ADDITIVE = PgStep(PG_NEXT, "expand: mood, reactions, an index, a column with a default", (
    "ALTER TABLE memories ADD COLUMN mood text",
    "ALTER TABLE memories ADD COLUMN weight real NOT NULL DEFAULT 1",
    "CREATE TABLE reactions (memory_id text NOT NULL, emoji text NOT NULL, at bigint NOT NULL)",
    "CREATE INDEX reactions_by_memory ON reactions (memory_id)",
    "COMMENT ON COLUMN memories.mood IS 'never DROP TABLE or RENAME here'",  # words in a literal are not SQL
))


@pytest.mark.parametrize("case", sorted(PG_BREACHES))
async def test_the_postgres_checker_catches_a_breach(case: str, pg_url: str) -> None:
    steps = (*postgres_migrations.STEPS, PG_BREACHES[case])
    scanned, applied = pg_scanned(steps), await pg_applied(pg_url, steps)
    assert scanned and all(b.startswith(f"step {PG_NEXT} ({PG_BREACHES[case].name})") for b in scanned), scanned
    assert applied and all(b.startswith(f"step {PG_NEXT} ") for b in applied), applied


async def test_the_postgres_checker_catches_a_required_column(pg_url: str) -> None:
    steps = (*postgres_migrations.STEPS, PG_ONLY_APPLIED["required column"])
    assert pg_scanned(steps) == []
    assert await pg_applied(pg_url, steps) == [
        f"step {PG_NEXT} (mood required) added memories.mood NOT NULL without a default: older releases cannot insert"
    ]


async def test_the_postgres_checker_passes_an_additive_step(pg_url: str) -> None:
    steps = (*postgres_migrations.STEPS, PG_ADDITIVE)
    assert pg_scanned(steps) == []
    assert await pg_applied(pg_url, steps) == []


def _drop_agent_id(conn: sqlite3.Connection) -> None:
    conn.execute('ALTER TABLE memories DROP COLUMN agent_id')  # single quotes: not mistaken for SQL


def _rebuild(sql: str) -> Callable[[sqlite3.Connection], None]:
    def apply(conn: sqlite3.Connection) -> None:
        for statement in sql.split(";"):
            conn.execute(statement)

    return apply


SQLITE_NEXT = sqlite_migrations.LATEST + 1
SQLITE_BREACHES = {
    "drop column": SqliteStep(SQLITE_NEXT, "drop agent_id",
                              sqlite_migrations._script("ALTER TABLE memories DROP COLUMN agent_id")),
    "rename column": SqliteStep(SQLITE_NEXT, "rename user_id",
                                sqlite_migrations._script("ALTER TABLE memories RENAME COLUMN user_id TO owner_id")),
    "rename table": SqliteStep(SQLITE_NEXT, "rename history",
                               sqlite_migrations._script("ALTER TABLE history RENAME TO memory_history")),
    "python function": SqliteStep(SQLITE_NEXT, "drop agent_id in Python", _drop_agent_id),
    "retype by rebuild": SqliteStep(SQLITE_NEXT, "meta.value as BLOB", _rebuild(
        "CREATE TABLE meta_new (key TEXT PRIMARY KEY, value BLOB NOT NULL);"
        "INSERT INTO meta_new SELECT key, value FROM meta;"
        "DROP TABLE meta;"
        "ALTER TABLE meta_new RENAME TO meta"
    )),
}


@pytest.mark.parametrize("case", sorted(SQLITE_BREACHES))
def test_the_sqlite_checker_catches_a_breach(case: str, tmp_path: Path) -> None:
    step = SQLITE_BREACHES[case]
    steps = (*sqlite_migrations.STEPS, step)
    scanned, applied = sqlite_scanned(steps), sqlite_applied(tmp_path / "breach.db", steps)
    assert scanned and all(b.startswith(f"step {SQLITE_NEXT} ({step.name})") for b in scanned), scanned
    assert applied and all(b.startswith(f"step {SQLITE_NEXT} ") for b in applied), applied


def test_the_sqlite_checker_passes_an_additive_step(tmp_path: Path) -> None:
    step = SqliteStep(SQLITE_NEXT, "expand: mood and reactions", sqlite_migrations._script(
        "ALTER TABLE memories ADD COLUMN mood TEXT;\n"
        "ALTER TABLE memories ADD COLUMN weight REAL NOT NULL DEFAULT 1;\n"
        "CREATE TABLE reactions (memory_id TEXT NOT NULL, emoji TEXT NOT NULL);\n"
        "CREATE INDEX reactions_by_memory ON reactions (memory_id)"
    ))
    steps = (*sqlite_migrations.STEPS, step)
    assert sqlite_scanned(steps) == []
    assert sqlite_applied(tmp_path / "ok.db", steps) == []
