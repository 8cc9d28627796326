"""`audit.md` and a self-contained `audit.html` (plots inlined as PNG data URIs) from an audit result."""
from __future__ import annotations

import base64
import html
import io
from collections import Counter

from .features import PROFILE_FLAGS
from .pii import KINDS as PII_KINDS
from .quality import RULES


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return out


def _sections(res: dict) -> list[tuple[str, list[str], list[list], str]]:
    """(title, header, rows, note) tables shared by the markdown and the HTML report."""
    splits = res["splits"]
    names = list(splits)
    out = []
    rows = []
    for n in names:
        s = splits[n]
        ln = s["length"]
        rows.append([n, s["documents"], s["tokens"], ln["mean"], ln["p50"], ln["p99"], ln["max"], s["classes"],
                     s["imbalance_ratio"] if s["imbalance_ratio"] is not None else "-",
                     s.get("over_max_length", {}).get("count", "-")])
    out.append(("Profile", ["split", "documents", "tokens", "mean len", "p50", "p99", "max", "classes",
                            "imbalance (max/min)", "over max_length"], rows,
                f"Lengths in {res.get('tokenizer') or 'tokens'}."))
    if any("scripts" in splits[n] for n in names):
        from .text import SCRIPTS

        def cov(s, sc):
            c = (s.get("coverage") or {}).get(sc)
            if not c or not c["tokens"]:
                return "-"
            return f"{c['unknown_rate']:.2%} ({c['unknown']}/{c['tokens']})"

        out.append(("Scripts and tokenizer coverage",
                    ["split", "spaced docs", "CJK docs"] + [f"unknown tokens: {sc}" for sc in SCRIPTS],
                    [[n, splits[n]["scripts"]["spaced"], splits[n]["scripts"]["cjk"]] + [cov(splits[n], sc) for sc in SCRIPTS]
                     for n in names if "scripts" in splits[n]],
                    "Spaced documents are shingled by words, CJK ones (at least half their units Han/kana "
                    "characters) by characters. Unknown tokens: share of the tokenizer's tokens that are its "
                    "unknown token, by the script of the token's first character ('-': no tokenizer offsets)."))
    classes = sorted({c for n in names for c in splits[n]["class_counts"]})
    if classes:
        out.append(("Class distribution", ["class"] + names,
                    [[c] + [splits[n]["class_counts"].get(c, 0) for n in names] for c in classes], ""))
    out.append(("Text checks", ["check"] + names,
                [[f] + [splits[n][f]["count"] for n in names] for f in PROFILE_FLAGS]
                + [["non-letter ratio (mean)"] + [splits[n]["nonletter_ratio_mean"] for n in names]],
                "empty / near-empty (<3 words or <10 characters), non-letter share above the threshold, "
                "encoding problems (U+FFFD, mojibake, control characters)."))
    dups = res["duplicates"]
    out.append(("Duplicates inside a split", ["split", "exact clusters", "exact extra copies", "near clusters",
                                              "near extra copies", "label conflicts"],
                [[n, len(dups[n]["exact"]), dups[n]["exact_extra_copies"], len(dups[n]["near"]),
                  dups[n]["near_extra_copies"], len(dups[n]["label_conflicts"])] for n in names],
                f"near: MinHash LSH, word {res['config']['shingle_size']}-gram shingles, Jaccard >= "
                f"{res['config']['near_threshold']}"
                + (f" (CJK documents: character {res['config']['cjk_shingle_size']}-grams, Jaccard >= "
                   f"{res['config']['cjk_near_threshold']})" if "cjk_shingle_size" in res["config"] else "")
                + "; a near cluster holds at least two distinct texts."))
    ls = res["leakage_summary"]
    if ls:
        out.append(("Leakage into train", ["split", "documents", "exact", "near", "ngram", "any", "clean",
                                           "label mismatch"],
                    [[n, v["documents"], v["exact"], v["near"], v["ngram"], v["any"], v["clean"], v["label_mismatch"]]
                     for n, v in ls.items()],
                    f"ngram: shares {res['config']['ngram_size']}-grams"
                    + (f" (CJK documents: {res['config']['cjk_ngram_size']}-character n-grams)"
                       if "cjk_ngram_size" in res["config"] else "")
                    + f" with train (fraction of its n-grams > {res['config']['ngram_threshold']}); "
                    "clean = no overlap of any kind."))
    q = res["quality"]
    out.append(("Quality flags (Gopher / C4 subset)", ["rule"] + names,
                [[r] + [q[n]["rules"][r]["count"] for n in names] for r in RULES]
                + [["any rule"] + [q[n]["flagged_any"] for n in names]], "Flags only; nothing is removed."))
    p = res["pii"]
    out.append(("PII", ["kind"] + [f"{n} (docs / matches)" for n in names],
                [[k] + [f"{p[n][k]['documents']} / {p[n][k]['matches']}" for n in names] for k in PII_KINDS], ""))
    if res.get("clean"):
        out.append(("Cleaned copies", ["split", "in", "out", "removed duplicates", "removed leaked",
                                        "PII replaced", "file"],
                    [[n, c["documents_in"], c["documents_out"], c["removed"]["duplicate"], c["removed"]["leaked"],
                      sum(c["pii_replaced"].values()), c["path"]] for n, c in res["clean"]["splits"].items()],
                    ", ".join(f"{k}={v}" for k, v in res["clean"]["options"].items())))
    return out


