"""`llm-dist audit` / `python -m llm_dist.analysis.audit`: argument parsing and the one-line errors."""
from __future__ import annotations

import argparse
import sys

from .config import AuditConfig, AuditError

USAGE = """llm-dist audit CONFIG.yaml [--output_dir DIR] [--key.sub=VALUE ...] [options]
       llm-dist audit --data train=PATH [--data validation=PATH] [--data test=PATH] --output_dir DIR [options]
       llm-dist audit ... --shard I/N --output_dir PARTIALS_DIR      (stage 1 of a sharded audit)
       llm-dist audit merge PARTIALS_DIR --output_dir DIR [options]  (stage 2)"""

DESCRIPTION = """Audit the data of a run before training: profile (documents, tokens, lengths, classes, text and
encoding checks), duplicates inside each split (exact and MinHash near duplicates), leakage of
validation/test into train (exact, near, 13-gram), Gopher/C4 quality flags and PII counts. Writes
audit.json, audit.md, audit.html and flags.jsonl to --output_dir (default: <run output_dir>/audit)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise AuditError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="llm-dist audit", usage=USAGE, description=DESCRIPTION, allow_abbrev=False)
    p.add_argument("config", nargs="*", metavar="CONFIG.yaml | merge PARTIALS_DIR",
                   help="a run config (YAML) whose data is audited; or `merge PARTIALS_DIR`")
    p.add_argument("--data", action="append", default=[], metavar="SPLIT=PATH",
                   help="a split file/dir/glob (csv, tsv, jsonl, json, parquet, txt); repeat per split")
    p.add_argument("--text_column", default="text")
    p.add_argument("--label_column", default=None, help="default 'label' when present; 'none' for unlabeled")
    p.add_argument("--id_column", default=None, help="default: the row number (several files: FILE:ROW)")
    p.add_argument("--output_dir", default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer dir for token counts (config: the run's)")
    p.add_argument("--max_length", type=int, default=None, help="count texts longer than this many tokens")
    d = AuditConfig()
    p.add_argument("--near_threshold", type=float, default=d.near_threshold)
    p.add_argument("--num_perm", type=int, default=d.num_perm)
    p.add_argument("--shingle_size", type=int, default=d.shingle_size)
    p.add_argument("--ngram_size", type=int, default=d.ngram_size)
    p.add_argument("--ngram_threshold", type=float, default=d.ngram_threshold,
                   help="n-gram leak when more than this share of an example's n-grams is in train (0: any)")
    p.add_argument("--cjk_near_threshold", type=float, default=d.cjk_near_threshold,
                   help="near-duplicate Jaccard for CJK documents (character shingles)")
    p.add_argument("--cjk_shingle_size", type=int, default=d.cjk_shingle_size, help="characters per CJK shingle")
    p.add_argument("--cjk_ngram_size", type=int, default=d.cjk_ngram_size, help="characters per CJK leakage n-gram")
    p.add_argument("--min_words", type=int, default=d.min_words)
    p.add_argument("--nonletter_threshold", type=float, default=d.nonletter_threshold)
    p.add_argument("--max_examples", type=int, default=d.max_examples)
    p.add_argument("--num_proc", type=int, default=1, help="worker processes for the scan")
    p.add_argument("--shard", default=None, metavar="I/N", help="scan shard I of N into --output_dir, then merge")
    p.add_argument("--dedup", action="store_true", help="write clean/ copies without duplicates")
    p.add_argument("--decontaminate", nargs="?", const="train", choices=("train", "eval"), default=None,
                   help="write clean/ copies without leaked pairs: drop the train side (default) or the eval side")
    p.add_argument("--scrub-pii", "--scrub_pii", dest="scrub_pii", action="store_true",
                   help="write clean/ copies with PII replaced")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except Exception as e:  # noqa: BLE001
        from ...config import ConfigError
        from ...data.sources import DataError

        if isinstance(e, (AuditError, ConfigError, DataError, OSError)):
            msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.filename}: {e.strerror}"
            print(f"error: {msg.splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
            return 2
        raise


def _main(argv: list[str]) -> int:
    from .reader import config_spec, file_spec
    from .run import merge_partials, run_audit, scan_shard

    args, rest = _parser().parse_known_args(argv)
    pos = list(args.config)
    merge_mode = bool(pos) and pos[0] == "merge"
    if merge_mode:
        pos = pos[1:]
    if len(pos) > 1:
        rest = pos[1:] + rest
    args.config = pos[0] if pos else None
    progress = not args.quiet
    clean = {"dedup": args.dedup, "decontaminate": args.decontaminate, "scrub_pii": args.scrub_pii}
    if merge_mode:
        if rest:
            raise AuditError(f"unexpected argument '{rest[0]}'")
        if not args.config:
            raise AuditError("merge: give the partials directory (llm-dist audit merge PARTIALS_DIR --output_dir DIR)")
        if not args.output_dir:
            raise AuditError("--output_dir: required for merge")
        res = merge_partials(args.config, args.output_dir, progress=progress, **clean)
        _summary(res, args.output_dir)
        return 0
    cfg = AuditConfig(near_threshold=args.near_threshold, num_perm=args.num_perm, shingle_size=args.shingle_size,
                      ngram_size=args.ngram_size, ngram_threshold=args.ngram_threshold, min_words=args.min_words,
                      nonletter_threshold=args.nonletter_threshold, max_length=args.max_length,
                      max_examples=args.max_examples, cjk_near_threshold=args.cjk_near_threshold,
                      cjk_shingle_size=args.cjk_shingle_size, cjk_ngram_size=args.cjk_ngram_size).validate()
    if args.num_proc < 1:
        raise AuditError(f"--num_proc: must be >= 1, got {args.num_proc}")
    if args.data and rest:
        raise AuditError(f"unexpected argument '{rest[0]}'")
    if args.config and args.data:
        raise AuditError("give either a run config or --data NAME=PATH, not both")
    if args.config:
        spec = config_spec(args.config, rest)
        output_dir = args.output_dir
        if output_dir is None:
            from ...config import load_config

            output_dir = f"{load_config(args.config, rest).output_dir}/audit"
    elif args.data:
        label = args.label_column
        explicit = label is not None and label.lower() != "none"
        label = None if label is not None and label.lower() == "none" else (label or "label")
        spec = file_spec(args.data, args.text_column, label, args.id_column, explicit)
        output_dir = args.output_dir
        if not output_dir:
            raise AuditError("--output_dir: required with --data")
    else:
        raise AuditError("nothing to audit: give a run config or --data train=PATH [--data test=PATH]")
    if args.shard:
        try:
            i, n = (int(x) for x in args.shard.split("/"))
        except ValueError:
            raise AuditError(f"--shard {args.shard}: expected I/N, e.g. 0/8") from None
        if any(clean.values()):
            raise AuditError("--dedup/--decontaminate/--scrub-pii go with the merge step, not --shard")
        path = scan_shard(spec, output_dir, i, n, cfg, args.tokenizer, args.num_proc, progress)
        print(f"audit shard {i}/{n}: {path}")
        return 0
    res = run_audit(spec, output_dir, cfg, args.tokenizer, args.num_proc, progress, **clean)
    _summary(res, output_dir)
    return 0


def _summary(res: dict, output_dir) -> None:
    parts = []
    for n, s in res["splits"].items():
        d = res["duplicates"][n]
        parts.append(f"{n}: {s['documents']} docs, {s['tokens']} tokens, {d['exact_extra_copies']} exact + "
                     f"{d['near_extra_copies']} near duplicate copies")
    for n, v in res["leakage_summary"].items():
        parts.append(f"{n} leaks: {v['exact']} exact, {v['near']} near, {v['ngram']} ngram ({v['clean']} clean)")
    print("audit: " + "; ".join(parts))
    print(f"audit: wrote {output_dir}/audit.json, audit.md, audit.html")
