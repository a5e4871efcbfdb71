"""The peer benchmark's subprocess (bench/peers.py): one store of one system, opened here, so
the resident memory measured is the store's and not the benchmark's.

    peers_worker.py serve SYSTEM STORE QUERIES   # answers the commands read on stdin
    peers_worker.py spawn SYSTEM STORE QUERIES   # answers one vector query, then exits
    peers_worker.py load chroma STORE DATASET    # Chroma's add, in batches

SYSTEM is ``greatmemory`` or ``chroma``; QUERIES the .npz of peers_data.Queries. Replies are
JSON lines on the standard output this process started with; anything a library prints goes
to stderr. Commands: ``{"op": "run", "figure": "index"|"vector"|"hybrid"|"keyword",
"user": bool, "queries": [..]}`` (each query timed alone; answers its ms and the ids found),
``{"op": "memory"}`` (VmRSS and VmHWM of this process), ``{"op": "quit"}``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from peers_data import NAMESPACE, Matrix, Queries, read_dataset

K = 10
COLLECTION = "bench"


class GreatMemory:
    """greatmemory through ``gm.open``: ``index`` is the vector index call alone, the rest
    ``Store.search`` with the query embedded by the store."""

    figures = ("index", "vector", "hybrid", "keyword")

    def __init__(self, path: Path) -> None:
        self.path = path

    async def open(self) -> None:
        import gm

        self.store = await gm.open(self.path / "memories.db")

    async def index(self, vector: Matrix, user: str | None) -> list[str]:
        """The vector index's own search (what changes when the index does: adapt it here)."""
        from gm.memory import Scope, now_ms

        store = self.store
        now = now_ms()
        found = await store.searcher.nearest(vector, Scope(NAMESPACE, user), now, K)  # rescored, read as searches are
        return [memory.id for memory, _ in found]

    async def search(self, text: str, mode: str, user: str | None) -> list[str]:
        hits = await self.store.search(text, namespace=NAMESPACE, user_id=user, mode=mode, limit=K)
        return [hit.memory.id for hit in hits]

    async def close(self) -> None:
        await self.store.close()


class Chroma:
    """Chroma embedded: a PersistentClient, one collection made with its default HNSW settings
    and no embedding function (so nothing downloads); ``index`` is ``collection.query``."""

    figures = ("index",)

    def __init__(self, path: Path) -> None:
        self.path = path

    def client(self) -> Any:
        import chromadb
        from chromadb.config import Settings

        return chromadb.PersistentClient(path=str(self.path), settings=Settings(anonymized_telemetry=False))

    async def open(self) -> None:
        self.collection = self.client().get_collection(COLLECTION, embedding_function=None)

    async def index(self, vector: Matrix, user: str | None) -> list[str]:
        where = {"user_id": user} if user is not None else None
        found = self.collection.query(query_embeddings=vector[None, :], n_results=K, where=where, include=[])
        return list(found["ids"][0])

    async def search(self, text: str, mode: str, user: str | None) -> list[str]:
        raise ValueError("Chroma without an embedding function searches by vector only")

    async def close(self) -> None:
        pass

    def load(self, dataset: Path) -> dict[str, Any]:
        client = self.client()
        collection = client.create_collection(COLLECTION, embedding_function=None)
        batch = min(5000, client.get_max_batch_size())
        started, added = time.perf_counter(), 0
        for ids, vectors, users, texts in read_dataset(dataset, batch):
            collection.add(ids=ids, embeddings=vectors, metadatas=[{"user_id": u} for u in users], documents=texts)
            added += len(ids)
        return {"added": added, "batch": batch, "add_s": time.perf_counter() - started}


SYSTEMS = {"greatmemory": GreatMemory, "chroma": Chroma}


def memory() -> dict[str, int]:
    """This process's resident bytes now (``rss``: anonymous ``rss_anon`` + file-backed
    ``rss_file``, e.g. an mmap'ed database, + shared) and at the peak (``peak``), from /proc."""
    names = {"VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file", "VmHWM": "peak"}
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in names:
            fields[names[name]] = int(value.split()[0]) * 1024
    return fields


async def run(system: GreatMemory | Chroma, queries: Queries, figure: str, user: bool,
              picked: list[int]) -> dict[str, Any]:
    ms, ids = [], []
    for q in picked:
        scope = queries.users[q] if user else None
        started = time.perf_counter()
        if figure == "index":
            found = await system.index(queries.vectors[q], scope)
        else:
            found = await system.search(queries.texts[q], figure, scope)
        ms.append((time.perf_counter() - started) * 1000)
        ids.append(found)
    return {"ms": ms, "ids": ids}


async def serve(system: GreatMemory | Chroma, queries: Queries, reply: Any) -> None:
    started = time.perf_counter()
    await system.open()
    send(reply, {"ready": True, "open_s": time.perf_counter() - started, "figures": system.figures})
    for raw in sys.stdin:
        command = orjson.loads(raw)
        if command["op"] == "quit":
            break
        if command["op"] == "memory":
            send(reply, memory())
        else:
            send(reply, await run(system, queries, command["figure"], command["user"], command["queries"]))
    await system.close()


async def spawn(system: GreatMemory | Chroma, queries: Queries, reply: Any) -> None:
    """One whole-namespace vector query through the index, answered as soon as the store
    can; then (greatmemory) one search that embeds its query, the model's load included."""
    await system.open()
    found = await system.index(queries.vectors[0], None)
    send(reply, {"answered": len(found)})
    if isinstance(system, GreatMemory):
        started = time.perf_counter()
        hits = await system.search(queries.texts[0], "vector", None)
        send(reply, {"embedded_search_s": time.perf_counter() - started, "answered": len(hits)})
    await system.close()


async def settle(system: GreatMemory, reply: Any) -> None:
    """Open the store, wait until its index's graph holds every row, and close it (which saves
    the index beside the database): the state a server that has run a while leaves."""
    started = time.perf_counter()
    await system.open()
    indexer = system.store.indexer
    await indexer.wait_ready()
    while indexer.index.graph_backlog() > 0:
        await asyncio.sleep(0.5)
    graphed = time.perf_counter() - started
    await system.close()
    send(reply, {"graph_s": graphed, "settle_s": time.perf_counter() - started})


def send(reply: Any, message: dict[str, Any]) -> None:
    reply.write(orjson.dumps(message) + b"\n")
    reply.flush()


def main() -> None:
    role, name, store, data = sys.argv[1:5]
    reply = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the libraries' prints go to stderr; the replies keep the real stdout
    system = SYSTEMS[name](Path(store))
    if role == "load":
        assert isinstance(system, Chroma)
        send(reply, system.load(Path(data)))
        return
    if role == "settle":
        assert isinstance(system, GreatMemory)
        asyncio.run(settle(system, reply))
        return
    queries = Queries.read(Path(data))
    asyncio.run((serve if role == "serve" else spawn)(system, queries, reply))


if __name__ == "__main__":
    main()
