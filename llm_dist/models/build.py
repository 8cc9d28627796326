"""Models and tokenizers: named BERT presets (random init), local pretrained dirs, WordPiece training,
and the sparse MLM head (the vocabulary projection runs only on masked positions)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer, BertConfig, PreTrainedTokenizerFast

from ..config import MODEL_PRESETS, ModelConfig, RunConfig, TokenizerConfig

PRESETS = {  # hidden, layers, heads, intermediate
    "tiny": (128, 2, 2, 512),
    "mini": (256, 4, 4, 1024),
    "small": (512, 4, 8, 2048),
    "medium": (512, 8, 8, 2048),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
}
assert tuple(PRESETS) == MODEL_PRESETS  # config.py validates preset names without importing torch


class ModelError(ValueError):
    """A model dir or tokenizer that cannot be used: the message names the dir and the problem."""


# ----------------------------------------------------------------------------- tokenizer
def train_wordpiece(texts, vocab_size: int, lowercase: bool = True) -> PreTrainedTokenizerFast:
    """Train a BERT WordPiece tokenizer with `tokenizers` and wrap it for transformers.

    Chinese is handled as BERT does (`handle_chinese_chars`): the normalizer puts spaces around every CJK
    ideograph, so each is a word of its own (the vocabulary holds single characters, never merged runs of
    them), while spaced scripts keep their sub-words (`token`, `##izer`); a mixed text gets both. Every
    character seen in training is in the alphabet (no `limit_alphabet`), so unknown tokens come only from
    characters the training texts never had: `vocab_report` measures it per script."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special, min_frequency=2)
    tok.train_from_iterator(texts, trainer=trainer)
    # The trainer breaks frequency ties in hash order, so ids differ between processes: renumber the
    # vocabulary canonically. The learned *set* can differ too (a tie between merges picks different
    # sub-words: ~17 of 209 entries on the influence test's corpus, stop 21), so two processes training
    # on the same corpus get the same tokenizer only up to those ties; tests that need bit-equal runs
    # train the tokenizer once and share it (conftest `tokenizer_dir`) or use a fixed vocabulary.
    learned = tok.get_vocab()
    order = special + sorted(t for t in learned if t not in special)
    tok.model = models.WordPiece(vocab={t: i for i, t in enumerate(order)}, unk_token="[UNK]")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=512,
    )


