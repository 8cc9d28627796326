"""Cleaned copies of the splits (`--dedup`, `--decontaminate`, `--scrub-pii`), written as new JSONL files
(`clean/<split>.jsonl`, columns id/text/label), never over the input.

- dedup: keep the first document (in file order) of every exact and near cluster of a split.
- decontaminate=train: drop the train documents that any validation/test example leaks from (all kinds);
  decontaminate=eval: drop the leaked validation/test examples instead (the "clean subset").
- scrub-pii: replace e-mails, URLs, card-like numbers and phone numbers by `<EMAIL>` … (counts kept).
"""
from __future__ import annotations

import json
from pathlib import Path

from .pii import KINDS as PII_KINDS, scrub
from .reader import SplitSource


def write_clean(res: dict, sources: dict[str, SplitSource], out_dir: Path, dedup: bool,
                decontaminate: str | None, scrub_pii: bool, all_train_ids: dict) -> dict:
    drop_dup: dict[str, set[str]] = {n: set() for n in sources}
    if dedup:
        for n, d in res["duplicates"].items():
            for kind in ("exact", "near"):
                for c in d[kind]:
                    drop_dup[n].update(c[1:])
    drop_leak: dict[str, set[str]] = {n: set() for n in sources}
    if decontaminate == "train":
        for key, ids in all_train_ids.items():
            drop_leak["train"].update(ids)
    elif decontaminate == "eval":
        for e in res["leakage"]:
            drop_leak[e["split"]].add(e["id"])
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"options": {"dedup": dedup, "decontaminate": decontaminate or False, "scrub_pii": scrub_pii},
               "splits": {}}
    for n, src in sources.items():
        path = out_dir / f"{n}.jsonl"
        kept = 0
        removed = {"duplicate": 0, "leaked": 0}
        replaced = dict.fromkeys(PII_KINDS, 0)
        total = 0
        with open(path, "w", encoding="utf-8") as fh:
            for _, doc_id, text, label, _ in src.rows():
                total += 1
                if doc_id in drop_dup[n]:
                    removed["duplicate"] += 1
                    continue
                if doc_id in drop_leak[n]:
                    removed["leaked"] += 1
                    continue
                if scrub_pii:
                    text, counts = scrub(text)
                    for k, v in counts.items():
                        replaced[k] += v
                rec = {"id": doc_id, "text": text}
                if label is not None:
                    rec["label"] = label
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                kept += 1
        summary["splits"][n] = {"documents_in": total, "documents_out": kept, "removed": removed,
                                "pii_replaced": replaced, "path": f"clean/{n}.jsonl"}
    return summary
