"""A model's identity by content (a hash of its files and of how its output is pooled, never
its path) and the record a database keeps of it in ``meta``, old-scheme records included.

The ``meta`` rows (written by the write flow's RecordModel, read by status and export):

- ``model``: the model in the old scheme (``label@<12 hex>``), the only row releases before
  content identities read. It stays what such a release, configured with the same model,
  computes (see :attr:`ModelRecord.legacy`), so rolling back to it keeps the database open.
- ``model_identity``: the content identity (``sha256:<32 hex>``), the one newer releases trust.
- ``model_identity_of``: the ``model`` value it was recorded beside. An older release
  re-records ``model`` (and knows nothing of the rows below) when it opens a database
  without memories with another model, then may add memories with it; a ``model`` that no
  longer equals this row means the identity is stale and ``model`` tells the truth.
- ``model_label``: the model's name for people (messages, status).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

MODEL, IDENTITY, IDENTITY_OF, LABEL = "model", "model_identity", "model_identity_of", "model_label"
META_KEYS = (MODEL, IDENTITY, IDENTITY_OF, LABEL)
FIRST_BLOCK = 4 << 20  # the old scheme's folder digest hashed this much of model.onnx, then its size
_LEGACY = re.compile(r"(.*)@([0-9a-f]{12})")


def vectors_identity(model_identity: str, generation: int) -> str:
    """What ``model_identity`` records for the vectors a re-embed or reindex (gm.reembed) of
    ``generation`` made: a reindex with the same model makes another set of its vectors, and
    the index and writes tell the two sets apart by this name."""
    return f"{model_identity}~{generation}" if generation else model_identity


def model_of(recorded: str) -> str:
    """The model identity of a recorded vectors identity (see :func:`vectors_identity`)."""
    return recorded.split("~", 1)[0]


@dataclass(frozen=True, slots=True)
class FileDigest:
    sha256: str  # of the whole file
    first_block: str  # the old scheme's folder digest: sha256 of the first 4 MiB, then str(size)


@dataclass(frozen=True, slots=True)
class Fingerprint:
    identity: str
    model: FileDigest
    tokenizer: FileDigest


# Hashing both files of the default model (22.9 MB) takes 22-31 ms here (min-median, page
# cache warm): gm.open of a fresh SQLite file took 43 ms hashing them, 21 ms without. A process
# that opens stores again and again (the tests, a program with several databases) pays it
# once per version of the files. Kept in memory only.
_digests: dict[tuple[str, int, int], FileDigest] = {}


def file_digest(path: Path) -> FileDigest:
    """The digests of ``path``, hashed once per (resolved path, size, mtime) in this process."""
    resolved = path.resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    found = _digests.get(key)
    if found is None:
        whole, first, read = hashlib.sha256(), hashlib.sha256(), 0
        with resolved.open("rb") as f:
            while chunk := f.read(1 << 20):  # one pass feeds both
                whole.update(chunk)
                if read < FIRST_BLOCK:
                    first.update(chunk[: FIRST_BLOCK - read])
                read += len(chunk)
        first.update(str(read).encode())
        found = _digests[key] = FileDigest(whole.hexdigest(), first.hexdigest())
    return found


def fingerprint(model: Path, tokenizer: Path, settings: str) -> Fingerprint:
    """The content identity of a model's files and the ``settings`` that turn its output into
    vectors: a hash over the two files' sha256 (as good as over their bytes, and it leaves
    model.onnx's own sha256 for recognising old-scheme records)."""
    model_digest, tokenizer_digest = file_digest(model), file_digest(tokenizer)
    manifest = (f"greatmemory model\n{settings}\n"
                f"model.onnx {model_digest.sha256}\ntokenizer.json {tokenizer_digest.sha256}\n")
    identity = "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()[:32]
    return Fingerprint(identity, model_digest, tokenizer_digest)


def legacy_digest(value: str) -> str | None:
    """The 12-hex digest of an old-scheme identity (``label@<12 hex>``), else None."""
    match = _LEGACY.fullmatch(value)
    return match[2] if match else None


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """The configured model as a database records it (what RecordModel carries)."""

    identity: str
    label: str
    legacy: str  # what a release before content identities, configured alike, calls this model
    legacy_digests: frozenset[str]  # the old-scheme digests these files were recorded under
    directory: str | None = None  # GM_MODEL_DIR's folder; None for the default model

    def made(self, recorded: str) -> bool:
        """Whether vectors recorded as made by ``recorded`` (a content identity, or an export
        header's old-scheme ``label@digest``) are this model's."""
        return model_of(recorded) == self.identity or legacy_digest(recorded) in self.legacy_digests

    def meta(self) -> dict[str, str]:
        """The meta rows of a database whose vectors this model makes from now on."""
        return {MODEL: self.legacy, IDENTITY: self.identity, IDENTITY_OF: self.legacy, LABEL: self.label}


@dataclass(frozen=True, slots=True)
class RecordedModel:
    """What a database's meta says made its vectors."""

    value: str  # the ``model`` row
    identity: str | None  # None: recorded by a release before content identities (or since re-recorded by one)
    label: str | None

    @property
    def shown(self) -> str:
        """The newest-scheme name this record gives: its identity, else the old-scheme value."""
        return self.identity or self.value

    def rows_for(self, model: ModelRecord) -> dict[str, str] | None:
        """The meta rows to write if ``model`` made these vectors: none when already recorded
        by content; the content identity beside an old-scheme record of the same files (the
        upgrade in place; ``model`` stays as it is for older releases). None when another
        model made them."""
        if self.identity is not None:
            return {} if model_of(self.identity) == model.identity else None
        if legacy_digest(self.value) not in model.legacy_digests:
            return None
        return {IDENTITY: model.identity, IDENTITY_OF: self.value, LABEL: self.label or model.label}


def recorded_model(meta: Mapping[str, str]) -> RecordedModel | None:
    """The record in ``meta`` (rows of META_KEYS), or None if no model was recorded yet."""
    value = meta.get(MODEL)
    if value is None:
        return None
    if meta.get(IDENTITY) is not None and meta.get(IDENTITY_OF) == value:
        return RecordedModel(value, meta[IDENTITY], meta.get(LABEL))
    match = _LEGACY.fullmatch(value)
    return RecordedModel(value, None, match[1] if match else None)

