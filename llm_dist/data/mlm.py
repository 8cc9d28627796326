"""The MLM data path: sources → (weighted mix) → hold-out split by id → rank split → tokenize →
pack into fixed-length sequences → seeded shuffle buffer → batches with dynamic masking.

`PackedStream` is a checkpointable torch `IterableDataset`: its `state_dict()` holds the position in
the underlying `datasets` stream, the epoch, the tokens not yet packed and the shuffle buffer, so a
resumed run continues with exactly the next batch without replaying the stream.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
from typing import Iterator

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from transformers import DataCollatorForLanguageModeling

from ..config import DataConfig, MLMConfig, SourceConfig
from .sources import DataError, source_files, stream_source


def is_heldout(doc_id: str, fraction: float) -> bool:
    """Deterministic hold-out by a hash of the document id (the same on every rank and run)."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return (h % 1_000_000) < fraction * 1_000_000


def document_stream(sources: list[SourceConfig], seed: int, epoch: int, rank: int, world_size: int,
                    heldout_fraction: float, want_heldout: bool) -> datasets.IterableDataset:
    """The documents this rank reads in `epoch`, disjoint from every other rank's and together complete.

    Per source: the file order is shuffled by (seed, source, epoch) — the same order on every rank —
    and cut into `world_size` contiguous groups of whole files balanced by bytes (`rank_files`); this
    rank streams only its own group, so it opens, reads and filters only its share. A source with fewer
    files than ranks is read whole by every rank and split by example (every `world_size`-th kept
    document). Then excluded ids are dropped, held-out documents kept or dropped (by a hash of the id),
    and several sources mixed by weight. (`world_size` here counts DataLoader workers too.)"""
    streams = []
    for i, src in enumerate(sources):
        files = epoch_order(source_files(src), seed, i, epoch)
        mine = rank_files(files, rank, world_size)
        ds = stream_source(src, files if mine is None else mine)
        excluded = excluded_ids(src)
        if excluded:
            ds = ds.filter(lambda ex, ids=excluded: ex["id"] not in ids)
        if heldout_fraction > 0:
            ds = ds.filter(lambda ex: is_heldout(ex["id"], heldout_fraction) == want_heldout)
        if mine is None and world_size > 1:  # fewer files than ranks: one example in `world_size`
            ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        streams.append(ds)
    if len(streams) == 1:
        return streams[0]
    weights = [s.weight for s in sources]
    total = sum(weights)
    return datasets.interleave_datasets(
        streams, probabilities=[w / total for w in weights], seed=seed + epoch, stopping_strategy="all_exhausted"
    )


def epoch_order(files: list[str], seed: int, source_index: int, epoch: int) -> list[str]:
    """The source's files in the order of `epoch`: a permutation drawn from (seed, source, epoch) only,
    so every rank (and a resumed run) computes the same one."""
    perm = np.random.default_rng([seed, source_index, epoch]).permutation(len(files))
    return [files[j] for j in perm]


_SIZES: dict[str, int] = {}


def _size(file: str) -> int:
    if file not in _SIZES:
        _SIZES[file] = max(os.path.getsize(file), 1)
    return _SIZES[file]


def rank_files(files: list[str], rank: int, world_size: int) -> list[str] | None:
    """Rank `rank`'s share of `files` (in their order): the `rank`-th of `world_size` contiguous groups
    of whole files with about equal bytes, each group at least one file. None when there are fewer files
    than ranks (the caller then splits by example)."""
    n = len(files)
    if world_size <= 1:
        return list(files)
    if n < world_size:
        return None
    cum = np.cumsum([0] + [_size(f) for f in files])
    cuts = [0]
    for k in range(1, world_size):
        target = cum[-1] * k / world_size
        j = int(np.searchsorted(cum, target))  # the first file boundary at or past the target bytes …
        if j > 0 and target - cum[j - 1] < cum[j] - target:
            j -= 1  # … or the one before it, if closer
        cuts.append(min(max(j, cuts[-1] + 1), n - (world_size - k)))  # every group keeps >= 1 file
    cuts.append(n)
    return list(files[cuts[rank]:cuts[rank + 1]])


