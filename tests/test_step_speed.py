"""Issue 17, the step: no host sync per micro-batch (counts read on the host before the copies, losses and
metric sums kept on the device until a log step); `compile: true` and its eager fallback; activation
checkpointing; classification and MLM batches from DataLoader workers with exact resume; a throughput / MFU
window of training-step time only, with FLOPs from real lengths. The runs share one eager reference run."""
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

    def step_flops(self, batch):
        return 6.0 * 8 * 3 * batch["x"].shape[0]

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
        assert r.n_global == 4 * n and r.tokens_global == 32 * n and r.flops_global == 6.0 * 8 * 3 * 4 * n
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


# ----------------------------------------------------------------------------- in-process tiny runs
CLS = "configs/classify/tiny.yaml"
MLM = "configs/mlm/tiny.yaml"


def _run(tmp_path_factory, tokenizer_dir, name, *extra, callbacks=None):
    """A 4-step tiny classify run on one process; (run.json dict, training losses, output dir)."""
    from conftest import read_metrics

    from llm_dist.config import load_config
    from llm_dist.training.loop import run

    out = tmp_path_factory.mktemp(name)
    cfg = load_config(CLS, [f"--output_dir={out}", f"--tokenizer.path={tokenizer_dir}", "--max_steps=4",
                            "--log_every=1", "--tracking.progress=false", "--batch_size=8", "--data.max_length=32",
                            "--eval_every=0", "--seed=1", "--data.pad_to_max_length=true", *extra])
    result = run(cfg, callbacks=callbacks)
    return result, [r["loss"] for r in read_metrics(out) if "loss" in r and "eval_loss" not in r], out


@pytest.fixture(scope="module")
def eager(tmp_path_factory, tokenizer_dir):
    return _run(tmp_path_factory, tokenizer_dir, "eager")


@pytest.mark.slow  # tiny in-process runs (seconds each)
def test_compile_runs_the_model_compiled_and_matches_eager(eager, tmp_path_factory, tokenizer_dir):
    """`compile: true` (aot_eager here: the same dynamo capture + AOT autograd as inductor, without the C++
    build that takes ~1 min on 2 cores; inductor: see README): dynamo captured graphs, the losses equal
    eager ones, and checkpoints keep their keys (in-place compile: no `_orig_mod.` prefix)."""
    from torch._dynamo.utils import counters

    counters.clear()
    result, losses, out = _run(tmp_path_factory, tokenizer_dir, "compiled", "--compile=true",
                               "--compile_backend=aot_eager")
    assert result["compile"]["compiled"] and result["compile"]["fallback"] is None
    assert counters["stats"]["unique_graphs"] >= 1 and counters["aot_autograd"]["total"] >= 1
    assert losses == pytest.approx(eager[1], rel=1e-5) and len(losses) == 4
    from safetensors import safe_open

    with safe_open(str(out / "final" / "model.safetensors"), "pt") as f:
        assert not any("_orig_mod" in k for k in f.keys())


@pytest.mark.slow  # inductor's C++ build: ~1 min on 2 cores
def test_inductor_compiles_the_model_on_the_cpu(tmp_path_factory, tokenizer_dir):
    """`compile: true` with the default backend, inductor, on this CPU: no fallback, the graphs compiled to
    C++ kernels, and the losses those of the eager model (dropout off: inductor draws its own random
    numbers, so with dropout the two runs would differ by design)."""
    import shutil

    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("inductor on the CPU needs a C++ compiler; none on PATH")
    from torch._dynamo.utils import counters

    no_dropout = ("--model.hidden_dropout=0", "--model.attention_dropout=0")
    _, eager_losses, _ = _run(tmp_path_factory, tokenizer_dir, "eager-nodrop", *no_dropout)
    counters.clear()
    result, losses, _ = _run(tmp_path_factory, tokenizer_dir, "inductor", "--compile=true", *no_dropout)
    assert result["compile"] == {"backend": "inductor", "compiled": True, "graphs": result["compile"]["graphs"],
                                 "fallback": None} and result["compile"]["graphs"] >= 1
    assert sum(counters["inductor"].values()) >= 1, dict(counters)  # inductor itself compiled the graphs
    assert losses == pytest.approx(eager_losses, rel=1e-4) and len(losses) == 4


@pytest.mark.slow  # tiny in-process runs (seconds each)
def test_compile_failure_falls_back_to_eager_with_one_warning(eager, tmp_path_factory, tokenizer_dir,
                                                               monkeypatch, capsys):
    """A backend that fails at the first step: one warning line naming the error; the run goes on eagerly
    and trains exactly as the eager run."""
    from torch._dynamo.backends import registry

    def broken(gm, example_inputs):
        raise RuntimeError("planted compiler failure")

    registry.lookup_backend("aot_eager")  # registers the built-in backends first (lazily imported)
    monkeypatch.setitem(registry._COMPILER_FNS, "aot_eager", broken)
    result, losses, _ = _run(tmp_path_factory, tokenizer_dir, "fallback", "--compile=true",
                             "--compile_backend=aot_eager")
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: compile:")]
    assert len(err) == 1 and "planted compiler failure" in err[0] and "running eagerly" in err[0]
    assert result["compile"]["compiled"] is False and "planted compiler failure" in result["compile"]["fallback"]
    assert result["final_step"] == 4 and losses == eager[1]


