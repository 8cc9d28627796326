"""Out-of-fold probabilities → detectors → `example_scores.{parquet,csv}`, `label_issues.csv`, `scores.json`,
`report.md`, `report.html`.

Columns (one row per training id; `suspicion_*`: higher = more likely mislabeled):

| column | meaning |
| --- | --- |
| `id`, `label`, `text` | the example, its *given* label (noisy when the config plants noise), a 200-character preview |
| `fold` | the fold that held it out |
| `oof_prob_given` | out-of-fold probability of the given label |
| `oof_loss` | out-of-fold cross-entropy of the given label, −log p (p clipped at 1e-12) |
| `suggested_label` | the out-of-fold argmax |
| `cleanlab_issue` | `cleanlab.filter.find_label_issues` (confident learning, prune_by_noise_rate) flags it |
| `cleanlab_quality` | `cleanlab.rank.get_label_quality_scores` (method `--cleanlab_method`, default normalized_margin) |
| `suspicion_oof_loss` | = `oof_loss` (Chong et al. 2022) |
| `suspicion_cleanlab` | 1 − `cleanlab_quality` |
| `planted_flip` | only with planted noise: the id is in noise.json |

cleanlab's default quality (`self_confidence`) is p(given label), a monotone function of the out-of-fold
loss — the same ranking; the default here is `normalized_margin` (p(given) − max p(other)), so the two
columns are two detectors."""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from ..detectors import agreement, detector_table, score_detectors, suspicion_columns
from .folds import LabelIssuesError, Plan

PREVIEW = 200


