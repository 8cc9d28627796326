"""Text classification fine-tuning: the task the loop sees — splits, tokenization, global batches, the
loss (imbalance switches in `losses.py`), exact distributed evaluation (`gather_for_metrics`), reports and
predictions (`metrics.py`). The model and PEFT wrapping live in `model.py`; the best model and early
stopping are the loop's `BestModel` callback, driven by `metric_for_best()` here."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...config import RunConfig, write_text_atomic
from ...data.classify import (Collate, GlobalBatches, eval_order, label_maps, load_splits, planted_noise, steps_for,
                              tokenize_split, write_splits)
from ...data.interventions import record_of
from ...data.noise import write_noise
from ...data.sources import DataError
from ...models.build import flops_per_token, get_tokenizer
from ...training.signals import poll
from ..base import FinalReport, LossOutput, Task, register
from .losses import class_weights, per_example_loss
from .metrics import compute_metrics, plot_confusion, report_text
from .model import build_classifier, save_classifier


def step_keys(batches: GlobalBatches) -> list[tuple]:
    """This rank's micro-batch keys (indices, epoch, position of the first example in the epoch's global
    order) for the next optimizer step; advances `batches`."""
    epoch, start = batches.epoch, batches.consumed
    return [(ix, epoch, start + (i * batches.world + batches.rank) * batches.micro)
            for i, ix in enumerate(batches.step_indices())]


class _Plan:
    """The DataLoader's sampler: the keys of every coming micro-batch, from a copy of the position (the
    DataLoader runs ahead of training by its prefetch; the task's own position moves on consumption)."""

    def __init__(self, batches: GlobalBatches):
        self.batches = copy.copy(batches)

    def __iter__(self):
        while True:
            yield from step_keys(self.batches)


class _KeyedBatches(torch.utils.data.Dataset):
    """Map-style view for the DataLoader (`batch_size=None`): a key in, its collated micro-batch out."""

    def __init__(self, task):
        self.task = task

    def __getitem__(self, key) -> dict:
        batch = self.task.make_batch(key)
        batch["plan_key"] = (key[1], key[2])
        return batch


