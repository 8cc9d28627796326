"""MLM data path and model: masking, packing, rank split, stream resume, sparse = dense."""
import copy

import pytest
import torch
from transformers import AutoModelForMaskedLM

from llm_dist.config import DataConfig, MLMConfig, RunConfig, SourceConfig
from llm_dist.data.mlm import MLMCollator, PackedStream, document_stream
from llm_dist.models.build import SparseMLM, load_tokenizer, preset_config


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_packing_has_no_padding_and_fixed_length(tok):
    data = DataConfig(seq_len=64, shuffle_buffer=8)
    seqs = take(iter(PackedStream(data.sources, tok, data, seed=0, rank=0, world_size=1)), 200)
    ids = torch.stack([s["input_ids"] for s in seqs])
    assert ids.shape == (200, 64)
    assert (ids == tok.pad_token_id).sum() == 0
    # documents are joined with [CLS] … [SEP] inside sequences
    assert (ids == tok.sep_token_id).sum() > 0 and (ids == tok.cls_token_id).sum() > 0


def test_masking_rate_and_80_10_10(tok):
    torch.manual_seed(0)
    data = DataConfig(seq_len=128, shuffle_buffer=1)
    seqs = take(iter(PackedStream(data.sources, tok, data, seed=0, rank=0, world_size=1)), 256)
    batch = MLMCollator(tok, MLMConfig())(seqs)
    orig = torch.stack([s["input_ids"] for s in seqs])
    special = torch.stack([s["special_tokens_mask"] for s in seqs]).bool()
    masked = batch["labels"] != -100
    rate = masked.sum() / (~special).sum()
    assert 0.14 < rate < 0.16
    assert not (masked & special).any()
    assert torch.equal(batch["labels"][masked], orig[masked])
    frac_mask = (batch["input_ids"][masked] == tok.mask_token_id).float().mean()
    frac_keep = (batch["input_ids"][masked] == orig[masked]).float().mean()
    assert 0.77 < frac_mask < 0.83 and 0.08 < frac_keep < 0.13  # 10% random (a few hit the original)
    assert batch["attention_mask"].all()


def test_whole_word_masking_masks_all_pieces(tok):
    torch.manual_seed(0)
    data = DataConfig(seq_len=128, shuffle_buffer=1)
    seqs = take(iter(PackedStream(data.sources, tok, data, 0, 0, 1, with_offsets=True)), 64)
    batch = MLMCollator(tok, MLMConfig(whole_word_masking=True))(seqs)
    masked = batch["labels"] != -100
    ids = torch.stack([s["input_ids"] for s in seqs])
    pieces = torch.tensor([[t.startswith("##") for t in tok.convert_ids_to_tokens(row.tolist())] for row in ids])
    # a masked continuation piece always has its previous piece masked too
    cont = masked[:, 1:] & pieces[:, 1:]
    assert cont.any() and (masked[:, :-1][cont]).all()
    assert 0.10 < masked.sum() / masked.numel() < 0.20


def _words(seq: dict, tok) -> list[list[int]]:
    """Token positions of each word of a sequence, from the tokens themselves: a `##` piece continues the
    word before it (independent of the collator's offset-based rule)."""
    toks = tok.convert_ids_to_tokens(seq["input_ids"].tolist())
    special = seq["special_tokens_mask"].bool().tolist()
    words: list[list[int]] = []
    for i, (t, sp) in enumerate(zip(toks, special)):
        if sp:
            continue
        if t.startswith("##") and words and words[-1][-1] == i - 1:
            words[-1].append(i)
        else:
            words.append([i])
    return words


