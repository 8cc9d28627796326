"""`task: prompt` — PET-style classification with the masked-LM head (Schick & Schütze 2021).

Each example becomes the pattern (`prompt.pattern`, e.g. "{text} this is about [MASK] .") with its text in
the `{text}` slot (the text is truncated so the pattern always fits `data.max_length`). A verbalizer maps
every label to one or more words; a word of m word pieces fills m [MASK]s and scores by the mean
log-probability of its pieces at them; a label scores as its best word. Those label scores are the
"logits": zero-shot is `classify.epochs: 0` (score with no training), few-shot fine-tunes the whole MLM with
cross-entropy over the label scores (PET's loss) on whatever training split the run has (select k examples
per class with the data options; this task does not sample). Everything else — splits, batches that do not
depend on the world size, exact distributed evaluation, predictions.jsonl, reports, the adversarial step
strategies (single-piece label words only: one input shape per example) and the robustness evaluation —
is the classification task's (this class extends it). `model.path` is our MLM `final/` dir or any local
masked-LM dir; its tokenizer is used. `final/` is the fine-tuned MLM (`AutoModelForMaskedLM`) plus
`prompt.json` (pattern, verbalizer)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError, RunConfig, write_text_atomic
from ..data.classify import Collate
from ..data.sources import DataError
from ..models.build import ModelError, apply_dropout, check_model_dir, check_vocab, preset_config
from .base import register
from .classify.task import ClassifyTask


class PromptMLM(nn.Module):
    """A masked LM that returns the MLM head's output at given positions only (the vocabulary projection
    runs on the [MASK] slots, not on every token). Wrapping it keeps every forward inside DDP's."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf
        self.config = hf.config

    def get_input_embeddings(self):
        return self.hf.get_input_embeddings()

    @property
    def head(self):
        return getattr(self.hf, "cls", None) or getattr(self.hf, "lm_head", None)

    def forward(self, input_ids, attention_mask, token_type_ids, positions):
        """(B, m, vocab) log-probabilities at `positions` (B, m)."""
        head = self.head
        if head is None:  # an MLM without a separate head module: the full logits, then pick
            logits = self.hf(input_ids=input_ids, attention_mask=attention_mask).logits
            sel = logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))
        else:
            kwargs = {"attention_mask": attention_mask}
            if getattr(self.config, "type_vocab_size", 0):
                kwargs["token_type_ids"] = token_type_ids
            hidden = self.hf.base_model(input_ids=input_ids, **kwargs).last_hidden_state
            sel = head(hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1])))
        return torch.log_softmax(sel.float(), dim=-1)


class PromptCollate(Collate):
    def __call__(self, indices) -> dict:
        b = super().__call__(indices)
        b["mask_pos"] = torch.tensor([self.split["mask_pos"][i] for i in b["idx"].tolist()])
        return b


