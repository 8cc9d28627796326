"""`llm-dist influence RUN_DIR [--split test | --test FILE | --query TEXT [--label NAME]] [--k 10]`: which
training examples pushed each test prediction up (proponents) or down (opponents) — TracIn-CP over the
run's saved checkpoints (tracin.py), on projected per-example gradients (grads.py), cached per checkpoint.

Writes RUN_DIR/influence/: test_topk.jsonl (per test example: id, label, prediction, its k proponents and
k opponents with ids, labels, scores, text previews), self_influence.csv, summary.json, report.md /
report.html (misclassified test examples with their strongest opponents; self-influence against planted
noise next to the other detectors), self_influence.png; adds `suspicion_self_influence` to
RUN_DIR/analysis/example_scores.parquet/.csv (the dynamics table) when it exists, else writes
influence/example_scores.parquet/.csv. Run on several ranks (`torchrun --nproc_per_node N -m llm_dist.cli
influence RUN_DIR`) each rank computes its share of the gradients; rank 0 scores and writes.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from ...config import write_text_atomic
from .tracin import (Grads, InfluenceError, barrier, checkpoint_weights, compute_grads, dist_info,
                     open_run, self_influence, top_k)

PREVIEW = 160


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _eval_split(run, args):
    """(name, tokenized split, datasets.Dataset) of the examples to explain."""
    from ...data.classify import tokenize_split
    from ...data.sources import DataError, load_table

    if args.test:
        d = run.cfg.data
        try:
            ds = load_table(args.test, d.text_column, d.label_column, d.id_column, d.text_pair_column, with_where=True)
        except DataError as e:
            raise InfluenceError(str(e).splitlines()[0]) from None
        if "label" not in ds.column_names:
            raise InfluenceError(f"{args.test}: no label column '{d.label_column}' (the gradient is of each "
                                 "example's label; use --query TEXT for one unlabelled text)")
        for where, lab in zip(ds["where"], ds["label"]):
            if lab not in run.label2id:
                raise InfluenceError(f"{where}: label '{lab}' is not one of the run's labels ({', '.join(run.names)})")
        ds = ds.remove_columns("where")
        return "file", tokenize_split(ds, run.tokenizer, run.label2id, run.cfg.data.max_length), ds
    split = args.split or ("test" if "test" in run.splits else "validation")
    if split not in run.splits:
        raise InfluenceError(f"{run.run_dir}: no '{split}' split (it has: {', '.join(run.splits)})")
    return split, run.data[split], run.splits[split]


def influence(run_dir, split: str | None = None, test: str | None = None, k: int = 10, proj_dim: int = 2048,
              proj_kind: str = "rademacher", seed: int = 0, layers: int = 1, cosine: bool = True, adam: bool = False,
              lr_weights: str = "lr", batch_size: int = 16, device: str = "auto", progress: bool = False,
              wandb: bool | None = None, cache_dtype: str = "float16") -> dict | None:
    """The whole analysis (see the module doc); returns summary.json's dict on rank 0, None on the others."""
    args = argparse.Namespace(split=split, test=test)
    rank, world = dist_info()
    t_start = time.time()
    run = open_run(run_dir)
    name, data, ds = _eval_split(run, args)
    dev = _device(device)
    from .grads import Projector, select_params

    names = select_params(run.model, run.peft, layers)
    dim = sum(int(p.numel()) for n, p in run.model.named_parameters() if n in set(names))
    proj = Projector(dim, proj_dim, seed, proj_kind, device=dev)
    weights = checkpoint_weights(run, lr_weights)
    cache = run.run_dir / "influence" / "cache"
    train, test_g, timing = [], [], {"train_grad_s": 0.0, "test_grad_s": 0.0, "train_cached": True}
    for c in run.checkpoints:
        g, st = compute_grads(run, c, run.data["train"], "train", names, proj, adam, cache, rank, world, batch_size,
                              progress, dev, cache_dtype)
        train.append(g)
        timing["train_grad_s"] += st["seconds"]
        timing["train_cached"] &= st["cached"]
        g, st = compute_grads(run, c, data, name, names, proj, False, cache, rank, world, batch_size, progress, dev,
                              cache_dtype)
        test_g.append(g)
        timing["test_grad_s"] += st["seconds"]
    if rank != 0:
        barrier(world)
        return None
    t0 = time.time()
    hi_v, hi_i, lo_v, lo_i = top_k(test_g, train, weights, cosine, k, progress=progress)
    timing["score_s"] = time.time() - t0
    si = self_influence(train, weights)
    summary = _write_outputs(run, name, data, ds, test_g, train, weights, si, (hi_v, hi_i, lo_v, lo_i), {
        "parameters": names, "parameter_count": dim, "proj_dim": proj.out_dim, "projection": proj_kind if proj_dim > 0
        else "none", "seed": seed, "layers": None if run.peft else layers, "peft": run.peft, "score": "cosine"
        if cosine else "raw", "cache_dtype": cache_dtype, "adam": adam, "lr_weights": lr_weights, "k": k, "ranks": world, "device": dev},
        timing, t_start, wandb)
    barrier(world)
    return summary