@pytest.mark.parametrize("mask_p, random_p", [(0.8, 0.1), (0.5, 0.4), (0.0, 1.0), (1.0, 0.0)])
def test_whole_word_masking_honours_80_10_10_per_word(tok, mask_p, random_p):
    """Over many batches, the [MASK] / random / kept shares of masked *words* match the config, every piece
    of a picked word is predicted, and a word's pieces all get the same treatment."""
    torch.manual_seed(1)
    data = DataConfig(seq_len=128, shuffle_buffer=1)
    seqs = take(iter(PackedStream(data.sources, tok, data, 0, 0, 1, with_offsets=True)), 160)
    collate = MLMCollator(tok, MLMConfig(whole_word_masking=True, mask_replace_prob=mask_p, random_replace_prob=random_p))
    counts = {"mask": 0, "random": 0, "keep": 0}
    words_total = words_masked = multi_piece_masked = 0
    for b in range(10):  # 10 batches of 16: fresh draws each
        chunk = seqs[16 * b:16 * (b + 1)]
        out = collate(chunk)
        for row, seq in enumerate(chunk):
            orig, inp, lab = seq["input_ids"], out["input_ids"][row], out["labels"][row]
            assert (lab[seq["special_tokens_mask"].bool()] == -100).all()
            for w in _words(seq, tok):
                words_total += 1
                m = lab[w] != -100
                assert m.all() or not m.any(), "a word is masked partly"
                if not m.any():
                    assert torch.equal(inp[w], orig[w])
                    continue
                assert torch.equal(lab[w], orig[w])
                words_masked += 1
                multi_piece_masked += len(w) > 1
                is_mask = inp[w] == tok.mask_token_id
                is_keep = inp[w] == orig[w]
                if is_mask.all():
                    counts["mask"] += 1
                elif is_keep.all():
                    counts["keep"] += 1
                else:  # random tokens for the whole word (a draw hits the original or [MASK] only by chance)
                    assert (~is_mask & ~is_keep).float().mean() > 0.5
                    counts["random"] += 1
    assert multi_piece_masked > 50
    assert 0.13 < words_masked / words_total < 0.17, words_masked / words_total
    want = {"mask": mask_p, "random": random_p, "keep": 1 - mask_p - random_p}
    for k, p in want.items():
        share = counts[k] / words_masked
        assert abs(share - p) < 0.03, (k, share, p, counts)  # ~2,400 masked words: 0.03 is > 4 sigma


@pytest.mark.parametrize("whole_word", [False, True])
def test_seeded_collator_repeats_and_leaves_the_global_rng(tok, whole_word):
    """Evaluation masks (MLMCollator(seed=…)): the same every time, and the training RNG is not drawn."""
    data = DataConfig(seq_len=64, shuffle_buffer=1)
    seqs = take(iter(PackedStream(data.sources, tok, data, 0, 0, 1, with_offsets=True)), 8)
    mlm = MLMConfig(whole_word_masking=whole_word)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = MLMCollator(tok, mlm, seed=17)(seqs)
    b = MLMCollator(tok, mlm, seed=17)(seqs)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert (a["labels"] != -100).any()


def test_whole_word_masking_needs_offsets(tok):
    data = DataConfig(seq_len=32, shuffle_buffer=1)
    seqs = take(iter(PackedStream(data.sources, tok, data, 0, 0, 1)), 2)
    with pytest.raises(ValueError, match="offset_mapping"):
        MLMCollator(tok, MLMConfig(whole_word_masking=True))(seqs)


def _rank_docs(src, rank, world, epoch=0, heldout=0.05, want_heldout=False):
    """(ids this rank reads, files and documents it opened / read from disk)."""
    from llm_dist.data import sources

    sources.READS.update(files=0, documents=0)
    ids = [ex["id"] for ex in document_stream(src, 0, epoch, rank, world, heldout, want_heldout=want_heldout)]
    return ids, dict(sources.READS)


def test_rank_split_is_disjoint_and_complete():
    """Two ranks: disjoint, together complete, and each opens and reads only about half the files (its
    own), not the whole corpus; the held-out documents are read apart."""
    src = [SourceConfig(name="bbc_news")]
    (ids0, reads0), (ids1, reads1) = (_rank_docs(src, r, 2) for r in range(2))
    held, _ = _rank_docs(src, 0, 1, want_heldout=True)
    everything, reads_all = _rank_docs(src, 0, 1, heldout=0)
    assert reads_all == {"files": 2225, "documents": 2225}
    assert not set(ids0) & set(ids1) and not (set(ids0) | set(ids1)) & set(held)
    assert set(ids0) | set(ids1) | set(held) == set(everything)
    assert len(ids0) + len(ids1) + len(held) == 2225
    assert 60 < len(held) < 170
    assert reads0["files"] + reads1["files"] == 2225  # each file opened by exactly one rank
    for reads in (reads0, reads1):
        assert 0.45 < reads["files"] / 2225 < 0.55 and reads["documents"] == reads["files"]
    assert abs(len(ids0) - len(ids1)) < 0.05 * 2225  # whole files balanced by bytes


