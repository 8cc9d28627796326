"""Text classification fine-tuning: model from a local encoder dir or a preset, losses for class
imbalance (class weights, focal, logit adjustment), optional LoRA / AdaLoRA, exact distributed
evaluation (`gather_for_metrics`), best model by a metric, early stopping, reports and predictions."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, classification_report, confusion_matrix,
                             f1_score)
from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig

from ..config import RunConfig, write_text_atomic
from ..data.classify import (Collate, GlobalBatches, eval_order, label_maps, load_splits, steps_for, tokenize_split,
                             write_splits)
from ..data.sources import DataError
from ..models.build import (ModelError, apply_dropout, check_model_dir, check_vocab, get_tokenizer, preset_config)
from ..training.signals import poll


# ----------------------------------------------------------------------------- imbalance
def class_weights(counts: np.ndarray, kind: str | None, beta: float = 0.999) -> torch.Tensor | None:
    """Per-class loss weights, normalised to mean 1: 'inverse' (1 / n_c) or 'effective'
    ((1 - β) / (1 - β^n_c), Cui et al. 2019)."""
    if kind is None:
        return None
    counts = np.maximum(counts.astype(np.float64), 1.0)
    w = 1.0 / counts if kind == "inverse" else (1.0 - beta) / (1.0 - np.power(beta, counts))
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
                        focal_gamma: float = 0.0, log_prior: torch.Tensor | None = None,
                        logit_adjustment: float = 0.0) -> torch.Tensor:
    """Summed per-example loss. Logit adjustment adds τ·log π_y to the logits (Menon et al. 2021);
    focal loss scales CE by (1 - p_y)^γ (Lin et al. 2017); class weights scale each example by w_y."""
    logits = logits.float()
    if logit_adjustment and log_prior is not None:
        logits = logits + logit_adjustment * log_prior.to(logits.device)
    logp = F.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
    loss = -logp
    if focal_gamma > 0:
        loss = loss * (1.0 - logp.exp()).pow(focal_gamma)
    if weights is not None:
        loss = loss * weights.to(logits.device)[labels]
    return loss.sum()


# ----------------------------------------------------------------------------- metrics
def compute_metrics(gold: np.ndarray, pred: np.ndarray, names: list[str]) -> dict:
    labels = list(range(len(names)))
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, average="macro", labels=labels, zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(gold, pred)) if len(gold) else 0.0,
        "per_class": classification_report(gold, pred, labels=labels, target_names=names, output_dict=True,
                                           zero_division=0),
        "confusion_matrix": confusion_matrix(gold, pred, labels=labels).tolist(),
        "examples": int(len(gold)),
    }


def plot_confusion(cm: list[list[int]], names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.1 * len(names) + 1.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- the task
class ClassifyTask:
    name = "classify"

    def __init__(self, cfg: RunConfig, accelerator, splits: dict | None = None):
        """`splits`: the validated splits from the start-up checks (training/preflight.py); else loaded here."""
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
        accelerator.wait_for_everyone()
        self.label2id, self.id2label = label_maps(self.splits["train"])
        self.names = [self.id2label[i] for i in range(len(self.id2label))]
        train_texts = list(self.splits["train"]["text"])
        self.tokenizer = get_tokenizer(cfg, accelerator, lambda n: iter(train_texts[:n] if n else train_texts))
        self.model = self._build_model()
        self.data = {s: tokenize_split(ds, self.tokenizer, self.label2id, d.max_length) for s, ds in self.splits.items()}
        train = self.data["train"]
        counts = np.bincount(train["labels"], minlength=len(self.names))
        self.prior = counts / counts.sum()
        self.log_prior = torch.tensor(np.log(np.maximum(self.prior, 1e-12)), dtype=torch.float32)
        self.weights = class_weights(counts, c.class_weights, c.effective_beta)
        world = accelerator.num_processes
        self.batches = GlobalBatches(train["lengths"], train["labels"], cfg.batch_size * cfg.grad_accum * world,
                                     cfg.batch_size, accelerator.process_index, world, cfg.seed,
                                     d.group_by_length and not d.pad_to_max_length, c.resample)
        pad_to = d.max_length if d.pad_to_max_length else None
        self.collate = {s: Collate(self.data[s], self.tokenizer.pad_token_id, pad_to) for s in self.data}
        self._pending: list = []
        self._eval_loaders = {}
        self.leaked = self._leaked_ids()
        self.best_state = None
        self.evals_without_improvement = 0
        self.steps_per_epoch = self.batches.steps_per_epoch

    # --- model ------------------------------------------------------------------------------------
    def _build_model(self):
        cfg, m = self.cfg, self.cfg.model
        n = len(self.names)
        kw = {"num_labels": n, "id2label": self.id2label, "label2id": self.label2id}
        if m.path:
            check_model_dir(m.path)
            config = apply_dropout(AutoConfig.from_pretrained(m.path, **kw), m)
            check_vocab(config, self.tokenizer, m.path)
            try:
                model = AutoModelForSequenceClassification.from_pretrained(
                    m.path, config=config, attn_implementation=m.attn_implementation, ignore_mismatched_sizes=True)
            except (OSError, ValueError) as e:
                raise ModelError(f"{m.path}: cannot load the model ({str(e).splitlines()[0]})") from None
        else:
            config: BertConfig = preset_config(m.preset, self.tokenizer, m, max_position=max(512, cfg.data.max_length))
            for k, v in kw.items():
                setattr(config, k, v)
            model = AutoModelForSequenceClassification.from_config(config, attn_implementation=m.attn_implementation)
        if cfg.classify.peft.method:
            model = self._wrap_peft(model)
        return model

    def _wrap_peft(self, model):
        from peft import AdaLoraConfig, LoraConfig, TaskType, get_peft_model

        p = self.cfg.classify.peft
        common = {"task_type": TaskType.SEQ_CLS, "lora_alpha": p.alpha, "lora_dropout": p.dropout,
                  "target_modules": p.target_modules}
        if p.method == "lora":
            pc = LoraConfig(r=p.r, **common)
        else:
            total = self.total_steps()
            pc = AdaLoraConfig(init_r=p.init_r, target_r=p.target_r, total_step=total,
                               tinit=max(1, total // 10), tfinal=max(1, total // 5), deltaT=1, **common)
        return get_peft_model(model, pc)

    # --- the loop's view --------------------------------------------------------------------------
    def total_steps(self) -> int:
        if self.cfg.max_steps > 0:
            return self.cfg.max_steps
        return steps_for(self.cfg.classify.epochs, self.batches.steps_per_epoch)

    def next_batch(self) -> dict:
        if not self._pending:
            self._pending = self.batches.step_indices()
        return self.collate["train"](self._pending.pop(0))

    def data_state(self) -> dict:
        return {"batches": self.batches.state_dict()}

    def load_data_state(self, state: dict) -> None:
        self.batches.load_state_dict(state["batches"])
        self._pending = []

    def resume_state(self) -> dict:
        return {"batches": self.batches.state_dict(), "evals_without_improvement": self.evals_without_improvement}

    def load_resume_state(self, saved: dict) -> None:  # a world-size change keeps the global position
        if "batches" in saved:
            self.batches.load_state_dict(saved["batches"])
        self.evals_without_improvement = saved.get("evals_without_improvement", 0)

    @staticmethod
    def count(batch: dict) -> int:
        return int(batch["labels"].numel())

    def example_ids(self, batch: dict) -> list[str]:
        """The stable ids of a training batch's examples (for reports: a non-finite step names them)."""
        ids = self.data["train"]["ids"]
        return [ids[i] for i in batch["idx"].tolist()]

    @staticmethod
    def tokens(batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    def _forward(self, model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"]).logits

    def loss(self, model, batch: dict):
        c = self.cfg.classify
        logits = self._forward(model, batch)
        loss = classification_loss(logits, batch["labels"], self.weights, c.focal_gamma, self.log_prior,
                                   c.logit_adjustment)
        correct = (logits.argmax(-1) == batch["labels"]).sum()
        return loss, {"correct": correct.detach().float()}

    def after_optimizer_step(self, model, step: int) -> None:
        """AdaLoRA re-allocates ranks from the gradients of this step (before they are zeroed)."""
        if self.cfg.classify.peft.method == "adalora":
            model.base_model.update_and_allocate(step)

    def flops_per_token(self) -> float:
        cfg = self.model.config
        h, L = cfg.hidden_size, cfg.num_hidden_layers
        inter = getattr(cfg, "intermediate_size", 4 * h)
        return 6.0 * L * (4 * h * h + 2 * h * inter + 2 * self.cfg.data.max_length * h)

    @staticmethod
    def log_row(sums: dict, count: float) -> dict:
        return {"train_accuracy": sums.get("correct", 0.0) / max(count, 1.0)}

    # --- evaluation -------------------------------------------------------------------------------
    def _leaked_ids(self) -> set | None:
        if not self.cfg.data.audit:
            return None
        from ..analysis.audit import leaked_ids

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
        return m, (idx, gold, logits, pred)

    def evaluate(self, model, step: int) -> dict:
        split = "validation" if "validation" in self.data else "test"
        m, _ = self.split_metrics(model, split)
        row = {f"eval_{k}": m[k] for k in ("loss", "accuracy", "macro_f1", "balanced_accuracy")}
        row["eval_split"] = split
        row["epoch"] = step / self.steps_per_epoch
        if self.cfg.classify.report_every_epoch and self.acc.is_main_process:
            gold_pred = self._report_text(m)
            print(f"epoch {row['epoch']:.2f} ({split}):\n{gold_pred}", flush=True)
        return row

    def _report_text(self, m: dict) -> str:
        pc = m["per_class"]
        lines = [f"{'':>16} precision    recall  f1-score   support"]
        for n in self.names:
            r = pc[n]
            lines.append(f"{n:>16} {r['precision']:9.3f} {r['recall']:9.3f} {r['f1-score']:9.3f} {int(r['support']):9d}")
        lines.append(f"{'accuracy':>16} {'':9} {'':9} {m['accuracy']:9.3f} {m['examples']:9d}")
        lines.append(f"{'macro avg':>16} {pc['macro avg']['precision']:9.3f} {pc['macro avg']['recall']:9.3f} "
                     f"{m['macro_f1']:9.3f} {m['examples']:9d}")
        return "\n".join(lines)

    def track_best(self, model, metrics: dict, best, state: dict):
        """Keep the best weights by `classify.metric_for_best` (validation); early stopping by patience."""
        key = f"eval_{self.cfg.classify.metric_for_best}"
        if key not in metrics:
            raise DataError(f"config key 'classify.metric_for_best': no eval metric '{self.cfg.classify.metric_for_best}'")
        value = metrics[key]
        higher = "loss" not in key
        improved = best is None or (value > best["value"] if higher else value < best["value"])
        if improved:
            best = {"value": value, "step": state["step"], "metric": key}
            self.evals_without_improvement = 0
            if self.acc.distributed_type.value != "DEEPSPEED":  # (under ZeRO the last model is exported)
                sd = self.acc.get_state_dict(model)  # every rank keeps it, to test the best model in step
                self.best_state = {k: v.detach().cpu().clone() for k, v in sd.items()}
        else:
            self.evals_without_improvement += 1
        patience = self.cfg.classify.early_stopping_patience
        return best, bool(patience and self.evals_without_improvement >= patience)

    # --- export and final report ------------------------------------------------------------------
    def save_final(self, model, state_dict: dict | None, out: Path) -> None:
        """`final/`: a plain `save_pretrained` classifier (LoRA merged in); `adapter/` beside it for PEFT."""
        if self.cfg.classify.peft.method:
            if state_dict is not None:
                model.load_state_dict(state_dict)
            adapter = out.parent / "adapter"
            shutil.rmtree(adapter, ignore_errors=True)
            model.save_pretrained(str(adapter))
            merged = model.merge_and_unload() if self.cfg.classify.peft.method == "lora" else _merge_adalora(model)
            merged.save_pretrained(str(out), safe_serialization=True)
        else:
            model.save_pretrained(str(out), state_dict=state_dict, safe_serialization=True)
        self.tokenizer.save_pretrained(str(out))

    def final_report(self, model, out: Path) -> dict:
        """Test metrics (all / clean subset), predictions.jsonl, report text and confusion-matrix plot."""
        if "test" not in self.data:
            return {}
        m, (idx, gold, logits, pred) = self.split_metrics(model, "test")
        result = {"test": {k: m[k] for k in ("accuracy", "macro_f1", "balanced_accuracy", "loss", "examples")}}
        if "clean" in m:
            result["test_clean"] = {k: m["clean"][k] for k in ("accuracy", "macro_f1", "balanced_accuracy", "examples")}
            result["test"]["leaked_examples"] = m["leaked_examples"]
        if self.acc.is_main_process:
            probs = torch.softmax(torch.tensor(self._adjusted(logits)), -1).numpy()
            ids = self.data["test"]["ids"]
            write_text_atomic(out / "predictions.jsonl", "".join(
                json.dumps({"id": ids[i], "gold": self.names[gold[k]], "predicted": self.names[pred[k]],
                            "probabilities": {n: round(float(p), 6) for n, p in zip(self.names, probs[k])}}) + "\n"
                for k, i in enumerate(idx)))
            text = self._report_text(m)
            if "clean" in m:
                text += (f"\n\nclean subset (no train overlap, {m['clean']['examples']} of {m['examples']}):\n"
                         + self._report_text(m["clean"]))
            write_text_atomic(out / "test_report.txt", text + "\n")
            write_text_atomic(out / "test_metrics.json", json.dumps(m, indent=1))
            plot_confusion(m["confusion_matrix"], self.names, out / "confusion_matrix.png", "test confusion matrix")
            print(f"test report ({out}):\n{text}", flush=True)
        row = {f"test_{k}": v for k, v in result["test"].items()}
        if "test_clean" in result:
            row.update({f"test_clean_{k}": v for k, v in result["test_clean"].items()})
        result["_log_row"] = row
        return result


def _merge_adalora(model):
    return model.merge_and_unload()
