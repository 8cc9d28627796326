"""Augmentation (issue 15): EDA ops change the stated number of words, keep labels and ids, are reproducible
by (seed, id, copy, epoch); Chinese goes through jieba; the training split gains `ID#augN` slots (class-
targeted ones only for the named / minority classes) whose text is made at collate time; the contextual MLM
augmenter is batched and reproducible."""
from collections import Counter

import numpy as np
import pytest
import torch

from issue15_helpers import write_bbc_subset
from llm_dist.data.augment.eda import eda, eda_copy, eda_words, split_words, synonyms

TEXT = ("Shares in the big company rose sharply after the board said that quarterly profit had grown faster "
        "than analysts expected and that new markets in Asia would bring more revenue next year")


def test_wordnet_synonyms_offline():
    assert "fast" in synonyms("quick") and "car" in synonyms("automobile")
    assert synonyms("Quick") == synonyms("quick") and synonyms("zzqxv") == ()


@pytest.mark.parametrize("alpha", [0.1, 0.3])
def test_each_op_changes_the_stated_fraction(alpha):
    words = TEXT.split()
    n = max(1, round(alpha * len(words)))
    assert sum(bool(synonyms(w)) for w in words) > n  # enough candidates for the synonym op
    for seed in range(3):
        rng = lambda: np.random.default_rng(seed)  # noqa: E731
        syn, _ = eda_words(TEXT, "synonym", alpha, rng(), "en")
        assert len(syn) == len(words) and sum(a != b for a, b in zip(words, syn)) == n
        assert all(b == a or b.lower() in synonyms(a) for a, b in zip(words, syn))
        ins, _ = eda_words(TEXT, "insert", alpha, rng(), "en")
        assert len(ins) == len(words) + n
        dele, _ = eda_words(TEXT, "delete", alpha, rng(), "en")
        assert len(dele) == len(words) - n and all(w in words for w in dele)
        sw, _ = eda_words(TEXT, "swap", alpha, rng(), "en")
        assert Counter(sw) == Counter(words) and 0 < sum(a != b for a, b in zip(words, sw)) <= 2 * n
    assert eda(TEXT, "delete", alpha, np.random.default_rng(0), "en") == " ".join(
        eda_words(TEXT, "delete", alpha, np.random.default_rng(0), "en")[0])


def test_reproducible_by_seed_id_copy_epoch():
    ops = ["synonym", "insert", "swap", "delete"]
    a = eda_copy(TEXT, "bbc/1", 1, 0, ops, 0.2, seed=0)
    assert a == eda_copy(TEXT, "bbc/1", 1, 0, ops, 0.2, seed=0)
    others = {eda_copy(TEXT, "bbc/1", 1, e, ops, 0.2, seed=0) for e in range(1, 6)}
    others |= {eda_copy(TEXT, "bbc/1", c, 0, ops, 0.2, seed=0) for c in range(2, 6)}
    assert a != TEXT and len(others - {a}) >= 5


def test_chinese_is_segmented_with_jieba():
    zh = "今天股市大涨，投资者对经济前景充满信心。"
    words, joiner = split_words(zh)
    assert joiner == "" and len(words) >= 6 and "".join(words) == zh
    out = eda(zh, "swap", 0.3, np.random.default_rng(0))
    assert out != zh and sorted(out) == sorted(zh)  # the same characters, reordered by word
    dele = eda(zh, "delete", 0.3, np.random.default_rng(0))
    assert len(dele) < len(zh)
    syn = eda(zh, "synonym", 0.3, np.random.default_rng(0))  # no Chinese synonyms: inserts existing words
    assert len(syn) > len(zh) and set(syn) <= set(zh)


@pytest.fixture(scope="module")
def aug_task(tmp_path_factory, tokenizer_dir):
    from accelerate import Accelerator

    from llm_dist.config import load_config
    from llm_dist.tasks.classify.task import ClassifyTask

    d = write_bbc_subset(tmp_path_factory.mktemp("augdata"))
    cfg = load_config("configs/classify/tiny.yaml", [
        f"--data.train={d}/train.jsonl", f"--data.validation={d}/validation.jsonl", f"--data.test={d}/test.jsonl",
        f"--output_dir={tmp_path_factory.mktemp('augrun')}", f"--tokenizer.path={tokenizer_dir}", "--batch_size=8",
        "--classify.augment.method=eda", "--classify.augment.copies=2", "--classify.augment.alpha=0.2",
        "--classify.augment.classes=[sports, tech]"])
    return ClassifyTask(cfg, Accelerator())


