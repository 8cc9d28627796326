"""Data-path work per rank of the MLM stream: files opened, documents read from disk, documents kept, and
seconds for one epoch of each rank's share, at 1 and 2 (or N) ranks — the rank split of today
(`llm_dist.data.mlm.document_stream`: each rank streams only its own group of whole files) against the
split it replaced (`before`: the whole stream cut with `datasets.distributed.split_dataset_by_node`, which
strides over examples when the file count is not a multiple of the ranks — BBC News has 2,225 files —
so every rank opened, read and hash-filtered every document).

Each rank's share is iterated in this one process, rank after rank (what a rank does does not depend
on the others), `--rounds` times; seconds are the median. The counts come from the streaming generators
(`llm_dist.data.sources.READS`). Ratio = per-rank work at N ranks / at 1 rank (ideal: 1/N).

    .venv/bin/python bench/data_path.py [--ranks 1,2] [--rounds 3] [--source PATH] [--eval_fraction 0.05]

Writes --out (JSON) when given.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import datasets  # noqa: E402
from datasets.distributed import split_dataset_by_node  # noqa: E402

from llm_dist.config import SourceConfig  # noqa: E402
from llm_dist.data import sources as data_sources  # noqa: E402
from llm_dist.data.mlm import document_stream, excluded_ids, is_heldout  # noqa: E402


def before_stream(sources, seed, epoch, rank, world_size, heldout_fraction, want_heldout):
    """The rank split as it was before issue 11 §2f (kept here only to measure it)."""
    streams = []
    for i, src in enumerate(sources):
        ds = data_sources.stream_source(src)
        excluded = excluded_ids(src)
        if excluded:
            ds = ds.filter(lambda ex, ids=excluded: ex["id"] not in ids)
        if ds.num_shards > 1:
            ds = ds.shuffle(seed=seed + 1000 * i, buffer_size=1)
            ds.set_epoch(epoch)
        streams.append(ds)
    if len(streams) == 1:
        ds = streams[0]
    else:
        weights = [s.weight for s in sources]
        ds = datasets.interleave_datasets(streams, probabilities=[w / sum(weights) for w in weights],
                                          seed=seed + epoch, stopping_strategy="all_exhausted")
    if heldout_fraction > 0:
        ds = ds.filter(lambda ex: is_heldout(ex["id"], heldout_fraction) == want_heldout)
    return split_dataset_by_node(ds, rank=rank, world_size=world_size)


SPLITS = {"before": before_stream, "now": document_stream}


def one_rank(split: str, sources, rank: int, world: int, args) -> dict:
    data_sources.READS.update(files=0, documents=0)
    t0 = time.perf_counter()
    kept = sum(1 for _ in SPLITS[split](sources, args.seed, 0, rank, world, args.eval_fraction, False))
    secs = time.perf_counter() - t0
    return {"files_opened": data_sources.READS["files"], "documents_read": data_sources.READS["documents"],
            "documents_kept": kept, "seconds": secs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="1,2", help="comma-separated world sizes (the first is the ratio's base)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--splits", default="before,now")
    p.add_argument("--source", default=None, help="a local file / dir / glob (default: the built-in BBC News)")
    p.add_argument("--eval_fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    worlds = [int(x) for x in args.ranks.split(",")]
    sources = [SourceConfig(path=args.source) if args.source else SourceConfig(name="bbc_news")]
    for src in sources:  # warm the file cache and the imports: the first pass is not timed
        sum(1 for _ in data_sources.stream_source(src))
    results: dict = {}
    for split in args.splits.split(","):
        for world in worlds:
            per_rank = []
            for rank in range(world):
                runs = [one_rank(split, sources, rank, world, args) for _ in range(args.rounds)]
                row = {k: runs[0][k] for k in ("files_opened", "documents_read", "documents_kept")}
                row["seconds"] = statistics.median(r["seconds"] for r in runs)
                row["seconds_rounds"] = [round(r["seconds"], 3) for r in runs]
                per_rank.append(row)
            results.setdefault(split, {})[world] = per_rank
    base = worlds[0]
    print(f"source {sources[0].name or sources[0].path}; eval_fraction {args.eval_fraction}; "
          f"median of {args.rounds} rounds; one epoch of the training share per rank")
    print(f"{'split':7} {'ranks':>5} {'rank':>4} {'files':>6} {'docs read':>9} {'docs kept':>9} {'seconds':>8} "
          f"{'read ratio':>10} {'time ratio':>10}")
    for split, by_world in results.items():
        b = by_world[base][0]
        for world, per_rank in by_world.items():
            for rank, r in enumerate(per_rank):
                r["read_ratio"] = r["documents_read"] / b["documents_read"]
                r["time_ratio"] = r["seconds"] / b["seconds"]
                print(f"{split:7} {world:>5} {rank:>4} {r['files_opened']:>6} {r['documents_read']:>9} "
                      f"{r['documents_kept']:>9} {r['seconds']:>8.3f} {r['read_ratio']:>10.3f} {r['time_ratio']:>10.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
