"""Callbacks: what the loop tells the rest of the run, and how features join it without living in it.

The loop calls, in order: `on_train_start` once (after resume), `on_step_end` after every optimizer step
with the step's micro-batches and their per-example outputs (`StepOutput`), `on_log` with each metrics
row before it is written (a callback may add keys), `on_evaluate` with each evaluation's metrics (a
callback may ask the run to stop: `ctx.should_stop = True`), `on_save` as a checkpoint is written,
`before_export` just before `final/` is written, and `on_train_end` with run.json's dict. A callback's
`state_dict()` (JSON-able) goes into every checkpoint's trainer_state.json under its `name` and comes back
through `load_state_dict` on resume.

    class PrintLoss(Callback):
        name = "print_loss"
        def on_log(self, ctx, row):
            if "loss" in row and ctx.is_main:
                print(row["step"], row["loss"])

Trackers (W&B / TensorBoard, `tracking/trackers.py`), throughput (`tracking/meters.py`) and best-model /
early stopping (below) are callbacks; the per-example ledger of the training-dynamics analysis is one too.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class StepOutput:
    """One optimizer step: this rank's micro-batches and the task's `LossOutput` for each (same order)."""

    step: int
    batches: list
    outputs: list
    grad_norm: float | torch.Tensor | None = None
    skipped: bool = False  # the optimizer step was dropped (on_nonfinite: skip)
    tokens: float = 0  # tokens of the step over all ranks
    samples: int = 0  # sequences / examples of the step over all ranks
    seconds: float = 0.0  # the step's own time (data, forward/backward, optimizer): the throughput window
    flops: float = 0.0  # the step's training FLOPs over all ranks (Task.step_flops)


@dataclass
class Context:
    """What callbacks may read (and `should_stop` they may set)."""

    cfg: object
    acc: object
    task: object
    model: object
    out: Path
    state: dict
    should_stop: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    @property
    def step(self) -> int:
        return self.state["step"]


class Callback:
    name = "callback"

    def on_train_start(self, ctx: Context) -> None: ...

    def on_step_end(self, ctx: Context, out: StepOutput) -> None: ...

    def on_log(self, ctx: Context, row: dict) -> None: ...

    def on_evaluate(self, ctx: Context, metrics: dict) -> None: ...

    def on_save(self, ctx: Context, step: int) -> None: ...

    def before_export(self, ctx: Context, result: dict) -> None: ...

    def on_train_end(self, ctx: Context, result: dict) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


class Callbacks:
    """Calls every callback's hook in order; collects and restores their states by name."""

    def __init__(self, callbacks: list[Callback]):
        names = [c.name for c in callbacks]
        if len(set(names)) != len(names):
            raise ValueError(f"callback names must be unique: {names}")
        self.items = list(callbacks)

    def __getattr__(self, hook: str):
        if not hook.startswith(("on_", "before_")):
            raise AttributeError(hook)

        def call(*args, **kwargs):
            for c in self.items:
                getattr(c, hook)(*args, **kwargs)

        return call

    def get(self, name: str) -> Callback | None:
        return next((c for c in self.items if c.name == name), None)

    def state_dict(self) -> dict:
        return {c.name: s for c in self.items if (s := c.state_dict())}

    def load_state_dict(self, states: dict) -> None:
        for c in self.items:
            if c.name in states:
                c.load_state_dict(states[c.name])


class BestModel(Callback):
    """Keep the best model by the task's `metric_for_best()` (classify: `classify.metric_for_best` on the
    validation split), stop early after `early_stopping_patience()` evaluations without improvement, and
    test and export the best weights instead of the last.

    The best weights are held in memory on every rank (so all ranks test the same model) and, for resume,
    written by the main process to `output_dir/best_model/step_N.safetensors`; the best metric, its step and
    the patience counter are in each checkpoint. A resumed run therefore ends with the same best step,
    `final/` weights and early-stop step as an uninterrupted one. Under DeepSpeed the last model is
    exported (the sharded weights are not copied), as before."""

    name = "best_model"

    def __init__(self, task, acc, out: Path):
        self.acc, self.dir = acc, Path(out) / "best_model"
        spec = task.metric_for_best()
        self.key, self.higher = (spec if spec else (None, True))
        self.patience = task.early_stopping_patience()
        self.best: dict | None = None
        self.bad_evals = 0
        self.weights: dict | None = None
        self.enabled = spec is not None

    def on_evaluate(self, ctx: Context, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.key not in metrics:
            from ..data.sources import DataError

            raise DataError(f"config key 'classify.metric_for_best': no eval metric '{self.key[len('eval_'):]}'")
        value = metrics[self.key]
        improved = self.best is None or (value > self.best["value"] if self.higher else value < self.best["value"])
        if improved:
            self.best = {"value": value, "step": ctx.step, "metric": self.key}
            self.bad_evals = 0
            if self.acc.distributed_type.value != "DEEPSPEED":
                sd = self.acc.get_state_dict(ctx.model)
                self.weights = {k: v.detach().cpu().clone() for k, v in sd.items()}
                if ctx.is_main:
                    self._write(ctx.step)
        else:
            self.bad_evals += 1
        if self.patience and self.bad_evals >= self.patience:
            ctx.should_stop = True

    def _path(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}.safetensors"

    def _write(self, step: int) -> None:
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".tmp-step_{step:08d}.safetensors"
        save_file({k: v.contiguous() for k, v in _untie(self.weights).items()}, str(tmp))
        os.replace(tmp, self._path(step))

    def on_save(self, ctx: Context, step: int) -> None:
        """Older best weights are no longer referenced by the newest checkpoint: drop them (main)."""
        if not ctx.is_main or not self.dir.is_dir() or self.best is None:
            return
        keep = self._path(self.best["step"]).name
        for f in self.dir.glob("step_*.safetensors"):
            if f.name != keep and int(f.stem.split("_")[1]) < self.best["step"]:
                f.unlink(missing_ok=True)

    def before_export(self, ctx: Context, result: dict) -> None:
        if self.best is None:
            return
        if self.weights is not None:
            self.acc.unwrap_model(ctx.model).load_state_dict(self.weights)  # test and export the best model
            result["best"] = self.best

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_evals": self.bad_evals} if self.enabled else {}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_evals = state.get("best"), state.get("bad_evals", 0)
        if self.best is None or self.acc.distributed_type.value == "DEEPSPEED":
            return
        path = self._path(self.best["step"])
        if path.exists():
            from safetensors.torch import load_file

            self.weights = load_file(str(path))
        else:
            print(f"warning: the best model's weights ({path}) are gone; the run will export its best model "
                  "from here on, or the last one", file=sys.stderr)
            self.best = None


def _untie(sd: dict) -> dict:
    """safetensors refuses tensors that share memory (tied embeddings): store each once as its own copy."""
    seen, out = {}, {}
    for k, v in sd.items():
        ptr = (v.data_ptr(), v.shape) if v.numel() else None
        out[k] = v.clone() if ptr in seen else v
        if ptr is not None:
            seen[ptr] = k
    return out
