"""`llm-dist analyze RUN_DIR`: training dynamics → data map, per-example scores and suspected label issues,
recomputed from a run dir's ledger (`dynamics/`) without retraining.

Scores per training id (over the ledger rows of the analysed pass, in order of epoch and presentation):

- cartography (Swayamdipta et al. 2020): `confidence` (mean gold-label probability), `variability` (its
  standard deviation), `correctness` (fraction of presentations predicted right); `region`: `ambiguous`
  (the third with the highest variability), else `hard` (confidence < 0.5) or `easy`;
- `forgetting_events` (Toneva et al. 2019: correct → incorrect transitions) and `never_learned`;
- `aum` (Pleiss et al. 2020: the mean margin, gold logit minus the largest other);
- `loss_mean`, `loss_last`;
- detectors, higher = more likely mislabeled: `suspicion_confidence` = 1 − confidence,
  `suspicion_aum` = −aum, `suspicion_forgetting` = forgetting events, or presentations + 1 when never
  learned, `suspicion_loss` = loss_mean.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from .ledger import read_ledger

SUSPICION_DOCS = {
    "suspicion_confidence": "1 − cartography confidence (mean probability of the given label)",
    "suspicion_aum": "− AUM (mean of gold logit − largest other logit); mislabeled examples have negative margins",
    "suspicion_forgetting": "forgetting events (correct → incorrect); never-learned examples get presentations + 1",
    "suspicion_loss": "mean training loss over all presentations",
    "suspicion_self_influence": "TracIn self-influence (`llm-dist influence`; merged from influence/self_influence.csv "
                                "when that ran)",
}
SCORE_DOCS = {
    "id": "stable example id (the split files' ids)",
    "label": "the given label (after planted noise, when any)",
    "text": "the first 200 characters of the text",
    "presentations": "ledger rows of the analysed pass",
    "epochs": "epochs seen",
    "confidence": "mean probability of the given label",
    "variability": "standard deviation of that probability",
    "correctness": "fraction of presentations predicted as the given label",
    "region": "easy | ambiguous | hard (cartography; see the module doc)",
    "forgetting_events": "correct → incorrect transitions (Toneva et al.)",
    "never_learned": "never predicted as the given label",
    "aum": "area under the margin (Pleiss et al.)",
    "loss_mean": "mean per-example loss",
    "loss_last": "the last presentation's loss",
    "suggested_label": "the label predicted most often in the last epoch",
    **SUSPICION_DOCS,
}


class AnalyzeError(Exception):
    """Bad input (no run dir, no ledger): one line, exit 2."""


def example_scores(df, names: list[str]):
    """One row per id from the merged ledger rows of one pass (sorted by id, epoch, presentation)."""
    import pandas as pd

    df = df.sort_values(["id", "epoch", "presentation"], kind="stable")
    g = df.groupby("id", sort=True)
    correct = (df["pred"].to_numpy() == df["label"].to_numpy()).astype(np.int8)
    df = df.assign(correct=correct)
    prev = df.groupby("id")["correct"].shift(1)
    forget = ((prev == 1) & (df["correct"] == 0)).groupby(df["id"]).sum()
    last_epoch = df[df["epoch"] == g["epoch"].transform("max")]
    counts = last_epoch.groupby(["id", "pred"]).size().reset_index(name="n")
    suggested = counts.sort_values(["id", "n", "pred"], ascending=[True, False, True]).drop_duplicates("id")
    suggested = suggested.set_index("id")["pred"]
    out = pd.DataFrame({
        "label": g["label"].first().map(lambda i: names[int(i)]),
        "presentations": g.size(),
        "epochs": g["epoch"].nunique(),
        "confidence": g["p_gold"].mean(),
        "variability": g["p_gold"].std(ddof=0),
        "correctness": df.groupby("id")["correct"].mean(),
        "forgetting_events": forget.astype(int),
        "never_learned": df.groupby("id")["correct"].max() == 0,
        "aum": g["margin"].mean(),
        "loss_mean": g["loss"].mean(),
        "loss_last": g["loss"].last(),
        "suggested_label": suggested.map(lambda i: names[int(i)]),
    })
    out.index.name = "id"
    out = out.reset_index()
    third = out["variability"].quantile(2 / 3) if len(out) else 0.0
    out["region"] = np.where(out["variability"] > third, "ambiguous",
                             np.where(out["confidence"] < 0.5, "hard", "easy"))
    out["suspicion_confidence"] = 1.0 - out["confidence"]
    out["suspicion_aum"] = -out["aum"]
    out["suspicion_forgetting"] = np.where(out["never_learned"], out["presentations"] + 1,
                                           out["forgetting_events"]).astype(float)
    out["suspicion_loss"] = out["loss_mean"]
    return out


def select(scores, region: str, fraction: float):
    """Cartography's selections: the `fraction` most ambiguous (highest variability), hardest (lowest
    confidence) or easiest (highest confidence) training examples."""
    k = max(1, int(round(fraction * len(scores))))
    if region == "ambiguous":
        order = scores.sort_values(["variability", "id"], ascending=[False, True])
    elif region == "hard":
        order = scores.sort_values(["confidence", "id"], ascending=[True, True])
    else:
        order = scores.sort_values(["confidence", "id"], ascending=[False, True])
    return order.head(k)


def _train_split(run_dir: Path):
    """(ids → text, label names) of the run's training split as the run saw it (planted noise included), or
    (None, None) when its data cannot be loaded here."""
    from ...config import ConfigError, load_config
    from ...data.classify import label_maps, load_splits
    from ...data.sources import DataError

    try:
        cfg = load_config(run_dir / "config.yaml", [])
        train = load_splits(cfg, pinned=run_dir / "splits")["train"]
    except (ConfigError, DataError, OSError) as e:
        print(f"warning: {run_dir}: the training data does not load here ({str(e).splitlines()[0]}); no texts",
              file=sys.stderr)
        return None, None, None
    _, id2label = label_maps(train)
    rows = {i: (t, lab) for i, t, lab in zip(train["id"], train["text"], train["label"])}
    return rows, [id2label[i] for i in range(len(id2label))], cfg


def load(run_dir, pass_: str | None = None, progress: bool = False):
    """(scores DataFrame, meta, train rows {id: (text, label)} or None, run config or None, pass analysed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AnalyzeError(f"{run_dir}: no such run directory")
    df = read_ledger(run_dir, progress)
    if df is None:
        raise AnalyzeError(f"{run_dir}: no training-dynamics ledger (dynamics/rank*.parquet); train with "
                           "--dynamics.enabled=true")
    meta_f = run_dir / "dynamics" / "meta.json"
    meta = json.loads(meta_f.read_text()) if meta_f.exists() else {}
    rows, names, cfg = _train_split(run_dir)
    names = meta.get("labels") or names
    if not names:
        raise AnalyzeError(f"{run_dir}: no label names (dynamics/meta.json missing and the data does not load)")
    want = pass_ or meta.get("pass", "train")
    if not (df["pass"] == want).any():
        if pass_ is not None:
            raise AnalyzeError(f"{run_dir}: the ledger has no '{want}' rows (it has: {', '.join(sorted(set(df['pass'])))})")
        want = "train"
    scores = example_scores(df[df["pass"] == want], names)
    if rows is not None:
        scores.insert(2, "text", scores["id"].map(lambda i: rows[i][0][:200] if i in rows else ""))
    else:
        scores.insert(2, "text", "")
    return scores, meta, rows, cfg, want


def analyze(run_dir, pass_: str | None = None, progress: bool = False, wandb: bool | None = None) -> dict:
    """Write RUN_DIR/analysis/ (example_scores.parquet/.csv, label_issues.csv, data_map.png, report.md/.html,
    scores.json) and return scores.json's dict."""
    from ..detectors import agreement, detector_table, score_detectors
    from ...data.noise import read_flipped

    run_dir = Path(run_dir)
    scores, meta, rows, cfg, used = load(run_dir, pass_, progress)
    si = run_dir / "influence" / "self_influence.csv"
    if si.exists():  # `llm-dist influence` ran first: keep its detector in the table and the comparison
        import pandas as pd

        scores = scores.merge(pd.read_csv(si, usecols=["id", "suspicion_self_influence"]), on="id", how="left")
    out = run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    flipped = read_flipped(run_dir)
    _atomic(out / "example_scores.parquet", lambda p: scores.to_parquet(p, index=False))
    _atomic(out / "example_scores.csv", lambda p: scores.to_csv(p, index=False))
    issues = label_issues(scores, rows)
    _atomic(out / "label_issues.csv", lambda p: issues.to_csv(p, index=False))
    _data_map(scores, flipped, out / "data_map.png")
    summary = {"run_dir": str(run_dir), "pass": used, "examples": int(len(scores)),
               "epochs": int(scores["epochs"].max()) if len(scores) else 0,
               "presentations": int(scores["presentations"].sum()),
               "regions": {r: int((scores["region"] == r).sum()) for r in ("easy", "ambiguous", "hard")},
               "label_issues": int(len(issues)), "columns": SCORE_DOCS}
    if flipped is not None:
        n_flipped = len(flipped & set(scores["id"]))
        summary["noise"] = {"flipped": n_flipped}
        summary["detectors"] = score_detectors(scores, flipped)
        summary["agreement"] = agreement(scores, k=max(1, n_flipped))
    else:
        summary["agreement"] = agreement(scores)
    _atomic(out / "scores.json", lambda p: Path(p).write_text(json.dumps(summary, indent=1, default=float)))
    md, html = _report(summary, scores, issues, out / "data_map.png", detector_table)
    _atomic(out / "report.md", lambda p: Path(p).write_text(md))
    _atomic(out / "report.html", lambda p: Path(p).write_text(html))
    if wandb is None:
        wandb = cfg is not None and cfg.tracking.report_to == "wandb"
    if wandb:
        _log_wandb(run_dir, cfg, summary, scores, out / "data_map.png")
    return summary


def label_issues(scores, rows):
    """Suspected mislabels: examples whose last-epoch prediction disagrees with the given label, ranked by
    `suspicion_aum` (highest first)."""
    bad = scores[scores["suggested_label"] != scores["label"]]
    bad = bad.sort_values(["suspicion_aum", "id"], ascending=[False, True])
    full = (lambda i: rows[i][0] if i in rows else "") if rows is not None else (lambda i: "")
    out = bad[["id", "label", "suggested_label", "suspicion_aum"]].rename(
        columns={"label": "given_label", "suspicion_aum": "score"})
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    out["text"] = [full(i)[:500] for i in out["id"]]
    return out.reset_index(drop=True)


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _data_map(scores, flipped, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    sc = ax.scatter(scores["variability"], scores["confidence"], c=scores["correctness"], cmap="viridis",
                    vmin=0, vmax=1, s=10, alpha=0.8)
    if flipped:
        m = scores["id"].isin(flipped)
        ax.scatter(scores.loc[m, "variability"], scores.loc[m, "confidence"], marker="x", c="red", s=14,
                   linewidths=0.8, label="planted flip")
        ax.legend(loc="lower right")
    fig.colorbar(sc, ax=ax, label="correctness")
    ax.set_xlabel("variability")
    ax.set_ylabel("confidence")
    ax.set_title(f"data map ({len(scores)} training examples)")
    fig.tight_layout()
    _atomic(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def _md(df) -> str:
    """A DataFrame as a markdown table (floats to 3 decimals)."""
    cell = lambda v: f"{v:.3f}" if isinstance(v, (float, np.floating)) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + " --- |" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _report(summary, scores, issues, png: Path, detector_table) -> tuple[str, str]:
    import pandas as pd

    regions = pd.DataFrame([summary["regions"]])
    lines = [f"# Training dynamics: {summary['run_dir']}", "",
             f"{summary['examples']} training examples, {summary['epochs']} epochs, {summary['presentations']} "
             f"ledger rows (pass `{summary['pass']}`), {summary['label_issues']} suspected label issues.", "",
             "![data map](data_map.png)", "", "## Regions", "", _md(regions), ""]
    if summary.get("detectors"):
        lines += ["## Detectors vs planted noise", "", f"{summary['noise']['flipped']} flipped training labels "
                  "(noise.json).", "", detector_table(summary["detectors"]), ""]
    if summary.get("agreement"):
        ag = pd.DataFrame([{"pair": k, **v} for k, v in summary["agreement"].items()])
        lines += ["## Detector agreement", "", _md(ag), ""]
    top = issues.head(20).assign(text=lambda d: d["text"].str.slice(0, 80).str.replace("\n", " ").str.replace("|", "/"))
    lines += ["## Top suspected label issues", "", _md(top) if len(top) else "none", "",
              "## Columns of example_scores", "", "| column | meaning |", "| --- | --- |"]
    lines += [f"| `{k}` | {v} |" for k, v in SCORE_DOCS.items()]
    md = "\n".join(lines) + "\n"
    img = base64.b64encode(png.read_bytes()).decode()
    parts = [f"<h1>Training dynamics: {summary['run_dir']}</h1>",
             f"<p>{summary['examples']} training examples, {summary['epochs']} epochs, pass {summary['pass']}.</p>",
             f'<img src="data:image/png;base64,{img}" alt="data map">', "<h2>Regions</h2>",
             regions.to_html(index=False)]
    if summary.get("detectors"):
        det = pd.DataFrame([{"detector": k, **v} for k, v in summary["detectors"].items()])
        parts += ["<h2>Detectors vs planted noise</h2>", det.to_html(index=False, float_format="%.3f")]
    if summary.get("agreement"):
        parts += ["<h2>Detector agreement</h2>", ag.to_html(index=False, float_format="%.3f")]
    parts += ["<h2>Top suspected label issues</h2>", top.to_html(index=False, float_format="%.3f")]
    html = ("<!doctype html><html><head><meta charset='utf-8'><title>training dynamics</title></head><body>"
            + "\n".join(parts) + "</body></html>\n")
    return md, html


def _log_wandb(run_dir: Path, cfg, summary, scores, png: Path) -> None:
    """The data map, the detector table and a sampled per-example table, into the run's W&B run (offline
    unless WANDB_MODE says otherwise): the live one at the end of training, else a new `-analyze` run."""
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        import wandb

        run, own = wandb.run, False
        if run is None:
            run = wandb.init(project=cfg.tracking.project, dir=str(run_dir), job_type="analyze",
                             name=f"{cfg.tracking.run_name or run_dir.name}-analyze")
            own = True
        log = {"dynamics/data_map": wandb.Image(str(png)),
               "dynamics/examples": wandb.Table(dataframe=scores.sample(min(500, len(scores)), random_state=0))}
        if summary.get("detectors"):
            log["dynamics/detectors"] = wandb.Table(
                columns=["detector", "auroc", "auprc", "precision_at_k", "k", "base_rate"],
                data=[[k, v["auroc"], v["auprc"], v["precision_at_k"], v["k"], v["base_rate"]]
                      for k, v in summary["detectors"].items()])
        run.log(log)
        if own:
            run.finish()
    except Exception as e:  # noqa: BLE001 - tracking must not fail the analysis
        print(f"warning: W&B logging of the analysis failed: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`llm-dist analyze RUN_DIR [--pass train|eval] [--select ambiguous|hard|easy --fraction F --out FILE.jsonl]`."""
    ap = argparse.ArgumentParser(prog="llm-dist analyze", description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--pass", dest="pass_", choices=("train", "eval"), default=None,
                    help="ledger rows to analyse (default: the run's dynamics.pass)")
    ap.add_argument("--select", choices=("ambiguous", "hard", "easy"))
    ap.add_argument("--fraction", type=float, default=0.33)
    ap.add_argument("--out", help="with --select: the JSONL training file to write (id, text, label)")
    ap.add_argument("--no-wandb", action="store_true", help="do not log to W&B even if the run did")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    try:
        if a.select:
            if not a.out:
                raise AnalyzeError("--select needs --out FILE.jsonl")
            if not 0 < a.fraction <= 1:
                raise AnalyzeError(f"--fraction must be in (0, 1], got {a.fraction}")
            scores, _, rows, _, _ = load(Path(a.run_dir), a.pass_, progress=not a.quiet)
            if rows is None:
                raise AnalyzeError(f"{a.run_dir}: the run's training data does not load here: no texts to select")
            chosen = select(scores, a.select, a.fraction)
            out = Path(a.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            _atomic(out, lambda p: Path(p).write_text("".join(
                json.dumps({"id": i, "text": rows[i][0], "label": rows[i][1]}) + "\n" for i in chosen["id"])))
            print(f"analyze: {len(chosen)} {a.select} examples of {len(scores)} → {out} "
                  f"(train on it with --data.train={out} --data.id_column=id)")
            return 0
        s = analyze(Path(a.run_dir), a.pass_, progress=not a.quiet, wandb=False if a.no_wandb else None)
    except AnalyzeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not a.quiet:
        print(f"analyze: {s['examples']} examples, regions {s['regions']}, {s['label_issues']} suspected label "
              f"issues → {Path(a.run_dir) / 'analysis'}")
        for name, m in sorted((s.get("detectors") or {}).items()):
            print(f"  {name}: AUROC {m['auroc']:.3f}  AUPRC {m['auprc']:.3f}  precision@{m['k']} {m['precision_at_k']:.3f}")
    return 0
