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

Section `paths` (issue 17): tokens/s of each MLM data path per rank — `fly` (the streaming text →
tokenize → pack path, the default), `shards` (pre-tokenized memmapped shards of `llm-dist prepare`,
`data.shards`), `shards+docmask` (the same plus the collator's per-document position ids and segments,
`data.document_mask`; the 4-D mask itself is built from them on the device in the training step) — each through the collator (dynamic masking) into batches of
`--batch_size` × `--seq_len`, every rank of `--ranks` in turn (the slowest rank counts), against what
training consumes: the tokens/s per rank of a real tiny-BERT MLM run of `--train_steps` steps launched on
`--train_ranks` CPU ranks (accelerate, from the shards; its `metrics.jsonl`, first log window skipped).
Also: the fraction of packed sequences that hold a document boundary, at each of `--boundary_lens`.

Section `docmask`: tiny-BERT MLM on BBC News at `--seq_len`, `--docmask_steps` steps, one process, with
and without `data.document_mask` (same data, seed, tokenizer): final held-out eval loss (each model
evaluated in its own attention regime) and training tokens/s.

    .venv/bin/python bench/data_path.py --sections paths --ranks 2
    .venv/bin/python bench/data_path.py --sections docmask --docmask_steps 300
"""
from __future__ import annotations

import argparse
import json
import os
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


# ----------------------------------------------------------------------------- issue 17: data paths
def tokenizer_and_shards(work: Path, seq_len: int):
    """A WordPiece (vocab 4096, what configs/mlm/tiny.yaml trains) and BBC News prepared as shards."""
    from llm_dist.config import SourceConfig
    from llm_dist.data.shards import prepare
    from llm_dist.data.sources import iter_texts
    from llm_dist.models.build import load_tokenizer, train_wordpiece

    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train_wordpiece(iter_texts([SourceConfig(name="bbc_news")]), 4096).save_pretrained(str(tok_dir))
    tok = load_tokenizer(str(tok_dir))
    t0 = time.perf_counter()
    res = prepare([SourceConfig(name="bbc_news")], tok, work / "shards", shard_bytes=512 * 1024, progress=False)
    secs = time.perf_counter() - t0
    return tok, tok_dir, work / "shards", res, secs


def path_rate(path: str, tok, shards_dir: Path, rank: int, world: int, args) -> float:
    """Tokens/s of one rank's batches (stream + collator) on `path`, over --tokens tokens (after one batch)."""
    import torch
    from torchdata.stateful_dataloader import StatefulDataLoader

    from llm_dist.config import DataConfig, MLMConfig, SourceConfig
    from llm_dist.data.mlm import MLMCollator, PackedStream
    from llm_dist.data.shards import ShardCorpus

    data = DataConfig(sources=[SourceConfig(name="bbc_news")], seq_len=args.seq_len, shuffle_buffer=256)
    shards = ShardCorpus(shards_dir, data.sources) if path.startswith("shards") else None
    docmask = path.endswith("docmask")
    ps = PackedStream(data.sources, tok, data, args.seed, rank, world, shards=shards)
    loader = StatefulDataLoader(ps, batch_size=args.batch_size, collate_fn=MLMCollator(tok, MLMConfig(), document_mask=docmask))
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    while n < args.tokens:
        n += next(it)["input_ids"].numel()
    return n / (time.perf_counter() - t0)


def boundary_fraction(tok, shards_dir: Path, seq_len: int, n: int = 2000) -> float:
    """Share of packed training sequences (first `n`) that hold more than one document."""
    from llm_dist.config import DataConfig, SourceConfig
    from llm_dist.data.mlm import PackedStream
    from llm_dist.data.shards import ShardCorpus

    data = DataConfig(sources=[SourceConfig(name="bbc_news")], seq_len=seq_len, shuffle_buffer=1)
    ps = PackedStream(data.sources, tok, data, 0, 0, 1, shards=ShardCorpus(shards_dir, data.sources))
    seqs = [s for _, s in zip(range(n), ps)]
    return sum(len(s["doc_lens"]) > 1 for s in seqs) / len(seqs)