MAX_EMPTY_EPOCHS = 32  # consecutive epochs without a document for a rank before its stream gives up
CHECK_EPOCHS = 4  # epochs check_sources tries for a rank's first document

_EXCLUDED: dict = {}


def excluded_ids(src: SourceConfig) -> frozenset:
    """Ids a pretraining source must skip: an ids file, and/or the validation + test splits of a classify
    config (so the encoder never reads the articles it will later be tested on)."""
    key = (src.exclude_ids, src.exclude_splits_of)
    if key not in _EXCLUDED:
        ids: set = set()
        if src.exclude_ids:
            try:
                ids |= {line.strip() for line in open(src.exclude_ids) if line.strip()}
            except OSError as e:
                raise DataError(f"config key 'exclude_ids': {src.exclude_ids}: {e.strerror}") from None
        if src.exclude_splits_of:
            from ..config import load_config
            from .classify import load_splits

            splits = load_splits(load_config(src.exclude_splits_of, []))
            for name in ("validation", "test"):
                if name in splits:
                    ids |= set(splits[name]["id"])
        _EXCLUDED[key] = frozenset(ids)
    return _EXCLUDED[key]


def loader_epoch(state) -> int | None:
    """The furthest epoch of the `PackedStream` states inside a StatefulDataLoader state dict: with workers
    each worker's stream moves on its own (the main process's copy stays at its start), so the epoch is read
    from the worker snapshots. None when the state holds no stream state."""
    if isinstance(state, dict):
        if "epoch" in state and "pending" in state:
            return int(state["epoch"])
        state = list(state.values())
    if not isinstance(state, (list, tuple)):
        return None
    found = [e for e in map(loader_epoch, state) if e is not None]
    return max(found) if found else None


