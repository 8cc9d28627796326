"""Run configuration: one dataclass per component, loaded from YAML plus dotted CLI overrides.

    cfg = load_config("configs/mlm/tiny.yaml", ["--optim.lr=3e-4", "--max_steps=50"])

Every error (unknown key, wrong type, missing value, unreadable file) is a `ConfigError` whose message
names the file and key; the CLI prints it on one line and exits with code 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
MODEL_PRESETS = ("tiny", "mini", "small", "medium", "base", "large")  # models/build.py PRESETS
METRICS_FOR_BEST = ("macro_f1", "accuracy", "balanced_accuracy", "loss")
SPECIAL_TOKENS = 5  # [PAD] [UNK] [CLS] [SEP] [MASK] of a trained WordPiece


class ConfigError(ValueError):
    """A bad config: the message names the key (or file) and what is wrong."""


# ----------------------------------------------------------------------------- components
@dataclass
class SourceConfig:
    """One data source. `name: bbc_news` is the built-in BBC News corpus; otherwise `path` is a
    local file, directory or glob (text / jsonl / json / csv / parquet, picked by extension or `format`)."""

    name: str | None = None
    path: str | None = None
    format: str | None = None  # text | json | csv | parquet (default: from the extension)
    weight: float = 1.0  # sampling weight in a mix of several sources
    text_column: str = "text"
    id_column: str | None = None  # default: "<file>:<row>" (data/sources.py file_ids)
    # keep evaluation data out of pretraining: drop documents whose id is in this file (one id a line) …
    exclude_ids: str | None = None
    # … or in the validation/test splits of this classify config (e.g. the fine-tuning run that follows)
    exclude_splits_of: str | None = None


@dataclass
class LabelNoiseConfig:
    """Planted label noise for testing detectors (training split only; flips are a function of the id, so
    every rank, fold and rerun flips the same examples; the flipped ids go to `output_dir/noise.json`)."""

    rate: float = 0.0  # fraction of training examples whose label is flipped
    kind: str = "symmetric"  # symmetric (to a uniformly chosen other class) | pair (to the next class) |
    #                          class_conditional (a seeded noise matrix: per-class rates around `rate`)
    seed: int = 0


@dataclass
class SubsetConfig:
    """Train on a nested, stratified part of the training split (data/interventions.py): examples are
    ranked once per class by a hash of (seed, id) and interleaved across classes, so a smaller subset is
    always a prefix of — lies inside — a larger one, and every prefix keeps the class proportions."""

    fraction: float = 1.0  # of the training examples (1: all)
    count: int = 0  # > 0: this many training examples instead of `fraction`
    per_class: int = 0  # > 0: this many examples of each class (few-shot; classes with fewer keep all)
    seed: int | None = None  # default: the run's seed (each seed draws its own subset; variants pair by seed)


@dataclass
class ImbalanceConfig:
    """Subsample classes to a target imbalance ratio (largest class count / smallest)."""

    ratio: float = 1.0  # 1: off; e.g. 10 for 1:10
    profile: str = "step"  # step: the minority classes get n_max / ratio | exponential: a long tail
    minority: list[str] | None = None  # step: the classes made rare (default: the second half of the sorted names)
    seed: int = 0


@dataclass
class InjectConfig:
    """Copies injected into the training split: `duplicates` copies train examples (ids `ID#dupK`),
    `contamination` copies examples of `split` (ids `ID#leak`) — exact, or lightly edited (a seeded
    `edit_rate` of the words deleted, swapped or repeated)."""

    rate: float = 0.0  # duplicates: copies as a fraction of train; contamination: fraction of `split` copied
    kind: str = "exact"  # exact | edited
    edit_rate: float = 0.05
    split: str = "test"  # contamination: test | validation
    seed: int = 0


@dataclass
class FilterConfig:
    """Remove training examples before training: by ids (a file, one a line: counterfactual removal), a
    seeded random fraction (its control), or by an in-process audit of the splits as trained on
    (decontaminate: train examples any validation/test example leaks from; dedup: all but the first of
    every exact / near cluster; quality: any Gopher/C4 quality flag)."""

    exclude_ids: str | None = None
    random_fraction: float = 0.0
    seed: int | None = None  # random_fraction: default the run's seed
    decontaminate: bool = False
    dedup: bool = False
    quality: bool = False


@dataclass
class DataConfig:
    # --- MLM (streaming) ---
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig(name="bbc_news")])
    seq_len: int = 128  # packed sequence length (MLM)
    eval_fraction: float = 0.05  # documents held out (by a hash of their id) for the eval stream
    shuffle_buffer: int = 256  # packed sequences in the (checkpointed) shuffle buffer
    max_eval_batches: int = 0  # 0: the whole held-out stream
    shards: str | None = None  # a token-shard dir of `llm-dist prepare` to stream from (default: tokenize on the fly)
    document_mask: bool = False  # MLM: position ids restart per document, attention only within the document
    # --- classify (in memory) ---
    train: str | None = None  # file / dir; or use `sources` (first) and a stratified split
    validation: str | None = None
    test: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    id_column: str | None = None
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # train/validation/test
    split_seed: int | None = None  # seed of the stratified split (default: the run's seed)
    max_length: int = 128
    group_by_length: bool = True
    drop_last: bool = False  # drop each epoch's last partial global batch (default: keep every example)
    label_noise: LabelNoiseConfig = field(default_factory=LabelNoiseConfig)
    pad_to_max_length: bool = False  # the seed recipe's padding='max_length' (for comparison)
    truncation: str = "head"  # head | tail | head_tail (Sun et al. 2019: the first and the last tokens)
    head_fraction: float = 0.25  # head_tail: share of max_length given to the head
    # --- interventions on the training split (classify; data/interventions.py), applied in this order:
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    imbalance: ImbalanceConfig = field(default_factory=ImbalanceConfig)
    # (label_noise), then filter, duplicates, contamination; the audit filter last
    filter: FilterConfig = field(default_factory=FilterConfig)
    duplicates: InjectConfig = field(default_factory=InjectConfig)
    contamination: InjectConfig = field(default_factory=InjectConfig)
    audit: str | None = None  # audit.json: report test metrics on all and on the clean subset
    num_workers: int = 0


@dataclass
class TokenizerConfig:
    path: str | None = None  # a local tokenizer dir; default: the model dir, else train one
    vocab_size: int = 8192
    lowercase: bool = True
    train_documents: int = 0  # 0: all documents of the sources


@dataclass
class ModelConfig:
    preset: str | None = "tiny"  # tiny | mini | small | base | large (random init)
    path: str | None = None  # local pretrained dir, or pkg:PACKAGE/sub/path (overrides preset)
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False  # recompute activations in backward (HF, use_reentrant=False): less memory
    fast_dropout: bool = True  # CPU dropout masks from 64-bit random words (models/fast.py); off: torch's dropout
    cls_only_last_layer: bool = True  # classification: the last layer computes position 0 only (same logits)
    hidden_dropout: float | None = None
    attention_dropout: float | None = None


@dataclass
class MLMConfig:
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    whole_word_masking: bool = False
    segmenter: str = "auto"  # CJK words for whole_word_masking: jieba | chars | auto (jieba if installed, else chars)
    sparse_prediction: bool = True


@dataclass
class PeftConfig:
    method: str | None = None  # lora | adalora
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["query", "key", "value", "dense"])
    init_r: int = 12  # adalora
    target_r: int = 4  # adalora


# ----------------------------------------------------------------------------- augmentation, adversarial, prompts
AUGMENT_OPS = ("synonym", "insert", "swap", "delete")


@dataclass
class AugmentConfig:
    """On-the-fly training-set augmentation (llm_dist/data/augment/): `copies` augmented copies of each
    (targeted) training example, drawn afresh each epoch, seeded per (id, copy, epoch); originals kept.
    Copy j of example ID has the id `ID#augj`."""

    method: str | None = None  # eda (Wei & Zou 2019) | mlm (contextual replacement with an MLM)
    copies: int = 1  # augmented copies per example
    alpha: float = 0.1  # fraction of the words each copy changes (at least one)
    ops: list[str] = field(default_factory=lambda: list(AUGMENT_OPS))  # eda: one op per copy, drawn from these
    classes: list[str] | None = None  # class-targeted: augment only these labels …
    minority: bool = False  # … or only classes with fewer training examples than the mean per class
    mlm_path: str | None = None  # mlm: a masked-LM dir (our MLM final/, or any local one)
    top_k: int = 10  # mlm: sample a replacement among the k most likely tokens
    language: str = "auto"  # auto | en | zh (zh: words segmented with jieba)
    seed: int = 0


@dataclass
class AdversarialConfig:
    """Adversarial training on the input embeddings (training/steps.py). Norms are per example, over all
    of its token embeddings (L2)."""

    method: str | None = None  # fgm | pgd | freelb | smart
    epsilon: float = 1.0  # radius of the perturbation ball (fgm: the perturbation's norm)
    step_size: float = 0.3  # pgd / freelb / smart: the norm of each ascent step
    steps: int = 3  # pgd / freelb: ascent steps K; smart: ascent steps before the regulariser
    init: float = 0.0  # freelb: initial perturbation drawn uniformly in a ball of this radius (0: zero)
    smart_weight: float = 1.0  # smart: weight of the smoothness (symmetric KL) term
    smart_sigma: float = 1e-3  # smart: std of the random initial perturbation (per coordinate)


@dataclass
class RobustnessConfig:
    """Test accuracy under word-level perturbation (EDA ops at each rate) and under an embedding-space PGD
    attack at each epsilon, next to clean accuracy: `robustness.json` and run.json's `robustness`."""

    enabled: bool = False
    word_rates: list[float] = field(default_factory=lambda: [0.1, 0.2])
    ops: list[str] = field(default_factory=lambda: list(AUGMENT_OPS))
    epsilons: list[float] = field(default_factory=lambda: [0.5, 1.0])
    attack_steps: int = 3  # PGD steps of the embedding attack (step size 2.5·ε / steps)
    seed: int = 0


