"""Contextual replacement with a masked LM (Kobayashi 2018; the `ContextualWordEmbsAug` idea of nlpaug, which
runs one sentence at a time): n = max(1, round(alpha · words)) words of each text are replaced by one
[MASK] each, ONE batched forward of the MLM (our `final/` or any local masked-LM dir) on the device scores
all slots of all texts, and each slot gets a whole-word token sampled from its `top_k` most likely ones
(word pieces `##…`, special tokens and the original word excluded). Which words, and which replacement, are
drawn from `augment_seed(seed, id, copy, epoch)`, so a copy is a function of the example, the copy and the
epoch (the model being fixed). Only words inside the first `max_length` tokens are candidates. Chinese text
is segmented with jieba; a multi-character word is replaced by one sampled token (often one character)."""
from __future__ import annotations

import numpy as np
import torch

from .eda import _core, _replace_core, augment_seed, split_words


class MLMAugmenter:
    def __init__(self, path: str, device, top_k: int = 10, alpha: float = 0.1, seed: int = 0,
                 language: str = "auto", max_length: int = 128):
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForMaskedLM.from_pretrained(path).to(device).eval()
        self.device, self.top_k, self.alpha, self.seed = device, top_k, alpha, seed
        self.language, self.max_length = language, max_length
        vocab = self.tok.convert_ids_to_tokens(list(range(len(self.tok))))
        bad = set(self.tok.all_special_ids)
        self.allowed = torch.tensor([i not in bad and not t.startswith("##") and any(ch.isalnum() for ch in t)
                                     for i, t in enumerate(vocab)], device=device)

    @torch.no_grad()
    def __call__(self, items: list[tuple[str, str, int, int]]) -> list[str]:
        """Augmented texts of (text, id, copy, epoch) items, in one batched MLM forward."""
        if not items:
            return []
        plans = []
        for text, ex_id, copy, epoch in items:
            words, joiner = split_words(text, self.language)
            rng = augment_seed(self.seed, ex_id, copy, epoch)
            if not words:
                plans.append((words, joiner, [], rng))
                continue
            fit = self.tok(words, is_split_into_words=True, truncation=True, max_length=self.max_length).word_ids()
            limit = max([w for w in fit if w is not None], default=-1) + 1
            cand = [i for i in range(limit) if _core(words[i])]
            n = min(len(cand), max(1, int(round(self.alpha * len(words)))))
            chosen = sorted(rng.choice(cand, size=n, replace=False).tolist()) if n else []
            plans.append((words, joiner, chosen, rng))
        masked = [[self.tok.mask_token if i in set(ch) else w for i, w in enumerate(words)] or [""]
                  for words, _, ch, _ in plans]
        enc = self.tok(masked, is_split_into_words=True, truncation=True, max_length=self.max_length, padding=True,
                       return_tensors="pt").to(self.device)
        logits = self.model(**enc).logits.float()
        logits[..., ~self.allowed] = -torch.inf
        out = []
        for b, (words, joiner, chosen, rng) in enumerate(plans):
            pos = (enc["input_ids"][b] == self.tok.mask_token_id).nonzero().flatten().tolist()
            words = list(words)
            for wi, p in zip(chosen, pos):
                orig = self.tok.convert_tokens_to_ids(self.tok.tokenize(_core(words[wi]).lower())[:1] or ["[UNK]"])
                lg = logits[b, p].clone()
                if isinstance(orig, int):
                    lg[orig] = -torch.inf
                top = torch.topk(lg, self.top_k)
                probs = torch.softmax(top.values, -1).cpu().numpy().astype(np.float64)
                pick = int(top.indices[int(rng.choice(len(probs), p=probs / probs.sum()))])
                new = self.tok.convert_tokens_to_string([self.tok.convert_ids_to_tokens(pick)]).strip()
                words[wi] = _replace_core(words[wi], new) if joiner else new
            out.append(joiner.join(words))
        return out