class PackedStream(torch.utils.data.IterableDataset):
    """Fixed-length packed sequences (`input_ids`, `special_tokens_mask`[, `offset_mapping`]).
    Documents are tokenized with [CLS] … [SEP] and concatenated, as `run_mlm.py`'s group_texts does,
    so no batch holds a pad token. Infinite (epoch after epoch) for training, one pass for eval."""

    def __init__(self, sources: list[SourceConfig], tokenizer, data: DataConfig, seed: int, rank: int,
                 world_size: int, eval_split: bool = False, with_offsets: bool = False, tokenize_batch: int = 16,
                 segmenter: str = "auto", shards=None):
        """`with_offsets`: also give each token's character offsets and whether it starts a word
        (`word_start`, for whole-word masking; CJK words from `segmenter`, see `word_start_flags`).
        `shards`: a `llm_dist.data.shards.ShardCorpus` to read pre-tokenized documents from instead of
        tokenizing `sources` on the fly (its position in the rank's document order is the `stream` state)."""
        super().__init__()
        if shards is not None and with_offsets:
            raise DataError("config key 'data.shards': whole-word masking needs the texts' offsets, which token "
                            "shards do not keep (mlm.whole_word_masking: false, or no data.shards)")
        self.shards = shards
        self.segment = get_segmenter(segmenter) if with_offsets else None
        self.sources, self.tok, self.data = sources, tokenizer, data
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.eval_split, self.with_offsets, self.tokenize_batch = eval_split, with_offsets, tokenize_batch
        self.seq_len = data.seq_len
        self.buffer_size = 0 if eval_split else data.shuffle_buffer
        self.special_ids = set(tokenizer.all_special_ids)
        # pending_docs: [doc id, tokens of it still in `pending`] runs, so each sequence knows its documents
        self._state = {"epoch": 0, "stream": None, "pending": [], "pending_offsets": [], "pending_starts": [],
                       "pending_docs": [], "buffer": [], "rng": random.Random(seed * 7919 + rank).getstate(),
                       "documents": 0}

    # --- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        # `stream` is the position just after the last tokenized document, whose tokens are all in
        # `pending`/`buffer` or already yielded: saving it never loses or repeats a document.
        state = {k: (list(v) if isinstance(v, list) else v) for k, v in self._state.items()}
        if torch.utils.data.get_worker_info() is not None:
            # In a DataLoader worker the collator's dynamic masking draws from this process's torch RNG,
            # which no checkpoint saves and torchdata reseeds (base seed + worker id) when a resumed worker
            # starts: it travels with the worker's stream state (StatefulDataLoader snapshots it after
            # each batch it collates), so a resumed worker masks as the uninterrupted one would.
            state["worker_torch_rng"] = torch.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        rng = state.pop("worker_torch_rng", None)
        if rng is not None and torch.utils.data.get_worker_info() is not None:
            torch.set_rng_state(rng)  # restored in the worker, after torchdata seeded it
        self._state = {"pending_docs": [], **state}
        if "pending_starts" not in state:  # a state saved before word_start: the offsets' gaps (the old rule)
            offs = state.get("pending_offsets", [])
            self._state["pending_starts"] = [i == 0 or offs[i][0] != offs[i - 1][1] for i in range(len(offs))]

    # --- iteration -----------------------------------------------------------------------------
    def _encode(self, texts: list[str]):
        encs = self.tok.backend_tokenizer.encode_batch(texts)
        if not self.with_offsets:
            return [(e.ids, e.offsets, None) for e in encs]
        return [(e.ids, e.offsets, word_start_flags(t, e.offsets, self.segment)) for t, e in zip(texts, encs)]

    def _pack(self) -> Iterator[dict]:
        """The full sequences in `pending`, each with its documents' ids and token counts (`doc_lens`: the
        runs of one document inside the sequence, for position ids / attention restricted per document)."""
        st, L = self._state, self.seq_len
        while len(st["pending"]) >= L:
            seq, st["pending"] = st["pending"][:L], st["pending"][L:]
            runs = _take_runs(st["pending_docs"], L)
            item = {"input_ids": seq, "doc_ids": [d for d, _ in runs if d is not None], "doc_lens": [n for _, n in runs]}
            if self.with_offsets:
                item["offset_mapping"] = st["pending_offsets"][:L]
                st["pending_offsets"] = st["pending_offsets"][L:]
                item["word_start"] = st["pending_starts"][:L]
                st["pending_starts"] = st["pending_starts"][L:]
            yield item

    def _shard_sequences(self) -> Iterator[dict]:
        """`_sequences` from token shards: no tokenization, the stream position is one integer per epoch."""
        st = self._state
        worker = torch.utils.data.get_worker_info()
        n_workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        empty_epochs = 0
        while True:
            start = (st["stream"] or {}).get("shard_pos", 0)
            whole_epoch, read = start == 0, 0
            for pos, doc, tokens in self.shards.documents(self.seed, st["epoch"], self.rank * n_workers + worker_id,
                                                          self.world_size * n_workers, self.data.eval_fraction,
                                                          self.eval_split, start=start):
                if doc is not None:
                    ids = tokens.tolist()
                    st["pending"].extend(ids)
                    st["pending_docs"].append([doc, len(ids)])
                    st["documents"] += 1
                    read += 1
                st["stream"] = {"shard_pos": pos}  # set before anything is yielded: never lost nor repeated
                yield from self._pack()
            st["stream"] = None
            if whole_epoch and read == 0 and not self.eval_split:
                empty_epochs += 1
                if empty_epochs >= MAX_EMPTY_EPOCHS:
                    raise DataError(f"data.shards ({self.shards.path}): no documents for rank {self.rank} of "
                                    f"{self.world_size} in epochs {st['epoch'] - empty_epochs + 1}-{st['epoch']}")
            elif read:
                empty_epochs = 0
            if self.eval_split:
                return
            st["epoch"] += 1

    def _sequences(self) -> Iterator[dict]:
        """Pack documents into sequences; updates `pending` (tokens carried to the next sequence)."""
        if self.shards is not None:
            yield from self._shard_sequences()
            return
        st, L = self._state, self.seq_len
        worker = torch.utils.data.get_worker_info()  # DataLoader workers split this rank's share again
        n_workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        empty_epochs = 0
        while True:
            ds = document_stream(self.sources, self.seed, st["epoch"], self.rank * n_workers + worker_id,
                                 self.world_size * n_workers, self.data.eval_fraction, want_heldout=self.eval_split)
            if st["stream"] is not None:
                ds.load_state_dict(st["stream"])
            whole_epoch, read = st["stream"] is None, 0
            batch: list[str] = []
            doc_ids: list[str] = []
            it = _examples(ds)
            exhausted = False
            while not exhausted:
                try:
                    ex = next(it)
                    batch.append(ex["text"])
                    doc_ids.append(ex["id"])
                except StopIteration:
                    exhausted = True
                if batch and (len(batch) >= self.tokenize_batch or exhausted):
                    # the stream position now includes these documents; their tokens go to `pending`
                    # before anything is yielded, so a checkpoint never loses or repeats a document.
                    for (ids, offs, starts), doc in zip(self._encode(batch), doc_ids):
                        st["pending"].extend(ids)
                        st["pending_docs"].append([doc, len(ids)])
                        if self.with_offsets:
                            st["pending_offsets"].extend(offs)
                            st["pending_starts"].extend(starts)
                    st["documents"] += len(batch)
                    read += len(batch)
                    batch, doc_ids = [], []
                    st["stream"] = ds.state_dict()
                    yield from self._pack()
            # end of an epoch
            st["stream"] = None
            if whole_epoch and read == 0 and not self.eval_split:
                # A rank's files can hold no training document in one epoch (all excluded or held out) and
                # some in the next, whose file order differs; but an empty source (or a share empty in
                # every epoch) would spin here for ever.
                empty_epochs += 1
                if empty_epochs >= MAX_EMPTY_EPOCHS:
                    names = ", ".join(source_name(s) for s in self.sources)
                    raise DataError(f"data.sources ({names}): no documents for rank {self.rank} of {self.world_size} "
                                    f"in epochs {st['epoch'] - empty_epochs + 1}-{st['epoch']}")
            elif read:
                empty_epochs = 0
            if self.eval_split:
                return
            st["epoch"] += 1

    def __iter__(self) -> Iterator[dict]:
        st = self._state
        rng = random.Random()
        rng.setstate(_tuple_state(st["rng"]))
        for item in self._sequences():
            if self.buffer_size <= 1:
                yield self._finish(item)
                continue
            st["buffer"].append(item)
            if len(st["buffer"]) < self.buffer_size:
                continue
            j = rng.randrange(len(st["buffer"]))
            st["buffer"][j], st["buffer"][-1] = st["buffer"][-1], st["buffer"][j]
            out = st["buffer"].pop()
            st["rng"] = rng.getstate()
            yield self._finish(out)
        while st["buffer"]:  # eval stream / finite: drain
            yield self._finish(st["buffer"].pop())

    def _finish(self, item: dict) -> dict:
        ids = item["input_ids"]
        out = {"input_ids": torch.tensor(ids, dtype=torch.long),
               "special_tokens_mask": torch.tensor([i in self.special_ids for i in ids], dtype=torch.long),
               "doc_ids": item.get("doc_ids", []), "doc_lens": item.get("doc_lens") or [len(ids)]}
        if "offset_mapping" in item:
            out["offset_mapping"] = torch.tensor(item["offset_mapping"], dtype=torch.long)
        if "word_start" in item:
            out["word_start"] = torch.tensor(item["word_start"], dtype=torch.bool)
        return out


