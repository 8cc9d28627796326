"""The task protocol: what the loop may ask of a task, and a registry by name.

A task owns its tokenizer, data and model, and turns a batch into a loss. The loop calls only the
methods below — required ones are abstract, optional hooks have defaults here — so it never probes a
task with `hasattr`. Register a new task with `@register("name")`; `task: name` in a run config selects it.

    @register("mytask")
    class MyTask(Task):
        def __init__(self, cfg, accelerator, checked=None): ...
        def total_steps(self): ...
        def next_batch(self): ...
        def loss(self, model, batch) -> LossOutput: ...
        ...
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no torch import when the config only checks a task name
    import torch


@dataclass
class LossOutput:
    """One micro-batch's forward pass.

    `loss_sum` is the loss summed over the batch's loss units (masked tokens / examples); the loop divides
    by the step's global unit count. `per_example` (detached, one value per row of the batch: a sequence's
    summed token loss for MLM, an example's loss for classification) and `logits` (detached, classification
    only) come from the same forward pass, for callbacks such as the training-dynamics ledger; they stay on
    the device (no host sync). `metrics` are summed device scalars the task turns into a log row."""

    loss_sum: "torch.Tensor"
    per_example: "torch.Tensor | None" = None
    logits: "torch.Tensor | None" = None
    metrics: dict = field(default_factory=dict)


@dataclass
class FinalReport:
    """What a task adds to run.json at the end (`result`) and the metrics row it logs (`row`)."""

    result: dict
    row: dict


class Task(ABC):
    name: str = ""
    model: "torch.nn.Module"
    tokenizer: object

    # --- required --------------------------------------------------------------------------------
    @abstractmethod
    def total_steps(self) -> int: ...

    @abstractmethod
    def next_batch(self) -> dict:
        """This rank's next training micro-batch (raises StopIteration when a finite source ends)."""

    @abstractmethod
    def loss(self, model, batch: dict) -> LossOutput: ...

    @abstractmethod
    def count(self, batch: dict) -> int:
        """Loss units in `batch` (the denominator of the global-count loss scaling)."""

    @abstractmethod
    def tokens(self, batch: dict) -> int: ...

    @abstractmethod
    def evaluate(self, model, step: int) -> dict: ...

    @abstractmethod
    def save_final(self, model, state_dict: dict | None, out: Path) -> None: ...

    @abstractmethod
    def data_state(self) -> dict:
        """This rank's data position (JSON-able), saved in every checkpoint."""

    @abstractmethod
    def load_data_state(self, state: dict) -> None: ...

    @abstractmethod
    def flops_per_token(self) -> float: ...

    def step_flops(self, batch: dict) -> float:
        """Training FLOPs of `batch` (host tensors) for MFU; default: tokens × flops_per_token()."""
        return self.tokens(batch) * self.flops_per_token()

    @abstractmethod
    def log_row(self, sums: dict, count: float) -> dict:
        """Turn summed `LossOutput.metrics` over a log window into metrics (e.g. accuracy)."""

    # --- optional hooks --------------------------------------------------------------------------
    steps_per_epoch: int | None = None  # for `eval_every: epoch` / `save_every: epoch`

    def resume_state(self) -> dict:
        """World-size-independent position, saved in trainer_state.json."""
        return {}

    def load_resume_state(self, saved: dict) -> None:
        return None

    def after_optimizer_step(self, model, step: int) -> None:
        return None

    def final_report(self, model, out: Path) -> FinalReport | None:
        return None

    def example_ids(self, batch: dict) -> list[str]:
        """Stable ids of a training batch's examples (reports, ledgers)."""
        return []

    def metric_for_best(self) -> tuple[str, bool] | None:
        """(eval metric key, higher is better) to keep the best model by, or None (keep the last)."""
        return None

    def early_stopping_patience(self) -> int:
        return 0

    def logits(self, model, batch: dict) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(logits with their graph, each row's weight): for the SMART regulariser and robustness attacks."""
        from ..config import ConfigError

        raise ConfigError(f"config key 'classify.adversarial.method': task {self.name!r} has no per-example logits")

    def loss_from_logits(self, logits: "torch.Tensor", batch: dict) -> LossOutput:
        """The `loss()` of a batch whose logits `logits(model, batch)` already computed."""
        from ..config import ConfigError

        raise ConfigError(f"config key 'classify.adversarial.method': task {self.name!r} has no per-example logits")


_REGISTRY: dict[str, type[Task]] = {}


def register(name: str):
    def wrap(cls: type[Task]) -> type[Task]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


BUILTIN_TASKS = ("mlm", "classify", "prompt")


def task_names() -> list[str]:
    """Built-in tasks and any registered since (without importing the built-in ones)."""
    return list(BUILTIN_TASKS) + sorted(set(_REGISTRY) - set(BUILTIN_TASKS))


def make_task(cfg, accelerator, checked=None) -> Task:
    """The registered task named by `cfg.task`, built (tokenizer, data, model) for this rank."""
    _load_builtins()
    try:
        cls = _REGISTRY[cfg.task]
    except KeyError:
        from ..config import ConfigError

        raise ConfigError(f"config key 'task': {cfg.task!r} is not one of {', '.join(task_names())}") from None
    return cls(cfg, accelerator, checked)


def _load_builtins() -> None:
    from . import classify, mlm, prompt  # noqa: F401 - their @register decorators fill the registry