def train_run(out: Path, tok_dir: Path, shards_dir: Path, nproc: int, steps: int, args, *extra: str) -> dict:
    """A tiny-BERT MLM run (configs/mlm/tiny.yaml) from the shards; its metrics rows."""
    import subprocess

    overrides = [f"--output_dir={out}", f"--tokenizer.path={tok_dir}", f"--data.shards={shards_dir}",
                 f"--data.seq_len={args.seq_len}", f"--batch_size={args.batch_size}", f"--max_steps={steps}",
                 f"--log_every={max(steps // 10, 1)}", "--tracking.progress=false", "--overwrite=true", *extra]
    if nproc == 1:
        cmd = [sys.executable, "train.py", "configs/mlm/tiny.yaml", *overrides]
    else:
        accel = str(Path(sys.executable).with_name("accelerate"))
        cmd = [accel, "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "train.py", "configs/mlm/tiny.yaml", *overrides]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    if nproc > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: training run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def section_paths(args, work: Path) -> dict:
    tok, tok_dir, shards_dir, prep, prep_secs = tokenizer_and_shards(work, args.seq_len)
    m = prep["manifest"]
    print(f"prepare: BBC News → {len(m['shards'])} shards, {m['documents']} documents, {m['tokens']} tokens "
          f"({m['dtype']}) in {prep_secs:.1f} s ({len(prep['done'])} written now)")
    worlds = [int(x) for x in args.ranks.split(",")]
    rates: dict = {}
    for path in args.paths.split(","):
        for world in worlds:
            per_rank = [path_rate(path, tok, shards_dir, r, world, args) for r in range(world)]
            rates.setdefault(path, {})[world] = per_rank
    train = {}
    if args.train_steps:
        rows = train_run(work / "train", tok_dir, shards_dir, args.train_ranks, args.train_steps, args)
        tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
        train = {"ranks": args.train_ranks, "tokens_per_s": statistics.median(tps),
                 "per_rank": statistics.median(tps) / args.train_ranks}
    bounds = {L: boundary_fraction(tok, shards_dir, L) for L in args.boundary_lens}
    print(f"data path tokens/s per rank (stream + collator, batches {args.batch_size} x {args.seq_len}; "
          f"slowest rank){'; training consumes ' + format(train['per_rank'], '.0f') + ' tokens/s per rank at ' + str(train['ranks']) + ' ranks' if train else ''}")
    print(f"{'path':16} {'ranks':>5} {'tokens/s/rank':>14} {'x training':>10}")
    for path, by_world in rates.items():
        for world, per_rank in by_world.items():
            slow = min(per_rank)
            ratio = f"{slow / train['per_rank']:>10.1f}" if train else f"{'-':>10}"
            print(f"{path:16} {world:>5} {slow:>14.0f} {ratio}")
    for L, f in bounds.items():
        print(f"sequences holding a document boundary at seq_len {L}: {f:.1%}")
    if train and args.train_ranks in worlds:
        for path in rates:
            slow = min(rates[path][args.train_ranks])
            print(f"summary: data path {path} at {args.train_ranks} ranks = {slow / train['per_rank']:.1f}x training "
                  f"consumption ({slow:.0f} vs {train['per_rank']:.0f} tokens/s per rank; target >= 10x)")
    return {"prepare_seconds": prep_secs, "rates": rates, "train": train, "boundary_fraction": bounds}


def section_docmask(args, work: Path) -> dict:
    tok, tok_dir, shards_dir, _, _ = tokenizer_and_shards(work, args.seq_len)
    out = {}
    for name, flag in (("packed", "false"), ("document_mask", "true")):
        rows = train_run(work / f"dm_{name}", tok_dir, shards_dir, 1, args.docmask_steps, args,
                         f"--data.document_mask={flag}", f"--eval_every={args.docmask_steps}",
                         f"--data.max_eval_batches={args.eval_batches}", f"--seed={args.seed}")
        tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
        ev = [r for r in rows if "eval_loss" in r][-1]
        out[name] = {"eval_loss": ev["eval_loss"], "eval_masked_tokens": ev["eval_masked_tokens"],
                     "train_loss": [r["loss"] for r in rows if "loss" in r][-1],
                     "tokens_per_s": statistics.median(tps)}
    print(f"tiny BERT MLM, BBC News, seq_len {args.seq_len}, batch {args.batch_size}, {args.docmask_steps} steps, "
          f"1 process; eval on the held-out documents ({args.eval_batches} batches)")
    print(f"{'run':14} {'eval loss':>9} {'train loss':>10} {'tokens/s':>9}")
    for name, r in out.items():
        print(f"{name:14} {r['eval_loss']:>9.4f} {r['train_loss']:>10.4f} {r['tokens_per_s']:>9.0f}")
    a, b = out["packed"], out["document_mask"]
    print(f"summary: document_mask eval loss {b['eval_loss']:.4f} vs {a['eval_loss']:.4f} packed "
          f"({b['eval_loss'] - a['eval_loss']:+.4f}); speed {b['tokens_per_s'] / a['tokens_per_s']:.2f}x")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="split,paths", help="split (rank split), paths (data paths vs "
                   "training), docmask (document-aware packing: eval loss and speed)")
    p.add_argument("--paths", default="fly,shards,shards+docmask")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--tokens", type=int, default=200_000, help="tokens timed per path and rank")
    p.add_argument("--train_steps", type=int, default=30, help="steps of the training run (0: skip it)")
    p.add_argument("--train_ranks", type=int, default=2)
    p.add_argument("--boundary_lens", default="128,512", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--docmask_steps", type=int, default=300)
    p.add_argument("--eval_batches", type=int, default=20)
    p.add_argument("--work", default=None, help="dir for the tokenizer, shards and runs (default: a temp dir)")
    p.add_argument("--ranks", default="1,2", help="comma-separated world sizes (the first is the ratio's base)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--splits", default="before,now")
    p.add_argument("--source", default=None, help="a local file / dir / glob (default: the built-in BBC News)")
    p.add_argument("--eval_fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sections = args.sections.split(",")
    report: dict = {"args": vars(args)}
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="data_path_"))
    work.mkdir(parents=True, exist_ok=True)
    if "split" in sections:
        report["results"] = section_split(args)
    if "paths" in sections:
        report["paths"] = section_paths(args, work)
    if "docmask" in sections:
        report["docmask"] = section_docmask(args, work)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return 0


def section_split(args) -> dict:
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
    return results


if __name__ == "__main__":
    sys.exit(main())