def vocab_report(tokenizer, texts) -> dict:
    """Vocabulary and coverage by script (cjk / latin / digit / other, `llm_dist.analysis.audit.text`):
    how many vocabulary entries each script has (by the first character after a `##`), and over `texts` how
    many tokens each script's characters became and how many of those are the unknown token (its rate).
    Needs a fast tokenizer (offsets)."""
    from ..analysis.audit.text import SCRIPTS, coverage_counts, script_of

    vocab = {sc: 0 for sc in SCRIPTS}
    special = set(tokenizer.all_special_tokens)
    for t in tokenizer.get_vocab():
        if t in special:
            continue
        body = t[2:] if t.startswith("##") and len(t) > 2 else t
        vocab[script_of(body[0])] += 1
    unk = tokenizer.unk_token_id
    special_ids = set(tokenizer.all_special_ids) - {unk}
    totals = {sc: [0, 0] for sc in SCRIPTS}
    docs = 0
    backend = tokenizer.backend_tokenizer
    batch: list[str] = []

    def flush():
        for text, enc in zip(batch, backend.encode_batch(batch)):
            for sc, (n, u) in coverage_counts(text, enc.ids, enc.offsets, unk, special_ids).items():
                totals[sc][0] += n
                totals[sc][1] += u
        batch.clear()

    for text in texts:
        batch.append(text)
        docs += 1
        if len(batch) == 256:
            flush()
    if batch:
        flush()
    return {"vocab_size": len(tokenizer), "vocab_by_script": vocab, "documents": docs,
            "coverage": {sc: {"tokens": n, "unknown": u, "unknown_rate": round(u / n, 6) if n else None}
                         for sc, (n, u) in totals.items()}}


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    p = Path(path)
    if not p.is_dir():
        raise ModelError(f"{path}: tokenizer dir not found")
    try:
        return AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # noqa: BLE001 - report any loader failure on one line
        raise ModelError(f"{path}: cannot load a tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def tokenizer_source(cfg: RunConfig) -> tuple[str | None, str | None]:
    """Where a run's tokenizer comes from, the one rule everything uses (training, start-up checks, the
    audit): (dir, config key) — `tokenizer.path`, else the model dir (`model.path`), else (None, None):
    a WordPiece trained on the training texts into `output_dir/tokenizer`."""
    if cfg.tokenizer.path:
        return cfg.tokenizer.path, "tokenizer.path"
    if cfg.model.path:
        return cfg.model.path, "model.path"
    return None, None


def get_tokenizer(cfg: RunConfig, accelerator, texts_fn) -> PreTrainedTokenizerFast:
    """The run's tokenizer (`tokenizer_source`); a trained one is trained by the main process and saved
    under `output_dir/tokenizer` (others wait, then load it)."""
    tcfg: TokenizerConfig = cfg.tokenizer
    path, _ = tokenizer_source(cfg)
    if path:
        return load_tokenizer(path)
    out = Path(cfg.output_dir) / "tokenizer"
    if accelerator.is_main_process and not (out / "tokenizer.json").exists():
        print(f"training a WordPiece tokenizer (vocab {tcfg.vocab_size}) on the training texts", flush=True)
        tok = train_wordpiece(texts_fn(tcfg.train_documents), tcfg.vocab_size, tcfg.lowercase)
        tmp = out.with_name("tokenizer.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        tok.save_pretrained(str(tmp))
        # vocabulary by script + unknown-token rate per script on (up to 2,000 of) the training texts; the
        # audit (`llm-dist audit CONFIG`) gives the same per split, held-out splits included
        report = vocab_report(tok, texts_fn(min(tcfg.train_documents or 2000, 2000)))
        (tmp / "vocab_report.json").write_text(json.dumps(report, indent=1))
        os.replace(tmp, out)
    accelerator.wait_for_everyone()
    return load_tokenizer(str(out))


# ----------------------------------------------------------------------------- model configs
def preset_config(name: str, tokenizer, mcfg: ModelConfig, max_position: int = 512) -> BertConfig:
    if name not in PRESETS:
        raise ModelError(f"config key 'model.preset': unknown preset '{name}' (one of {', '.join(PRESETS)})")
    hidden, layers, heads, inter = PRESETS[name]
    return BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=inter, max_position_embeddings=max_position, pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=0.1 if mcfg.hidden_dropout is None else mcfg.hidden_dropout,
        attention_probs_dropout_prob=0.1 if mcfg.attention_dropout is None else mcfg.attention_dropout,
    )


def check_model_dir(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise ModelError(f"config key 'model.path': {path}: model dir not found")
    if not (p / "config.json").exists():
        raise ModelError(f"{path}: not a model dir (no config.json)")
    weights = [f for f in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                           "pytorch_model.bin.index.json") if (p / f).exists()]
    if not weights:
        raise ModelError(f"{path}: model dir has no weights (model.safetensors or pytorch_model.bin)")


# models whose position ids start after the padding index (position embeddings hold pad_token_id + 1 more rows)
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer",
                     "bart", "mbart")


def max_positions(model_config) -> int | None:
    """How many token positions a model config can embed (None: no learned limit)."""
    n = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(n, int) or n <= 0:
        return None
    if getattr(model_config, "model_type", None) in _OFFSET_POSITIONS:
        n -= (getattr(model_config, "pad_token_id", None) or 0) + 1
    return n


def check_positions(model_config, length: int, key: str, where: str) -> None:
    limit = max_positions(model_config)
    if limit is not None and length > limit:
        raise ModelError(f"config key '{key}': {length} is more than the model's {limit} positions "
                         f"({where}: max_position_embeddings)")