def oof_probabilities(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [n, classes] in `plan.names` order, fold of each example), aligned with plan.rows."""
    pos = {r["id"]: j for j, r in enumerate(plan.rows)}
    probs = np.full((len(plan.rows), len(plan.names)), np.nan)
    fold = np.full(len(plan.rows), -1)
    for f in plan.folds:
        path = f.out / "predictions.jsonl"
        want = {plan.rows[j]["id"] for j in f.heldout}
        seen = set()
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if r["id"] not in want:
                raise LabelIssuesError(f"{path}: id {r['id']!r} is not in fold {f.k}'s held-out examples")
            p = r["probabilities"]
            missing = [n for n in plan.names if n not in p]
            if missing:
                raise LabelIssuesError(f"{path}: no probability for class '{missing[0]}'")
            j = pos[r["id"]]
            probs[j] = [p[n] for n in plan.names]
            fold[j] = f.k
            seen.add(r["id"])
        if seen != want:
            raise LabelIssuesError(f"{path}: {len(want - seen)} held-out example(s) of fold {f.k} have no prediction")
    probs = np.clip(probs, 0.0, None)
    probs = probs / probs.sum(1, keepdims=True)  # predictions.jsonl rounds to 6 decimals
    return probs, fold


def example_scores(plan: Plan, probs: np.ndarray, fold: np.ndarray, method: str = "normalized_margin"):
    import pandas as pd
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    index = {n: i for i, n in enumerate(plan.names)}
    y = np.array([index[r["label"]] for r in plan.rows])
    p_given = probs[np.arange(len(y)), y]
    loss = -np.log(np.clip(p_given, 1e-12, None))
    issues = find_label_issues(y, probs, n_jobs=1)
    quality = get_label_quality_scores(y, probs, method=method)
    df = pd.DataFrame({
        "id": [r["id"] for r in plan.rows], "label": [r["label"] for r in plan.rows],
        "text": [" ".join(r["text"].split())[:PREVIEW] for r in plan.rows], "fold": fold,
        "oof_prob_given": p_given, "oof_loss": loss,
        "suggested_label": [plan.names[i] for i in probs.argmax(1)],
        "cleanlab_issue": np.asarray(issues, dtype=bool), "cleanlab_quality": quality,
        "suspicion_oof_loss": loss, "suspicion_cleanlab": 1.0 - quality})
    if plan.flipped is not None:
        flipped = {r["id"] for r in plan.flipped}
        df["planted_flip"] = [i in flipped for i in df["id"]]
    return df


def merge_run(df, run_dir: Path):
    """Left-join a full-data run's `analysis/example_scores.parquet` on id (its label/text dropped; other
    clashing names get `_run`)."""
    import pandas as pd

    f = Path(run_dir) / "analysis" / "example_scores.parquet"
    if not f.is_file():
        raise LabelIssuesError(f"--run {run_dir}: no {f} (run `llm-dist analyze {run_dir}` first)")
    other = pd.read_parquet(f)
    if "id" not in other.columns:
        raise LabelIssuesError(f"{f}: no 'id' column")
    other = other.drop(columns=[c for c in ("label", "text") if c in other.columns])
    other["id"] = other["id"].astype(str)
    other = other.rename(columns={c: f"{c}_run" for c in other.columns if c != "id" and c in df.columns})
    merged = df.merge(other, on="id", how="left")
    matched = int(df["id"].isin(set(other["id"])).sum())
    return merged, matched


def write_outputs(plan: Plan, df, out: Path, info: dict) -> dict:
    """example_scores.{parquet,csv}, label_issues.csv, scores.json, report.md, report.html; returns scores."""
    from ...config import write_text_atomic

    df.to_parquet(out / ".example_scores.parquet.tmp", index=False)
    (out / ".example_scores.parquet.tmp").replace(out / "example_scores.parquet")
    df.to_csv(out / ".example_scores.csv.tmp", index=False)
    (out / ".example_scores.csv.tmp").replace(out / "example_scores.csv")
    ranked = df.sort_values(["cleanlab_issue", "suspicion_oof_loss"], ascending=[False, False], kind="stable")
    issues = ranked[ranked["cleanlab_issue"] | (ranked["suggested_label"] != ranked["label"])]
    table = issues.rename(columns={"label": "given_label", "suspicion_oof_loss": "score"})[
        ["id", "given_label", "suggested_label", "score", "suspicion_cleanlab", "cleanlab_issue", "text"]]
    table.to_csv(out / ".label_issues.csv.tmp", index=False)
    (out / ".label_issues.csv.tmp").replace(out / "label_issues.csv")

    y_pred_ok = (df["suggested_label"] == df["label"]).to_numpy()
    res = dict(info)
    res.update({"examples": len(df), "classes": plan.names, "oof_accuracy_given": float(y_pred_ok.mean()),
                "cleanlab_flagged": int(df["cleanlab_issue"].sum()), "suspicion_columns": suspicion_columns(df)})
    if plan.flipped is not None:
        flipped = {r["id"] for r in plan.flipped}
        truth = df["planted_flip"].to_numpy()
        orig = {r["id"]: r["original"] for r in plan.flipped}
        true_label = np.array([orig.get(i, lab) for i, lab in zip(df["id"], df["label"])])
        flagged = df["cleanlab_issue"].to_numpy()
        res["noise"] = {"rate": plan.cfg.data.label_noise.rate, "kind": plan.cfg.data.label_noise.kind,
                        "seed": plan.cfg.data.label_noise.seed, "flipped": len(flipped)}
        res["oof_accuracy_true"] = float((df["suggested_label"].to_numpy() == true_label).mean())
        res["detectors"] = score_detectors(df, flipped)
        res["agreement"] = agreement(df, k=len(flipped))
        res["cleanlab_issue_flag"] = {
            "precision": float(truth[flagged].mean()) if flagged.any() else float("nan"),
            "recall": float(flagged[truth].mean()) if truth.any() else float("nan")}
        res["suggested_is_original"] = float((df["suggested_label"].to_numpy()[truth] == true_label[truth]).mean()) \
            if truth.any() else float("nan")
    else:
        res["agreement"] = agreement(df)
    write_text_atomic(out / "scores.json", json.dumps(res, indent=1, default=float))
    md = markdown(res, issues)
    write_text_atomic(out / "report.md", md)
    write_text_atomic(out / "report.html", html_report(md))
    return res


def markdown(res: dict, issues) -> str:
    lines = ["# Label issues from out-of-fold probabilities", "",
             f"- config: `{res.get('config')}` ({res['examples']} training examples, {len(res['classes'])} classes)",
             f"- folds: {res.get('folds')} (stratified by the given label, seed {res.get('seed')}); seconds per fold: "
             + ", ".join(f"{s:.0f}" for s in res.get("fold_seconds", {}).values()),
             f"- out-of-fold accuracy against the given labels: {res['oof_accuracy_given']:.3f}",
             f"- cleanlab `find_label_issues` flags {res['cleanlab_flagged']} examples"]
    if "noise" in res:
        n = res["noise"]
        flag = res["cleanlab_issue_flag"]
        lines += [f"- planted noise: {n['kind']}, rate {n['rate']}, seed {n['seed']}: {n['flipped']} labels flipped",
                  f"- out-of-fold accuracy against the true labels: {res['oof_accuracy_true']:.3f}",
                  f"- cleanlab's flag: precision {flag['precision']:.3f}, recall {flag['recall']:.3f}; the suggested "
                  f"label is the original one for {res['suggested_is_original']:.3f} of the flipped examples",
                  "", "## Detectors against the planted noise", "",
                  "Each `suspicion_*` column ranks the training examples (higher = more likely mislabeled); k = the "
                  "number flipped, base rate = the AUPRC of a random ranking.", "", detector_table(res["detectors"])]
    if res.get("agreement"):
        lines += ["", "## Agreement between detectors", "", "| pair | Spearman | top-k overlap |", "| --- | --- | --- |"]
        lines += [f"| {k} | {v['spearman']:.3f} | {v['top_k_overlap']:.3f} |" for k, v in res["agreement"].items()]
    lines += ["", f"## Top suspected label issues ({len(issues)} flagged or mispredicted; first 25)", "",
              "| id | given | suggested | oof loss | text |", "| --- | --- | --- | --- | --- |"]
    for _, r in issues.head(25).iterrows():
        text = str(r["text"])[:100].replace("|", "\\|")
        lines.append(f"| {r['id']} | {r['label']} | {r['suggested_label']} | {r['suspicion_oof_loss']:.3f} | {text} |")
    lines += ["", "Full tables: example_scores.parquet / .csv, label_issues.csv, scores.json.", ""]
    return "\n".join(lines)


def html_report(md: str) -> str:
    """A self-contained HTML page from the markdown above (headings, bullets, tables, paragraphs)."""
    import re

    def inline(s: str) -> str:
        return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(s))

    out = ["<!doctype html><html><head><meta charset='utf-8'><title>Label issues</title><style>"
           "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
           "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px}"
           "th{background:#f3f3f3}code{background:#f6f6f6}</style></head><body>"]
    in_list = in_table = False
    for line in md.splitlines():
        if in_list and not line.startswith("- "):
            out.append("</ul>")
            in_list = False
        if in_table and not line.startswith("|"):
            out.append("</table>")
            in_table = False
        if line.startswith("# "):
            out.append(f"<h1>{inline(line[2:])}</h1>")
        elif line.startswith("## "):
            out.append(f"<h2>{inline(line[3:])}</h2>")
        elif line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{inline(line[2:])}</li>")
        elif line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if all(set(c) <= {"-", " "} for c in cells):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{inline(c)}</{tag}>" for c in cells) + "</tr>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    if in_list:
        out.append("</ul>")
    if in_table:
        out.append("</table>")
    out.append("</body></html>")
    return "".join(out)
