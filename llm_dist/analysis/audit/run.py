"""Driving an audit: scan → merge → write `audit.json`, `audit.md`, `audit.html`, `flags.jsonl` and optional
cleaned copies into a temporary directory that replaces `output_dir` only when everything is written."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from .config import AuditConfig, AuditError
from .pipeline import load_partials, merge, save_partial, scan
from .reader import open_sources

AUDIT_VERSION = 2  # 2: ids `<file>:<row>` for every file split (was: the row number for one file); split_ids


def _prepare(spec: dict, cfg: AuditConfig, tokenizer: str | None):
    """(sources, tokenizer path, tokenizer name for the report)."""
    sources, facts = open_sources(spec)
    name = tokenizer
    if tokenizer is None:
        tokenizer, name = facts.get("tokenizer"), facts.get("tokenizer_name")
    if cfg.max_length is None and tokenizer and facts.get("max_length"):
        cfg.max_length = facts["max_length"]
    return sources, tokenizer, name


def run_audit(spec: dict, output_dir: str | os.PathLike, cfg: AuditConfig | None = None,
              tokenizer: str | None = None, num_proc: int = 1, progress: bool = True, dedup: bool = False,
              decontaminate: str | None = None, scrub_pii: bool = False) -> dict:
    """The whole audit on one machine. `spec`: from `reader.file_spec` / `reader.config_spec`."""
    cfg = (cfg or AuditConfig()).validate()
    sources, tokenizer, name = _prepare(spec, cfg, tokenizer)
    t0 = time.perf_counter()
    part = scan(sources, cfg, tokenizer, num_proc=num_proc, progress=progress, meta={"data": spec, "tokenizer_name": name})
    t1 = time.perf_counter()
    res, flags = merge([part], progress=progress)
    t2 = time.perf_counter()
    return _finish(res, flags, part.meta, sources, output_dir, (t1 - t0, t2 - t1), num_shards=1,
                   dedup=dedup, decontaminate=decontaminate, scrub_pii=scrub_pii)


def scan_shard(spec: dict, partials_dir: str | os.PathLike, shard: int, num_shards: int,
               cfg: AuditConfig | None = None, tokenizer: str | None = None, num_proc: int = 1,
               progress: bool = True) -> Path:
    """Stage 1 for one shard (e.g. one SLURM array task): writes `partials_dir/shard-I-of-N/`."""
    if not 0 <= shard < num_shards:
        raise AuditError(f"--shard: {shard}/{num_shards} is out of range (0 <= I < N)")
    cfg = (cfg or AuditConfig()).validate()
    sources, tokenizer, name = _prepare(spec, cfg, tokenizer)
    t0 = time.perf_counter()
    part = scan(sources, cfg, tokenizer, shard, num_shards, num_proc, progress,
                meta={"data": spec, "tokenizer_name": name})
    part.meta["scan_s"] = round(time.perf_counter() - t0, 3)
    return save_partial(part, partials_dir)


def merge_partials(partials_dir: str | os.PathLike, output_dir: str | os.PathLike, progress: bool = True,
                   dedup: bool = False, decontaminate: str | None = None, scrub_pii: bool = False) -> dict:
    """Stage 2: all shards' partials → the same outputs as `run_audit`."""
    parts = load_partials(partials_dir)
    meta = parts[0].meta
    t0 = time.perf_counter()
    res, flags = merge(parts, progress=progress)
    t1 = time.perf_counter()
    sources = None
    if dedup or decontaminate or scrub_pii:
        sources, _ = open_sources(meta["data"])
    scan_s = sum(p.meta.get("scan_s", 0.0) for p in parts)
    return _finish(res, flags, meta, sources, output_dir, (scan_s, t1 - t0), num_shards=len(parts),
                   dedup=dedup, decontaminate=decontaminate, scrub_pii=scrub_pii)


def _finish(res: dict, flags: list[dict], meta: dict, sources, output_dir, times: tuple[float, float],
            num_shards: int, dedup: bool, decontaminate: str | None, scrub_pii: bool) -> dict:
    from .clean import write_clean
    from .report import html_report, markdown

    docs = sum(s["documents"] for s in res["splits"].values())
    all_train_ids = {}
    for e in res["leakage"]:
        all_train_ids[(e["split"], e["id"], e["kind"])] = e.pop("_all_train_ids")
    out = {"version": AUDIT_VERSION, "data": meta["splits"],
           "tokenizer": meta.get("tokenizer_name") or meta.get("tokenizer") or "whitespace words",
           "tokenizer_kind": "tokenizer" if meta.get("tokenizer") else "whitespace", "config": meta["config"], **res,
           "shards": num_shards,
           "timing": {"scan_s": round(times[0], 3), "merge_s": round(times[1], 3),
                      "documents_per_s": round(docs / max(times[0] + times[1], 1e-9), 1)}}
    output_dir = Path(output_dir)
    parent = output_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    if output_dir.exists() and any(output_dir.iterdir()) and not (output_dir / "audit.json").exists():
        raise AuditError(f"{output_dir}: exists and is not an audit output directory (choose another --output_dir)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the final dir should look like any other
    try:
        if dedup or decontaminate or scrub_pii:
            if sources is None:
                sources, _ = open_sources(meta["data"])
            out["clean"] = write_clean(out, sources, tmp / "clean", dedup, decontaminate, scrub_pii, all_train_ids)
        (tmp / "audit.json").write_text(json.dumps(out, indent=1, ensure_ascii=False))
        with open(tmp / "flags.jsonl", "w", encoding="utf-8") as fh:
            for row in flags:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        (tmp / "audit.md").write_text(markdown(out))
        (tmp / "audit.html").write_text(html_report(out))
        old = None
        if output_dir.exists():
            old = parent / f".{output_dir.name}.old-{os.getpid()}"
            os.replace(output_dir, old)
        os.replace(tmp, output_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
