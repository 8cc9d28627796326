"""Pre-tokenized MLM token shards: `llm-dist prepare` writes them once, training streams from them.

Layout of a shard dir (as nanoGPT's `.bin` files / Megatron's indexed datasets: one flat token array and
document offsets, memory-mapped at training time)::

    DIR/tokenizer/                     the tokenizer the shards were made with (save_pretrained)
    DIR/shard_00000.tokens.bin         all tokens of the shard's documents ([CLS] … [SEP] each), uint16 when
                                       the vocabulary fits in 65,536 ids, else uint32
    DIR/shard_00000.offsets.npy        int64, documents + 1 entries: document d is tokens[o[d]:o[d+1]]
    DIR/shard_00000.json               the shard's record: its source files (size, mtime), document ids,
                                       counts; written last, so its presence means "finished" (resume)
    DIR/manifest.json                  tokenizer hash, sources, dtype, every shard's counts; written when the
                                       last shard is finished (by whichever process finishes it)

A shard is a group of whole source files (in the source's sorted order) of about `shard_bytes` of text.
The work is split by shard: `--workers N` processes on one machine, or `--task_index i --num_tasks n` for
a SLURM array task (shards i, i+n, …); finished shards are skipped, so a killed prepare resumes.

Training (`data.shards: DIR`, see `ShardCorpus.documents`) applies the same rules as the on-the-fly path:
per epoch the shard order is a permutation of (seed, epoch), each rank (and DataLoader worker) reads a
contiguous group of whole shards balanced by tokens (or every `world`-th document when there are fewer
shards than ranks), documents inside a shard in a permutation of (seed, epoch, shard); held-out documents
(by a hash of the id, `data.eval_fraction`) and excluded ids are dropped by id, as before. The position in
that order is one integer, checkpointed with the packer's pending tokens and shuffle buffer.

Why not `datasets.Dataset.map` + Arrow: its cache stores token lists as Arrow list arrays (int32/int64,
~2–4× the bytes of uint16) and its files are keyed by a fingerprint, not by a tokenizer hash we can refuse
on; a flat memmap is what the packer needs (contiguous token runs) and costs nothing to open on every rank.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from ..config import ConfigError, SourceConfig, write_text_atomic
from .sources import DataError, source_files, stream_source

FORMAT = "llm_dist.token_shards/1"
MANIFEST = "manifest.json"


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's full serialization (vocabulary, normalizer, pre-tokenizer, post-processor):
    two tokenizers with the same hash give the same ids for every text."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def file_record(path: str) -> dict:
    st = os.stat(path)
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def plan_shards(sources: list[SourceConfig], shard_bytes: int) -> list[dict]:
    """The shards of a corpus: per source (in config order), its sorted files grouped greedily into runs of
    about `shard_bytes` (a file bigger than that is a shard of its own)."""
    plan = []
    for si, src in enumerate(sources):
        group, size = [], 0
        for f in source_files(src):
            group.append(f)
            size += os.path.getsize(f)
            if size >= shard_bytes:
                plan.append({"source": si, "files": group})
                group, size = [], 0
        if group:
            plan.append({"source": si, "files": group})
    for i, sh in enumerate(plan):
        sh["name"] = f"shard_{i:05d}"
    return plan


def _shard_done(out: Path, shard: dict, tok_hash: str) -> bool:
    """A shard is finished when its record exists, names the same tokenizer and the same files with the same
    sizes and mtimes (a changed source file makes its shard be redone)."""
    try:
        rec = json.loads((out / f"{shard['name']}.json").read_text())
    except (OSError, ValueError):
        return False
    return rec.get("tokenizer_hash") == tok_hash and rec.get("files") == [file_record(f) for f in shard["files"]]


def write_shard(out: Path, shard: dict, src: SourceConfig, tokenizer, tok_hash: str, batch: int = 64) -> dict:
    """Tokenize one shard's files (fast tokenizer, batched) and write its three files (tokens and offsets
    to temporary names, renamed; the record last)."""
    dtype = token_dtype(len(tokenizer))
    name = shard["name"]
    tmp_tokens, tmp_offsets = out / f".{name}.tokens.bin.tmp", out / f".{name}.offsets.npy.tmp"
    ids, offsets, n_tokens = [], [0], 0
    texts: list[str] = []
    with open(tmp_tokens, "wb") as fh:
        def flush():
            nonlocal n_tokens
            for enc in tokenizer.backend_tokenizer.encode_batch(texts):
                arr = np.asarray(enc.ids, dtype=dtype)
                fh.write(arr.tobytes())
                n_tokens += len(arr)
                offsets.append(n_tokens)
            texts.clear()

        for ex in stream_source(src, shard["files"]):
            ids.append(ex["id"])
            texts.append(ex["text"])
            if len(texts) >= batch:
                flush()
        if texts:
            flush()
    with open(tmp_offsets, "wb") as fh:
        np.save(fh, np.asarray(offsets, dtype=np.int64))
    os.replace(tmp_tokens, out / f"{name}.tokens.bin")
    os.replace(tmp_offsets, out / f"{name}.offsets.npy")
    rec = {"name": name, "source": shard["source"], "tokenizer_hash": tok_hash, "dtype": np.dtype(dtype).name,
           "documents": len(ids), "tokens": n_tokens, "files": [file_record(f) for f in shard["files"]], "ids": ids}
    write_text_atomic(out / f"{name}.json", json.dumps(rec))
    return rec


_WORKER: dict = {}


def _init_worker(out: str, tok_dir: str, sources: list[dict], tok_hash: str) -> None:
    from ..models.build import load_tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(out=Path(out), tok=load_tokenizer(tok_dir), sources=[SourceConfig(**s) for s in sources],
                   hash=tok_hash)


def _work(shard: dict) -> dict:
    w = _WORKER
    rec = write_shard(w["out"], shard, w["sources"][shard["source"]], w["tok"], w["hash"])
    return {k: rec[k] for k in ("name", "documents", "tokens")}


def prepare(sources: list[SourceConfig], tokenizer, out: str | Path, shard_bytes: int = 64 * 2**20,
            workers: int = 1, task_index: int = 0, num_tasks: int = 1, progress: bool = True) -> dict:
    """Tokenize `sources` into shards under `out` (this task's share: shards task_index, +num_tasks, …),
    with `workers` processes; skip finished shards. Writes the manifest when every shard is finished and
    returns {"done": [...], "skipped": [...], "manifest": manifest or None}."""
    from dataclasses import asdict

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok_hash = tokenizer_hash(tokenizer)
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        tmp = out / ".tokenizer.tmp"
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, tok_dir)
    else:
        from ..models.build import load_tokenizer

        if tokenizer_hash(load_tokenizer(str(tok_dir))) != tok_hash:
            raise DataError(f"{out}: shards made with another tokenizer are there already (tokenizer hash differs); "
                            "use a new directory")
    plan = plan_shards(sources, shard_bytes)
    mine = plan[task_index::num_tasks]
    todo = [s for s in mine if not _shard_done(out, s, tok_hash)]
    skipped = [s["name"] for s in mine if s not in todo]
    done = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="prepare shards", unit="shard", disable=not progress or not todo)
    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp

        # fork where there is one (no re-import per worker; the workers load their own tokenizer without
        # parallelism, so no inherited tokenizer thread pool is used); spawn elsewhere
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(min(workers, len(todo)), initializer=_init_worker,
                      initargs=(str(out), str(tok_dir), [asdict(s) for s in sources], tok_hash)) as pool:
            for rec in pool.imap_unordered(_work, todo):
                done.append(rec["name"])
                bar.update(1)
    else:
        for s in todo:
            write_shard(out, s, sources[s["source"]], tokenizer, tok_hash)
            done.append(s["name"])
            bar.update(1)
    bar.close()
    manifest = write_manifest(out, plan, sources, tokenizer, tok_hash)
    return {"done": done, "skipped": skipped, "manifest": manifest, "shards": len(plan)}


def write_manifest(out: Path, plan: list[dict], sources: list[SourceConfig], tokenizer, tok_hash: str) -> dict | None:
    """The manifest, once every shard of the plan is finished (None before: another task is still working)."""
    if not all(_shard_done(out, s, tok_hash) for s in plan):
        return None
    from dataclasses import asdict

    shards = []
    for s in plan:
        rec = json.loads((out / f"{s['name']}.json").read_text())
        shards.append({k: rec[k] for k in ("name", "source", "documents", "tokens")})
    manifest = {
        "format": FORMAT, "tokenizer_hash": tok_hash, "vocab_size": len(tokenizer),
        "dtype": np.dtype(token_dtype(len(tokenizer))).name, "tokenizer": "tokenizer",
        "sources": [{"config": {k: v for k, v in asdict(src).items() if v is not None},
                     "files": [file_record(f) for f in source_files(src)]} for src in sources],
        "documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
    }
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


# ----------------------------------------------------------------------------- reading
def read_manifest(path: str | Path) -> dict:
    p = Path(path) / MANIFEST
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config key 'data.shards': {p}: no manifest (run `llm-dist prepare` to the end)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"config key 'data.shards': {p}: unreadable ({e})") from None
    if m.get("format") != FORMAT:
        raise ConfigError(f"config key 'data.shards': {p}: not a token-shard manifest ({FORMAT})")
    return m


def check_tokenizer(manifest: dict, tokenizer, shards_dir: str) -> None:
    """One line when the shards were made with another tokenizer than the run's."""
    h = tokenizer_hash(tokenizer)
    if h != manifest["tokenizer_hash"]:
        raise ConfigError(f"config key 'data.shards': {shards_dir} was made with another tokenizer "
                          f"(hash {manifest['tokenizer_hash'][:12]}) than the run's (hash {h[:12]}); "
                          f"use tokenizer.path: {Path(shards_dir) / 'tokenizer'} or prepare again")


def split_by_weight(weights, rank: int, world: int) -> tuple[int, int] | None:
    """[start, end) of the `rank`-th of `world` contiguous groups of items with about equal total weight,
    each at least one item (the rule of `llm_dist.data.mlm.rank_files`, on token counts); None when there
    are fewer items than groups."""
    n = len(weights)
    if world <= 1:
        return 0, n
    if n < world:
        return None
    cum = np.cumsum([0] + [max(int(w), 1) for w in weights])
    cuts = [0]
    for k in range(1, world):
        target = cum[-1] * k / world
        j = int(np.searchsorted(cum, target))
        if j > 0 and target - cum[j - 1] < cum[j] - target:
            j -= 1
        cuts.append(min(max(j, cuts[-1] + 1), n - (world - k)))
    cuts.append(n)
    return cuts[rank], cuts[rank + 1]


class ShardCorpus:
    """The documents of a shard dir, memory-mapped (opened lazily, once per process)."""

    def __init__(self, path: str | Path, sources: list[SourceConfig] | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(path)
        self.shards = self.manifest["shards"]
        self.dtype = np.dtype(self.manifest["dtype"])
        if sources is not None and len(sources) != len(self.manifest["sources"]):
            raise ConfigError(f"config key 'data.shards': {path} holds {len(self.manifest['sources'])} source(s), "
                              f"data.sources has {len(sources)}")
        if sources and len({s.weight for s in sources}) > 1:
            raise ConfigError("config key 'data.sources': weights are not applied when streaming from data.shards "
                              "(the shards' sources are read as one corpus); drop the weights or the shards")
        self.sources = sources
        self._tokens: dict[int, np.ndarray] = {}
        self._offsets: dict[int, np.ndarray] = {}
        self._ids: dict[int, list[str]] = {}
        self._keep: dict = {}

    def __getstate__(self) -> dict:
        """Pickled (into DataLoader workers) without the opened memmaps, which would be copied whole: each
        worker maps the files itself."""
        st = dict(self.__dict__)
        st.update(_tokens={}, _offsets={}, _ids={}, _keep={})
        return st

    def _open(self, i: int) -> None:
        if i in self._tokens:
            return
        name = self.shards[i]["name"]
        off = np.load(self.path / f"{name}.offsets.npy", mmap_mode="r")
        n = int(off[-1])
        self._offsets[i] = off
        self._tokens[i] = (np.memmap(self.path / f"{name}.tokens.bin", dtype=self.dtype, mode="r", shape=(n,))
                           if n else np.zeros(0, dtype=self.dtype))
        self._ids[i] = json.loads((self.path / f"{name}.json").read_text())["ids"]

    def doc_ids(self, i: int) -> list[str]:
        self._open(i)
        return self._ids[i]

    def tokens(self, i: int, d: int) -> np.ndarray:
        self._open(i)
        off = self._offsets[i]
        return self._tokens[i][int(off[d]):int(off[d + 1])]

    def keep_mask(self, i: int, heldout_fraction: float, want_heldout: bool) -> np.ndarray:
        """Which documents of shard `i` this stream reads: held-out or not (by the id hash), not excluded."""
        key = (i, heldout_fraction, want_heldout)
        if key not in self._keep:
            from .mlm import excluded_ids, is_heldout

            ids = self.doc_ids(i)
            excluded = excluded_ids(self.sources[self.shards[i]["source"]]) if self.sources else frozenset()
            self._keep[key] = np.array([(is_heldout(d, heldout_fraction) == want_heldout) and d not in excluded
                                        for d in ids], dtype=bool)
        return self._keep[key]

    def order(self, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
        """(shard, document) pairs this rank reads in `epoch`, in order: an (n, 2) int array."""
        perm = np.random.default_rng([seed, 7, epoch]).permutation(len(self.shards))
        span = split_by_weight([self.shards[j]["tokens"] for j in perm], rank, world)
        mine = perm if span is None else perm[span[0]:span[1]]
        parts = []
        for j in mine:
            n = self.shards[j]["documents"]
            docs = np.random.default_rng([seed, 11, epoch, int(j)]).permutation(n)
            parts.append(np.stack([np.full(n, j), docs], axis=1))
        pairs = np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)
        if span is None:  # fewer shards than ranks: every `world`-th document of the whole order
            pairs = pairs[rank::world]
        return pairs

    def documents(self, seed: int, epoch: int, rank: int, world: int, heldout_fraction: float,
                  want_heldout: bool, start: int = 0) -> Iterator[tuple[int, str, np.ndarray]]:
        """(position after this document, doc id, tokens) of this rank's documents in `epoch`, from position
        `start` (a checkpoint's) on."""
        pairs = self.order(seed, epoch, rank, world)
        for pos in range(start, len(pairs)):
            i, d = int(pairs[pos, 0]), int(pairs[pos, 1])
            if self.keep_mask(i, heldout_fraction, want_heldout)[d]:
                yield pos + 1, self.doc_ids(i)[d], self.tokens(i, d)
            elif (pos + 1) % 4096 == 0:  # long runs of dropped documents still move the position
                yield pos + 1, None, None


def check_shards(corpus: ShardCorpus, rank: int, world: int, heldout_fraction: float, accelerator=None,
                 seed: int = 0) -> None:
    """Fail fast when this rank's share of the shards holds no training document (agreed over ranks)."""
    import torch

    mine = any(d is not None for _, d, _ in corpus.documents(seed, 0, rank, world, heldout_fraction, False))
    empty = torch.tensor([float(not mine)])
    if accelerator is not None and world > 1:
        empty = accelerator.reduce(empty.to(accelerator.device), reduction="sum").cpu()
    if empty.item() > 0:
        raise DataError(f"data.shards ({corpus.path}): too few documents to give each of {world} ranks a share")


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str]) -> int:
    """`llm-dist prepare CONFIG.yaml --out DIR [--workers N] [--shard_mb M] [--task_index i --num_tasks n]
    [--key=value ...]`: the config's data.sources and tokenizer (tokenizer.path / model.path, else a WordPiece
    trained on the sources as training would) tokenized into shards under DIR."""
    import argparse
    import sys

    from ..config import load_config
    from ..models.build import ModelError, get_tokenizer, load_tokenizer, tokenizer_source
    from .sources import iter_texts

    p = argparse.ArgumentParser(prog="llm-dist prepare", description=main.__doc__)
    p.add_argument("config")
    p.add_argument("--out", required=True, help="shard dir (data.shards of the training config)")
    p.add_argument("--workers", type=int, default=1, help="processes on this machine")
    p.add_argument("--shard_mb", type=float, default=64.0, help="source text per shard (MB)")
    p.add_argument("--task_index", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)))
    p.add_argument("--num_tasks", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)))
    args, overrides = p.parse_known_args(argv)
    try:
        if not 0 <= args.task_index < args.num_tasks:
            raise ConfigError(f"--task_index {args.task_index}: must be in [0, --num_tasks={args.num_tasks})")
        if args.workers < 1 or args.shard_mb <= 0:
            raise ConfigError("--workers must be >= 1 and --shard_mb > 0")
        cfg = load_config(args.config, overrides)
        path, _ = tokenizer_source(cfg)
        out = Path(args.out)
        if path:
            tok = load_tokenizer(path)
        elif (out / "tokenizer" / "tokenizer.json").exists():  # a resumed prepare / another array task
            tok = load_tokenizer(str(out / "tokenizer"))
        else:
            if args.num_tasks > 1:
                raise ConfigError("prepare as an array needs a tokenizer: set tokenizer.path (or run one task first)")

            class _One:  # get_tokenizer's accelerator: one process
                is_main_process = True

                def wait_for_everyone(self):
                    pass

            cfg.output_dir = str(out)
            tok = get_tokenizer(cfg, _One(), lambda n: iter_texts(cfg.data.sources, n))
        res = prepare(cfg.data.sources, tok, out, shard_bytes=int(args.shard_mb * 2**20), workers=args.workers,
                      task_index=args.task_index, num_tasks=args.num_tasks)
    except (ConfigError, DataError, ModelError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    m = res["manifest"]
    print(f"prepare: {len(res['done'])} shard(s) written, {len(res['skipped'])} already finished "
          f"(task {args.task_index} of {args.num_tasks}, {res['shards']} shards in all)")
    if m:
        print(f"manifest: {out / MANIFEST}: {m['documents']} documents, {m['tokens']} tokens ({m['dtype']}), "
              f"tokenizer {m['tokenizer_hash'][:12]}")
    else:
        print("manifest: not yet (other tasks' shards are unfinished)")
    return 0