@dataclass
class PromptConfig:
    """`task: prompt`: PET-style classification with the MLM head (tasks/prompt.py). The pattern holds
    `{text}` and one `[MASK]` slot; the verbalizer maps each label to one or more words (a multi-token word
    fills as many [MASK]s and is scored by the mean log-probability of its tokens; a label scores as its
    best word). Zero-shot: `classify.epochs: 0`; few-shot: train through the pattern."""

    pattern: str = "{text} this is about [MASK] ."
    verbalizer: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class ClassifyConfig:
    epochs: float = 3.0  # used when max_steps is 0
    class_weights: str | None = None  # inverse | effective
    effective_beta: float = 0.999
    resample: bool = False  # class-balanced weighted resampling of the train set
    focal_gamma: float = 0.0  # > 0: focal loss
    logit_adjustment: float = 0.0  # tau > 0: add tau*log(prior) to train logits (Menon et al.)
    posthoc_logit_adjustment: float = 0.0  # tau > 0: subtract tau*log(prior) at prediction time
    metric_for_best: str = "macro_f1"
    early_stopping_patience: int = 0  # evals without improvement; 0: off
    report_every_epoch: bool = False
    peft: PeftConfig = field(default_factory=PeftConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    scheduler: str = "linear"  # linear | cosine | constant_with_warmup | constant | wsd
    warmup_steps: int = 0
    warmup_ratio: float = 0.06
    decay_ratio: float = 0.2  # wsd: fraction of steps spent decaying
    max_grad_norm: float = 1.0
    fused: bool = True  # fused / foreach AdamW where available


@dataclass
class TrackingConfig:
    report_to: str = "none"  # wandb | tensorboard | none (metrics.jsonl is always written)
    project: str = "llm_dist"
    run_name: str | None = None
    group: str | None = None  # W&B group (experiments: one group per experiment)
    peak_tflops: float = 0.0  # MFU denominator per device; 0: guess from the device
    progress: bool = True  # tqdm bar on the main process


@dataclass
class DeepSpeedConfig:
    config: str | None = None  # path to a DeepSpeed JSON (configs/deepspeed/*.json)


@dataclass
class DynamicsConfig:
    """The per-example training-dynamics ledger (classify; llm_dist/analysis/dynamics/): rows go to
    `output_dir/dynamics/`, `llm-dist analyze` turns them into data maps and mislabel scores."""

    enabled: bool = False
    # train: record every presentation from the training forward pass (no extra pass);
    # eval: also an eval-mode pass over the whole training set at each epoch end, which analyze then uses
    pass_: str = "train"  # the config key is `pass` (a Python keyword: stored as pass_)
    analyze: bool = True  # run `llm-dist analyze` at the end of the run (main process)


@dataclass
class RunConfig:
    task: str = "mlm"  # mlm | classify
    output_dir: str = "runs/demo"
    seed: int = 42
    max_steps: int = 200  # optimizer steps (classify: 0 = use classify.epochs)
    max_tokens: int = 0  # stop after this many tokens (all ranks); 0: off
    save_every: int | str = 0  # steps, or "epoch" (classify); 0: only at the end / on a signal
    eval_every: int | str = 0  # steps, or "epoch" (classify); 0: only at the end
    log_every: int = 10
    keep_checkpoints: int = 2
    on_nonfinite: str = "stop"  # stop | skip: a non-finite loss / gradient norm (training/nonfinite.py)
    max_nonfinite_skips: int = 3  # skip: consecutive skipped steps before the run stops
    resume: str = "auto"  # auto | never | PATH of a checkpoint dir
    overwrite: bool = False  # replace the run already in output_dir (its records are removed after validation)
    batch_size: int = 32  # per device micro-batch
    grad_accum: int = 1
    mixed_precision: str = "auto"  # auto (= the launcher's: accelerate config / --mixed_precision, else no) | no | bf16 | fp16
    compile: bool = False  # run the model under torch.compile (falls back to eager with a warning if it fails)
    compile_backend: str = "inductor"  # inductor | aot_eager | eager (torch._dynamo backends; tests use aot_eager)
    malloc_release: str = "auto"  # auto (= yes for ZeRO-3 without CUDA) | yes | no: glibc gives freed memory back (training/memory.py)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mlm: MLMConfig = field(default_factory=MLMConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    then: str | None = None  # a second config to run after this one (the demo: pretrain → classify)

    def validate(self) -> "RunConfig":
        from .tasks.base import task_names
        choices = {
            "task": tuple(task_names()),
            "mixed_precision": ("auto", "no", "bf16", "fp16"),
            "malloc_release": ("auto", "yes", "no"),
            "compile_backend": ("inductor", "aot_eager", "eager"),
            "on_nonfinite": ("stop", "skip"),
            "data.label_noise.kind": ("symmetric", "pair", "class_conditional"),
            "optim.scheduler": ("linear", "cosine", "constant_with_warmup", "constant", "wsd"),
            "tracking.report_to": ("wandb", "tensorboard", "none"),
            "classify.metric_for_best": METRICS_FOR_BEST,
            "dynamics.pass": ("train", "eval"),
            "data.truncation": ("head", "tail", "head_tail"),
            "data.imbalance.profile": ("step", "exponential"),
            "data.duplicates.kind": ("exact", "edited"),
            "data.contamination.kind": ("exact", "edited"),
            "data.contamination.split": ("test", "validation"),
        }
        for key, allowed in choices.items():
            value = _get(self, key)
            if value not in allowed:
                raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(allowed)}")
        if self.classify.class_weights not in (None, "inverse", "effective"):
            raise ConfigError(f"config key 'classify.class_weights': {self.classify.class_weights!r} is not one of inverse, effective")
        if self.classify.peft.method not in (None, "lora", "adalora"):
            raise ConfigError(f"config key 'classify.peft.method': {self.classify.peft.method!r} is not one of lora, adalora")
        positive = ["batch_size", "grad_accum", "log_every", "data.seq_len", "data.max_length", "max_nonfinite_skips"]
        for key in positive:
            if _get(self, key) < 1:
                raise ConfigError(f"config key '{key}': must be >= 1, got {_get(self, key)}")
        if not 0 < self.mlm.mlm_probability < 1:
            raise ConfigError(f"config key 'mlm.mlm_probability': must be in (0, 1), got {self.mlm.mlm_probability}")
        if self.task == "mlm" and self.max_steps < 1 and self.max_tokens < 1:
            raise ConfigError("config key 'max_steps': an MLM run needs max_steps >= 1 or max_tokens >= 1")
        if self.model.path is None and self.model.preset is None:
            raise ConfigError("config key 'model.preset': missing (or set model.path)")
        if self.model.path is None and self.model.preset not in MODEL_PRESETS:
            raise ConfigError(f"config key 'model.preset': unknown preset '{self.model.preset}' "
                              f"(one of {', '.join(MODEL_PRESETS)})")
        self._check_ranges()
        self._check_robustness_keys()
        for i, src in enumerate(self.data.sources):
            if (src.name is None) == (src.path is None):
                raise ConfigError(f"config key 'data.sources.{i}': give exactly one of 'name' or 'path'")
            if src.format not in (None, "text", "json", "csv", "parquet"):
                raise ConfigError(f"config key 'data.sources.{i}.format': {src.format!r} is not one of text, json, "
                                  "csv, parquet")
        return self

    def _check_ranges(self) -> None:
        """Every numeric key within its meaningful range (a NaN or an infinity is never one)."""
        def check(key: str, ok, want: str) -> None:
            value = _get(self, key)
            if value is None:
                return
            bad = isinstance(value, float) and not math.isfinite(value)
            if bad or not ok(value):
                raise ConfigError(f"config key '{key}': must be {want}, got {value}")

        ge0, gt0, ge1 = (lambda v: v >= 0), (lambda v: v > 0), (lambda v: v >= 1)
        unit = lambda v: 0 <= v <= 1  # noqa: E731
        below1 = lambda v: 0 <= v < 1  # noqa: E731
        for key in ("save_every", "eval_every"):
            value = _get(self, key)
            if isinstance(value, str) and (value != "epoch" or self.task == "mlm"):
                raise ConfigError(f"config key '{key}': {value!r} is not a number of steps"
                                  + (" or 'epoch'" if self.task != "mlm" else " (MLM streams have no epochs)"))
        for key in [k for k in ("save_every", "eval_every") if not isinstance(_get(self, k), str)] + [
                    "max_steps", "max_tokens", "data.shuffle_buffer",
                    "data.max_eval_batches", "data.num_workers", "tokenizer.train_documents", "classify.epochs",
                    "classify.focal_gamma", "classify.logit_adjustment", "classify.posthoc_logit_adjustment",
                    "classify.early_stopping_patience", "optim.weight_decay", "optim.warmup_steps",
                    "optim.max_grad_norm", "tracking.peak_tflops"]:
            check(key, ge0, ">= 0")
        for key in ("keep_checkpoints", "classify.peft.r", "classify.peft.init_r", "classify.peft.target_r"):
            check(key, ge1, ">= 1")
        check("seed", lambda v: 0 <= v < 2**32, "in [0, 2^32)")
        check("data.split_seed", lambda v: 0 <= v < 2**32, "in [0, 2^32)")
        check("optim.lr", gt0, "> 0")
        check("optim.eps", gt0, "> 0")
        check("classify.peft.alpha", gt0, "> 0")
        for key in ("optim.warmup_ratio", "optim.decay_ratio", "mlm.mask_replace_prob", "mlm.random_replace_prob"):
            check(key, unit, "in [0, 1]")
        if self.dynamics.enabled and self.task != "classify":
            raise ConfigError("config key 'dynamics.enabled': the training-dynamics ledger needs task: classify")
        for key in ("data.shards", "data.document_mask"):
            if _get(self, key) and self.task != "mlm":
                raise ConfigError(f"config key '{key}': token shards and document masks are for task: mlm")
        if self.data.label_noise.rate and self.task == "mlm":
            raise ConfigError("config key 'data.label_noise.rate': label noise needs a classification task")
        if self.task == "mlm":
            for key, off in (("data.subset.fraction", 1.0), ("data.subset.count", 0), ("data.subset.per_class", 0),
                             ("data.imbalance.ratio", 1.0), ("data.duplicates.rate", 0.0),
                             ("data.contamination.rate", 0.0), ("data.filter.random_fraction", 0.0),
                             ("data.filter.exclude_ids", None), ("data.filter.decontaminate", False),
                             ("data.filter.dedup", False), ("data.filter.quality", False),
                             ("data.truncation", "head")):
                if _get(self, key) != off:
                    raise ConfigError(f"config key '{key}': a training-data intervention needs task: classify "
                                      "(MLM scale: max_tokens)")
        check("data.subset.fraction", lambda v: 0 < v <= 1, "in (0, 1]")
        for key in ("data.subset.count", "data.subset.per_class"):
            check(key, ge0, ">= 0")
        check("data.subset.seed", lambda v: 0 <= v < 2**32, "in [0, 2^32)")
        check("data.imbalance.ratio", ge1, ">= 1")
        for key in ("data.duplicates.rate", "data.contamination.rate"):
            check(key, lambda v: 0 <= v <= 10, "in [0, 10]")
        for key in ("data.duplicates.edit_rate", "data.contamination.edit_rate", "data.head_fraction"):
            check(key, unit, "in [0, 1]")
        check("data.filter.random_fraction", below1, "in [0, 1)")
        for key in ("data.label_noise.rate", "data.eval_fraction", "classify.effective_beta", "classify.peft.dropout", "model.hidden_dropout",
                    "model.attention_dropout"):
            check(key, below1, "in [0, 1)")
        check("tokenizer.vocab_size", lambda v: v > SPECIAL_TOKENS,
              f"> {SPECIAL_TOKENS} (a trained tokenizer holds {SPECIAL_TOKENS} special tokens)")
        if self.mlm.mask_replace_prob + self.mlm.random_replace_prob > 1:
            raise ConfigError("config key 'mlm.random_replace_prob': mlm.mask_replace_prob + mlm.random_replace_prob "
                              f"must be <= 1, got {self.mlm.mask_replace_prob + self.mlm.random_replace_prob}")
        betas = self.optim.betas
        if len(betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"config key 'optim.betas': must be two numbers in [0, 1), got {betas}")
        split = self.data.split
        if not 1 <= len(split) <= 3 or not all(math.isfinite(f) and f >= 0 for f in split) or split[0] <= 0:
            raise ConfigError("config key 'data.split': must be 1 to 3 fractions >= 0 (train, validation, test) "
                              f"with train > 0, got {split}")
        if self.classify.peft.target_r > self.classify.peft.init_r:
            raise ConfigError(f"config key 'classify.peft.target_r': must be <= classify.peft.init_r "
                              f"({self.classify.peft.init_r}), got {self.classify.peft.target_r}")
        for i, src in enumerate(self.data.sources):
            if not (math.isfinite(src.weight) and src.weight > 0):
                raise ConfigError(f"config key 'data.sources.{i}.weight': must be > 0, got {src.weight}")


    def _check_robustness_keys(self) -> None:
        """classify.augment / classify.adversarial / classify.robustness / prompt (issue 15)."""
        c = self.classify
        choices = {"classify.augment.method": (None, "eda", "mlm"),
                   "classify.adversarial.method": (None, "fgm", "pgd", "freelb", "smart"),
                   "classify.augment.language": ("auto", "en", "zh")}
        for key, allowed in choices.items():
            if _get(self, key) not in allowed:
                raise ConfigError(f"config key '{key}': {_get(self, key)!r} is not one of "
                                  f"{', '.join(str(a) for a in allowed if a)}")
        for key in ("classify.augment.ops", "classify.robustness.ops"):
            bad = [o for o in _get(self, key) if o not in AUGMENT_OPS]
            if bad or not _get(self, key):
                raise ConfigError(f"config key '{key}': must be a non-empty list of {', '.join(AUGMENT_OPS)}, "
                                  f"got {_get(self, key)}")
        for key in ("classify.augment.copies", "classify.augment.top_k", "classify.adversarial.steps",
                    "classify.robustness.attack_steps"):
            if _get(self, key) < 1:
                raise ConfigError(f"config key '{key}': must be >= 1, got {_get(self, key)}")
        for key in ("classify.augment.alpha",):
            v = _get(self, key)
            if not (math.isfinite(v) and 0 < v <= 1):
                raise ConfigError(f"config key '{key}': must be in (0, 1], got {v}")
        for key in ("classify.adversarial.epsilon", "classify.adversarial.step_size",
                    "classify.adversarial.smart_sigma"):
            v = _get(self, key)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"config key '{key}': must be > 0, got {v}")
        for key in ("classify.adversarial.init", "classify.adversarial.smart_weight"):
            v = _get(self, key)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"config key '{key}': must be >= 0, got {v}")
        if c.adversarial.init > c.adversarial.epsilon:
            raise ConfigError(f"config key 'classify.adversarial.init': must be <= classify.adversarial.epsilon "
                              f"({c.adversarial.epsilon}), got {c.adversarial.init}")
        for r in c.robustness.word_rates:
            if not (math.isfinite(r) and 0 < r <= 1):
                raise ConfigError(f"config key 'classify.robustness.word_rates': each must be in (0, 1], got {r}")
        for e in c.robustness.epsilons:
            if not (math.isfinite(e) and e > 0):
                raise ConfigError(f"config key 'classify.robustness.epsilons': each must be > 0, got {e}")
        if c.adversarial.method and self.deepspeed.config:
            from .training.steps import DEEPSPEED_UNSUPPORTED

            raise ConfigError(DEEPSPEED_UNSUPPORTED)
        if c.augment.method == "mlm" and not c.augment.mlm_path:
            raise ConfigError("config key 'classify.augment.mlm_path': missing (augment.method: mlm needs an MLM dir)")
        if self.task == "prompt":
            p = self.prompt
            if p.pattern.count("[MASK]") != 1 or p.pattern.count("{text}") != 1:
                raise ConfigError(f"config key 'prompt.pattern': must hold exactly one {{text}} and one [MASK], "
                                  f"got {p.pattern!r}")
            if not isinstance(p.verbalizer, dict) or not p.verbalizer:
                raise ConfigError("config key 'prompt.verbalizer': missing (a mapping label -> word or list of words)")
            for label, words in p.verbalizer.items():
                words = [words] if isinstance(words, str) else words
                if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
                    raise ConfigError(f"config key 'prompt.verbalizer.{label}': must be a word or a list of words, "
                                      f"got {words!r}")
                p.verbalizer[label] = words