@register("prompt")
class PromptTask(ClassifyTask):
    def __init__(self, cfg: RunConfig, accelerator, checked=None):
        if cfg.classify.augment.method:
            raise ConfigError("config key 'classify.augment.method': augmentation is not supported with task: prompt "
                              "(augmented texts would bypass the pattern)")
        if cfg.classify.peft.method:
            raise ConfigError("config key 'classify.peft.method': PEFT is not supported with task: prompt")
        super().__init__(cfg, accelerator, checked)

    # --- pattern and verbalizer ---------------------------------------------------------------------
    def _setup_prompt(self):
        if getattr(self, "_segments", None) is not None:
            return
        tok, p = self.tokenizer, self.cfg.prompt
        if tok.mask_token_id is None:
            raise ModelError("the tokenizer has no [MASK] token: task: prompt needs a masked-LM tokenizer")
        missing = [n for n in self.names if n not in p.verbalizer]
        if missing:
            raise DataError(f"config key 'prompt.verbalizer': no label words for {missing} "
                            f"(labels: {', '.join(self.names)})")
        # pattern → [("text"), ("mask"), [ids], …]
        segs = []
        for part in p.pattern.split("{text}"):
            for k, piece in enumerate(part.split("[MASK]")):
                if k:
                    segs.append("mask")
                if piece.strip():
                    segs.append(tok(piece.strip(), add_special_tokens=False)["input_ids"])
            segs.append("text")
        self._segments = segs[:-1]
        words = []  # (label index, piece ids)
        for li, name in enumerate(self.names):
            for w in p.verbalizer[name]:
                ids = tok(w.strip(), add_special_tokens=False)["input_ids"]
                if not ids or tok.unk_token_id in ids:
                    raise DataError(f"config key 'prompt.verbalizer.{name}': the word {w!r} is not in the "
                                    f"tokenizer's vocabulary (pieces: {tok.convert_ids_to_tokens(ids)})")
                words.append((li, tuple(ids)))
        self.label_words = words
        self.mask_counts = sorted({len(ids) for _, ids in words})

    def tokenize_split(self, ds) -> dict:
        """The pattern around each (truncated) text, with one [MASK] (expanded to m at forward time)."""
        self._setup_prompt()
        tok, L = self.tokenizer, self.cfg.data.max_length
        fixed = sum(len(s) for s in self._segments if isinstance(s, list)) + 2 + max(self.mask_counts)
        budget = L - fixed
        if budget < 1:
            raise ConfigError(f"config key 'data.max_length': {L} leaves no room for the text in the pattern "
                              f"({fixed} tokens)")
        texts = tok(list(ds["text"]), add_special_tokens=False, truncation=True, max_length=budget)["input_ids"]
        ids, pos = [], []
        for t in texts:
            seq = [tok.cls_token_id]
            for s in self._segments:
                if s == "text":
                    seq += t
                elif s == "mask":
                    pos.append(len(seq))
                    seq.append(tok.mask_token_id)
                else:
                    seq += s
            ids.append(seq + [tok.sep_token_id])
        return {"input_ids": ids, "token_type_ids": [[0] * len(s) for s in ids], "mask_pos": pos,
                "labels": [self.label2id[x] for x in ds["label"]], "ids": list(ds["id"]),
                "lengths": [len(s) for s in ids]}

    def make_collate(self, data: dict):
        d = self.cfg.data
        return PromptCollate(data, self.tokenizer.pad_token_id, d.max_length if d.pad_to_max_length else None)

    def build_model(self):
        m = self.cfg.model
        from transformers import AutoConfig, AutoModelForMaskedLM

        if m.path:
            check_model_dir(m.path)
            config = apply_dropout(AutoConfig.from_pretrained(m.path), m)
            check_vocab(config, self.tokenizer, m.path)
            try:
                hf, info = AutoModelForMaskedLM.from_pretrained(m.path, config=config, output_loading_info=True,
                                                                attn_implementation=m.attn_implementation)
            except (OSError, ValueError) as e:
                raise ModelError(f"{m.path}: cannot load a masked LM ({str(e).splitlines()[0]})") from None
            head_missing = [k for k in info.get("missing_keys", []) if "cls." in k or "lm_head" in k]
            if head_missing and self.acc.is_main_process:
                print(f"warning: {m.path} has no trained MLM head ({len(head_missing)} head weights newly "
                      "initialised): zero-shot prompt scores are meaningless until it is trained", flush=True)
        else:
            config = preset_config(m.preset, self.tokenizer, m, max_position=max(512, self.cfg.data.max_length))
            hf = AutoModelForMaskedLM.from_config(config, attn_implementation=m.attn_implementation)
        return PromptMLM(hf)

    # --- label scores ---------------------------------------------------------------------------------
    def _forward(self, model, batch):
        """(B, labels): each label's best word, a word scored by the mean log-probability of its pieces."""
        ids, am, tt, pos = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["mask_pos"]
        B = ids.shape[0]
        best: list = [None] * len(self.names)  # no in-place writes: the scores keep their graph
        for m in self.mask_counts:
            if m == 1:
                x, a, t = ids, am, tt
            else:  # m − 1 more [MASK]s right after the slot
                extra = torch.full((B, m - 1), self.tokenizer.mask_token_id, dtype=ids.dtype, device=ids.device)
                rows = [torch.cat([ids[r, :pos[r] + 1], extra[r], ids[r, pos[r] + 1:]]) for r in range(B)]
                x = torch.stack(rows)
                a = torch.stack([torch.cat([am[r, :pos[r] + 1], torch.ones_like(extra[r]), am[r, pos[r] + 1:]])
                                 for r in range(B)])
                t = torch.zeros_like(x)
            positions = pos[:, None] + torch.arange(m, device=ids.device)[None]
            logp = model(input_ids=x, attention_mask=a, token_type_ids=t, positions=positions)  # (B, m, V)
            for li, pieces in self.label_words:
                if len(pieces) != m:
                    continue
                idx = torch.tensor(pieces, device=ids.device)
                s = logp[:, torch.arange(m, device=ids.device), idx].mean(-1)
                best[li] = s if best[li] is None else torch.maximum(best[li], s)
        return torch.stack(best, dim=1)

    def flops_per_token(self) -> float:
        """The encoder per token plus the vocabulary head on the [MASK] slots only, spread over the
        `data.max_length` positions of an example (an estimate for MFU, like the classifier's)."""
        from ..models.build import flops_per_token

        c = self.model.config
        head = (c.hidden_size * (c.hidden_size + c.vocab_size) * sum(self.mask_counts)) // self.cfg.data.max_length
        return flops_per_token(c, self.cfg.data.max_length, head_params=max(head, 1))

    # --- export ---------------------------------------------------------------------------------------
    def save_final(self, model, state_dict: dict | None, out: Path) -> None:
        """`final/`: the MLM (`AutoModelForMaskedLM.from_pretrained` loads it), its tokenizer, prompt.json."""
        if state_dict is not None:
            state_dict = {k[len("hf."):]: v for k, v in state_dict.items() if k.startswith("hf.")}
        model.hf.save_pretrained(str(out), state_dict=state_dict, safe_serialization=True)
        self.tokenizer.save_pretrained(str(out))
        p = self.cfg.prompt
        write_text_atomic(Path(out) / "prompt.json", json.dumps({"pattern": p.pattern, "verbalizer": p.verbalizer,
                                                                 "labels": self.names}, indent=1))