def check_vocab(model_config, tokenizer, where: str) -> None:
    if len(tokenizer) > model_config.vocab_size:
        raise ModelError(
            f"{where}: tokenizer has {len(tokenizer)} tokens but the model's embeddings have "
            f"{model_config.vocab_size} rows (config key 'tokenizer.path' does not match the model)"
        )


def apply_dropout(config, mcfg: ModelConfig):
    if mcfg.hidden_dropout is not None and hasattr(config, "hidden_dropout_prob"):
        config.hidden_dropout_prob = mcfg.hidden_dropout
    if mcfg.attention_dropout is not None and hasattr(config, "attention_probs_dropout_prob"):
        config.attention_probs_dropout_prob = mcfg.attention_dropout
    return config


# ----------------------------------------------------------------------------- MLM with a sparse head
class SparseMLM(nn.Module):
    """Wraps an `AutoModelForMaskedLM`. With `sparse=True` the encoder runs on every token but the MLM
    head (transform + vocabulary projection) only on masked positions, as in cramming /
    academic-budget-bert; the summed loss equals the dense head's on the same batch."""

    def __init__(self, hf_model: nn.Module, sparse: bool = True):
        super().__init__()
        self.hf = hf_model
        self.sparse = sparse and self.head is not None
        self.config = hf_model.config

    @property
    def head(self):  # not a registered submodule: the parameters stay under `hf.` only
        return getattr(self.hf, "cls", None) or getattr(self.hf, "lm_head", None)

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None, per_example: bool = False,
                position_ids=None):
        """(summed loss over masked tokens, masked-token count, correct predictions)[, each sequence's summed
        loss when `per_example` — a scatter-add on the device, no extra pass]."""
        sel = labels != -100
        if self.sparse:
            base = self.hf.base_model
            kwargs = {"attention_mask": attention_mask}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            if position_ids is not None:
                kwargs["position_ids"] = position_ids
            hidden = base(input_ids=input_ids, **kwargs).last_hidden_state
            logits = self.head(hidden[sel])
            target = labels[sel]
        else:
            logits = self.hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
            target = labels[sel]
            logits = logits[sel]
        token_loss = F.cross_entropy(logits.float(), target, reduction="none")
        correct = (logits.argmax(-1) == target).sum()
        if not per_example:
            return token_loss.sum(), sel.sum(), correct
        rows = sel.nonzero(as_tuple=True)[0]
        per_seq = torch.zeros(labels.shape[0], dtype=token_loss.dtype, device=token_loss.device)
        per_seq.index_add_(0, rows, token_loss.detach())
        return token_loss.sum(), sel.sum(), correct, per_seq


def build_mlm_model(cfg: RunConfig, tokenizer) -> SparseMLM:
    mcfg = cfg.model
    if mcfg.path:
        check_model_dir(mcfg.path)
        config = apply_dropout(AutoConfig.from_pretrained(mcfg.path), mcfg)
        check_vocab(config, tokenizer, mcfg.path)
        hf = AutoModelForMaskedLM.from_pretrained(mcfg.path, config=config, attn_implementation=mcfg.attn_implementation)
    else:
        config = preset_config(mcfg.preset, tokenizer, mcfg, max_position=max(512, cfg.data.seq_len))
        hf = AutoModelForMaskedLM.from_config(config, attn_implementation=mcfg.attn_implementation)
    return SparseMLM(hf, sparse=cfg.mlm.sparse_prediction)


def flops_per_token(config, seq_len: int, masked_fraction: float = 1.0, sparse: bool = False,
                    head_params: int | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward, 2 FLOPs per MAC), counting the
    encoder's matmuls, attention scores over `seq_len`, and the head: the MLM vocabulary head by default
    (on the masked fraction only when `sparse`), or `head_params` weights per token (classification)."""
    h, L = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", 4 * h)
    per_layer = 4 * h * h + 2 * h * inter + 2 * seq_len * h  # qkv+o, mlp, scores+values
    head = h * h + h * config.vocab_size if head_params is None else head_params
    head_frac = masked_fraction if sparse and head_params is None else 1.0
    return 6.0 * (L * per_layer + head * head_frac)
