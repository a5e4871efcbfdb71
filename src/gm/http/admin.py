"""The admin routes (``/v1/admin/reembed``...): a re-embed or reindex run in the background on
the server's store, its progress, cancelling it and dropping the old vectors after a switch.

They act on every namespace, so with API keys they need a key bound to none (403 otherwise).
A server runs at most one re-embed; it is stopped when the server shuts down, and asking
again after a restart resumes it where it stopped (the state is in the database's rows).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gm import loops
from gm.errors import Forbidden, GMError, InvalidInput, ModelError, NotReady, ReembedInProgress
from gm.http.errors import Handler, json_response
from gm.http.parsing import json_object, only_fields, query
from gm.memory import format_time, now_ms
from gm.model_identity import model_of
from gm.progress import Progress
from gm.reembed import ReembedReport, new_model, recorded
from gm.reindex import reindex
from gm.store import Store

log = logging.getLogger("gm.http")

START_SECONDS = 5.0  # how long a start waits to see the run begin, so a refusal is the request's answer


class ReembedJob:
    """This server's re-embed: one run at a time, in a task of its own, and what it has done."""

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.state = "idle"  # idle | running | done | failed
        self.progress: Progress | None = None
        self.model: str | None = None  # the model the vectors move to (a reindex: the current one)
        self.started_at: int | None = None
        self.finished_at: int | None = None
        self.error: GMError | None = None
        self.report: ReembedReport | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def start(self, store: Store, model_dir: str | None, batch: int | None) -> None:
        """Start moving ``store``'s vectors to the model in ``model_dir`` (None: a reindex);
        returns once the run has begun (or after START_SECONDS), and raises what refused it
        before it began: a re-embed under way (here or elsewhere), a bad folder or batch."""
        if self.running:
            raise ReembedInProgress(
                f"a re-embed to model {self.model!r} is running on this server; follow it with "
                "GET /v1/admin/reembed (gmem status), or cancel it with POST /v1/admin/reembed/cancel "
                "(gmem reembed --cancel)"
            )
        try:  # (off the loop: a model's identity is a hash of its files)
            model = (await asyncio.to_thread(new_model, model_dir)).identity if model_dir is not None \
                else model_of(store.vectors_model)
        except ModelError as exc:
            exc.status = 422  # the folder the request named: its error, not the server's
            raise
        before = dict(vars(self))
        self.state, self.progress, self.model, self.error, self.report = "running", None, model, None, None
        self.started_at, self.finished_at = now_ms(), None
        begun = asyncio.Event()

        def heard(progress: Progress) -> None:
            self.progress = progress
            begun.set()

        self.task = asyncio.get_running_loop().create_task(self._run(store, model_dir, batch, heard),
                                                           name="gm-reembed")
        waiting = asyncio.ensure_future(begun.wait())
        try:
            await asyncio.wait({self.task, waiting}, timeout=START_SECONDS, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
        if self.task.done() and not begun.is_set() and self.error is not None:
            refused = self.error
            vars(self).update(before)  # refused before it began: nothing happened, as far as the status goes
            if isinstance(refused, ModelError) and model_dir is not None:
                refused.status = 422
            raise refused

    async def _run(self, store: Store, model_dir: str | None, batch: int | None, progress: Callable[[Progress], None]
                   ) -> None:
        size = {} if batch is None else {"batch": batch}
        try:
            if model_dir is None:
                self.report = await reindex(store, progress=progress, **size)
            else:
                self.report = await store.reembed(model_dir, progress=progress, **size)
            self.state = "done"
        except asyncio.CancelledError:
            self.state, self.error = "failed", NotReady(
                "the re-embed was stopped (the server shut down, or it was cancelled); ask again to resume it"
            )
            raise
        except GMError as exc:
            self.state, self.error = "failed", exc
            log.warning("re-embed failed: %s", exc.message)
        except Exception as exc:  # a bug: the status says so, the log has the trace
            log.exception("re-embed failed")
            self.state, self.error = "failed", GMError(f"an unexpected fault: {type(exc).__name__}; it was logged")
        finally:
            self.finished_at = now_ms()

    async def stop(self) -> bool:
        """Stop the run under way, if any (it resumes when started again); whether one ran."""
        if not self.running:
            return False
        await loops.stop(self.task)
        return True

    def status(self) -> dict[str, Any]:
        """The status body (schema ReembedStatus), but for ``database``, which needs a read."""
        p = self.progress
        return {
            "state": self.state,
            "phase": p.phase if p is not None else ("starting" if self.state == "running" else None),
            "done": p.done if p is not None else 0,
            "total": p.total if p is not None else 0,
            "rate": round(p.rate, 1) if p is not None else 0.0,
            "eta_seconds": round(p.eta_seconds, 1) if p is not None and p.eta_seconds is not None else None,
            "model": self.model,
            "started_at": format_time(self.started_at) if self.started_at is not None else None,
            "finished_at": format_time(self.finished_at) if self.finished_at is not None else None,
            "error": {"code": self.error.code, "message": self.error.message} if self.error is not None else None,
            "report": self.report.to_dict() if self.report is not None else None,
        }


class Admin:
    """What the admin handlers reach: the server's store (it may be replaced while the server
    opens), the namespace a request's key is bound to, and the re-embed job."""

    def __init__(self, store: Callable[[], Store], bound: Callable[[web.Request], str | None]) -> None:
        self.store = store
        self.bound = bound
        self.job = ReembedJob()

    def check(self, request: web.Request) -> Store:
        if self.bound(request) is not None:
            raise Forbidden("re-embedding acts on every namespace: use an API key not bound to one")
        return self.store()

    async def status(self, store: Store) -> dict[str, Any]:
        job = self.job
        body = job.status()
        # While this server runs it, the job's own figures stand for the database's count.
        database = (await recorded(store.backend, next_column=not job.running)).to_dict()
        if job.running and database["reembed"] is not None:
            database["reembed"].update(done=body["done"], total=body["total"])
        body["database"] = database
        return body

    async def stop(self, app: web.Application) -> None:
        """``on_shutdown``: the run under way stops before the store closes."""
        if await self.job.stop():
            log.info("re-embed stopped for the shutdown; asking again after the restart resumes it")


ADMIN_KEY = web.AppKey("gm_admin", Admin)


def _admin(request: web.Request) -> tuple[Admin, Store]:
    query(request)
    admin = request.app[ADMIN_KEY]
    return admin, admin.check(request)


async def start_reembed(request: web.Request) -> web.Response:
    admin, store = _admin(request)
    body = await json_object(request)
    only_fields(body, ["model_dir", "batch"])
    if "model_dir" not in body:
        raise InvalidInput("model_dir is required: the model's folder on the server, or null for a reindex",
                           path="model_dir")
    model_dir = body["model_dir"]
    if model_dir is not None and (not isinstance(model_dir, str) or not model_dir or "\x00" in model_dir):
        raise InvalidInput("model_dir must be a folder's path on the server (or null for a reindex)", path="model_dir")
    batch = body.get("batch")
    await admin.job.start(store, model_dir, batch)
    return json_response(await admin.status(store), 202)


async def reembed_status(request: web.Request) -> web.Response:
    admin, store = _admin(request)
    return json_response(await admin.status(store))


async def _no_body(request: web.Request) -> None:
    """An action that takes nothing: an empty JSON object (or no body at all)."""
    if await request.read():
        only_fields(await json_object(request), [])


async def cancel_reembed(request: web.Request) -> web.Response:
    admin, store = _admin(request)
    await _no_body(request)
    stopped = await admin.job.stop()
    if stopped:
        admin.job.state, admin.job.error = "idle", None  # cancelled as asked: not a failure
    return json_response({"done": await store.end_reembed(drop_old=False) or stopped})


async def drop_old_vectors(request: web.Request) -> web.Response:
    admin, store = _admin(request)
    await _no_body(request)
    return json_response({"done": await store.end_reembed(drop_old=True)})


ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("POST", "/v1/admin/reembed", start_reembed),
    ("GET", "/v1/admin/reembed", reembed_status),
    ("POST", "/v1/admin/reembed/cancel", cancel_reembed),
    ("POST", "/v1/admin/reembed/drop-old", drop_old_vectors),
)
