"""`experiment_report.{json,md,html}` + plots from an experiment's finished runs (recomputed from the run
dirs every time): per variant and metric the mean, std and 95% CI over seeds, the paired difference from
the baseline (and, for removal by a detector, from removing a random k%), throughput and wall time; for a
scale sweep the fitted power law; plots of bars with CIs and the learning curve with the fit."""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path

import numpy as np

from ...config import write_text_atomic
from . import stats
from .plan import Plan

# metric name → (where in run.json, higher is better)
CLASSIFY_METRICS = {
    "accuracy": (("test", "accuracy"), True),
    "macro_f1": (("test", "macro_f1"), True),
    "balanced_accuracy": (("test", "balanced_accuracy"), True),
    "clean_accuracy": (("test_clean", "accuracy"), True),
    "clean_macro_f1": (("test_clean", "macro_f1"), True),
    "test_loss": (("test", "loss"), False),
    "contaminated_accuracy": (("test_contaminated", "accuracy"), True),  # data.contamination: the copied …
    "uncontaminated_accuracy": (("test_uncontaminated", "accuracy"), True),  # … and the other test examples
}
MLM_METRICS = {
    "eval_loss": (("eval", "eval_loss"), False),
    "perplexity": (("eval", "perplexity"), False),
    "eval_accuracy": (("eval", "eval_accuracy"), True),
}


def _get(d: dict, path: tuple):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return float(d) if isinstance(d, (int, float)) else None


def run_values(out: Path, seconds: float | None) -> dict | None:
    """The numbers of one finished run (None when it has not finished)."""
    try:
        rj = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return None
    if rj.get("signalled") or not ("test" in rj or "eval" in rj):
        return None
    table = CLASSIFY_METRICS if "test" in rj else MLM_METRICS
    vals = {k: _get(rj, path) for k, (path, _) in table.items()}
    vals = {k: v for k, v in vals.items() if v is not None}
    rob = rj.get("robustness") or {}  # classify.robustness: accuracy under word-level / embedding attacks
    vals.update({f"words@{k}": float(v) for k, v in (rob.get("word_level") or {}).items()})
    vals.update({f"embedding@{k}": float(v) for k, v in (rob.get("embedding") or {}).items()})
    if "accuracy" in vals and "uncontaminated_accuracy" in vals:  # how much the copies inflate test accuracy
        vals["inflation"] = vals["accuracy"] - vals["uncontaminated_accuracy"]
    train_s = rj.get("train_seconds")
    perf = {"tokens_per_s": rj["tokens_seen"] / train_s if train_s else None, "train_seconds": train_s,
            "wall_seconds": seconds, "tokens_seen": rj.get("tokens_seen")}
    data = rj.get("data", {})
    x = data.get("train_examples") if "test" in rj else rj.get("tokens_seen")
    return {"metrics": vals, "perf": perf, "x": x, "interventions": data.get("interventions", {})}


def higher_is_better(metric: str) -> bool:
    return {**CLASSIFY_METRICS, **MLM_METRICS, "inflation": (None, False)}.get(metric, (None, True))[1]