def test_rank_split_of_local_files(tmp_path):
    """Local files (lines of different lengths, an uneven count): 3 ranks each open only their own files,
    the shard order changes with the epoch and is the same on every rank; fewer files than ranks falls
    back to one document in `world_size` (everything still read exactly once overall)."""
    from llm_dist.data.mlm import epoch_order, rank_files

    for k in range(7):
        (tmp_path / f"part{k}.txt").write_text("".join(f"doc {k} {i} " + "w " * (k * 3 + i % 5) + "\n"
                                                    for i in range(40 + 13 * k)))
    src = [SourceConfig(path=str(tmp_path))]
    total = sum(40 + 13 * k for k in range(7))
    for epoch in (0, 1):
        runs = [_rank_docs(src, r, 3, epoch=epoch, heldout=0) for r in range(3)]
        ids = [set(i) for i, _ in runs]
        assert sum(len(i) for i in ids) == total == len(set().union(*ids))
        assert sum(r["files"] for _, r in runs) == 7 and all(r["files"] >= 1 for _, r in runs)
        assert [r["documents"] for _, r in runs] == [len(i) for i in ids]  # nothing read that is not kept
    files = sorted(str(p) for p in tmp_path.glob("*.txt"))
    assert epoch_order(files, 0, 0, 0) != epoch_order(files, 0, 0, 1)  # reshuffled each epoch …
    assert epoch_order(files, 0, 0, 1) == epoch_order(list(files), 0, 0, 1)  # … the same on every rank
    groups = [rank_files(epoch_order(files, 0, 0, 1), r, 3) for r in range(3)]
    assert sum(groups, []) == epoch_order(files, 0, 0, 1)
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.txt").write_text("".join(f"line {i}\n" for i in range(9)))
    runs = [_rank_docs([SourceConfig(path=str(one))], r, 2, heldout=0) for r in range(2)]
    assert sorted(runs[0][0] + runs[1][0]) == sorted(f"a:{i}" for i in range(9)) and len(runs[0][0]) == 5


def test_rank_whose_files_are_all_excluded_moves_to_the_next_epoch(tmp_path, tok):
    """Two files, two ranks, one file all evaluation ids (excluded): in each epoch one rank's share is
    empty; the start-up check passes and both ranks' streams go on (the next epochs give them the other file)."""
    from llm_dist.data.mlm import check_sources

    d = tmp_path / "mix"
    d.mkdir()
    (d / "pretrain.txt").write_text("".join(f"pretraining text number {i} with some words\n" for i in range(300)))
    (d / "test.txt").write_text("".join(f"held back test text {i}\n" for i in range(50)))
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"test:{i}\n" for i in range(50)))
    src = [SourceConfig(path=str(d), exclude_ids=str(ids))]
    data = DataConfig(sources=src, seq_len=32, shuffle_buffer=1, eval_fraction=0)
    for rank in range(2):
        check_sources(src, rank, 2, 0.0, seed=0)
        seqs = take(iter(PackedStream(src, tok, data, 0, rank, 2)), 200)  # > one epoch of the 300 documents
        assert all(d.startswith("pretrain:") for s in seqs for d in s["doc_ids"])


def test_dataloader_workers_split_files_once(tok):
    """With DataLoader workers each worker streams its own group of files (ranks x workers groups): the
    held-out pass over 2 workers yields every held-out document exactly once."""
    data = DataConfig(seq_len=64, shuffle_buffer=1)
    want, _ = _rank_docs(data.sources, 0, 1, want_heldout=True)
    ps = PackedStream(data.sources, tok, data, 0, 0, 1, eval_split=True)
    items = list(torch.utils.data.DataLoader(ps, batch_size=None, num_workers=2))
    single = list(PackedStream(data.sources, tok, data, 0, 0, 1, eval_split=True))
    assert {d for item in items for d in item["doc_ids"]} == set(want)  # none lost …
    assert len(single) - 1 <= len(items) <= len(single)  # … none twice (each worker drops a partial sequence)


