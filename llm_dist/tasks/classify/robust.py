"""Issue 15 hooks of the classification task: on-the-fly training-set augmentation (`TrainAugmentation`)
and the robustness evaluation (`robustness_report`): test accuracy under word-level perturbation (EDA ops at
a rate) and under an embedding-space PGD attack at ε, next to clean accuracy."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...config import write_text_atomic
from ...data.augment import aug_id
from ...data.augment.eda import eda_copy
from ...data.classify import Collate
from ...data.sources import DataError
from ...training.signals import poll
from ...training.steps import EmbeddingDelta, normalize, project


class _Overlay:
    """A list view with some items replaced (the augmented token ids of this batch)."""

    def __init__(self, base, over: dict):
        self.base, self.over = base, over

    def __getitem__(self, i):
        return self.over[i] if i in self.over else self.base[i]


class TrainAugmentation:
    """`classify.augment`: the training split grows by `copies` slots per targeted example (all classes, the
    listed `classes`, or the `minority` ones); slot (i, j) is copy j of example i, id `ID#augj`, same label.
    Its text is made afresh when a batch holding it is collated: EDA, or contextual replacement with an MLM
    (batched over the batch's augmented slots, on the device), seeded per (id, copy, epoch). Originals stay."""

    def __init__(self, cfg, train_split, train: dict, tokenizer, names: list[str], device):
        a = cfg.classify.augment
        self.cfg, self.a, self.tok, self.max_length = cfg, a, tokenizer, cfg.data.max_length
        self.texts = list(train_split["text"])
        self.pairs = list(train_split["text_pair"]) if "text_pair" in train_split.column_names else None
        labels = np.asarray(train["labels"])
        counts = np.bincount(labels, minlength=len(names))
        if a.classes:
            unknown = [c for c in a.classes if c not in names]
            if unknown:
                raise DataError(f"config key 'classify.augment.classes': {unknown} not among the training labels "
                                f"({', '.join(names)})")
            target = {names.index(c) for c in a.classes}
        elif a.minority:
            target = {k for k in range(len(names)) if counts[k] < counts.mean()}
        else:
            target = set(range(len(names)))
        self.target_classes = sorted(names[k] for k in target)
        self.n_orig = len(labels)
        orig = [i for i in range(self.n_orig) if labels[i] in target]
        self.slots = [(i, j) for j in range(1, a.copies + 1) for i in orig]  # slot n_orig + s
        for key in ("input_ids", "token_type_ids", "labels", "lengths"):
            if train.get(key) is not None:
                train[key] = list(train[key]) + [train[key][i] for i, _ in self.slots]
        self.orig_ids = list(train["ids"])
        train["ids"] = list(train["ids"]) + [aug_id(train["ids"][i], j) for i, j in self.slots]
        self.ids = train["ids"]
        self.epoch = 0
        self.mlm = None
        if a.method == "mlm":
            from ...data.augment.mlm_contextual import MLMAugmenter

            self.mlm = MLMAugmenter(a.mlm_path, device, a.top_k, a.alpha, a.seed, a.language)

    def texts_for(self, slots: list[int], epoch: int) -> list[str]:
        """The augmented texts of training slots (indices ≥ the original count) in `epoch`; the seed is keyed
        by the ORIGINAL id, the copy and the epoch, so a copy is the same on any world size or rerun."""
        items = [(self.texts[i], self.orig_ids[i], j, epoch) for i, j in (self.slots[s - self.n_orig] for s in slots)]
        if self.mlm is not None:
            return self.mlm(items)
        a = self.a
        return [eda_copy(t, i, j, e, a.ops, a.alpha, a.seed, a.language) for t, i, j, e in items]

    def collate(self, base: Collate):
        aug = self

        class AugmentedCollate:
            def __call__(self, indices):
                indices = [int(i) for i in indices]
                slots = [i for i in indices if i >= aug.n_orig]
                if not slots:
                    return base(indices)
                texts = aug.texts_for(slots, aug.epoch)
                pairs = [aug.pairs[aug.slots[s - aug.n_orig][0]] for s in slots] if aug.pairs else None
                enc = aug.tok(texts, pairs, truncation=True, max_length=aug.max_length, return_token_type_ids=True)
                split = dict(base.split)
                split["input_ids"] = _Overlay(base.split["input_ids"], dict(zip(slots, enc["input_ids"])))
                if base.split.get("token_type_ids") is not None:
                    split["token_type_ids"] = _Overlay(base.split["token_type_ids"],
                                                       dict(zip(slots, enc["token_type_ids"])))
                return Collate(split, base.pad_id, base.pad_to)(indices)

        return AugmentedCollate()


# ----------------------------------------------------------------------------- robustness evaluation
def perturbed_split(task, split: str, rate: float) -> str:
    """Register `split` with every text perturbed by one EDA op (drawn from `robustness.ops`) changing a
    `rate` fraction of its words, seeded per id; returns the new split's key."""
    r = task.cfg.classify.robustness
    key = f"{split}@words{rate:g}"
    if key not in task.data:
        ds = task.splits[split]
        texts = [eda_copy(t, i, 0, 0, r.ops, rate, r.seed, task.cfg.classify.augment.language)
                 for t, i in zip(ds["text"], ds["id"])]
        new = ds.remove_columns("text").add_column("text", texts)
        task.data[key] = task.tokenize_split(new)
        task.collate[key] = task.make_collate(task.data[key])
    return key


def attacked_accuracy(task, model, split: str, eps: float, steps: int) -> float:
    """Accuracy when each test example's input embeddings get the PGD perturbation (L2 ball of radius ε
    per example, `steps` steps of 2.5·ε/steps) that raises its loss on the gold label most. The attack's
    forwards run on the unwrapped model (no gradient sync; parameter gradients untouched)."""
    module = task.acc.unwrap_model(model)
    module.eval()
    correct, total = [], []
    with EmbeddingDelta(module) as emb:
        for batch in task._loader(split):
            poll(task.acc)
            delta = None
            for _ in range(steps):
                emb.set(delta, True)
                emb.mask = None
                with task.acc.autocast():
                    logits, _ = task.logits(module, batch)
                    loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
                (g,) = torch.autograd.grad(loss, emb.delta)
                base = emb.delta.detach()
                delta = project(base + (2.5 * eps / steps) * normalize(g, emb.mask), eps)
            emb.set(delta, False)
            emb.mask = None
            with torch.no_grad(), task.acc.autocast():
                logits, _ = task.logits(module, batch)
            ok = (logits.argmax(-1) == batch["labels"]).float()
            ok, = task.acc.gather_for_metrics((ok,))
            correct.append(ok.sum().item())
            total.append(len(ok))
    module.train()
    return float(sum(correct) / max(sum(total), 1))


def robustness_report(task, model, out: Path, clean_accuracy: float) -> dict:
    """`classify.robustness`: {clean, words@rate…, embedding@eps…} accuracies on the test split."""
    r = task.cfg.classify.robustness
    rep = {"split": "test", "clean_accuracy": clean_accuracy, "word_level": {}, "embedding": {},
           "ops": list(r.ops), "attack_steps": r.attack_steps}
    for rate in r.word_rates:
        key = perturbed_split(task, "test", rate)
        _, gold, logits = task.predict(model, key)
        rep["word_level"][f"{rate:g}"] = float((task._adjusted(logits).argmax(-1) == gold).mean()) if len(gold) else 0.0
    for eps in r.epsilons:
        rep["embedding"][f"{eps:g}"] = attacked_accuracy(task, model, "test", eps, r.attack_steps)
    if task.acc.is_main_process:
        write_text_atomic(out / "robustness.json", json.dumps(rep, indent=1))
        lines = [f"clean accuracy {clean_accuracy:.4f}"]
        lines += [f"word-level rate {k}: {v:.4f}" for k, v in rep["word_level"].items()]
        lines += [f"embedding PGD eps {k}: {v:.4f}" for k, v in rep["embedding"].items()]
        print("robustness (test):\n  " + "\n  ".join(lines), flush=True)
    return rep
