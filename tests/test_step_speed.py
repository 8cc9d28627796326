"""Issue 17, the step: no host sync per micro-batch (counts read on the host before the copies, losses and
metric sums kept on the device until a log step)."""
from __future__ import annotations

import pytest
import torch

from llm_dist.tasks.base import LossOutput

SYNCS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")


class CountSyncs:
    """Counts calls of the Tensor methods that read a value back to the host (each one a device sync on an
    accelerator; on the CPU they are the same calls, so the count is what a GPU would wait for)."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in SYNCS:
            orig = getattr(torch.Tensor, name)

            def wrapped(t, *a, _orig=orig, _name=name, **k):
                self.calls.append(_name)
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapped)


class LinearTask:
    """A task of the loop's protocol over a linear classifier: loss summed over examples, `correct` metric."""

    def count(self, batch):
        return int(batch["weight"].sum())

    def tokens(self, batch):
        return int(batch["x"].shape[0] * batch["x"].shape[1])

    def loss(self, model, batch):
        logits = model(batch["x"])
        losses = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none") * batch["weight"]
        correct = ((logits.argmax(-1) == batch["labels"]).float() * batch["weight"]).sum()
        return LossOutput(losses.sum(), losses.detach(), logits.detach(), {"correct": correct.detach().float()})


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(4, 8, generator=g), "labels": torch.randint(0, 3, (4,), generator=g),
             "weight": torch.ones(4)} for _ in range(n)]


def test_plain_step_reads_the_device_once_per_step_whatever_the_micro_batches(monkeypatch):
    """1 and 4 micro-batches: the same single read (the one collective's result); the loss and metrics
    come back as device scalars equal to the Python-float sums of the old step, bit for bit."""
    from accelerate import Accelerator

    from llm_dist.training.steps import PlainStep, host_counts

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(8, 3)
    task = LinearTask()
    seen = {}
    for n in (1, 4):
        micro = _batches(n)
        counts = host_counts(task, micro)  # the loop does this before the copies to the device
        sync = CountSyncs(monkeypatch)
        r = PlainStep()(model, task, micro, acc, 1, 0.0, counts=counts)
        seen[n] = list(sync.calls)
        monkeypatch.undo()
        assert torch.is_tensor(r.loss_local) and r.loss_local.dtype == torch.float64
        assert torch.is_tensor(r.sums["correct"])
        # the old step: Python floats of each micro-batch's float32 loss, summed in order
        old_loss, old_correct = 0.0, 0.0
        for b in micro:
            out = task.loss(model, b)
            old_loss += out.loss_sum.detach().float().item()
            old_correct += float(out.metrics["correct"])
        assert float(r.loss_local) == old_loss and float(r.sums["correct"]) == old_correct
        assert r.n_global == 4 * n and r.tokens_global == 32 * n
        model.zero_grad()
    assert seen[1] == seen[4] == ["tolist"], seen


def test_adversarial_step_is_sync_free_too(monkeypatch):
    """FGM on a model with input embeddings: 3 micro-batches, still one read per step."""
    from accelerate import Accelerator

    from llm_dist.config import AdversarialConfig
    from llm_dist.training.steps import FGMStep, host_counts

    class Emb(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 8)
            self.out = torch.nn.Linear(8, 3)

        def get_input_embeddings(self):
            return self.emb

        def forward(self, ids):
            return self.out(self.emb(ids).mean(1))

    class EmbTask(LinearTask):
        def tokens(self, batch):
            return int(batch["x"].numel())

    g = torch.Generator().manual_seed(1)
    micro = [{"x": torch.randint(1, 20, (4, 6), generator=g), "labels": torch.randint(0, 3, (4,), generator=g),
              "weight": torch.ones(4)} for _ in range(3)]
    acc = Accelerator(cpu=True)
    step = FGMStep(AdversarialConfig(method="fgm", epsilon=0.5))
    counts = host_counts(EmbTask(), micro)
    sync = CountSyncs(monkeypatch)
    r = step(Emb(), EmbTask(), micro, acc, 1, 0.0, counts=counts)
    calls = list(sync.calls)
    monkeypatch.undo()
    assert calls == ["tolist"], calls
    assert float(r.sums["adv_norm"]) / float(r.sums["adv_rows"]) == pytest.approx(0.5, abs=1e-5)