def _field(name: str) -> str:
    """The dataclass attribute of a config key: a Python keyword (`dynamics.pass`) is stored with a `_`."""
    return name + "_" if keyword.iskeyword(name) else name


def _key(attr: str) -> str:
    return attr[:-1] if attr.endswith("_") and keyword.iskeyword(attr[:-1]) else attr


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, _field(part))
    return obj


# ----------------------------------------------------------------------------- building from dicts
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert `value` to the annotated type `tp`; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return build(tp, value, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads no/off/yes/on as booleans: `mixed_precision: no`
            value = "yes" if value else "no"
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    return value


def build(cls: type, values: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    names = [_key(f.name) for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" (did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint}")
        kwargs[_field(key)] = _coerce(value, hints[_field(key)], full)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"config key '{'.'.join(parts[:i])}': not a section (cannot set '{dotted}')")
        if isinstance(node, list):
            idx = int(part) if part.isdigit() else len(node)
            if idx >= len(node):
                raise ConfigError(f"config key '{'.'.join(parts[:i + 1])}': index {idx} out of range")
            node = node[idx]
            continue
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        node = nxt
    last = parts[-1]
    if not isinstance(node, (dict, list)):
        raise ConfigError(f"config key '{'.'.join(parts[:-1])}': not a section (cannot set '{dotted}')")
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"config key '{dotted}': index {last} out of range")
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    out = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}' (overrides look like --key=value)")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, raw = body, args[i + 1]
            i += 1
        else:
            raise ConfigError(f"config key '{body}': missing value (use --{body}=VALUE)")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        out.append((key.replace("-", "_") if key.count(".") == 0 else key, value))
        i += 1
    return out


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {_key(f.name): _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    return value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """YAML file (default: the embedded demo) + `--dotted.key=value` overrides → validated RunConfig.

    An error about a key names where the key was set: `FILE:LINE:` for a key in the file (1-based),
    `(from --KEY)` for an override, `FILE:` for a default."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not valid UTF-8"
        raise ConfigError(f"{path}: cannot read config ({why})") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        line = _yaml_error_line(e, text)
        where = f":{line}" if line else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys")
    lines = _key_lines(text)
    # Start from the defaults so overrides can reach into nested defaults (e.g. data.sources.0.weight).
    tree = _to_plain(RunConfig())
    _merge(tree, raw)
    overridden: list[str] = []
    for key, value in parse_overrides(overrides or []):
        _check_key(key)
        _set_dotted(tree, key, value)
        overridden.append(key)
    try:
        return resolve_assets(build(RunConfig, tree)).validate()
    except ConfigError as e:
        raise ConfigError(_locate(str(e), path, lines, overridden)) from None


# path-valued keys where `pkg:PACKAGE/sub/path` names a file or folder inside an installed package
PATH_KEYS = ("model.path", "tokenizer.path", "classify.augment.mlm_path", "data.train", "data.validation", "data.test",
             "data.audit", "data.filter.exclude_ids",
             "deepspeed.config", "then")
SOURCE_PATH_KEYS = ("path", "exclude_ids", "exclude_splits_of")


def resolve_assets(cfg: RunConfig) -> RunConfig:
    """Replace every `pkg:` reference in a path-valued key by the real path (llm_dist/assets.py), so each
    consumer sees a plain path; a reference that does not resolve is a ConfigError naming the key."""
    from .assets import AssetError, is_asset_ref, resolve_asset

    def fix(obj: Any, attr: str, key: str) -> None:
        value = getattr(obj, attr)
        if is_asset_ref(value):
            try:
                setattr(obj, attr, resolve_asset(value))
            except AssetError as e:
                raise ConfigError(f"config key '{key}': {e}") from None

    for key in PATH_KEYS:
        *parents, attr = key.split(".")
        fix(_get(cfg, ".".join(parents)) if parents else cfg, attr, key)
    for i, src in enumerate(cfg.data.sources):
        for attr in SOURCE_PATH_KEYS:
            fix(src, attr, f"data.sources.{i}.{attr}")
    return cfg


def _yaml_error_line(e: yaml.YAMLError, text: str) -> int | None:
    """The 1-based line of a YAML error. The parser often notices a problem only at the next token — past
    the end of the file for an unclosed bracket or quote — so a mark beyond the last line with content
    points at what was left open (the error's context) or at that last line."""
    mark = getattr(e, "problem_mark", None)
    if mark is None:
        return None
    filled = [i for i, line in enumerate(text.splitlines()) if line.strip()]
    last = filled[-1] if filled else 0
    line = mark.line
    if line > last:
        ctx = getattr(e, "context_mark", None)
        line = ctx.line if ctx is not None and ctx.line <= last else last
    return line + 1


def _key_lines(text: str) -> dict[str, int]:
    """dotted key → 1-based line where the YAML file sets it (list items by index: data.sources.0)."""
    out: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                out.setdefault(key, k.start_mark.line + 1)
                walk(v, key + ".")
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                out.setdefault(f"{prefix}{i}", item.start_mark.line + 1)
                walk(item, f"{prefix}{i}.")

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    except yaml.YAMLError:
        pass
    return out


def _locate(message: str, path: Path, lines: dict[str, int], overridden: list[str]) -> str:
    """Prefix a config error with where its key was set (see load_config)."""
    m = re.search(r"config key '([^']+)'", message)
    if m is None:
        return f"{path}: {message}"
    key = m.group(1)
    for ov in reversed(overridden):  # the last override of a key wins
        if ov == key or ov.startswith(key + ".") or key.startswith(ov + "."):
            return f"{message} (from --{ov})"
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        line = lines.get(".".join(parts[:n]))
        if line is not None:
            return f"{path}:{line}: {message}"
    return f"{path}: {message}"


def _merge(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def _check_key(dotted: str) -> None:
    """Reject an override naming an unknown key before it is merged (so the message names it)."""
    cls: Any = RunConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if cls is None:
            return
        if part.isdigit():
            continue
        hints = {_key(k): v for k, v in typing.get_type_hints(cls).items()}
        if part not in hints:
            prefix = ".".join(parts[:i])
            close = difflib.get_close_matches(part, list(hints), n=1, cutoff=0.5)
            hint = f" (did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{dotted}'{hint}")
        tp = hints[part]
        cls = None
        for cand in (tp, *typing.get_args(tp), *[a for t in typing.get_args(tp) for a in typing.get_args(t)]):
            if dataclasses.is_dataclass(cand):
                cls = cand
                break


def to_dict(cfg: RunConfig) -> dict:
    return _to_plain(cfg)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a record whole or not at all: a temp file beside it, then rename over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
