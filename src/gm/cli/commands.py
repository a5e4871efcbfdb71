"""What each ``gmem`` command does, apart from ``serve``. Each takes the parsed arguments,
prints its result (readable, or one JSON document with ``--json``) and returns an exit code;
errors are raised as typed exceptions and turned into one line on stderr by ``main``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TextIO

import orjson

import gm
from gm import config, transfer
from gm.errors import Forbidden, InvalidInput, NotFound, StorageUnavailable
from gm.memory import parse_json
from gm.remote import Connecting, RemoteStore
from gm.storage import is_postgres_url, postgres_migrations, sqlite_files, sqlite_migrations
from gm.storage.inspection import inspect

# -- output -------------------------------------------------------------------------------


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() if args.json else text)


class ProgressBar:
    """``  42%  1,234 / 2,938 memories`` redrawn on stderr, only when stderr is a terminal."""

    def __init__(self, unit: str, stream: TextIO = sys.stderr) -> None:
        self.unit = unit
        self.stream = stream
        self.enabled = stream.isatty()
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        share = f"{100 * done // total:3d}%  " if total else ""
        self.stream.write(f"\r{share}{done:,} / {total:,} {self.unit}" if total else f"\r{done:,} {self.unit}")
        self.stream.flush()
        self.drawn = True

    def finish(self) -> None:
        if self.drawn:
            self.stream.write("\n")


def mib(size: int | None) -> str:
    return "unknown" if size is None else f"{size / 1048576:.1f} MiB"


# -- where a command acts ---------------------------------------------------------------------


def database(args: argparse.Namespace) -> str:
    """The database a command acts on: ``--db`` (a file or a postgresql:// URL), else
    GM_DATABASE_URL, else GM_DB, else ./greatmemory.db."""
    flag = getattr(args, "db", None)
    return str(flag or config.DATABASE_URL.read() or config.DB.read())


def server_url(args: argparse.Namespace) -> str | None:
    """The server to talk to: ``--url``, else ``GM_URL`` unless ``--db`` names a file."""
    if getattr(args, "url", None):
        if getattr(args, "db", None):
            raise InvalidInput("give --url (a server) or --db (a file), not both")
        return config.URL.read(flags=vars(args))
    if getattr(args, "db", None):
        return None
    return config.URL.read()


def client(args: argparse.Namespace, url: str) -> Connecting:
    return gm.connect(url, api_key=config.API_KEY.read(flags=vars(args)))


def local_store(args: argparse.Namespace) -> AbstractAsyncContextManager[gm.Store]:
    target = database(args)
    if is_postgres_url(target):
        return gm.open(target)
    path = Path(target)
    if not path.exists():
        raise StorageUnavailable(f"there is no database at {path}; give --db, or --url for a server")
    return gm.open(path)


def memories(args: argparse.Namespace, *, create: bool = False) -> AbstractAsyncContextManager[gm.Store | RemoteStore]:
    """Where a memory command acts: the server at ``--url`` (or GM_URL), else the database,
    which only ``create`` (an add) makes when it does not exist. Both have the same methods."""
    url = server_url(args)
    if url:
        return client(args, url)
    return gm.open(database(args)) if create else local_store(args)


# -- status -----------------------------------------------------------------------------------


async def status_of_server(args: argparse.Namespace, url: str) -> dict[str, Any]:
    async with client(args, url) as remote:
        readiness = await remote.probe()
        result: dict[str, Any] = {"target": url, "readiness": readiness.phase, "ready": readiness.phase == "ready"}
        if result["ready"]:
            stats = (await remote.stats()).to_dict()
            result.update(stats)
            latest = postgres_migrations.LATEST if stats["backend"] == "postgres" else sqlite_migrations.LATEST
            result["latest_schema_version"] = latest
            result["migrations_pending"] = stats["schema_version"] < latest
            try:
                job = await remote.reembed_status()
            except (Forbidden, NotFound):  # a key bound to a namespace; a server from before re-embedding
                return result
            result.update(job.pop("database"))
            result["reembed_job"] = job
    return result


def model_line(identity: str | None, label: str | None) -> str:
    if identity is None:
        return "none recorded yet"
    if label is None or identity.startswith(f"{label}@"):  # (an older release's record names its label)
        return identity
    return f"{label} ({identity})"


def reembed_lines(result: dict[str, Any]) -> list[str]:
    """What ``gmem status`` says of re-embedding: the one under way, this server's last run,
    old vectors awaiting ``--drop-old``."""
    lines = []
    job, under_way = result.get("reembed_job") or {}, result.get("reembed")
    if under_way is not None:
        share = f" ({100 * under_way['done'] // under_way['total']}%)" if under_way["total"] else ""
        lines.append(f"re-embed under way: to model {under_way['label'] or under_way['model']}, "
                     f"{under_way['done']:,} of {under_way['total']:,} memories have its vector{share}")
        if job.get("state") == "running":
            rate = f", {job['rate']:,.0f}/s" if job.get("rate") else ""
            eta = f", about {job['eta_seconds']:.0f}s left" if job.get("eta_seconds") is not None else ""
            lines.append(f"  running on this server: {job['phase']}{rate}{eta}")
        else:
            lines.append(f"  running elsewhere, or interrupted: `gmem reembed --model-dir {under_way['model_dir']}` "
                         "resumes it, `gmem reembed --cancel` cancels it")
    elif job.get("state") == "failed" and job.get("error"):
        lines.append(f"last re-embed on this server failed: {job['error']['message']}")
    if result.get("old_vectors") is not None:
        lines.append(f"old vectors: {result['old_vectors']}'s, kept by the last switch; "
                     "`gmem reembed --drop-old` drops them")
    return lines


async def status(args: argparse.Namespace) -> int:
    url = server_url(args)
    target = database(args)
    if url:
        result = await status_of_server(args, url)
    else:
        async with inspect(target) as database_now:
            result = await database_now.status()
    lines = [f"{'server' if url else 'database'}: {result['target']}", f"readiness: {result['readiness']}"]
    if "backend" in result:
        lines.append(f"backend: {result['backend']}")
    if "schema_version" in result:
        pending = " (migrations pending)" if result.get("migrations_pending") else ""
        known = result["latest_schema_version"]
        lines.append(f"schema: v{result['schema_version']}{pending}; this release knows v{known}")
        lines.append(f"memories: {result['memories']:,}")
        lines += [f"  {ns}: {count:,}" for ns, count in result["namespaces"].items()]
        lines.append(f"database size: {mib(result.get('database_bytes'))}")
        lines.append(f"model: {model_line(result.get('model'), result.get('model_label'))}")
        lines += reembed_lines(result)
    if url and result.get("process_resident_bytes") is not None:
        lines.append(f"server memory (resident): {mib(result['process_resident_bytes'])}")
    if "in_use_by" in result:
        lines.append(f"in use by: {result['in_use_by'] or 'nobody (no server running on it)'}")
    if "connected_instances" in result:
        lines.append(f"connected instances: {result['connected_instances']}")
    emit(args, result, "\n".join(lines))
    return 0


# -- backup / restore --------------------------------------------------------------------------


POSTGRES_BACKUP = (
    "gmem {command} works on SQLite files; back up a Postgres database with your provider's managed "
    "snapshots or pg_dump, e.g. `pg_dump --format=custom --file=greatmemory.dump \"$GM_DATABASE_URL\"`, "
    "and restore with `pg_restore --clean --dbname=\"$GM_DATABASE_URL\" greatmemory.dump`; "
    "`gmem export` also works on Postgres"
)


def refuse_postgres(command: str, target: str) -> None:
    if is_postgres_url(target):
        raise InvalidInput(POSTGRES_BACKUP.format(command=command))


async def backup(args: argparse.Namespace) -> int:
    refuse_postgres("backup", database(args))
    db = Path(database(args))
    target = Path(args.path) if args.path else sqlite_files.default_backup_path(db)
    bar = ProgressBar("pages")
    try:
        info = sqlite_files.backup(db, target, progress=bar)
    finally:
        bar.finish()
    emit(args, {"backup": str(info.path), "memories": info.memories, "history": info.history,
                "schema_version": info.schema_version, "bytes": info.bytes, "verified": True},
         f"backup written: {info.path}\n  {info.memories:,} memories, {info.history:,} history rows, "
         f"schema v{info.schema_version}, {mib(info.bytes)}; integrity check ok, counts match")
    return 0


async def restore(args: argparse.Namespace) -> int:
    refuse_postgres("restore", database(args))
    db = Path(database(args))
    info, kept = sqlite_files.restore(db, args.path)
    note = ""
    if info.schema_version < sqlite_migrations.LATEST:
        note = f"\n  it is at schema v{info.schema_version}; the next open migrates it to v{sqlite_migrations.LATEST}"
    emit(args, {"database": str(db), "restored_from": str(args.path), "memories": info.memories,
                "schema_version": info.schema_version, "previous_kept_as": str(kept) if kept else None},
         f"restored {db} from {args.path}: {info.memories:,} memories, schema v{info.schema_version}"
         + (f"\n  the database it replaced is kept as {kept}" if kept else "") + note)
    return 0


# -- export / import ---------------------------------------------------------------------------

READ_BYTES = 1 << 20  # an import file's read buffer


async def export(args: argparse.Namespace) -> int:
    lines = transfer.export_lines_async(database(args), vectors=args.vectors, namespace=args.namespace)
    header = await anext(lines)
    total = orjson.loads(header)["greatmemory"]["memories"]
    bar = ProgressBar("memories")
    to_file = args.path not in (None, "-")
    partial = Path(f"{args.path}.partial") if to_file else None
    out = open(partial, "wb") if partial else sys.stdout.buffer  # noqa: SIM115
    written = 0
    try:
        out.write(header)
        async for line in lines:
            out.write(line)
            written += 1
            if written % 1000 == 0:
                bar(written, total)
        bar(written, total)
    except BaseException:
        if partial:
            out.close()
            partial.unlink(missing_ok=True)  # no half-written export left under the real name
        raise
    finally:
        bar.finish()
    if partial:
        out.close()
        os.replace(partial, args.path)
    if args.path not in (None, "-"):
        emit(args, {"exported": written, "path": args.path, "vectors": args.vectors},
             f"exported {written:,} memories to {args.path}{' with vectors' if args.vectors else ''}")
    return 0


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """Python's cycle collector less often while an import runs in this process: each line
    makes a few dozen objects, none of them cyclic, and at the default thresholds collections
    took 11% of the importing thread's samples and 3% of the Writer's (py-spy). 100k more
    memories into a 1M file: 20.1 -> 18.0 s."""
    before = gc.get_threshold()
    gc.set_threshold(50_000, 20, 100)
    try:
        yield
    finally:
        gc.set_threshold(*before)


async def import_(args: argparse.Namespace) -> int:
    if args.path != "-" and not Path(args.path).is_file():
        raise InvalidInput(f"there is no file {args.path}")
    # (read in blocks of 1 MiB: each read lets the Writer's thread take the GIL, a switch interval a time)
    with (tempfile.TemporaryFile(buffering=READ_BYTES) if args.path == "-"
          else open(args.path, "rb", buffering=READ_BYTES)) as source:
        if args.path == "-":  # read twice: once to refuse unknown fields before anything is stored
            shutil.copyfileobj(sys.stdin.buffer, source)
            source.seek(0)
        total = transfer.check_fields(source)
        source.seek(0)
        bar = ProgressBar("lines")
        async with gm.open(database(args)) as store:
            try:
                with _fewer_collections():
                    report = await transfer.import_lines(store, source, total=total, progress=bar)
            finally:
                bar.finish()
    reasons: dict[str, int] = {}
    for skip in report.skipped:
        reasons[skip.reason] = reasons.get(skip.reason, 0) + 1
    text = [f"imported {report.imported:,} memories into {database(args)}, skipped {len(report.skipped):,}"]
    text += [f"  {count:,} skipped: {reason}" for reason, count in sorted(reasons.items(), key=lambda r: -r[1])]
    text += [f"  line {s.line}{f' ({s.id})' if s.id else ''}: {s.reason}" for s in report.skipped[:10]]
    emit(args, {"imported": report.imported, "embedded": report.embedded,
                "skipped": [{"line": s.line, "id": s.id, "reason": s.reason} for s in report.skipped]},
         "\n".join(text))
    return 0


# -- client commands -------------------------------------------------------------------------


def _scope(args: argparse.Namespace) -> dict[str, Any]:
    fields = {"namespace": args.namespace, "user_id": args.user_id, "agent_id": args.agent_id,
              "session_id": args.session_id}
    return {k: v for k, v in fields.items() if v is not None}


def _json_arg(raw: str | None, name: str) -> Any:
    if raw is None:
        return None
    try:
        value = parse_json(raw)
    except orjson.JSONDecodeError:
        raise InvalidInput(f"--{name} must be JSON, e.g. '{{\"topic\": \"travel\"}}'", path=name) from None
    if value is None:  # (leaving the flag out is the way to give none: null must not pass for that)
        raise InvalidInput(f"--{name} must be a JSON object, not null; leave it out to give none", path=name)
    return value


def _describe(memory: dict[str, Any]) -> str:
    scope = ", ".join(f"{k}={memory[k]}" for k in ("namespace", "user_id", "agent_id", "session_id") if memory.get(k))
    lines = [f"{memory['id']}  [{scope}]", f"  {memory['text']}"]
    if memory.get("metadata"):
        lines.append(f"  metadata: {orjson.dumps(memory['metadata']).decode()}")
    if memory.get("occurred_at") not in (None, memory["created_at"]):
        lines.append(f"  occurred {memory['occurred_at']}")
    lines.append(f"  created {memory['created_at']}, updated {memory['updated_at']}"
                 + (f", expires {memory['expires_at']}" if memory.get("expires_at") else ""))
    return "\n".join(lines)


async def add(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"text": args.text, **_scope(args)}
    for key, value in (("metadata", _json_arg(args.metadata, "metadata")), ("id", args.id),
                       ("ttl_seconds", args.ttl_seconds), ("occurred_at", args.occurred_at)):
        if value is not None:
            body[key] = value
    async with memories(args, create=True) as mem:
        memory = (await mem.add(body.pop("text"), **body)).to_dict()
    emit(args, memory, f"added {memory['id']}")
    return 0


async def search(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"query": args.query, **_scope(args), "limit": args.limit, "mode": args.mode}
    for option in ("min_score", "recency"):
        if getattr(args, option) is not None:
            body[option] = getattr(args, option)
    if args.filter is not None:
        body["filter"] = _json_arg(args.filter, "filter")
    for key in ("occurred_after", "occurred_before"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    async with memories(args) as mem:
        hits = await mem.search(body.pop("query"), **body)
    result = {"hits": [h.to_dict() for h in hits]}
    lines = [f"{h['score']:.4f}  {h['memory']['text']}  ({h['memory']['id']})" for h in result["hits"]]
    emit(args, result, "\n".join(lines) if lines else "no memories match")
    return 0


async def get(args: argparse.Namespace) -> int:
    async with memories(args) as mem:
        memory = (await mem.get(args.id)).to_dict()
    emit(args, memory, _describe(memory))
    return 0


async def delete(args: argparse.Namespace) -> int:
    async with memories(args) as mem:
        await mem.delete(args.id)
    emit(args, {"deleted": args.id}, f"deleted {args.id}")
    return 0


# -- keys and version ----------------------------------------------------------------------------


def new_key() -> str:
    """256 random bits, URL-safe, after a ``gm_`` prefix: a key never starts with ``-``
    (one in 64 of bare ``token_urlsafe`` keys did, and ``--api-key -x...`` reads as a flag),
    and it is recognisable as a greatmemory key in a config file or a secret scanner."""
    return "gm_" + secrets.token_urlsafe(32)


async def keys_new(args: argparse.Namespace) -> int:
    key = new_key()
    bound = f"{key}@{args.namespace}" if args.namespace else key
    emit(args, {"key": key, "gm_api_keys_entry": bound}, bound)
    return 0


async def version(args: argparse.Namespace) -> int:
    emit(args, {"version": gm.__version__, "schema_version": sqlite_migrations.LATEST},
         f"greatmemory {gm.__version__} (schema v{sqlite_migrations.LATEST})")
    return 0