def _examples(ds: datasets.IterableDataset) -> Iterator[dict]:
    """The stream's examples. Not `iter(ds)`: inside a DataLoader worker that would split the shards
    across workers a second time, though `document_stream` already gave this worker only its own share."""
    for batch in ds.iter(batch_size=1):
        yield {k: v[0] for k, v in batch.items()}


def _take_docs(runs: list[list], n: int) -> list[str]:
    """Pop `n` tokens' worth of [doc id, tokens left] runs; the ids of the documents they belong to."""
    return [d for d, _ in _take_runs(runs, n)]


def _take_runs(runs: list[list], n: int) -> list[tuple[str, int]]:
    """Pop `n` tokens' worth of [doc id, tokens left] runs: (doc id, tokens of it) in order. Tokens not
    covered by a run (a state saved before runs were kept) count for the first run."""
    out = []
    while n > 0 and runs:
        doc, left = runs[0]
        used = min(n, left)
        out.append((doc, used))
        n -= used
        if used == left:
            runs.pop(0)
        else:
            runs[0] = [doc, left - used]
    if n > 0:
        out = [(out[0][0] if out else None, (out[0][1] if out else 0) + n)] + out[1:]
    return out


def source_name(src: SourceConfig) -> str:
    return src.name or src.path or "?"