@register("classify")
class ClassifyTask(Task):
    def __init__(self, cfg: RunConfig, accelerator, checked=None):
        """`checked`: the start-up checks' result (training/preflight.py) with the validated splits."""
        splits = checked.splits if checked is not None else None
        self.cfg, self.acc = cfg, accelerator
        out = Path(cfg.output_dir)
        d, c = cfg.data, cfg.classify
        world = accelerator.num_processes
        if splits is None:
            splits = load_splits(cfg, pinned=out / "splits", min_train=cfg.batch_size * cfg.grad_accum * world,
                                 for_training=True)
        self.splits = splits
        if accelerator.is_main_process:
            write_splits(self.splits, out / "splits")
            if d.label_noise.rate > 0:
                write_noise(out / "noise.json", d.label_noise, planted_noise(self.splits["train"]) or [],
                            len(self.splits["train"]))
            record = record_of(self.splits["train"])
            if record:  # what the data interventions did (data/interventions.py)
                write_text_atomic(out / "interventions.json", json.dumps(record, indent=1))
        accelerator.wait_for_everyone()
        self.label2id, self.id2label = label_maps(self.splits["train"])
        self.names = [self.id2label[i] for i in range(len(self.id2label))]
        train_texts = list(self.splits["train"]["text"])
        self.tokenizer = get_tokenizer(cfg, accelerator, lambda n: iter(train_texts[:n] if n else train_texts))
        self.data = {s: self.tokenize_split(ds) for s, ds in self.splits.items()}
        self.augmentation = None
        if c.augment.method:  # classify.augment: augmented slots appended to the training split (robust.py)
            from .robust import TrainAugmentation

            self.augmentation = TrainAugmentation(cfg, self.splits["train"], self.data["train"], self.tokenizer,
                                                  self.names, accelerator.device)
        train = self.data["train"]
        counts = np.bincount(train["labels"], minlength=len(self.names))
        self.prior = counts / counts.sum()
        self.log_prior = torch.tensor(np.log(np.maximum(self.prior, 1e-12)), dtype=torch.float32)
        self.weights = class_weights(counts, c.class_weights, c.effective_beta)
        self.batches = GlobalBatches(train["lengths"], train["labels"], cfg.batch_size * cfg.grad_accum * world,
                                     cfg.batch_size, accelerator.process_index, world, cfg.seed,
                                     d.group_by_length and not d.pad_to_max_length, c.resample, d.drop_last)
        self.model = self.build_model()
        self.collate = {s: self.make_collate(self.data[s]) for s in self.data}
        if self.augmentation is not None:
            self.collate["train"] = self.augmentation.collate(self.collate["train"])
        self._pending: list = []
        self._loader_iter = None  # data.num_workers > 0: the training DataLoader's iterator
        self._eval_loaders = {}
        self.leaked = self._leaked_ids()
        self.steps_per_epoch = self.batches.steps_per_epoch

    # --- what a subclass (tasks/prompt.py) may change ----------------------------------------------
    def tokenize_split(self, ds) -> dict:
        d = self.cfg.data
        return tokenize_split(ds, self.tokenizer, self.label2id, d.max_length, d.truncation, d.head_fraction)

    def make_collate(self, data: dict):
        d = self.cfg.data
        return Collate(data, self.tokenizer.pad_token_id, d.max_length if d.pad_to_max_length else None)

    def build_model(self):
        return build_classifier(self.cfg, self.tokenizer, self.id2label, self.total_steps)

    # --- the loop's view --------------------------------------------------------------------------
    def total_steps(self) -> int:
        if self.cfg.max_steps > 0:
            return self.cfg.max_steps
        return steps_for(self.cfg.classify.epochs, self.batches.steps_per_epoch)

    def next_batch(self) -> dict:
        """The next micro-batch, stamped with its epoch and each example's position in the epoch's global
        order (`pos`; the same on any world size: the training-dynamics ledger keys on it). With
        `data.num_workers > 0` DataLoader workers build the batches ahead (`_prefetched`); the position
        (`self.batches`) still advances here, per consumed micro-batch, so a checkpoint never counts a
        prefetched batch."""
        if not self._pending:
            if self.cfg.data.num_workers > 0 and self._loader_iter is None:
                self._loader_iter = iter(self._train_loader())  # its plan starts at the current position
            self._pending = step_keys(self.batches)
        key = self._pending.pop(0)
        if self._loader_iter is not None:
            return self._prefetched(key)
        return self.make_batch(key)

    def make_batch(self, key) -> dict:
        """The micro-batch of `key` = (indices, epoch, position of its first example); in DataLoader
        workers too (the augmentation's epoch is set in the process that collates)."""
        ix, epoch, first = key
        if self.augmentation is not None:
            self.augmentation.epoch = epoch  # augmented copies are drawn afresh each epoch
        batch = self.collate["train"](ix)
        batch["epoch"] = torch.full_like(batch["idx"], epoch)
        batch["pos"] = torch.arange(first, first + len(batch["idx"]))
        return batch

    def _train_loader(self):
        """A torch DataLoader whose workers collate the micro-batches of a look-ahead copy of the global
        order (`_Plan`), pinned for non-blocking copies on CUDA."""
        pin = torch.cuda.is_available() and self.acc.device.type == "cuda"
        # its own generator: the workers' base seed is not drawn from the global RNG (dropout stays as without workers)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        return torch.utils.data.DataLoader(_KeyedBatches(self), batch_size=None, sampler=_Plan(self.batches),
                                           num_workers=self.cfg.data.num_workers, pin_memory=pin, generator=gen)

    def _prefetched(self, key) -> dict:
        batch = next(self._loader_iter)
        got = batch.pop("plan_key")
        if tuple(got) != (key[1], key[2]):  # the look-ahead plan and the position went apart: never train on it
            raise RuntimeError(f"classify data loader out of step: expected (epoch, position) {key[1:]}, got {got}")
        return batch

    def _reset_loader(self) -> None:
        self._pending, self._loader_iter = [], None  # workers of a stale look-ahead end with their iterator

    def data_state(self) -> dict:
        return {"batches": self.batches.state_dict()}

    def load_data_state(self, state: dict) -> None:
        self.batches.load_state_dict(state["batches"])
        self._reset_loader()

    def resume_state(self) -> dict:
        return {"batches": self.batches.state_dict()}

    def load_resume_state(self, saved: dict) -> None:  # a world-size change keeps the global position
        if "batches" in saved:
            self.batches.load_state_dict(saved["batches"])
            self._reset_loader()

    def count(self, batch: dict) -> int:
        return int(batch["weight"].sum())  # padding examples (weight 0) at the end of an epoch do not count

    def example_ids(self, batch: dict) -> list[str]:
        """The stable ids of a training batch's examples (for reports: a non-finite step names them)."""
        ids = self.data["train"]["ids"]
        return [ids[i] for i, w in zip(batch["idx"].tolist(), batch["weight"].tolist()) if w > 0]

    def tokens(self, batch: dict) -> int:
        return int((batch["attention_mask"].sum(1) * batch["weight"]).sum())

    def _forward(self, model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"]).logits

    def logits(self, model, batch: dict):
        return self._forward(model, batch), batch["weight"]

    def loss(self, model, batch: dict) -> LossOutput:
        return self.loss_from_logits(self._forward(model, batch), batch)

    def loss_from_logits(self, logits, batch: dict) -> LossOutput:
        c = self.cfg.classify
        losses = per_example_loss(logits, batch["labels"], self.weights, c.focal_gamma, self.log_prior,
                                  c.logit_adjustment) * batch["weight"]
        correct = ((logits.argmax(-1) == batch["labels"]).float() * batch["weight"]).sum()
        return LossOutput(losses.sum(), losses.detach(), logits.detach(), {"correct": correct.detach().float()})

    def after_optimizer_step(self, model, step: int) -> None:
        """AdaLoRA re-allocates ranks from the gradients of this step (before they are zeroed)."""
        if self.cfg.classify.peft.method == "adalora":
            model.base_model.update_and_allocate(step)

    def flops_per_token(self) -> float:
        """Per real (unpadded) token; attention over `data.max_length` positions (an upper bound)."""
        cfg = self.model.config
        return flops_per_token(cfg, self.cfg.data.max_length, head_params=cfg.hidden_size * (cfg.hidden_size + len(self.names)))

    def step_flops(self, batch: dict) -> float:
        """Training FLOPs of a batch from its real lengths: the dense part per real token, plus attention
        scores and values over each example's own length L_i (not `data.max_length`): 12·layers·hidden·Σ L_i²."""
        if type(self).flops_per_token is not ClassifyTask.flops_per_token:  # a subclass's own head (prompt)
            return super().step_flops(batch)
        cfg = self.model.config
        lengths = (batch["attention_mask"].sum(1) * (batch["weight"] > 0)).double()
        dense = flops_per_token(cfg, 0, head_params=cfg.hidden_size * (cfg.hidden_size + len(self.names)))
        return float(dense * lengths.sum() + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * (lengths ** 2).sum())

    def log_row(self, sums: dict, count: float) -> dict:
        row = {"train_accuracy": sums.get("correct", 0.0) / max(count, 1.0)}
        if "adv_rows" in sums:  # an adversarial step strategy (training/steps.py)
            row["adv_norm"] = sums["adv_norm"] / max(sums["adv_rows"], 1.0)  # mean per-example ‖δ‖
            row["adv_loss"] = sums["adv_loss"] / max(count, 1.0)  # the perturbed pass's loss (SMART: the KL)
        return row

    # --- evaluation -------------------------------------------------------------------------------
    def _leaked_ids(self) -> set | None:
        if not self.cfg.data.audit:
            return None
        from ...analysis.audit import leaked_ids

        path = Path(self.cfg.data.audit)
        if not path.exists():
            raise DataError(f"config key 'data.audit': {path} not found (run `llm-dist audit` first)")
        test = self.splits.get("test")  # the audit must have seen this run's test split (ids checked)
        return leaked_ids(str(path), split="test", expected_ids=None if test is None else test["id"])

    def _loader(self, split: str):
        if split not in self._eval_loaders:
            order = eval_order(self.data[split]["lengths"])
            dl = torch.utils.data.DataLoader(order, batch_size=self.cfg.batch_size, shuffle=False,
                                             collate_fn=self.collate[split])
            self._eval_loaders[split] = self.acc.prepare(dl)  # sharded over ranks; gather_for_metrics de-duplicates
        return self._eval_loaders[split]

    @torch.no_grad()
    def predict(self, model, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indices, gold, logits) for every example of `split`, exactly once, on every rank."""
        model.eval()
        idx, gold, logits = [], [], []
        for batch in self._loader(split):
            poll(self.acc)  # a preemption signal ends the evaluation on every rank at this batch
            with self.acc.autocast():
                out = self._forward(model, batch).float()
            i, g, l = self.acc.gather_for_metrics((batch["idx"], batch["labels"], out))
            idx.append(i.cpu())
            gold.append(g.cpu())
            logits.append(l.cpu())
        model.train()
        idx, gold, logits = torch.cat(idx).numpy(), torch.cat(gold).numpy(), torch.cat(logits).numpy()
        order = np.argsort(idx, kind="stable")
        return idx[order], gold[order], logits[order]

    def _adjusted(self, logits: np.ndarray) -> np.ndarray:
        tau = self.cfg.classify.posthoc_logit_adjustment
        return logits - tau * self.log_prior.numpy() if tau else logits

    def split_metrics(self, model, split: str) -> tuple[dict, tuple]:
        idx, gold, logits = self.predict(model, split)
        pred = self._adjusted(logits).argmax(-1)
        loss = F.cross_entropy(torch.tensor(logits), torch.tensor(gold)).item() if len(gold) else 0.0
        m = compute_metrics(gold, pred, self.names)
        m["loss"] = loss
        if split == "test" and self.leaked is not None:
            ids = self.data[split]["ids"]
            clean = np.array([ids[i] not in self.leaked for i in idx], dtype=bool)
            m["clean"] = compute_metrics(gold[clean], pred[clean], self.names)
            m["leaked_examples"] = int((~clean).sum())
        copied = record_of(self.splits["train"]).get("contamination", {})
        if copied.get("split") == split and copied.get("ids"):  # data.contamination: the copied vs the rest
            ids, leak = self.data[split]["ids"], set(copied["ids"])
            hit = np.array([ids[i] in leak for i in idx], dtype=bool)
            m["contaminated"] = compute_metrics(gold[hit], pred[hit], self.names)
            m["uncontaminated"] = compute_metrics(gold[~hit], pred[~hit], self.names)
        return m, (idx, gold, logits, pred)

    def evaluate(self, model, step: int) -> dict:
        split = "validation" if "validation" in self.data else "test"
        m, _ = self.split_metrics(model, split)
        row = {f"eval_{k}": m[k] for k in ("loss", "accuracy", "macro_f1", "balanced_accuracy")}
        row["eval_split"] = split
        row["epoch"] = step / self.steps_per_epoch
        if self.cfg.classify.report_every_epoch and self.acc.is_main_process:
            gold_pred = report_text(m, self.names)
            print(f"epoch {row['epoch']:.2f} ({split}):\n{gold_pred}", flush=True)
        return row

    def metric_for_best(self) -> tuple[str, bool]:
        key = f"eval_{self.cfg.classify.metric_for_best}"
        return key, "loss" not in key

    def early_stopping_patience(self) -> int:
        return self.cfg.classify.early_stopping_patience

    # --- export and final report ------------------------------------------------------------------
    def save_final(self, model, state_dict: dict | None, out: Path) -> None:
        save_classifier(self.cfg, model, state_dict, out, self.tokenizer)

    def final_report(self, model, out: Path) -> FinalReport | None:
        """Test metrics (all / clean subset), predictions.jsonl, report text and confusion-matrix plot."""
        if "test" not in self.data:
            return None
        m, (idx, gold, logits, pred) = self.split_metrics(model, "test")
        result = {"test": {k: m[k] for k in ("accuracy", "macro_f1", "balanced_accuracy", "loss", "examples")},
                  "data": {"train_examples": len(self.data["train"]["ids"]),
                           "train_tokens": int(sum(self.data["train"]["lengths"])),
                           "interventions": record_of(self.splits["train"])}}
        if "clean" in m:
            result["test_clean"] = {k: m["clean"][k] for k in ("accuracy", "macro_f1", "balanced_accuracy", "examples")}
            result["test"]["leaked_examples"] = m["leaked_examples"]
        for part in ("contaminated", "uncontaminated"):
            if part in m:
                result[f"test_{part}"] = {k: m[part][k] for k in ("accuracy", "macro_f1", "examples")}
        if self.acc.is_main_process:
            probs = torch.softmax(torch.tensor(self._adjusted(logits)), -1).numpy()
            ids = self.data["test"]["ids"]
            write_text_atomic(out / "predictions.jsonl", "".join(
                json.dumps({"id": ids[i], "gold": self.names[gold[k]], "predicted": self.names[pred[k]],
                            "probabilities": {n: round(float(p), 6) for n, p in zip(self.names, probs[k])}}) + "\n"
                for k, i in enumerate(idx)))
            text = report_text(m, self.names)
            if "clean" in m:
                text += (f"\n\nclean subset (no train overlap, {m['clean']['examples']} of {m['examples']}):\n"
                         + report_text(m["clean"], self.names))
            write_text_atomic(out / "test_report.txt", text + "\n")
            write_text_atomic(out / "test_metrics.json", json.dumps(m, indent=1))
            plot_confusion(m["confusion_matrix"], self.names, out / "confusion_matrix.png", "test confusion matrix")
            print(f"test report ({out}):\n{text}", flush=True)
        if self.cfg.classify.robustness.enabled:
            from .robust import robustness_report

            rob = robustness_report(self, model, out, m["accuracy"])
            result["robustness"] = rob
        row = {f"test_{k}": v for k, v in result["test"].items()}
        if "robustness" in result:
            row.update({f"robust_words_{k}": v for k, v in result["robustness"]["word_level"].items()})
            row.update({f"robust_emb_{k}": v for k, v in result["robustness"]["embedding"].items()})
        if "test_clean" in result:
            row.update({f"test_clean_{k}": v for k, v in result["test_clean"].items()})
        return FinalReport(result, row)