def build(plan: Plan) -> dict:
    timing = plan.out / "run_seconds.json"
    seconds = json.loads(timing.read_text()) if timing.exists() else {}
    per: dict[str, dict[int, dict]] = {v.name: {} for v in plan.variants}
    missing = []
    for r in plan.runs:
        vals = run_values(r.out, seconds.get(r.key))
        if vals is None:
            missing.append(r.key)
        else:
            per[r.variant][r.seed] = vals
    names = set()
    for runs in per.values():
        for v in runs.values():
            names.update(v["metrics"])
    order = list(CLASSIFY_METRICS) + ["inflation"] + list(MLM_METRICS)
    order += sorted(n for n in names if n.startswith(("words@", "embedding@")))
    wanted = plan.spec.get("metrics")
    metrics = [m for m in (wanted or order) if m in names]
    base = per.get(plan.baseline, {})
    variants = []
    for v in plan.variants:
        runs = per[v.name]
        row = {"name": v.name, "overrides": v.overrides, "n_seeds": len(runs), "seeds": sorted(runs),
               "run_dirs": {str(r.seed): str(r.out) for r in plan.runs if r.variant == v.name},
               "metrics": {}, "delta_vs_base": {}}
        for m in metrics:
            by_seed = {s: r["metrics"].get(m) for s, r in runs.items()}
            row["metrics"][m] = {**stats.summary(list(by_seed.values())),
                                 "values": {str(s): x for s, x in sorted(by_seed.items())}}
            if v.name != plan.baseline:
                d = stats.paired(by_seed, {s: r["metrics"].get(m) for s, r in base.items()})
                if d is not None:
                    row["delta_vs_base"][m] = d
        if v.removal and "detector" in v.removal:  # the detector against a random removal of the same size
            rnd = next((w for w in plan.variants if w.removal and w.removal.get("random")
                        and w.removal["fraction"] == v.removal["fraction"]), None)
            if rnd is not None:
                row["delta_vs_random"] = {}
                for m in metrics:
                    d = stats.paired({s: r["metrics"].get(m) for s, r in runs.items()},
                                     {s: r["metrics"].get(m) for s, r in per[rnd.name].items()})
                    if d is not None:
                        row["delta_vs_random"][m] = d
                row["random_variant"] = rnd.name
        if v.removal:
            row["removal"] = v.removal
        row["perf"] = {k: stats.summary([r["perf"][k] for r in runs.values()])
                       for k in ("tokens_per_s", "train_seconds", "wall_seconds")}
        xs = [r["x"] for r in runs.values() if r["x"] is not None]
        row["train_examples" if per and _is_classify(runs) else "tokens"] = float(np.mean(xs)) if xs else None
        if v.sweep_value is not None:
            row["sweep_value"] = v.sweep_value
        variants.append(row)
    rep = {"name": plan.name, "claim": plan.spec.get("claim"), "spec": str(plan.spec_path),
           "base": str(plan.spec.get("base")), "seeds": plan.seeds, "baseline": plan.baseline,
           "output_dir": str(plan.out), "metrics": metrics, "variants": variants, "missing_runs": missing}
    sweep = plan.spec.get("sweep")
    if sweep:
        rep["scaling"] = _scaling(plan, per, sweep, metrics)
    if plan.spec.get("curves"):
        rep["curves"] = _curves(per, plan.spec["curves"], metrics)
    if plan.spec.get("removal"):
        from .plan import scores_path

        rep["removal"] = {"scores": str(scores_path(plan)), "fractions": plan.spec["removal"].get("fractions", [0.1]),
                          "detectors": plan.spec["removal"].get("detectors", [])}
    return rep


def _is_classify(runs: dict) -> bool:
    return any("accuracy" in r["metrics"] for r in runs.values())


def _scaling(plan: Plan, per: dict, sweep: dict, metrics: list) -> dict:
    metric = sweep.get("metric") or (metrics[0] if metrics else None)
    if metric is None:
        return {"error": "no metric"}
    hib = higher_is_better(metric)
    points: dict[float, list] = {}
    for v in plan.variants:
        if v.sweep_value is None:
            continue
        for r in per[v.name].values():
            val = r["metrics"].get(metric)
            if val is None or r["x"] is None:
                continue
            points.setdefault(float(r["x"]), []).append(1.0 - val if hib else val)
    out = {"metric": metric, "error_is": f"1 - {metric}" if hib else metric,
           "x": "train_examples" if metric in CLASSIFY_METRICS else "tokens", "sweep_key": sweep["key"]}
    if len(points) < 3:
        return {**out, "error": f"a power-law fit needs at least 3 finished sizes, got {len(points)}"}
    try:
        fit = stats.scaling(points)
    except ValueError as e:
        return {**out, "error": str(e)}
    return {**out, **fit}


def _curves(per: dict, spec: dict, metrics: list) -> dict:
    """Learning curves (spec `curves`): each curve's points (x, mean, 95% CI over seeds); at each x both of
    `worth`'s curves have, their paired difference; and at each point of the first, the x at which the
    second reaches the same mean — what the first is worth in the second's units (e.g. labelled examples
    per class a prompt saves over a classification head)."""
    metric = spec.get("metric") or (metrics[0] if metrics else "accuracy")
    out = {"metric": metric, "x": spec.get("x", "x"), "curves": {}}
    values = {}
    for name, pts in spec["of"].items():
        rows = []
        for variant, x in pts.items():
            by_seed = {s: r["metrics"].get(metric) for s, r in per.get(variant, {}).items()}
            s = stats.summary(list(by_seed.values()))
            if s["mean"] is not None:
                rows.append({"variant": variant, "x": float(x), **s,
                             "values": {str(k): v for k, v in sorted(by_seed.items())}})
                values[(name, float(x))] = by_seed
        out["curves"][name] = sorted(rows, key=lambda r: r["x"])
    pair = spec.get("worth")
    if pair:
        a, b = pair
        xb = [r["x"] for r in out["curves"][b]]
        yb = [r["mean"] for r in out["curves"][b]]
        rows = []
        for r in out["curves"][a]:
            eq, where = stats.equivalent_x(r["mean"], xb, yb)
            row = {"x": r["x"], a: r["mean"], "equivalent_x": eq, "where": where,
                   "worth": None if eq is None else eq - r["x"]}
            if (b, r["x"]) in values:
                row[b] = next(p["mean"] for p in out["curves"][b] if p["x"] == r["x"])
                row["delta"] = stats.paired(values[(a, r["x"])], values[(b, r["x"])])
            rows.append(row)
        out["worth"] = {"of": a, "in": b, "points": rows}
    return out