def check_sources(sources: list[SourceConfig], rank: int, world_size: int, heldout_fraction: float,
                  accelerator=None, seed: int = 0) -> None:
    """Fail fast, before any slow work, on a source with no documents, or a rank whose share of the
    training documents is empty (every rank checks its own share; the verdict is agreed over ranks so
    they all stop with the same one-line error instead of one of them waiting for ever). A share of whole
    files may be empty in one epoch only (its files all excluded or held out): the first epochs are tried."""
    for i, src in enumerate(sources):
        ds = stream_source(src)
        excluded = excluded_ids(src)
        if excluded:
            ds = ds.filter(lambda ex, ids=excluded: ex["id"] not in ids)
        if next(iter(ds), None) is None:
            what = "after excluding evaluation ids " if excluded else ""
            raise DataError(f"config key 'data.sources.{i}' ({source_name(src)}): no documents {what}".rstrip())
    mine = None
    for epoch in range(CHECK_EPOCHS):
        mine = next(iter(document_stream(sources, seed, epoch, rank, world_size, heldout_fraction, False)), None)
        if mine is not None:
            break
    empty = torch.tensor([float(mine is None)])
    if accelerator is not None and world_size > 1:
        empty = accelerator.reduce(empty.to(accelerator.device), reduction="sum").cpu()
    if empty.item() > 0:
        names = ", ".join(source_name(s) for s in sources)
        raise DataError(f"data.sources ({names}): too few documents to give each of {world_size} ranks a share "
                        f"(after holding out data.eval_fraction={heldout_fraction}); add data or use fewer ranks")


def _tuple_state(state):
    """random.Random state after a JSON/pickle round trip may come back as lists."""
    if isinstance(state, list):
        return tuple(tuple(s) if isinstance(s, list) else s for s in state)
    return state