def test_weighted_mix_of_sources(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text("".join(f"alpha document {i}\n" for i in range(300)))
    b.write_text("".join(f'{{"text": "beta document {i}"}}\n' for i in range(300)))
    src = [SourceConfig(path=str(a), weight=3.0), SourceConfig(path=str(b), weight=1.0)]
    first = [ex["text"].split()[0] for ex, _ in zip(document_stream(src, 0, 0, 0, 1, 0, False), range(200))]
    share = first.count("alpha") / len(first)
    assert 0.65 < share < 0.85


def test_stream_resumes_exactly(tok):
    data = DataConfig(seq_len=64, shuffle_buffer=32)
    ps = PackedStream(data.sources, tok, data, 3, 0, 2)
    it = iter(ps)
    take(it, 150)
    state = copy.deepcopy(ps.state_dict())
    after = [s["input_ids"] for s in take(it, 20)]
    ps2 = PackedStream(data.sources, tok, data, 3, 0, 2)
    ps2.load_state_dict(state)
    again = [s["input_ids"] for s in take(iter(ps2), 20)]
    assert all(torch.equal(x, y) for x, y in zip(after, again))


def test_sparse_head_equals_dense(tok):
    torch.manual_seed(0)
    cfg = RunConfig()
    hf = AutoModelForMaskedLM.from_config(preset_config("tiny", tok, cfg.model), attn_implementation="sdpa")
    hf.eval()
    data = DataConfig(seq_len=64, shuffle_buffer=1)
    batch = MLMCollator(tok, MLMConfig())(take(iter(PackedStream(data.sources, tok, data, 0, 0, 1)), 8))
    sparse, dense = SparseMLM(hf, sparse=True), SparseMLM(hf, sparse=False)
    ls, n, c = sparse(batch["input_ids"], batch["attention_mask"], batch["labels"])
    g_sparse = torch.autograd.grad(ls, list(hf.parameters()), allow_unused=True)
    ld, n2, c2 = dense(batch["input_ids"], batch["attention_mask"], batch["labels"])
    g_dense = torch.autograd.grad(ld, list(hf.parameters()), allow_unused=True)
    ref = hf(**batch).loss * n  # transformers' own mean loss × masked count
    assert n == n2 and c == c2
    torch.testing.assert_close(ls, ld, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ls, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(g_sparse, g_dense):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_pretraining_can_exclude_eval_articles(tmp_path):
    """The demo pretrains only on the fine-tuning train split: its validation/test articles stay unseen."""
    from llm_dist.config import load_config
    from llm_dist.data.classify import load_splits

    src = [SourceConfig(name="bbc_news", exclude_splits_of="configs/classify/tiny.yaml")]
    seen = {ex["id"] for ex in document_stream(src, 0, 0, 0, 1, 0, False)}
    splits = load_splits(load_config("configs/classify/tiny.yaml"))
    assert seen == set(splits["train"]["id"])
    ids = tmp_path / "ids.txt"
    ids.write_text("business/001\nsports/100\n")
    src = [SourceConfig(name="bbc_news", exclude_ids=str(ids))]
    seen = {ex["id"] for ex in document_stream(src, 0, 0, 0, 1, 0, False)}
    assert len(seen) == 2223 and "business/001" not in seen


@pytest.mark.parametrize("name", ["linear", "cosine", "constant_with_warmup", "wsd"])
def test_schedules(name):
    from llm_dist.config import OptimConfig
    from llm_dist.training.optim import build_optimizer, build_scheduler

    model = torch.nn.Linear(4, 4)
    cfg = OptimConfig(lr=1.0, scheduler=name, warmup_steps=10, decay_ratio=0.2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 100)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(1.0)  # linear warmup to the peak
    if name == "wsd":  # warmup, stable at the peak, then decay over the last 20%
        assert lrs[50] == pytest.approx(1.0) and lrs[79] == pytest.approx(1.0) and lrs[99] < 0.05
    elif name == "constant_with_warmup":
        assert lrs[99] == pytest.approx(1.0)
    else:
        assert lrs[99] < 0.05 and lrs[50] < 1.0
    # no weight decay on biases
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.weight_decay, 0.0]