def _write_outputs(run, name, data, ds, test_g, train, weights, si, tops, settings, timing, t_start, wandb):
    import pandas as pd

    from ...data.noise import read_flipped
    from ..detectors import detector_table, score_detectors

    out = run.run_dir / "influence"
    out.mkdir(parents=True, exist_ok=True)
    hi_v, hi_i, lo_v, lo_i = tops
    tr_ids, tr_text = run.data["train"]["ids"], list(run.splits["train"]["text"])
    tr_lab = [run.names[i] for i in run.data["train"]["labels"]]
    texts = list(ds["text"])
    pred = np.asarray(test_g[-1].logits).argmax(1)
    gold = np.asarray(data["labels"])
    item = lambda j, s: {"id": tr_ids[j], "label": tr_lab[j], "score": round(float(s), 6),  # noqa: E731
                         "text": tr_text[j][:PREVIEW]}
    rows = []
    for r, tid in enumerate(data["ids"]):
        rows.append({"id": tid, "label": run.names[gold[r]], "predicted": run.names[pred[r]],
                     "correct": bool(pred[r] == gold[r]), "text": texts[r][:PREVIEW],
                     "proponents": [item(j, s) for j, s in zip(hi_i[r], hi_v[r])],
                     "opponents": [item(j, s) for j, s in zip(lo_i[r], lo_v[r])]})
    write_text_atomic(out / "test_topk.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    si_df = pd.DataFrame({"id": tr_ids, "label": tr_lab, "self_influence": si, "suspicion_self_influence": si})
    write_text_atomic(out / "self_influence.csv", si_df.to_csv(index=False))
    flipped = read_flipped(run.run_dir)
    table, where = _merge_scores(run, si_df, out)
    detectors = score_detectors(table, flipped) if flipped is not None else {}
    _plot(si_df, flipped, out / "self_influence.png")
    n = len(train[0].norms)
    grad_s = timing["train_grad_s"]
    summary = {"run_dir": str(run.run_dir), "split": name, "test_examples": len(rows), "train_examples": n,
               "checkpoints": [{"name": c.name, "weight": w} for c, w in zip(run.checkpoints, weights)],
               **settings, "test_accuracy_last_checkpoint": float((pred == gold).mean()) if len(rows) else None,
               "misclassified": int((pred != gold).sum()), "example_scores": str(where),
               "timing": {**timing, "total_s": time.time() - t_start,
                          "train_grad_examples_per_s": (n * len(train) / grad_s) if grad_s > 0 else None,
                          "score_pairs_per_s": (n * len(rows) * len(train) / timing["score_s"])
                          if timing["score_s"] > 0 else None},
               "peak_rss_gb": _rss_gb(), "cache_bytes": _dir_bytes(out / "cache")}
    if flipped is not None:
        summary["noise"] = {"flipped": len(flipped & set(tr_ids))}
        summary["detectors"] = detectors
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1, default=float))
    md, html = _report(summary, rows, si_df, flipped, detector_table, out / "self_influence.png")
    write_text_atomic(out / "report.md", md)
    write_text_atomic(out / "report.html", html)
    if wandb is None:
        wandb = run.cfg.tracking.report_to == "wandb"
    if wandb:
        _log_wandb(run, summary, rows, si_df, out / "self_influence.png")
    return summary


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) if d.is_dir() else 0


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _merge_scores(run, si_df, out: Path):
    """Add `suspicion_self_influence` to the dynamics `example_scores` table (analysis/), else write a table
    of our own (influence/); returns (the table, where it went)."""
    import pandas as pd

    col = si_df[["id", "suspicion_self_influence"]]
    dyn = run.run_dir / "analysis" / "example_scores.parquet"
    if dyn.exists():
        table = pd.read_parquet(dyn).drop(columns=["suspicion_self_influence"], errors="ignore").merge(
            col, on="id", how="left")
        _atomic(dyn, lambda p: table.to_parquet(p, index=False))
        _atomic(dyn.with_suffix(".csv"), lambda p: table.to_csv(p, index=False))
        return table, dyn
    text = {i: t[:200] for i, t in zip(run.splits["train"]["id"], run.splits["train"]["text"])}
    table = si_df[["id", "label"]].assign(text=si_df["id"].map(text)).merge(col, on="id")
    f = out / "example_scores.parquet"
    _atomic(f, lambda p: table.to_parquet(p, index=False))
    _atomic(f.with_suffix(".csv"), lambda p: table.to_csv(p, index=False))
    return table, f


