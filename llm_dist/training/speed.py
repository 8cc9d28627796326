"""Step-speed switches applied to the built model before the parallel set-up (issue 17): activation
(gradient) checkpointing and `torch.compile`, with a fallback to eager when compilation fails.

`compile: true` compiles the model *in place* (`module.compile()`): the module keeps its class and its
state-dict keys (no `_orig_mod.` prefix), so checkpoints, `final/` exports and resumes are unchanged, and
DDP / DeepSpeed wrap it as before. Inductor compiles lazily, at the first forward (and again on a new input
shape), so a failure shows up inside a training step: `CompiledModel.step()` catches it there, prints one
warning line naming the error, turns compilation off, clears the half-done step's gradients and runs the
step again eagerly — the run continues. Evaluation (eval mode, no grad: graphs of its own, compiled at the
first evaluation) goes through `CompiledModel.call()`, which falls back the same way and evaluates again.
"""
from __future__ import annotations

import sys

import torch

from ..models.fast import cls_only_reason, enable_cls_only_last_layer, enable_fast_dropout, hf_models


def enable_gradient_checkpointing(model) -> list[str]:
    """`model.gradient_checkpointing`: HF's activation checkpointing (non-reentrant: works with frozen
    embeddings, PEFT and DDP without `enable_input_require_grads`) on the outermost transformers model that
    supports it. Returns the class names it was enabled on (an empty list is a config error)."""
    from ..config import ConfigError

    for m in hf_models(model):
        if getattr(m, "supports_gradient_checkpointing", False):
            kwargs = {"use_reentrant": False}
            if hasattr(m, "activation_checkpointing_enable"):  # transformers v5 (gradient_… is its deprecated alias)
                m.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if hasattr(m.config, "use_cache"):
                m.config.use_cache = False
            return [type(m).__name__]
    raise ConfigError(f"config key 'model.gradient_checkpointing': {type(model).__name__} has no transformers "
                      "model that supports gradient checkpointing")


def apply_model_speedups(model, cfg, task) -> dict:
    """`model.fast_dropout` and `model.cls_only_last_layer` (models/fast.py) on the trainer's model; what
    applied goes to run.json. The [CLS]-only layer applies to a sequence classifier that reads position 0
    (not the prompt task's MLM head); elsewhere it is skipped and the record says why."""
    record: dict = {}
    if cfg.model.fast_dropout:
        record["fast_dropout"] = enable_fast_dropout(model)
    if cfg.model.cls_only_last_layer and getattr(task, "name", None) == "classify":
        reason = cls_only_reason(model)
        record["cls_only_last_layer"] = {"applied": reason is None, "reason": reason}
        if reason is None:
            record["cls_only_last_layer"]["layer"] = enable_cls_only_last_layer(model)
    return record


def _is_compile_error(exc: BaseException) -> bool:
    """An error raised by dynamo / AOT autograd / inductor (not by the model's own code running eagerly)."""
    for e in (exc, exc.__cause__, exc.__context__):
        mod = type(e).__module__ if e is not None else ""
        if mod.startswith(("torch._dynamo", "torch._inductor", "torch._functorch", "torch.fx")):
            return True
    return False


def _error_line(exc: BaseException) -> str:
    """`Outer: Root: first line of the root cause` (dynamo wraps the backend's own error)."""
    root, seen = exc, {id(exc)}
    while True:
        nxt = getattr(root, "inner_exception", None) or root.__cause__
        if nxt is None or id(nxt) in seen:
            break
        root = nxt
        seen.add(id(nxt))
    first = (str(root).strip().splitlines() or [""])[0][:300]
    names = type(exc).__name__ + (f": {type(root).__name__}" if root is not exc else "")
    return f"{names}: {first}"


class CompiledModel:
    """`compile: true`: the model compiled in place, and the fallback to eager at a failing step."""

    def __init__(self, module: torch.nn.Module, backend: str, main: bool):
        self.module, self.backend, self.main = module, backend, main
        self.fallback: str | None = None  # the error line, once the run fell back to eager
        module.compile(backend=backend)

    @property
    def active(self) -> bool:
        return self.fallback is None and getattr(self.module, "_compiled_call_impl", None) is not None

    def step(self, step_fn, optimizer, *args, **kwargs):
        """Run the step strategy; if compilation fails inside it, warn once, go eager, redo the step."""
        # the failed attempt may have accumulated some gradients: cleared before the eager retry
        return self._guarded(step_fn, args, kwargs, lambda: optimizer.zero_grad(set_to_none=True))

    def call(self, fn, *args, **kwargs):
        """Run `fn` (evaluation: the compiled forward in eval mode / under no_grad is a new graph, compiled
        there for the first time); a compile error falls back to eager as in `step()` and `fn` runs again."""
        return self._guarded(fn, args, kwargs, None)

    def _guarded(self, fn, args, kwargs, before_retry):
        if not self.active:
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - only compile errors are caught, the rest re-raised
            if not _is_compile_error(exc):
                raise
            self.fallback = _error_line(exc)
            if self.main:
                print(f"warning: compile: the model did not compile with backend {self.backend!r} "
                      f"({self.fallback}); running eagerly", file=sys.stderr, flush=True)
            self.module._compiled_call_impl = None  # back to the module's own forward
            torch._dynamo.reset()
            if before_retry is not None:
                before_retry()
            return fn(*args, **kwargs)

    def record(self) -> dict:
        """What run.json says about compilation."""
        from torch._dynamo.utils import counters

        return {"backend": self.backend, "compiled": self.fallback is None,
                "graphs": int(counters["stats"].get("unique_graphs", 0)), "fallback": self.fallback}