def test_training_split_gains_targeted_copies(aug_task):
    t = aug_task
    tr = t.data["train"]
    n = t.augmentation.n_orig
    orig = dict(zip(tr["ids"][:n], tr["labels"][:n]))
    aug = list(zip(tr["ids"][n:], tr["labels"][n:]))
    targeted = [i for i, lab in orig.items() if t.names[lab] in ("sports", "tech")]
    assert len(aug) == 2 * len(targeted) > 0
    assert {i for i, _ in aug} == {f"{i}#aug{j}" for i in targeted for j in (1, 2)}
    for aid, lab in aug:  # labels kept
        assert orig[aid.split("#aug")[0]] == lab and t.names[lab] in ("sports", "tech")
    assert t.batches.steps_per_epoch == -(-len(tr["ids"]) // 8)


def test_augmented_text_is_made_per_epoch(aug_task):
    t = aug_task
    n = t.augmentation.n_orig
    slot = n  # copy 1 of the first targeted example
    src = t.augmentation.slots[0][0]
    coll = t.collate["train"]
    t.augmentation.epoch = 0
    e0 = coll([src, slot])
    again = coll([slot, src])
    t.augmentation.epoch = 1
    e1 = coll([src, slot])
    assert not torch.equal(e0["input_ids"][0], e0["input_ids"][1])  # the copy differs from its original
    assert torch.equal(e0["input_ids"][1], again["input_ids"][0])  # same (id, copy, epoch): same text
    assert not torch.equal(e0["input_ids"][1], e1["input_ids"][1])  # a new epoch: a new copy
    assert e0["labels"].tolist() == [t.data["train"]["labels"][src]] * 2
    assert t.example_ids(e0) == [t.data["train"]["ids"][src], t.data["train"]["ids"][src] + "#aug1"]


def test_mlm_contextual_batched_and_reproducible(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from llm_dist.data.augment.mlm_contextual import MLMAugmenter

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(tmp_path / "mlm")
    tok.save_pretrained(tmp_path / "mlm")
    aug = MLMAugmenter(str(tmp_path / "mlm"), "cpu", top_k=5, alpha=0.25, seed=3)
    items = [(TEXT, "a", 1, 0), ("the match ended in a draw after extra time", "b", 1, 0), (TEXT, "a", 2, 0)]
    batched = aug(items)
    single = [aug([it])[0] for it in items]
    assert batched == single  # a copy does not depend on the rest of the batch
    for (text, *_), out in zip(items, batched):
        w, o = text.split(), out.split()
        assert len(o) == len(w) and sum(a != b for a, b in zip(w, o)) == max(1, round(0.25 * len(w)))
    assert batched[0] != batched[2]  # another copy, other words


def test_mlm_augmentation_in_the_training_split(tmp_path, tokenizer_dir):
    """`classify.augment.method: mlm`: copies made by the MLM at collate time, minority classes only."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from llm_dist.config import load_config
    from llm_dist.tasks.classify.task import ClassifyTask

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(tmp_path / "mlm")
    tok.save_pretrained(tmp_path / "mlm")
    d = write_bbc_subset(tmp_path / "data", words=20)
    cfg = load_config("configs/classify/tiny.yaml", [
        f"--data.train={d}/train.jsonl", f"--data.validation={d}/validation.jsonl", f"--data.test={d}/test.jsonl",
        f"--output_dir={tmp_path / 'run'}", f"--tokenizer.path={tokenizer_dir}", "--batch_size=8",
        "--classify.augment.method=mlm", f"--classify.augment.mlm_path={tmp_path / 'mlm'}",
        "--classify.augment.minority=true", "--classify.augment.alpha=0.2"])
    t = ClassifyTask(cfg, Accelerator())
    aug = t.augmentation
    counts = Counter(t.data["train"]["labels"][:aug.n_orig])
    mean = sum(counts.values()) / len(counts)
    assert aug.target_classes == sorted(t.names[k] for k, c in counts.items() if c < mean) and aug.slots
    src, slot = aug.slots[0][0], aug.n_orig
    a = t.collate["train"]([src, slot])
    b = t.collate["train"]([slot])
    assert not torch.equal(a["input_ids"][0], a["input_ids"][1]) and torch.equal(a["input_ids"][1], b["input_ids"][0])
    orig = t.tokenizer.decode(a["input_ids"][0], skip_special_tokens=True).split()
    new = t.tokenizer.decode(a["input_ids"][1], skip_special_tokens=True).split()
    assert len(orig) == len(new) and 1 <= sum(x != y for x, y in zip(orig, new)) <= round(0.2 * 20) + 1


@pytest.mark.slow
def test_mlm_augmentation_on_two_ranks(tmp_path, tokenizer_dir):
    """`classify.augment.method: mlm` under DDP (2 ranks): each rank's copies come from the MLM at collate time,
    the augmented slots (`ID#aug1`) are trained and traced in the ledger, the replicas stay in sync."""
    import json

    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from conftest import launch, read_run
    from llm_dist.analysis.dynamics.ledger import read_ledger

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(tmp_path / "mlm")
    tok.save_pretrained(tmp_path / "mlm")
    d, out = write_bbc_subset(tmp_path / "data", words=20), tmp_path / "run"
    launch("configs/classify/tiny.yaml", f"--output_dir={out}", f"--data.train={d}/train.jsonl",
           f"--data.validation={d}/validation.jsonl", f"--data.test={d}/test.jsonl", "--data.id_column=id",
           f"--tokenizer.path={tokenizer_dir}", "--batch_size=8", "--max_steps=6", "--eval_every=0", "--log_every=3",
           "--tracking.progress=false", "--classify.augment.method=mlm", f"--classify.augment.mlm_path={tmp_path / 'mlm'}",
           "--classify.augment.alpha=0.2", "--dynamics.enabled=true", "--dynamics.analyze=false")
    run = read_run(out)
    assert run["world_size"] == 2 and run["final_step"] == 6 and len(set(run["param_checksums"])) == 1
    led = read_ledger(out)
    led = led if hasattr(led, "columns") else led.to_pandas()
    aug = led[led["id"].str.contains("#aug")]
    assert len(aug) > 0 and aug["id"].str.endswith("#aug1").all()
    originals = {json.loads(line)["id"] for line in (d / "train.jsonl").read_text().splitlines()}
    assert {i.split("#aug")[0] for i in aug["id"]} <= originals