def _plot(si_df, flipped, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = np.log10(np.maximum(si_df["self_influence"].to_numpy(dtype=float), 1e-12))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    bins = np.linspace(v.min(), v.max() + 1e-9, 40)
    if flipped:
        m = si_df["id"].isin(flipped).to_numpy()
        ax.hist(v[~m], bins=bins, alpha=0.7, label="kept label")
        ax.hist(v[m], bins=bins, alpha=0.7, color="red", label="planted flip")
        ax.legend()
    else:
        ax.hist(v, bins=bins)
    ax.set_xlabel("log10 self-influence")
    ax.set_ylabel("training examples")
    ax.set_title(f"self-influence ({len(v)} training examples)")
    fig.tight_layout()
    _atomic(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def _clean(s: str, n: int = 90) -> str:
    return s[:n].replace("\n", " ").replace("|", "/")


def _report(summary, rows, si_df, flipped, detector_table, png: Path) -> tuple[str, str]:
    import html as h

    s, t = summary, summary["timing"]
    ck = ", ".join(f"{c['name']} (η {c['weight']:.3g})" for c in s["checkpoints"])
    lines = [f"# Influence (TracIn-CP): {s['run_dir']}", "",
             f"{s['test_examples']} `{s['split']}` examples × {s['train_examples']} training examples over "
             f"{len(s['checkpoints'])} checkpoints: {ck}.", "",
             f"Gradients of {s['parameter_count']:,} parameters ({'PEFT adapter + head' if s['peft'] else 'head + last ' + str(s['layers']) + ' layer(s)'}), "
             f"projection {s['projection']} to d = {s['proj_dim']}, {s['score']} scores"
             f"{', Adam-preconditioned training gradients' if s['adam'] else ''}; {s['ranks']} rank(s) on {s['device']}.", "",
             f"Time {t['total_s']:.1f} s (training gradients {t['train_grad_s']:.1f} s"
             f"{' (cached)' if t['train_cached'] else ''}, scoring {t['score_s']:.2f} s); peak RSS {s['peak_rss_gb']:.2f} GB; "
             f"cache {s['cache_bytes'] / 2**20:.1f} MiB.", "",
             f"Accuracy at the last checkpoint: {s['test_accuracy_last_checkpoint']:.3f} "
             f"({s['misclassified']} misclassified).", ""]
    if s.get("detectors"):
        lines += ["## Self-influence vs planted noise, next to the other detectors", "",
                  f"{s['noise']['flipped']} flipped training labels (noise.json); table: `{s['example_scores']}`.", "",
                  detector_table(s["detectors"]), ""]
    lines += ["![self-influence](self_influence.png)", "", "## Misclassified test examples and their strongest opponents", ""]
    bad = [r for r in rows if not r["correct"]]
    for r in bad[:20]:
        lines += [f"### `{r['id']}`: gold **{r['label']}**, predicted **{r['predicted']}**", "", f"> {_clean(r['text'], 300)}", "",
                  "| opponent | label | score | text |", "| --- | --- | --- | --- |"]
        lines += [f"| `{o['id']}` | {o['label']} | {o['score']:.4g} | {_clean(o['text'])} |" for o in r["opponents"][:5]]
        lines += ["", "| proponent | label | score | text |", "| --- | --- | --- | --- |"]
        lines += [f"| `{o['id']}` | {o['label']} | {o['score']:.4g} | {_clean(o['text'])} |" for o in r["proponents"][:3]]
        lines.append("")
    if not bad:
        lines += ["none", ""]
    top = si_df.sort_values("self_influence", ascending=False).head(15)
    lines += ["## Highest self-influence (likeliest mislabeled or atypical)", "", "| id | label | self-influence |",
              "| --- | --- | --- |"] + [f"| `{i}` | {lab} | {v:.4g} |" for i, lab, v in
                                        zip(top["id"], top["label"], top["self_influence"])]
    md = "\n".join(lines) + "\n"
    img = base64.b64encode(png.read_bytes()).decode()
    body = [f"<h1>Influence (TracIn-CP): {h.escape(s['run_dir'])}</h1>"]
    body += [f"<p>{h.escape(x)}</p>" for x in lines[2:10:2]]
    if s.get("detectors"):
        import pandas as pd

        det = pd.DataFrame([{"detector": k, **v} for k, v in s["detectors"].items()])
        body += ["<h2>Self-influence vs planted noise</h2>", det.to_html(index=False, float_format="%.3f")]
    body += [f'<img src="data:image/png;base64,{img}" alt="self-influence">',
             "<h2>Misclassified test examples and their strongest opponents</h2>"]
    for r in bad[:20]:
        body += [f"<h3>{h.escape(r['id'])}: gold {h.escape(r['label'])}, predicted {h.escape(r['predicted'])}</h3>",
                 f"<blockquote>{h.escape(r['text'])}</blockquote><table border=1><tr><th>opponent</th><th>label</th>"
                 "<th>score</th><th>text</th></tr>"]
        body += [f"<tr><td>{h.escape(o['id'])}</td><td>{h.escape(o['label'])}</td><td>{o['score']:.4g}</td>"
                 f"<td>{h.escape(o['text'])}</td></tr>" for o in r["opponents"][:5]]
        body.append("</table>")
    html = ("<!doctype html><html><head><meta charset='utf-8'><title>influence</title></head><body>"
            + "\n".join(body) + "</body></html>\n")
    return md, html


def _log_wandb(run, summary, rows, si_df, png: Path) -> None:
    """The self-influence plot, the detector table and the misclassified examples' opponents, into the run's
    W&B project (offline unless WANDB_MODE says otherwise), as an `-influence` run."""
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        import wandb

        cfg = run.cfg
        r = wandb.init(project=cfg.tracking.project, dir=str(run.run_dir), job_type="influence",
                       name=f"{cfg.tracking.run_name or run.run_dir.name}-influence")
        log = {"influence/self_influence": wandb.Image(str(png)),
               "influence/opponents": wandb.Table(columns=["test_id", "gold", "predicted", "opponent", "label", "score"],
                                                  data=[[x["id"], x["label"], x["predicted"], o["id"], o["label"], o["score"]]
                                                        for x in rows if not x["correct"] for o in x["opponents"][:3]])}
        if summary.get("detectors"):
            log["influence/detectors"] = wandb.Table(
                columns=["detector", "auroc", "auprc", "precision_at_k"],
                data=[[k, v["auroc"], v["auprc"], v["precision_at_k"]] for k, v in summary["detectors"].items()])
        r.log(log)
        r.summary.update({"influence/total_s": summary["timing"]["total_s"]})
        r.finish()
    except Exception as e:  # noqa: BLE001 - tracking must not fail the analysis
        print(f"warning: W&B logging of the influence analysis failed: {e}", file=sys.stderr)


def query(run_dir, text: str, label: str | None = None, k: int = 10, proj_dim: int = 2048,
          proj_kind: str = "rademacher", seed: int = 0, layers: int = 1, cosine: bool = True, adam: bool = False,
          lr_weights: str = "lr", batch_size: int = 16, device: str = "auto", progress: bool = False,
          cache_dtype: str = "float16") -> dict:
    """Proponents and opponents of one text (its label: `label`, else the last checkpoint's prediction)."""
    from .grads import Projector, select_params
    from .tracin import _fill

    run = open_run(run_dir)
    if label is not None and label not in run.label2id:
        raise InfluenceError(f"--label '{label}' is not one of the run's labels ({', '.join(run.names)})")
    dev = _device(device)
    names = select_params(run.model, run.peft, layers)
    dim = sum(int(p.numel()) for n, p in run.model.named_parameters() if n in set(names))
    proj = Projector(dim, proj_dim, seed, proj_kind, device=dev)
    weights = checkpoint_weights(run, lr_weights)
    enc = run.tokenizer([text], truncation=True, max_length=run.cfg.data.max_length, return_token_type_ids=True)

    def grads_at(ckpt, lab):
        q = {"input_ids": enc["input_ids"], "token_type_ids": enc.get("token_type_ids"), "labels": [lab],
             "ids": ["query"], "lengths": [len(enc["input_ids"][0])]}
        arrs = {"units": np.zeros((1, proj.out_dim), np.dtype(cache_dtype)), "norms": np.zeros(1, np.float32),
                "self": np.zeros(1, np.float32), "logits": np.zeros((1, len(run.names)), np.float32)}
        _fill(run, ckpt, q, names, proj, False, arrs, 0, 1, 1, False, dev, "query")
        return Grads(arrs["units"], arrs["norms"], arrs["self"], arrs["logits"])

    lab = run.label2id[label] if label is not None else int(grads_at(run.checkpoints[-1], 0).logits[0].argmax())
    cache = run.run_dir / "influence" / "cache"
    train, qg = [], []
    for c in run.checkpoints:
        train.append(compute_grads(run, c, run.data["train"], "train", names, proj, adam, cache, 0, 1, batch_size,
                                   progress, dev, cache_dtype)[0])
        qg.append(grads_at(c, lab))
    hi_v, hi_i, lo_v, lo_i = top_k(qg, train, weights, cosine, k)
    ids, tx = run.data["train"]["ids"], list(run.splits["train"]["text"])
    labs = [run.names[i] for i in run.data["train"]["labels"]]
    item = lambda j, s: {"id": ids[j], "label": labs[j], "score": round(float(s), 6), "text": tx[j][:PREVIEW]}  # noqa: E731
    res = {"text": text, "label": run.names[lab], "label_source": "given" if label is not None else "predicted",
           "predicted": run.names[int(qg[-1].logits[0].argmax())],
           "proponents": [item(j, s) for j, s in zip(hi_i[0], hi_v[0])],
           "opponents": [item(j, s) for j, s in zip(lo_i[0], lo_v[0])]}
    out = run.run_dir / "influence"
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "query.json", json.dumps(res, indent=1))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llm-dist influence", description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--split", choices=("test", "validation", "train"), help="the run's split to explain (default test)")
    src.add_argument("--test", metavar="FILE", help="a csv / jsonl / parquet file of labelled examples to explain")
    src.add_argument("--query", metavar="TEXT", help="one text: print its proponents and opponents")
    ap.add_argument("--label", help="with --query: the label to explain (default: the model's prediction)")
    ap.add_argument("--k", type=int, default=10, help="proponents and opponents per example (default 10)")
    ap.add_argument("--proj-dim", type=int, default=2048, help="random projection dimension d; 0: none (exact)")
    ap.add_argument("--proj-kind", choices=("rademacher", "gaussian"), default="rademacher")
    ap.add_argument("--seed", type=int, default=0, help="the projection's seed")
    ap.add_argument("--layers", type=int, default=1, help="without PEFT: the head + this many last encoder layers")
    ap.add_argument("--raw", action="store_true", help="raw dot products instead of cosine similarities")
    ap.add_argument("--adam", action="store_true", help="precondition training gradients with the checkpoints' Adam moments")
    ap.add_argument("--lr-weights", choices=("lr", "uniform"), default="lr", help="checkpoint weights η_c")
    ap.add_argument("--cache-dtype", choices=("float16", "float32"), default="float16",
                    help="the gradient cache's unit vectors (float32: twice the disk, finer near-ties)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--no-wandb", action="store_true", help="do not log to W&B even if the run did")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    common = dict(k=a.k, proj_dim=a.proj_dim, proj_kind=a.proj_kind, seed=a.seed, layers=a.layers, cosine=not a.raw,
                  adam=a.adam, lr_weights=a.lr_weights, batch_size=a.batch_size, cache_dtype=a.cache_dtype, device=a.device, progress=not a.quiet)
    try:
        if a.k < 1 or a.layers < 0 or a.batch_size < 1 or a.proj_dim < 0:
            raise InfluenceError("--k and --batch-size must be >= 1, --layers and --proj-dim >= 0")
        if a.label and not a.query:
            raise InfluenceError("--label goes with --query")
        if a.query is not None:
            r = query(a.run_dir, a.query, a.label, **common)
            print(f"query ({r['label_source']} label {r['label']}, predicted {r['predicted']}):")
            for kind in ("proponents", "opponents"):
                print(f"  {kind}:")
                for o in r[kind]:
                    print(f"    {o['score']:+.4f}  {o['id']}  [{o['label']}]  {_clean(o['text'], 80)}")
            return 0
        s = influence(a.run_dir, a.split, a.test, wandb=False if a.no_wandb else None, **common)
    except InfluenceError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2
    if s is not None and not a.quiet:
        t = s["timing"]
        print(f"influence: {s['test_examples']} {s['split']} × {s['train_examples']} train examples, "
              f"{len(s['checkpoints'])} checkpoints, d={s['proj_dim']} → {Path(a.run_dir) / 'influence'} "
              f"({t['total_s']:.1f} s; {s['misclassified']} misclassified)")
        for name, m in sorted((s.get("detectors") or {}).items()):
            print(f"  {name}: AUROC {m['auroc']:.3f}  AUPRC {m['auprc']:.3f}  precision@{m['k']} {m['precision_at_k']:.3f}")
    return 0