def _curves_md(c: dict) -> list[str]:
    lines = [f"## Learning curves ({c['metric']} against {c['x']})", ""]
    names = list(c["curves"])
    xs = sorted({r["x"] for rows in c["curves"].values() for r in rows})
    w = c.get("worth")
    head = [c["x"]] + [f"{n} mean [95% CI]" for n in names]
    if w:
        head += [f"{w['of']} − {w['in']} (paired) [95% CI], p", f"{w['of']} is worth ({w['in']} {c['x']})"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    byx = {(n, r["x"]): r for n, rows in c["curves"].items() for r in rows}
    wx = {p["x"]: p for p in (w or {}).get("points", [])}
    for x in xs:
        row = [_fmt(x, 0)]
        for n in names:
            r = byx.get((n, x))
            row.append(f"{_fmt(r['mean'])} {_ci(r['ci95'])}" if r else "–")
        if w:
            p = wx.get(x)
            d = (p or {}).get("delta")
            row.append(f"{_fmt(d['mean'])} {_ci(d.get('ci95'))}, p={_fmt(d.get('p_value'), 3)}" if d else "–")
            if p is None:
                row.append("–")
            elif p["equivalent_x"] is None:
                row.append(f"{p['where']} the {w['in']} curve's range")
            else:
                row.append(f"{_fmt(p['equivalent_x'], 1)} ({p['worth']:+.1f})")
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


# ----------------------------------------------------------------------------- writing
def _fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _ci(ci) -> str:
    return "–" if not ci else f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def tables(rep: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    out = []
    for m in rep["metrics"]:
        rows = []
        for v in rep["variants"]:
            s, d = v["metrics"].get(m, {}), v["delta_vs_base"].get(m)
            row = [v["name"], str(v["n_seeds"]), _fmt(s.get("mean")), _fmt(s.get("std")), _ci(s.get("ci95")),
                   "(baseline)" if v["name"] == rep["baseline"] else (_fmt(d["mean"]) if d else "–"),
                   _ci(d.get("ci95")) if d else "–", _fmt(d.get("p_value"), 3) if d else "–"]
            if any("delta_vs_random" in w for w in rep["variants"]):
                r = v.get("delta_vs_random", {}).get(m)
                row.append(f"{_fmt(r['mean'])} {_ci(r.get('ci95'))} p={_fmt(r.get('p_value'), 3)}" if r else "–")
            rows.append(row)
        head = ["variant", "seeds", "mean", "std", "95% CI", "Δ vs baseline", "Δ 95% CI", "paired p"]
        if any("delta_vs_random" in w for w in rep["variants"]):
            head.append("Δ vs random removal (95% CI, p)")
        out.append((f"test {m}" if not m.startswith(("eval", "perp")) else m, head, rows))
    perf = [[v["name"], _fmt(v.get("train_examples") or v.get("tokens"), 0),
             _fmt(v["perf"]["tokens_per_s"]["mean"], 0), _fmt(v["perf"]["train_seconds"]["mean"], 1),
             _fmt(v["perf"]["wall_seconds"]["mean"], 1)] for v in rep["variants"]]
    out.append(("data and speed", ["variant", "train examples (mean)", "tokens/s", "train s", "wall s"], perf))
    return out


def markdown(rep: dict) -> str:
    lines = [f"# Experiment: {rep['name']}", ""]
    if rep.get("claim"):
        lines += [f"Claim tested: {rep['claim']}", ""]
    lines += [f"Base config `{rep['base']}`, seeds {rep['seeds']}, baseline `{rep['baseline']}`. Means over seeds "
              "with 95% t-intervals; Δ is paired by seed (same subset, initialisation and batch order), p from a "
              "paired t-test.", ""]
    if rep["missing_runs"]:
        lines += [f"**Not finished ({len(rep['missing_runs'])}):** {', '.join(rep['missing_runs'])}", ""]
    for title, head, rows in tables(rep):
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    sc = rep.get("scaling")
    if sc:
        lines += ["## Scaling", ""]
        if "error" in sc:
            lines += [f"No fit: {sc['error']}", ""]
        else:
            lines += [f"err(n) = a·n^(−b) + c with err = {sc['error_is']}, n = {sc['x']}: a = {sc['a']:.4g} "
                      f"{_ci(sc['a_ci95'])}, b = {sc['b']:.3f} {_ci(sc['b_ci95'])}, c = {sc['c']:.4f} "
                      f"{_ci(sc['c_ci95'])} (bootstrap over seeds, {sc['bootstrap']} fits); R² = {_fmt(sc['r2'], 3)}; "
                      f"monotone: {'yes' if sc['monotone'] else 'no ' + str(sc['monotonicity_violations'])}.", ""]
            ex = sc.get("extrapolation")
            if ex:
                lines += [f"Extrapolation: fitted on n = {ex['fit_on']}, predicts {ex['predicted']:.4f} at n = "
                          f"{ex['n']} where {ex['measured']:.4f} was measured (error {ex['error']:+.4f}).", ""]
            else:
                lines += ["Extrapolation: needs at least 4 sizes.", ""]
            for k, p in sc["predicted"].items():
                lines.append(f"- predicted err at {k} the data (n = {p['n']:.0f}): {p['value']:.4f} {_ci(p['ci95'])}")
            lines.append("")
    if rep.get("curves"):
        lines += _curves_md(rep["curves"])
    return "\n".join(lines)


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plots(rep: dict) -> dict[str, str]:
    """{name: base64 PNG}: bars with CIs per metric, and the learning curve with the fitted law."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    for m in rep["metrics"][:4]:
        vs = [v for v in rep["variants"] if v["metrics"].get(m, {}).get("mean") is not None]
        if not vs:
            continue
        fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(vs) + 1.5), 3.2))
        means = [v["metrics"][m]["mean"] for v in vs]
        err = [[mu - (v["metrics"][m]["ci95"] or [mu, mu])[0] for mu, v in zip(means, vs)],
               [(v["metrics"][m]["ci95"] or [mu, mu])[1] - mu for mu, v in zip(means, vs)]]
        ax.bar(range(len(vs)), means, yerr=err, capsize=4, color="#4c72b0")
        for i, v in enumerate(vs):
            xs = [float(x) for x in v["metrics"][m]["values"].values() if x is not None]
            ax.scatter([i] * len(xs), xs, color="k", s=8, zorder=3)
        ax.set_xticks(range(len(vs)), [v["name"] for v in vs], rotation=30, ha="right", fontsize=8)
        lo = min(min(x for x in [mu - e for mu, e in zip(means, err[0])]), min(means))
        ax.set_ylim(max(0.0, lo - 0.1 * abs(lo)) if lo > 0 else None)
        ax.set_ylabel(m)
        ax.set_title(f"{rep['name']}: {m} (mean, 95% CI, seeds as dots)", fontsize=9)
        out[f"bars_{m}"] = _png(fig)
    sc = rep.get("scaling")
    if sc and "error" not in sc:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        pts = sc["points"]
        ns = np.array([float(n) for n in pts])
        for n, p in pts.items():
            ax.scatter([float(n)] * len(p["values"]), p["values"], color="k", s=10, zorder=3)
        means = np.array([p["mean"] for p in pts.values()])
        ax.plot(ns, means, "o", color="#4c72b0", label="mean over seeds")
        grid = np.geomspace(ns.min(), ns.max() * 10, 100)
        ax.plot(grid, stats.power_law(grid, sc["a"], sc["b"], sc["c"]), "-", color="#dd8452",
                label=f"fit a·n^-{sc['b']:.2f} + {sc['c']:.3f}")
        lo = [p["ci95"][0] if p["ci95"] else p["value"] for p in sc["predicted"].values()]
        hi = [p["ci95"][1] if p["ci95"] else p["value"] for p in sc["predicted"].values()]
        px = [p["n"] for p in sc["predicted"].values()]
        ax.errorbar(px, [p["value"] for p in sc["predicted"].values()],
                    yerr=[np.subtract([p["value"] for p in sc["predicted"].values()], lo),
                          np.subtract(hi, [p["value"] for p in sc["predicted"].values()])],
                    fmt="s", color="#c44e52", capsize=4, label="predicted (2×, 10×; 95% CI)")
        ax.set_xscale("log")
        ax.set_xlabel(sc["x"])
        ax.set_ylabel(sc["error_is"])
        ax.set_title(f"{rep['name']}: learning curve", fontsize=9)
        ax.legend(fontsize=7)
        out["learning_curve"] = _png(fig)
    cv = rep.get("curves")
    if cv and any(cv["curves"].values()):
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for name, rows in cv["curves"].items():
            if not rows:
                continue
            xs = [r["x"] for r in rows]
            ms = [r["mean"] for r in rows]
            lo = [m - (r["ci95"] or [m, m])[0] for m, r in zip(ms, rows)]
            hi = [(r["ci95"] or [m, m])[1] - m for m, r in zip(ms, rows)]
            ax.errorbar(xs, ms, yerr=[lo, hi], fmt="o-", capsize=3, label=name)
            for r in rows:
                vals = [v for v in r["values"].values() if v is not None]
                ax.scatter([r["x"]] * len(vals), vals, color="k", s=6, zorder=3)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel(cv["x"])
        ax.set_ylabel(cv["metric"])
        ax.set_title(f"{rep['name']}: learning curves (mean, 95% CI, seeds as dots)", fontsize=9)
        ax.legend(fontsize=7)
        out["curves"] = _png(fig)
    return out


def html_report(rep: dict, images: dict[str, str]) -> str:
    e = html.escape
    parts = [f"<html><head><meta charset='utf-8'><title>Experiment {e(rep['name'])}</title><style>"
             "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px}</style></head><body>",
             f"<h1>Experiment: {e(rep['name'])}</h1>"]
    if rep.get("claim"):
        parts.append(f"<p><b>Claim tested:</b> {e(rep['claim'])}</p>")
    parts.append(f"<p>Base <code>{e(rep['base'])}</code>, seeds {e(str(rep['seeds']))}, baseline "
                 f"<code>{e(rep['baseline'])}</code>; means with 95% t-intervals, Δ paired by seed.</p>")
    if rep["missing_runs"]:
        parts.append(f"<p><b>Not finished:</b> {e(', '.join(rep['missing_runs']))}</p>")
    for title, head, rows in tables(rep):
        parts.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
                     + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")
    md = markdown(rep)
    if "## Scaling" in md:
        parts.append("<h2>Scaling</h2><pre>" + e(md.split("## Scaling", 1)[1].split("## Learning curves")[0].strip())
                     + "</pre>")
    if "## Learning curves" in md:
        parts.append("<h2>Learning curves</h2><pre>" + e(md.split("## Learning curves", 1)[1].strip()) + "</pre>")
    for name, img in images.items():
        parts.append(f"<h3>{e(name)}</h3><img src='data:image/png;base64,{img}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write(plan: Plan, rep: dict) -> dict[str, Path]:
    out = plan.out
    images = plots(rep)
    paths = {"json": out / "experiment_report.json", "md": out / "experiment_report.md",
             "html": out / "experiment_report.html"}
    write_text_atomic(paths["json"], json.dumps(rep, indent=1, default=float))
    write_text_atomic(paths["md"], markdown(rep) + "\n")
    write_text_atomic(paths["html"], html_report(rep, images))
    for name, img in images.items():
        p = out / f"{name}.png"
        tmp = p.with_suffix(".png.tmp")
        tmp.write_bytes(base64.b64decode(img))
        os.replace(tmp, p)
        paths[name] = p
    return paths


def log_wandb(plan: Plan, rep: dict, paths: dict) -> None:
    """The report into W&B (offline unless WANDB_MODE says otherwise): one `<name>/report` run in the
    experiment's group, next to the runs themselves."""
    os.environ.setdefault("WANDB_MODE", "offline")
    import wandb

    first = plan.runs[0].cfg
    run = wandb.init(project=first["tracking"]["project"], group=plan.name, name=f"{plan.name}/report",
                     job_type="experiment-report", dir=str(plan.out), reinit=True)
    cols = ["variant", "metric", "n", "mean", "std", "ci_low", "ci_high", "delta", "p_value"]
    rows = []
    for v in rep["variants"]:
        for m, s in v["metrics"].items():
            d = v["delta_vs_base"].get(m, {})
            ci = s.get("ci95") or [None, None]
            rows.append([v["name"], m, s["n"], s["mean"], s["std"], ci[0], ci[1], d.get("mean"), d.get("p_value")])
    log = {"experiment/variants": wandb.Table(columns=cols, data=rows)}
    for k, p in paths.items():
        if str(p).endswith(".png"):
            log[f"experiment/{k}"] = wandb.Image(str(p))
    sc = rep.get("scaling")
    if sc and "error" not in sc:
        run.summary.update({f"scaling/{k}": sc[k] for k in ("a", "b", "c", "r2") if sc.get(k) is not None})
    run.log(log)
    run.finish()