class MLMCollator:
    """Stack packed sequences and apply dynamic masking; draws come from the global torch RNG, which
    checkpoints save (in a DataLoader worker: the worker's, saved with its `PackedStream` state), or, with
    `seed`, from a generator of that seed (evaluation masks, comparable between evals and leaving the
    training RNG untouched).

    - Token masking: transformers' `DataCollatorForLanguageModeling` (`mlm_probability` of the non-special
      tokens; of those `mask_replace_prob` become [MASK], `random_replace_prob` a random token, the rest
      stay as they are).
    - Whole-word masking (`whole_word_masking: true`, needs the sequences' `offset_mapping`): words are
      picked with probability `mlm_probability` (a word = a token starting after a gap in the text, or
      after a special token, plus the pieces that continue it) and every piece of a picked word is
      predicted. The 80/10/10 choice is made **per word**, so a word is either all [MASK], all random
      tokens or all kept. transformers 5's collator cannot do this: with `whole_word_mask` it sets
      `mask_replace_prob=1` (100% [MASK]) whatever it is given, so it is done here."""

    def __init__(self, tokenizer, mlm: MLMConfig, seed: int | None = None, document_mask: bool = False):
        """`document_mask`: also give `position_ids` restarting at 0 at every document start inside a packed
        sequence and `doc_segments` (the index of each token's document run), from which the task builds
        attention restricted to each document (`document_attention_mask`)."""
        self.mlm = mlm
        self.document_mask = document_mask
        self.whole_word = mlm.whole_word_masking
        self.mask_id = tokenizer.mask_token_id
        self.vocab = len(tokenizer)
        self.inner = None if self.whole_word else DataCollatorForLanguageModeling(
            tokenizer, mlm=True, mlm_probability=mlm.mlm_probability,
            mask_replace_prob=mlm.mask_replace_prob, random_replace_prob=mlm.random_replace_prob,
        )
        self.generator = None
        if seed is not None:
            if self.inner is not None:
                self.inner.seed = seed
                self.inner.create_rng("pt")
            else:
                self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, examples: list[dict]) -> dict:
        input_ids = torch.stack([e["input_ids"] for e in examples])
        special = torch.stack([e["special_tokens_mask"] for e in examples])
        if self.whole_word:
            if "offset_mapping" not in examples[0]:
                raise ValueError("whole-word masking needs the sequences' offset_mapping "
                                 "(PackedStream(with_offsets=True))")
            offsets = torch.stack([e["offset_mapping"] for e in examples])
            starts = torch.stack([e["word_start"] for e in examples]) if "word_start" in examples[0] else None
            inputs, labels = self.whole_word_mask(input_ids, special, offsets, starts)
        else:
            inputs, labels = self.inner.torch_mask_tokens(input_ids, special_tokens_mask=special)
        out = {"input_ids": inputs, "labels": labels, "attention_mask": torch.ones_like(inputs),
               "doc_ids": [e.get("doc_ids", []) for e in examples]}
        if self.document_mask:
            L = inputs.shape[1]
            out["position_ids"], out["doc_segments"] = document_positions(
                [e.get("doc_lens") or [L] for e in examples], L)
        return out

    def whole_word_mask(self, input_ids: torch.Tensor, special: torch.Tensor, offsets: torch.Tensor,
                        word_start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) with whole words masked and the mask / random / keep split drawn per word.
        `word_start`: the stream's per-token word starts (`word_start_flags`: CJK words from a segmenter);
        without it, the gaps in `offsets` alone."""
        m = self.mlm
        inputs, labels = input_ids.clone(), input_ids.clone()
        special = special.bool()
        starts = word_starts(offsets, special, word_start)
        # the word of each token: the position of its first piece (special tokens are never masked)
        pos = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        head = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
        # one draw per word (made at its first piece), shared by all its pieces
        g = self.generator
        pick = torch.rand(input_ids.shape, generator=g) < m.mlm_probability
        how = torch.rand(input_ids.shape, generator=g)
        masked = (pick & starts).gather(1, head) & ~special
        how = how.gather(1, head)
        labels[~masked] = -100
        to_mask = masked & (how < m.mask_replace_prob)
        to_random = masked & ~to_mask & (how < m.mask_replace_prob + m.random_replace_prob)
        inputs[to_mask] = self.mask_id
        random_ids = torch.randint(self.vocab, input_ids.shape, dtype=torch.long, generator=g)
        inputs[to_random] = random_ids[to_random]
        return inputs, labels


def document_positions(doc_lens: list[list[int]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids, doc_segments), each (batch, seq_len) long: per sequence, the positions count from 0 at
    the start of every document run (`doc_lens`: the token counts of the runs, summing to seq_len), and the
    segment is the run's index."""
    counts = [len(lens) for lens in doc_lens]
    runs = np.fromiter((n for lens in doc_lens for n in lens), dtype=np.int64, count=sum(counts))
    sums = np.add.reduceat(runs, np.cumsum([0] + counts[:-1])) if runs.size else np.zeros(0, np.int64)
    bad = np.nonzero(sums != seq_len)[0]
    if bad.size:
        raise ValueError(f"document runs of sequence {bad[0]} cover {sums[bad[0]]} tokens, not {seq_len}")
    run = np.repeat(np.arange(runs.size), runs)  # each token's run, over the whole batch (numpy: one pass)
    starts = np.cumsum(runs) - runs
    first_run = np.repeat(np.cumsum([0] + counts[:-1]), seq_len)
    pos = np.arange(run.size) - starts[run]
    seg = run - first_run
    shape = (len(doc_lens), seq_len)
    return torch.from_numpy(pos.reshape(shape)), torch.from_numpy(seg.reshape(shape))