@pytest.mark.slow  # tiny in-process runs (seconds each)
def test_compile_failure_first_met_in_evaluation_falls_back_too(eager, tmp_path_factory, tokenizer_dir,
                                                                monkeypatch, capsys):
    """A backend that compiles the training graphs but fails on the evaluation graph (no grad): training ran
    compiled, the final evaluation falls back with one warning line and gives the eager run's metrics."""
    from torch._dynamo.backends import registry

    real = registry.lookup_backend("aot_eager")
    failed = []

    def picky(gm, example_inputs):
        if not torch.is_grad_enabled():
            failed.append(1)
            raise RuntimeError("planted evaluation compile failure")
        return real(gm, example_inputs)

    monkeypatch.setitem(registry._COMPILER_FNS, "aot_eager", picky)
    result, losses, _ = _run(tmp_path_factory, tokenizer_dir, "evalfallback", "--compile=true",
                             "--compile_backend=aot_eager")
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: compile:")]
    assert failed and len(err) == 1 and "planted evaluation compile failure" in err[0]
    assert result["compile"]["compiled"] is False and result["compile"]["graphs"] >= 1
    assert losses == pytest.approx(eager[1], rel=1e-5)  # the 4 training steps ran compiled
    numbers = {k: v for k, v in eager[0]["eval"].items() if isinstance(v, float)}
    assert numbers and {k: result["eval"][k] for k in numbers} == pytest.approx(numbers, rel=1e-5)


@pytest.mark.slow  # tiny in-process runs (seconds each)
def test_gradient_checkpointing_recomputes_and_trains_the_same(eager, tmp_path_factory, tokenizer_dir, monkeypatch):
    """`model.gradient_checkpointing: true`: HF's flag is on in every layer, torch's checkpoint runs once per
    layer per forward, and the losses equal the run without it (non-reentrant checkpointing replays the
    dropout RNG)."""
    import transformers.modeling_utils as mu
    from transformers.models.bert.modeling_bert import BertLayer

    from llm_dist.training.callbacks import Callback
    from llm_dist.training.speed import hf_models

    calls, seen = [], {}
    orig = mu.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return orig(fn, *args, **kwargs)

    monkeypatch.setattr(mu, "checkpoint", counting)

    class Flags(Callback):
        name = "flags"

        def on_train_start(self, ctx):
            hf = hf_models(ctx.model)[0]
            seen["layers"] = [getattr(m, "gradient_checkpointing", None) for m in hf.modules()
                              if isinstance(m, BertLayer)]  # the last one is the [CLS]-only subclass

    result, losses, _ = _run(tmp_path_factory, tokenizer_dir, "gc", "--model.gradient_checkpointing=true",
                             callbacks=[Flags()])
    n_layers = len(seen["layers"])
    assert n_layers >= 1 and all(seen["layers"])
    assert len(calls) == 4 * n_layers and set(calls) == {False}  # 4 steps, every layer, non-reentrant
    assert losses == pytest.approx(eager[1], rel=1e-5)


