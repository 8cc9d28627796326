"""Data audit (`llm-dist audit`): profile, duplicates, leakage, quality, PII — before any GPU hour.

Public API:
- `main(argv) -> int`: the CLI (`llm-dist audit`, `python -m llm_dist.analysis.audit`).
- `run_audit(spec, output_dir, cfg=AuditConfig(), ...) -> dict`: one-machine audit; `spec` from
  `file_spec(...)` / `config_spec(...)`.
- `scan_shard(...)` / `merge_partials(...)`: the sharded path (SLURM array + merge).
- `leaked_ids(audit_json, split="test") -> set[str]`: ids with any train overlap (for clean-subset metrics).
See docs/audit.md.
"""
from __future__ import annotations

import json
import os

from .cli import main
from .config import AuditConfig, AuditError
from .reader import config_spec, file_spec
from .run import merge_partials, run_audit, scan_shard

__all__ = ["AuditConfig", "AuditError", "main", "run_audit", "scan_shard", "merge_partials", "leaked_ids",
           "file_spec", "config_spec", "load_audit"]


def load_audit(path: str | os.PathLike) -> dict:
    """An `audit.json` (or the directory holding one)."""
    p = os.fspath(path)
    if os.path.isdir(p):
        p = os.path.join(p, "audit.json")
    try:
        with open(p, encoding="utf-8") as fh:
            res = json.load(fh)
    except OSError as e:
        raise AuditError(f"{p}: cannot read audit ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise AuditError(f"{p}: not valid JSON ({e.msg})") from None
    if not isinstance(res, dict) or "leakage" not in res or "splits" not in res:
        raise AuditError(f"{p}: not an audit.json (no 'leakage' / 'splits')")
    return res


def leaked_ids(audit_json_path: str | os.PathLike, split: str = "test", kinds: tuple[str, ...] | None = None,
               expected_ids=None) -> set[str]:
    """Ids of the `split` examples with any train overlap (exact, near or n-gram; or only `kinds`).
    The clean subset of that split is every other example.

    With `expected_ids` (the ids of the run's own `split`), the audit must have seen that split: every
    expected id among the audit's ids of it, else an AuditError naming the audit file — a join on ids
    that do not match would silently call every example clean."""
    res = load_audit(audit_json_path)
    if split not in res["splits"]:
        raise AuditError(f"{audit_json_path}: no split '{split}' in the audit (splits: {', '.join(res['splits'])})")
    leaked = {str(e["id"]) for e in res["leakage"] if e["split"] == split and (kinds is None or e["kind"] in kinds)}
    if expected_ids is not None:
        check_ids(audit_json_path, res, split, [str(i) for i in expected_ids], leaked)
    return leaked


def check_ids(path, res: dict, split: str, expected: list[str], leaked: set[str]) -> None:
    """AuditError unless the audit's ids of `split` cover the run's (`expected`); see `leaked_ids`."""
    audited = res.get("split_ids", {}).get(split)
    fix = "re-run `llm-dist audit` on the run's config or on the same files"
    if audited is None:  # an audit.json written before split_ids: its leakage ids must at least be the run's
        stray = sorted(leaked - set(expected))
        if stray:
            raise AuditError(f"{path}: {len(stray)} of the audit's {len(leaked)} leaked {split} ids are not ids of "
                             f"this run's {split} split (e.g. audit id {stray[0]!r}, run id "
                             f"{expected[0] if expected else None!r}); {fix}")
        return
    audited = set(map(str, audited))
    found = sum(1 for i in expected if i in audited)
    if found < len(expected):
        missing = next(i for i in expected if i not in audited)
        example = next(iter(sorted(audited)), None)
        raise AuditError(f"{path}: only {found} of this run's {len(expected)} {split} ids "
                         f"({found / max(len(expected), 1):.0%}) are in the audit's {split} split (e.g. run id "
                         f"{missing!r}, audit id {example!r}); {fix}")
