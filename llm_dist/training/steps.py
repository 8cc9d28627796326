"""Step strategies: the forward/backward work of one optimizer step.

The plain step runs each micro-batch once. Other strategies (adversarial training: several forward /
backward passes on perturbed `inputs_embeds`) replace it through `STEP_STRATEGIES` while keeping the
global-count loss scaling of `loss_scale()`, so the gradient of a step never depends on how its examples
are split over ranks and micro-batches.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


@dataclass
class StepResult:
    """What a step strategy returns. The counts come from the step's one collective (host floats); the
    loss and metric sums stay device tensors (float64, detached) so a step never waits for the device per
    micro-batch: the loop reads them at log steps only (and the non-finite guard reads `loss_local` once
    per step, where it needs it)."""

    n_global: float  # loss units in the step over all ranks (masked tokens / examples)
    tokens_global: float
    flag: float  # the signal flag summed over ranks (> 0: stop after this step)
    loss_local: "torch.Tensor | float"  # this rank's summed loss (a float64 device scalar)
    sums: dict  # this rank's summed task metrics (float64 device scalars)
    outputs: list = field(default_factory=list)  # the task's LossOutput per micro-batch
    flops_global: float = 0.0  # the step's training FLOPs over all ranks (task.step_flops: real lengths)


def host_counts(task, micro_batches: list[dict]) -> list[tuple[int, int, float]]:
    """(loss units, tokens, training FLOPs) of each micro-batch, read from the batches while they are still
    on the host (the loop calls this before moving them to the device: no device sync)."""
    return [(task.count(b), task.tokens(b), float(task.step_flops(b))) for b in micro_batches]


def count_step(task, micro_batches: list[dict], acc, world_size: int, extra_flag: float = 0.0,
               counts: list[tuple[int, int, float]] | None = None):
    """The one collective before the forward passes: (global units, global tokens, flag sum, global FLOPs).
    `counts`: the micro-batches' `host_counts`, taken before they went to the device (else the units and
    tokens are read here, with no FLOPs: the throughput meter then uses tokens × flops_per_token)."""
    if counts is None:
        counts = [(task.count(b), task.tokens(b), 0.0) for b in micro_batches]
    local = torch.tensor([sum(c[0] for c in counts), sum(c[1] for c in counts), extra_flag,
                          sum(c[2] for c in counts)], dtype=torch.float64, device=acc.device)
    glob = acc.reduce(local, reduction="sum") if world_size > 1 else local
    n_global, tokens, flag, flops = glob.tolist()  # the step's one read from the device
    return n_global, tokens, flag, flops


def _acc(total: "torch.Tensor | None", value) -> "torch.Tensor":
    """total + value as a detached float64 device scalar (float64 like the Python floats it replaces)."""
    v = value.detach().double() if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float64)
    return v if total is None else total + v


def _add_sums(sums: dict, metrics: dict) -> None:
    for k, v in metrics.items():
        sums[k] = _acc(sums.get(k), v)


def loss_scale(n_global: float, world_size: int, n_micro: int, is_ds: bool) -> float:
    """Multiply a micro-batch's summed loss by this before backward: the step's loss is then
    sum(unit losses over all micro-batches and ranks) / their count. DDP averages gradients over ranks
    (hence × world); the DeepSpeed engine divides by its accumulation steps itself (hence × micro)."""
    scale = world_size / max(n_global, 1.0)
    return scale * n_micro if is_ds else scale


class PlainStep:
    """Forward/backward of each micro-batch once (no gradient sync until the last one)."""

    name = "plain"

    def __call__(self, model, task, micro_batches: list[dict], acc, world_size: int,
                 extra_flag: float = 0.0, counts: list | None = None) -> StepResult:
        n_global, tokens, flag, flops = count_step(task, micro_batches, acc, world_size, extra_flag, counts)
        is_ds = acc.distributed_type.value == "DEEPSPEED"
        scale = loss_scale(n_global, world_size, len(micro_batches), is_ds)
        loss_total, sums, outputs = None, {}, []
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if (last or is_ds) else acc.no_sync(model)
            if is_ds:  # the engine steps (clip, optimizer, zero grad) at the accumulation boundary only
                acc.gradient_state._set_sync_gradients(last)
            with sync, acc.autocast():
                out = task.loss(model, mb)
                acc.backward(out.loss_sum * scale)
            outputs.append(out)
            loss_total = _acc(loss_total, out.loss_sum.detach().float())
            _add_sums(sums, out.metrics)
        return StepResult(n_global, tokens, flag, loss_total, sums, outputs, flops)


# ----------------------------------------------------------------------------- adversarial training
class EmbeddingDelta:
    """Adds a perturbation δ to the output of the model's word-embedding module — i.e. to `inputs_embeds` —
    through a forward hook, so the task's forward and the model code stay unchanged and the embedding matrix
    is never edited in place (under ZeRO that would perturb a partition, or nothing). δ has the shape of the
    embedding output; `mask` (B, L, 1) is 1 on real tokens, 0 on padding (read from the input ids)."""

    def __init__(self, model):
        self.module = model.get_input_embeddings()
        self.pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        self.delta: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.make = None  # (shape, mask, dtype, device) -> δ, called on the first forward of a pass
        self._h = None

    def __enter__(self):
        self._h = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._h.remove()
        self.delta = self.mask = self.make = None

    def _hook(self, module, inputs, output):
        if self.mask is None:
            ids = inputs[0]
            mask = (ids != self.pad_id) if self.pad_id is not None else torch.ones_like(ids, dtype=torch.bool)
            self.mask = mask.unsqueeze(-1).to(output.dtype)
        if self.delta is None and self.make is not None:
            self.delta = self.make(output.shape, self.mask, output.device)
        if self.delta is None:
            return output
        if self.delta.shape != output.shape:
            raise RuntimeError(f"adversarial training: the task ran forwards of different shapes in one pass "
                               f"({tuple(self.delta.shape)} vs {tuple(output.shape)}); use one input per example")
        return output + self.delta.to(output.dtype)

    def set(self, delta: torch.Tensor | None, grad: bool):
        """The next forward adds `delta` (a fresh leaf; with a gradient when `grad`). None: made lazily as
        zeros on the first forward (its shape is known only then)."""
        if delta is None:
            self.make = lambda shape, mask, device: torch.zeros(shape, device=device, requires_grad=grad)
            self.delta = None
        else:
            self.delta = delta.detach().requires_grad_(grad)
        return self


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """Each example's L2 norm over all of its token embeddings: (B,) for x of shape (B, L, H)."""
    return x.float().flatten(1).norm(dim=1)


