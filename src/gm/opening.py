"""Opening a memory database: :func:`gm.open` and the opener it returns, which builds the
store for a SQLite path or a ``postgresql://`` URL and is awaited or used with ``async with``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from gm.config import DEFAULT_DB, StoreSettings
from gm.embedding import ModelSpec
from gm.errors import InvalidInput
from gm.storage import is_postgres_url
from gm.store import Store


def open(
    target: str | os.PathLike[str] = DEFAULT_DB,
    *,
    model_dir: str | os.PathLike[str] | None = None,
    **backend_options: Any,
) -> Opening:
    """Open (creating and migrating as needed) a memory database: a SQLite file path, or a
    ``postgresql://`` URL for a database shared by several instances.

    Use it as ``async with gm.open("mem.db") as mem:`` (closes on exit) or
    ``mem = await gm.open("mem.db")`` (then ``await mem.close()``). ``model_dir`` (or
    ``GM_MODEL_DIR``) names a folder with ``model.onnx`` and ``tokenizer.json`` to use
    instead of the default all-MiniLM-L6-v2.
    """
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", os.fspath(target)) if isinstance(target, str) else None
    if scheme and not is_postgres_url(os.fspath(target)):
        hint = (
            " For a running greatmemory server, write gm.connect in place of gm.open: "
            f"`async with gm.connect({target!r}, api_key=...) as mem:` has the same methods"
            if scheme[1].lower() in ("http", "https") else ""
        )
        raise InvalidInput(
            f"gm.open({target!r}): that is a {scheme[1]}:// URL, not a database; gm.open takes a SQLite file path "
            f"or a postgresql:// URL.{hint}",
            path="target",
        )
    return Opening(target, model_dir, backend_options)


class Opening:
    """Awaitable and async context manager returned by :func:`open`."""

    def __init__(self, target: str | os.PathLike[str], model_dir: Any, options: dict[str, Any]) -> None:
        self.target = target
        self.model_dir = model_dir
        self.options = options
        self.store: Store | None = None

    def build(self) -> Store:
        settings = StoreSettings.load()  # a bad GM_* value fails here, before anything opens
        directory = self.model_dir or settings.model_dir
        model = ModelSpec.from_dir(directory) if directory else ModelSpec.default()
        text = os.fspath(self.target)
        options = dict(self.options)
        if settings.schema_cap is not None and "target_version" not in options:
            options["target_version"] = settings.schema_cap  # testing only: stands in for an older release
        options.setdefault("write_timeout", settings.write_timeout)
        if is_postgres_url(text):
            from gm.storage.postgres import PostgresBackend

            return Store(PostgresBackend(text, **options), model, settings)
        from gm.storage.sqlite import SQLiteBackend

        return Store(SQLiteBackend(Path(text), **options), model, settings)

    def __await__(self) -> Any:
        return self.__aenter__().__await__()

    def __getattr__(self, name: str) -> Any:
        if hasattr(Store, name):  # e.g. `mem = gm.open("mem.db"); await mem.add(...)`
            raise AttributeError(
                f"gm.open() returns an opener, not an open store, so it has no .{name}: write "
                f"`async with gm.open(...) as mem:` or `mem = await gm.open(...)`, then use mem.{name}"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __enter__(self) -> None:
        raise TypeError("gm.open() is asynchronous: write `async with gm.open(...) as mem:` (not `with`)")

    def __exit__(self, *exc: object) -> None:  # never reached: __enter__ refuses
        pass

    async def __aenter__(self) -> Store:
        self.store = self.build()
        try:
            return await self.store.open()
        except BaseException:
            await self.store.close()
            raise

    async def __aexit__(self, *exc: object) -> None:
        if self.store is not None:
            await self.store.close()
