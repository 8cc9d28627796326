"""Small data files and a planted toy masked LM shared by the augmentation / adversarial / prompt tests."""
from __future__ import annotations

import json
import random
from pathlib import Path

FRUIT = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"]
VEHICLE = ["car", "truck", "bus", "train", "bike", "boat", "plane", "van"]


def write_bbc_subset(d: Path, sizes=(96, 32, 32), words: int = 60) -> Path:
    """train/validation/test JSONL (id, text, label) from a seeded sample of BBC News, texts cut short."""
    from llm_dist.data.sources import bbc_news_records

    recs = list(bbc_news_records())
    random.Random(0).shuffle(recs)
    d.mkdir(parents=True, exist_ok=True)
    start = 0
    for name, n in zip(("train", "validation", "test"), sizes):
        part = recs[start:start + n]
        start += n
        (d / f"{name}.jsonl").write_text("".join(
            json.dumps({"id": r["id"], "text": " ".join(r["text"].split()[:words]), "label": r["label"]}) + "\n"
            for r in part))
    return d


def write_toy_task(d: Path, sizes=(32, 16, 40)) -> Path:
    """Label f: three fruit words; label v: three vehicle words (chance: 0.5)."""
    rng = random.Random(1)
    d.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "validation", "test"), sizes):
        rows = []
        for k in range(n):
            lab = "f" if k % 2 == 0 else "v"
            rows.append({"id": f"{split}/{k}", "text": " ".join(rng.sample(FRUIT if lab == "f" else VEHICLE, 3)),
                         "label": lab})
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def toy_mlm(out: Path, steps: int = 150) -> Path:
    """A tiny BERT MLM pretrained (seconds) on a planted corpus "<3 fruit words> this is about fruit ." /
    "<3 vehicle words> this is about vehicle .", saved as a `save_pretrained` dir with its WordPiece
    tokenizer (the layout of our MLM `final/`). The class tag is masked more often than other tokens."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from llm_dist.models.build import train_wordpiece

    rng = random.Random(0)
    corpus = [" ".join(rng.sample(w, 3)) + f" this is about {tag} ." for w, tag in
              [(FRUIT, "fruit")] * 200 + [(VEHICLE, "vehicle")] * 200]
    tok = train_wordpiece(corpus, 200)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast and does not thrash a busy machine
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=128, max_position_embeddings=64,
                                       pad_token_id=tok.pad_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    enc = tok(corpus, padding=True, return_tensors="pt")
    tags = torch.tensor(tok.convert_tokens_to_ids(["fruit", "vehicle"]))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ix = torch.randint(len(corpus), (32,), generator=g)
        ids, am = enc["input_ids"][ix].clone(), enc["attention_mask"][ix]
        special = (ids == tok.cls_token_id) | (ids == tok.sep_token_id) | (am == 0)
        p = torch.where(torch.isin(ids, tags), 0.5, 0.15)
        m = (torch.rand(ids.shape, generator=g) < p) & ~special
        labels = torch.where(m, ids, torch.full_like(ids, -100))
        ids[m] = tok.mask_token_id
        loss = model(input_ids=ids, attention_mask=am, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