@pytest.mark.slow  # tiny in-process runs (seconds each)
def test_dataloader_workers_train_the_same_and_resume_exactly(eager, tmp_path_factory, tokenizer_dir):
    """`data.num_workers: 2`: DataLoader workers build the classify batches ahead; a run stopped (signal) at
    step 2 and resumed gives the same 4 losses and final weights as the uninterrupted run without workers:
    the checkpoint counts consumed batches, not the ones the workers had prefetched."""
    import json
    import signal

    from llm_dist.training.callbacks import Callback
    from llm_dist.training.signals import StopSignal

    stop, used = StopSignal(), {}

    class StopAfterFirst(Callback):
        name = "stop_after_first"

        def on_step_end(self, ctx, out):
            used["workers"] = ctx.task._loader_iter._num_workers  # the batches came from 2 worker processes
            if out.step == 1:
                stop.received = signal.SIGTERM  # read at the next step boundary: saved at step 2

    from llm_dist.config import load_config
    from llm_dist.training.loop import run

    out = tmp_path_factory.mktemp("workers")
    args = [f"--output_dir={out}", f"--tokenizer.path={tokenizer_dir}", "--max_steps=4", "--log_every=1",
            "--tracking.progress=false", "--batch_size=8", "--data.max_length=32", "--eval_every=0", "--seed=1",
            "--data.pad_to_max_length=true", "--data.num_workers=2"]
    try:
        first = run(load_config(CLS, args), stop=stop, callbacks=[StopAfterFirst()])
    finally:
        stop.restore()
    assert first["signalled"] and first["final_step"] == 2 and used["workers"] == 2
    saved = json.loads((out / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert saved["batches"] == {"epoch": 0, "consumed": 16}  # 2 steps × 8, whatever the workers prefetched
    result = run(load_config(CLS, args))
    from conftest import read_metrics

    losses = [r["loss"] for r in read_metrics(out) if "loss" in r and "eval_loss" not in r]
    assert result["final_step"] == 4 and losses == eager[1]
    assert result["param_checksums"] == eager[0]["param_checksums"]


@pytest.mark.slow  # tiny in-process runs (seconds each)
def test_mlm_dataloader_workers_resume_with_the_same_masks(tmp_path_factory, tokenizer_dir):
    """MLM with `data.num_workers: 2`: the workers pack and mask the batches (dynamic masking draws from each
    worker's torch RNG); a run stopped (signal) at step 2 and resumed gives the same 4 losses and final
    weights as the uninterrupted run with workers — the resumed workers continue their RNG draws instead of
    restarting from their seeds (which masked steps 3-4 like steps 1-2's workers did)."""
    import signal

    from conftest import read_metrics

    from llm_dist.config import load_config
    from llm_dist.training.callbacks import Callback
    from llm_dist.training.loop import run
    from llm_dist.training.signals import StopSignal

    stop, used = StopSignal(), {}

    class StopAfterFirst(Callback):
        name = "stop_after_first"

        def on_step_end(self, ctx, out):
            used["workers"] = ctx.task._iter._num_workers  # the batches came from 2 worker processes
            if out.step == 1:
                stop.received = signal.SIGTERM  # read at the next step boundary: saved at step 2

    def args(out):
        return [f"--output_dir={out}", f"--tokenizer.path={tokenizer_dir}", "--max_steps=4", "--log_every=1",
                "--tracking.progress=false", "--batch_size=4", "--data.seq_len=32", "--data.shuffle_buffer=8",
                "--seed=1", "--data.num_workers=2"]

    def losses(out):
        return [r["loss"] for r in read_metrics(out) if "loss" in r and "eval_loss" not in r]

    full_dir, cut_dir = tmp_path_factory.mktemp("mlm_workers_full"), tmp_path_factory.mktemp("mlm_workers_cut")
    full = run(load_config(MLM, args(full_dir)))
    try:
        first = run(load_config(MLM, args(cut_dir)), stop=stop, callbacks=[StopAfterFirst()])
    finally:
        stop.restore()
    assert first["signalled"] and first["final_step"] == 2 and used["workers"] == 2
    used.clear()
    resumed = run(load_config(MLM, args(cut_dir)), callbacks=[StopAfterFirst()])  # starts at step 3: no stop
    assert used["workers"] == 2 and resumed["final_step"] == 4
    assert len(losses(full_dir)) == 4 and losses(cut_dir) == losses(full_dir)
    assert resumed["param_checksums"] == full["param_checksums"]


@pytest.mark.slow  # tiny in-process runs (seconds each)
def test_throughput_window_counts_training_steps_only(tmp_path_factory, tokenizer_dir):
    """A slow evaluation and checkpoint (1 s each, planted) between steps: the logged window
    (`train_step_seconds`, from which tokens/s and MFU come) leaves them out by construction; MFU uses the
    FLOPs of the batches' real lengths."""
    import time

    from llm_dist.models.build import flops_per_token
    from llm_dist.training.callbacks import Callback

    seen = {"flops": 0.0}

    class Slow(Callback):
        name = "slow"

        def on_step_end(self, ctx, out):
            seen["task"] = ctx.task
            seen["flops"] += sum(ctx.task.step_flops(b) for b in out.batches)

        def on_evaluate(self, ctx, metrics):
            if ctx.step == 2:
                time.sleep(1.0)

        def on_save(self, ctx, step):
            if step == 2:
                time.sleep(1.0)

    t0 = time.perf_counter()
    result, _, out = _run(tmp_path_factory, tokenizer_dir, "window", "--eval_every=2", "--save_every=2",
                          "--log_every=4", callbacks=[Slow()])
    from conftest import read_metrics

    row = [r for r in read_metrics(out) if "tokens_per_s" in r][-1]
    assert row["step"] == 4 and row["tokens_per_s"] * row["train_step_seconds"] == pytest.approx(result["tokens_seen"])
    assert row["train_step_seconds"] == pytest.approx(result["step_seconds"])
    assert result["step_seconds"] < result["train_seconds"] - 2.0 < time.perf_counter() - t0
    task = seen["task"]
    peak = 0.5  # the CPU default of tracking.peak_tflops (meters.CPU_PEAK_TFLOPS)
    assert row["mfu"] == pytest.approx(seen["flops"] / row["train_step_seconds"] / (peak * 1e12), rel=1e-6)
    # attention over each example's own length: one example of length L costs L × flops_per_token(L)
    c = task.model.config
    head = c.hidden_size * (c.hidden_size + len(task.names))
    for lengths in ([10], [10, 20]):
        mask = torch.zeros(len(lengths), 32, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        batch = {"attention_mask": mask, "weight": torch.ones(len(lengths))}
        want = sum(n * flops_per_token(c, n, head_params=head) for n in lengths)
        assert task.step_flops(batch) == pytest.approx(want, rel=1e-12)
    assert task.step_flops(batch) < 30 * task.flops_per_token()  # the old estimate: attention over max_length