def normalize(g: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """g / ‖g‖ per example (rows with a zero gradient stay zero)."""
    if mask is not None:
        g = g * mask
    n = row_norms(g)
    return g / torch.where(n > 0, n, torch.ones_like(n)).view(-1, *[1] * (g.dim() - 1)).to(g.dtype)


def project(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """δ projected onto the L2 ball of radius ε, per example."""
    n = row_norms(delta)
    factor = torch.clamp(eps / torch.clamp(n, min=1e-12), max=1.0)
    return delta * factor.view(-1, *[1] * (delta.dim() - 1)).to(delta.dtype)


# ZeRO-2 fails inside DeepSpeed's gradient-bucket epilogue when a micro-batch runs several backward passes
# (IndexError in reduce_ipg_grads); ZeRO-3 runs, but its equivalence to the DDP step is not verified yet.
DEEPSPEED_UNSUPPORTED = ("config key 'classify.adversarial.method': adversarial training runs under DDP only; "
                         "under DeepSpeed ZeRO-2 several backward passes per micro-batch fail and ZeRO-3 is not "
                         "verified (drop deepspeed.config, or the adversarial method)")


class AdversarialStep(PlainStep):
    """Base of the adversarial strategies: each micro-batch runs `micro()` (several forward / backward passes
    on perturbed `inputs_embeds`), every loss multiplied by the plain step's global-count `scale`, so the
    step's gradient is Σ over passes of (Σ unit losses over all ranks and micro-batches) / their count —
    independent of how the examples are split over ranks and micro-batches. Under DDP, every pass runs
    under `no_sync` except the final backward of the step's last micro-batch, which all-reduces the
    gradient accumulated by all passes once; passes that need only ∂loss/∂δ use `torch.autograd.grad` (no
    parameter gradient is touched). `stats` of the last step (per-example perturbation norms) are kept for
    tests and logged as `adv_norm` / `adv_loss`."""

    forwards = backwards = 1  # per micro-batch: full forward passes / backward passes into the parameters

    def __init__(self, cfg):
        self.cfg = cfg
        self.last_norms: torch.Tensor | None = None

    def __call__(self, model, task, micro_batches: list[dict], acc, world_size: int,
                 extra_flag: float = 0.0, counts: list | None = None) -> StepResult:
        is_ds = acc.distributed_type.value == "DEEPSPEED"
        if is_ds:  # see DEEPSPEED_UNSUPPORTED
            from ..config import ConfigError

            raise ConfigError(DEEPSPEED_UNSUPPORTED)
        n_global, tokens, flag, flops = count_step(task, micro_batches, acc, world_size, extra_flag, counts)
        scale = loss_scale(n_global, world_size, len(micro_batches), is_ds)
        loss_total, sums, outputs, norms = None, {}, [], []
        with EmbeddingDelta(acc.unwrap_model(model)) as emb:
            for i, mb in enumerate(micro_batches):
                self._ctx = (model, acc, is_ds, i == len(micro_batches) - 1)
                out, delta, adv_loss = self.micro(model, task, mb, acc, scale, emb)
                outputs.append(out)
                loss_total = _acc(loss_total, out.loss_sum.detach().float())
                _add_sums(sums, out.metrics)
                nrm = row_norms(delta.detach())
                norms.append(nrm)
                _add_sums(sums, {"adv_norm": nrm.sum(),  # rows with no gradient (padding examples) add 0 …
                                 "adv_rows": (nrm > 0).sum(),  # … and are not counted
                                 "adv_loss": adv_loss.float()})
                emb.mask = None
        self.last_norms = torch.cat(norms) if norms else None
        return StepResult(n_global, tokens, flag, loss_total, sums, outputs, flops)

    # --- helpers for the strategies --------------------------------------------------------------------
    def pass_ctx(self, final: bool):
        """DDP: sync only in the step's final pass; DeepSpeed: the engine steps at the final backward."""
        model, acc, is_ds, last = self._ctx
        sync = last and final
        if is_ds:
            acc.gradient_state._set_sync_gradients(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync else acc.no_sync(model)

    def loss_pass(self, model, task, mb, acc, emb, delta, scale, final: bool, grad_delta: bool = True):
        """Forward at δ (None: zeros) and backward of `scale × loss` into the parameters (and δ)."""
        emb.set(delta, grad_delta)
        with self.pass_ctx(final), acc.autocast():
            out = task.loss(model, mb)
            acc.backward(out.loss_sum * scale)
        return out, emb.delta

    def grad_only(self, model, task, mb, acc, emb, delta) -> tuple[torch.Tensor, torch.Tensor]:
        """∂loss/∂δ at δ, without touching any parameter gradient (DDP: outside gradient sync)."""
        emb.set(delta, True)
        with self.pass_ctx(False), acc.autocast():
            out = task.loss(model, mb)
            (g,) = torch.autograd.grad(out.loss_sum, emb.delta)
        return g, out.loss_sum.detach().float()

    def micro(self, model, task, mb, acc, scale, emb):  # pragma: no cover - abstract
        raise NotImplementedError


class FGMStep(AdversarialStep):
    """FGM (Miyato et al. 2017): a clean pass gives g = ∂L/∂e; the adversarial pass at r = ε·g/‖g‖ (per
    example) adds its gradient: ∇θ[L(e) + L(e + r)]. 2 forwards, 2 backwards per micro-batch."""

    name, forwards, backwards = "fgm", 2, 2

    def micro(self, model, task, mb, acc, scale, emb):
        out, d = self.loss_pass(model, task, mb, acc, emb, None, scale, final=False)
        r = self.cfg.epsilon * normalize(d.grad, emb.mask)
        adv, _ = self.loss_pass(model, task, mb, acc, emb, r, scale, final=True, grad_delta=False)
        return out, r, adv.loss_sum.detach().float()


class PGDStep(AdversarialStep):
    """PGD (Madry et al. 2018) as used for BERT: a clean pass (gradient kept, gives the first ascent
    direction), K ascent steps δ ← Π_ε(δ + α·g/‖g‖) (the K−1 intermediate ones by ∂L/∂δ only), then the
    adversarial pass at δ_K adds its gradient: ∇θ[L(e) + L(e + δ_K)]. K+1 forwards, 2 parameter backwards
    (+ K−1 backwards to δ only)."""

    name = "pgd"

    @property
    def forwards(self):
        return self.cfg.steps + 1

    backwards = 2

    def micro(self, model, task, mb, acc, scale, emb):
        c = self.cfg
        out, d = self.loss_pass(model, task, mb, acc, emb, None, scale, final=False)
        g, delta = d.grad, torch.zeros_like(d)
        for k in range(c.steps):
            delta = project(delta + c.step_size * normalize(g, emb.mask), c.epsilon)
            if k < c.steps - 1:
                g, _ = self.grad_only(model, task, mb, acc, emb, delta)
        adv, _ = self.loss_pass(model, task, mb, acc, emb, delta, scale, final=True, grad_delta=False)
        return out, delta, adv.loss_sum.detach().float()


class FreeLBStep(AdversarialStep):
    """FreeLB (Zhu et al. 2020): δ_0 = 0 (or uniform in a ball of radius `init`); for t = 1..K a pass at
    δ_{t−1} whose gradient (÷K) accumulates into the parameters, then δ_t = Π_ε(δ_{t−1} + α·g/‖g‖). With
    zero init the first pass is the clean one; with K = 1 the step IS the plain step. K forwards and K
    backwards per micro-batch."""

    name = "freelb"

    @property
    def forwards(self):
        return self.cfg.steps

    backwards = forwards

    def micro(self, model, task, mb, acc, scale, emb):
        c = self.cfg
        delta, first, adv_loss = None, None, None
        if c.init > 0:  # a random direction with norm `init`, shaped on the first forward
            def make(shape, mask, device):
                r = normalize(torch.randn(shape, device=device), mask)
                return (c.init * r).requires_grad_(True)
            emb.make, emb.delta = make, None
            delta = "lazy"
        for t in range(c.steps):
            if delta == "lazy":
                with self.pass_ctx(t == c.steps - 1), acc.autocast():
                    out = task.loss(model, mb)
                    acc.backward(out.loss_sum * (scale / c.steps))
                d = emb.delta
            else:
                out, d = self.loss_pass(model, task, mb, acc, emb, delta, scale / c.steps, final=t == c.steps - 1)
            emb.make = None
            first = first or out
            adv_loss = out.loss_sum.detach().float()
            if t < c.steps - 1:
                delta = project(d.detach() + c.step_size * normalize(d.grad, emb.mask), c.epsilon)
            else:
                delta = d.detach()
        return first, delta, adv_loss


class SMARTStep(AdversarialStep):
    """SMART-style smoothness regulariser (Jiang et al. 2020): the clean loss plus
    λ·Σ_i symKL(f(e_i + δ_i) ‖ f(e_i)), with δ started from N(0, σ²) noise and moved by K ascent steps on
    that KL (by ∂/∂δ only), projected to the ε ball. The clean logits are held fixed (detached) in the
    regulariser, so its gradient flows through the perturbed branch only (as in VAT); the Bregman proximal
    point part of SMART is not implemented. 2 + K forwards, 2 parameter backwards (+ K to δ only)."""

    name, backwards = "smart", 2

    @property
    def forwards(self):
        return self.cfg.steps + 2

    def micro(self, model, task, mb, acc, scale, emb):
        c = self.cfg
        emb.set(None, False)
        with self.pass_ctx(False), acc.autocast():
            logits, weight = task.logits(model, mb)
            out = task.loss_from_logits(logits, mb)
            acc.backward(out.loss_sum * scale)
        clean = logits.detach().float()
        delta = c.smart_sigma * torch.randn_like(emb.delta) * emb.mask
        for _ in range(c.steps):
            emb.set(delta, True)
            with self.pass_ctx(False), acc.autocast():
                adv_logits, _ = task.logits(model, mb)
                kl = (sym_kl(adv_logits.float(), clean) * weight).sum()
                (g,) = torch.autograd.grad(kl, emb.delta)
            delta = project(delta + c.step_size * normalize(g, emb.mask), c.epsilon)
        emb.set(delta, False)
        with self.pass_ctx(True), acc.autocast():
            adv_logits, _ = task.logits(model, mb)
            reg = (sym_kl(adv_logits.float(), clean) * weight).sum()
            acc.backward(reg * (c.smart_weight * scale))
        return out, delta, reg.detach().float()


def sym_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Symmetric KL between the softmax distributions of two logit tensors, per row."""
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return ((lp.exp() * (lp - lq)).sum(-1) + (lq.exp() * (lq - lp)).sum(-1))


STEP_STRATEGIES = {"plain": PlainStep, "fgm": FGMStep, "pgd": PGDStep, "freelb": FreeLBStep, "smart": SMARTStep}


def make_step(cfg):
    """The run's step strategy: `classify.adversarial.method` (none: the plain step)."""
    method = cfg.classify.adversarial.method if cfg.task in ("classify", "prompt") else None
    if not method:
        return PlainStep()
    return STEP_STRATEGIES[method](cfg.classify.adversarial)


def train_step(model, task, micro_batches, accelerator, world_size: int, extra_flag: float = 0.0):
    """The plain step as a function: (global count, global tokens, flag sum, local summed loss, metric sums)."""
    r = PlainStep()(model, task, micro_batches, accelerator, world_size, extra_flag)
    return r.n_global, r.tokens_global, r.flag, r.loss_local, r.sums