def document_attention_mask(doc_segments: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The block-diagonal 4-D mask (batch, 1, seq, seq) that lets a token attend only to its own document's
    tokens. Boolean (True = attend; what SDPA takes), or, given a float `dtype`, additive (0 / dtype's min;
    what eager attention adds to its scores). transformers passes a 4-D mask through to attention as is."""
    same = doc_segments[:, None, :, None] == doc_segments[:, None, None, :]
    if dtype is None or dtype == torch.bool:
        return same
    return torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill_(~same, torch.finfo(dtype).min)


def word_starts(offsets: torch.Tensor, special: torch.Tensor, word_start: torch.Tensor | None = None) -> torch.Tensor:
    """True at the first piece of each word: a non-special token whose text does not continue the previous
    token's (a gap in the character offsets; or, given `word_start`, where that says a word starts), or that
    follows a special token or starts the sequence."""
    prev_special = torch.roll(special, 1, dims=1)
    if word_start is None:
        prev_end = torch.roll(offsets[..., 1], 1, dims=1)
        new = (offsets[..., 0] != prev_end) | prev_special
    else:
        new = word_start.bool() | prev_special
    new[:, 0] = True
    return new & ~special


# ----------------------------------------------------------------------------- word boundaries
# Spaced scripts: a word is what the text separates by spaces (a gap between two tokens' offsets), so
# "token" + "##izer" is one word. CJK text has no spaces: every run of Han/kana characters would be one
# "word", a whole clause. Chinese BERT-wwm (Cui et al. 2019) masks the words of a segmenter instead (LTP
# there); here jieba (PyPI, pure Python, its own dictionary: no network), or, without it, each CJK
# character as a word (= character masking, what Google's Chinese BERT does).
SEGMENTERS = ("auto", "jieba", "chars")
_CJK = ("\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ebef"
        "\U0002f800-\U0002fa1f")
_CJK_CHAR = re.compile(f"[{_CJK}]")
_CJK_SIDE = re.compile(f"[{_CJK}\u3000-\u303f\uff00-\uffef]")  # CJK characters and CJK / full-width punctuation
_warned: set = set()


def _jieba_words(text: str) -> list[str]:
    import jieba

    return jieba.lcut(text)


def _char_words(text: str) -> list[str]:
    return list(text)


def get_segmenter(name: str = "auto"):
    """The CJK word segmenter `mlm.segmenter` names: `jieba` (an error when it is not installed), `chars`
    (every CJK character a word), `auto` (jieba when installed, else chars, with a warning once)."""
    if name not in SEGMENTERS:
        raise DataError(f"config key 'mlm.segmenter': {name!r} is not one of {', '.join(SEGMENTERS)}")
    if name == "chars":
        return _char_words
    try:
        import logging

        import jieba

        jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict …" lines on every rank
    except ImportError:
        if name == "jieba":
            raise DataError("config key 'mlm.segmenter': jieba is not installed (pip install jieba), "
                            "or use mlm.segmenter: chars") from None
        if "jieba" not in _warned:
            _warned.add("jieba")
            import warnings

            warnings.warn("whole-word masking: jieba is not installed, CJK text falls back to character masking "
                          "(each character one word); pip install jieba for word masking", stacklevel=2)
        return _char_words
    return _jieba_words


def word_start_flags(text: str, offsets, segment=None) -> list[bool]:
    """Per token of `text` (with its character `offsets`): does it start a word? A token starts a word after
    a gap in the offsets (spaced scripts, as before), and — in text with CJK characters — where `segment`
    (`get_segmenter`) puts a word boundary next to a CJK character or CJK punctuation. Special tokens (empty offsets) get True;
    the collator never masks them."""
    flags = []
    prev_end = None
    bounds = None
    if segment is not None and _CJK_CHAR.search(text):
        bounds = set()
        pos = 0
        for w in segment(text):
            if _CJK_SIDE.match(text, pos) or (pos and _CJK_SIDE.match(text, pos - 1)):
                bounds.add(pos)
            pos += len(w)
    for a, b in offsets:
        if b <= a:
            flags.append(True)
            continue
        flags.append(prev_end is None or a != prev_end or (bounds is not None and a in bounds))
        prev_end = b
    return flags