def _examples(res: dict, k: int = 5) -> list[str]:
    lines = []
    for n, d in res["duplicates"].items():
        for kind in ("exact", "near"):
            for c in d[kind][:k]:
                lines.append(f"- {n} {kind}: {', '.join(c[:8])}{' …' if len(c) > 8 else ''}")
        for c in d["label_conflicts"][:k]:
            lines.append(f"- {n} label conflict ({c['kind']}): {', '.join(c['ids'][:8])} → {c['labels']}")
    by_id: dict = {}
    for e in res["leakage"]:
        by_id.setdefault((e["split"], e["id"]), {})[e["kind"]] = e
    shown = {"exact": 0, "near": 0, "ngram": 0}
    for (split, doc_id), kinds in by_id.items():
        top = next(k for k in ("exact", "near", "ngram") if k in kinds)  # the strongest kind
        if shown[top] >= k:
            continue
        shown[top] += 1
        e = kinds[top]
        how = ", ".join(f"{kk} {kinds[kk]['score']}" for kk in ("exact", "near", "ngram") if kk in kinds)
        lines.append(f"- {split} {doc_id} ← train {', '.join(e['train_ids'][:5])} ({how})")
    return lines


def markdown(res: dict) -> str:
    out = ["# Data audit", ""]
    for key, val in res["data"].items():
        out.append(f"- {key}: `{val}`")
    out.append(f"- tokenizer: {res.get('tokenizer')}")
    out.append("")
    for title, header, rows, note in _sections(res):
        out += [f"## {title}", ""] + _table(header, rows) + [""]
        if note:
            out += [note, ""]
    ex = _examples(res)
    if ex:
        out += ["## Examples", ""] + ex + [""]
    out += ["Full lists: `audit.json` (clusters, leakage entries), `flags.jsonl` (per-document flags).", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- plots
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plots(res: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = {}
    splits = res["splits"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for n, s in splits.items():
        h = s["length"]["histogram"]
        ax.stairs(h["counts"], h["edges"], label=n)
    max_len = res["config"].get("max_length")
    if max_len:
        ax.axvline(max_len, color="k", ls="--", lw=1, label=f"max_length {max_len}")
    unit = "tokens" if res.get("tokenizer_kind") == "tokenizer" else "words"
    ax.set_xlabel(f"length ({unit}; the last bin holds the longest 1%)")
    ax.set_ylabel("documents")
    ax.legend()
    ax.set_title("Length histogram")
    out["length"] = _png(fig)

    classes = sorted({c for s in splits.values() for c in s["class_counts"]})
    if classes:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        width = 0.8 / len(splits)
        for i, (n, s) in enumerate(splits.items()):
            tot = max(s["documents"], 1)
            ax.bar([j + i * width for j in range(len(classes))], [s["class_counts"].get(c, 0) / tot for c in classes],
                   width, label=n)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(classes))], classes, rotation=30, ha="right")
        ax.set_ylabel("share of split")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # room for the legend
        ax.legend(ncol=len(splits), fontsize=8, loc="upper center")
        ax.set_title("Class distribution")
        out["classes"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    series = {f"{n} {kind}": Counter(len(c) for c in d[kind])
              for n, d in res["duplicates"].items() for kind in ("exact", "near") if d[kind]}
    sizes = sorted({x for c in series.values() for x in c})
    if series:
        width = 0.8 / len(series)
        for i, (name, cnt) in enumerate(series.items()):
            ax.bar([j + i * width for j in range(len(sizes))], [cnt.get(x, 0) for x in sizes], width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], [str(x) for x in sizes])
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no duplicate clusters", ha="center", transform=ax.transAxes)
    ax.set_xlabel("cluster size (documents)")
    ax.set_ylabel("clusters")
    ax.set_title("Duplicate-cluster sizes")
    out["clusters"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    scores = {}
    for e in res["leakage"]:
        if e["kind"] != "exact":
            scores.setdefault(f"{e['split']} {e['kind']}", []).append(e["score"])
    for name, vals in sorted(scores.items()):
        ax.hist(vals, bins=20, range=(0, 1), histtype="step", label=name)
    ax.set_xlabel("overlap score (near: Jaccard; ngram: share of the example's n-grams in train)")
    ax.set_ylabel("examples")
    if scores:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no leakage", ha="center", transform=ax.transAxes)
    ax.set_title("Leakage scores")
    out["leakage"] = _png(fig)
    return out


def html_report(res: dict) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Data audit</title><style>",
             "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}",
             "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
             ".plots img{max-width:48%;margin:1%}.note{color:#666;font-size:90%}code{background:#f6f6f6}",
             "</style></head><body><h1>Data audit</h1><ul>"]
    for key, val in res["data"].items():
        parts.append(f"<li>{e(key)}: <code>{e(str(val))}</code></li>")
    parts.append(f"<li>tokenizer: {e(str(res.get('tokenizer')))}</li></ul><div class='plots'>")
    for name, b64 in plots(res).items():
        parts.append(f"<img alt='{e(name)}' src='data:image/png;base64,{b64}'>")
    parts.append("</div>")
    for title, header, rows, note in _sections(res):
        parts.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        for r in rows:
            parts.append("<tr>" + "".join(f"<td>{e(_fmt(c))}</td>" for c in r) + "</tr>")
        parts.append("</table>")
        if note:
            parts.append(f"<p class='note'>{e(note)}</p>")
    ex = _examples(res)
    if ex:
        parts.append("<h2>Examples</h2><ul>" + "".join(f"<li>{e(x[2:])}</li>" for x in ex) + "</ul>")
    parts.append("<p class='note'>Full lists: audit.json, flags.jsonl.</p></body></html>")
    return "".join(parts)
