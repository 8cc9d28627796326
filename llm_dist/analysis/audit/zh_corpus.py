"""A small Chinese corpus with planted duplicates and leaks, built offline from the project's own article.

`python -m llm_dist.analysis.audit.zh_corpus [ARTICLE.md] OUT_DIR` writes `OUT_DIR/train.jsonl`,
`OUT_DIR/test.jsonl` (id / text / label) and `OUT_DIR/planted.json` (what was planted where). The source is
`tests/data/zh_article.md`, a copy of the Chinese article the project comes from (``../shared/article.md``;
the project's own text, used here as test data). Its prose paragraphs (code, tables, formulas and headings
dropped; markdown list markers and emphasis removed) are grouped within each section into documents of at
least `min_chars` characters; the label is the section's number.

Planted (ids say what they are; nothing else in the corpus is a copy by construction, though the article
repeats a few of its own passages, which the audit rightly reports as well):
- test `leak_exact_*`: a train document verbatim, with ASCII for its full-width punctuation, or re-spaced
  (all equal after NFKC + whitespace normalisation: exact duplicates);
- test `leak_edit_*`: a train document with `edit_rate` of its CJK characters replaced (near duplicates);
- test `leak_passage_*`: a test document with a 30-character passage (>= 25 Han characters) of a train
  document appended (n-gram leakage only);
- train `dup_exact_*` / `dup_edit_*`: the same two kinds of copies inside train;
- train `junk_*`: texts the quality rules must reject; `pii_zh`: a mainland mobile number, an 18-digit
  resident identity number and an address; `mixed_zh_en`: a Chinese/English document.
Why not a registry corpus: none ships Chinese prose that the tests can read without a network.
"""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

ARTICLE = Path(__file__).resolve().parents[3] / "tests" / "data" / "zh_article.md"
_HAN = re.compile(r"[\u4e00-\u9fff]")
_FULLWIDTH = str.maketrans("，：；！？（）", ",:;!?()")

JUNK = {
    "junk_keywords": "关键词：" + ",".join(["大数据", "深度学习", "预训练", "模型优化"] * 12),
    "junk_symbols": "###### 123 456 789 …… ### 2024-01-01 $$$ %%% ￥￥￥ 42 ###### …… " * 4,
    "junk_repeat": "\n".join(["点击这里立即购买，限时优惠！"] * 10),
    "junk_short": "你好",
    "junk_ellipsis": "\n".join(f"{w}……" for w in ["模型训练", "数据增强", "参数调整", "评估指标", "部署上线",
                                                     "错误分析", "超参数搜索", "持续学习"]),
}
PII_ZH = ("如需报名，请联系张老师，手机 13812345678 或 +86 139-1234-5678，身份证号 11010519491231002X，"
          "通讯地址：北京市海淀区中关村大街27号。报名截止日期为下周五，逾期不再受理，请大家相互转告。")
MIXED = ("Pre-training on large unlabeled corpora is the first stage of building a language model. "
         "在大量无标签文本数据上进行预训练之后，模型再通过微调适应下游任务，例如情感分析和问答系统。"
         "Fine-tuning then adapts the model to a downstream task with a small labeled set.")


def article_documents(path: str | Path = ARTICLE, min_chars: int = 120) -> list[tuple[str, str]]:
    """(section label, text) documents: prose paragraphs grouped within a section to >= `min_chars`."""
    text = Path(path).read_text(encoding="utf-8")
    docs: list[tuple[str, str]] = []
    section, buf, in_code = "s0", [], False

    def flush():
        nonlocal buf
        if buf:
            joined = "\n".join(buf)
            if docs and docs[-1][0] == section and len(docs[-1][1]) < min_chars:
                docs[-1] = (section, docs[-1][1] + "\n" + joined)
            else:
                docs.append((section, joined))
            buf = []

    for block in re.split(r"\n\s*\n", text):
        b = block.strip()
        if b.startswith("```") or in_code:
            in_code = (b.count("```") % 2 == 1) != in_code
            continue
        if b.startswith("## "):
            flush()
            m = re.match(r"##\s+(\d+)", b)
            section = f"s{m.group(1)}" if m else section
            continue
        if not b or b.startswith(("#", "|", "$$", ">")):
            continue
        b = re.sub(r"(?m)^\s*(?:[-*]|\d+\.)\s+", "", b).replace("**", "").replace("`", "")
        if len(_HAN.findall(b)) < 20:
            continue
        buf.append(b)
        if sum(map(len, buf)) >= min_chars:
            flush()
    flush()
    return [d for d in docs if len(d[1]) >= min_chars // 2]


def _edit(rng: random.Random, text: str, rate: float, alphabet: list[str]) -> str:
    chars = list(text)
    han = [i for i, c in enumerate(chars) if _HAN.match(c)]
    for i in rng.sample(han, max(2, round(rate * len(han)))):
        chars[i] = rng.choice([a for a in alphabet if a != chars[i]])
    return "".join(chars)


def build(out_dir: str | Path, article: str | Path = ARTICLE, seed: int = 0, test_fraction: float = 0.2,
          edit_rate: float = 0.03, copies: int = 4) -> dict:
    """Write the corpus; returns the planted facts (also written to `planted.json`)."""
    rng = random.Random(seed)
    docs = article_documents(article)
    alphabet = sorted({c for _, t in docs for c in _HAN.findall(t)})
    order = list(range(len(docs)))
    rng.shuffle(order)
    n_test = round(test_fraction * len(docs))
    train = [{"id": f"zh{i:03d}", "text": docs[i][1], "label": docs[i][0]} for i in sorted(order[n_test:])]
    test = [{"id": f"zh{i:03d}", "text": docs[i][1], "label": docs[i][0]} for i in sorted(order[:n_test])]
    srcs = rng.sample(range(len(train)), 4 * copies + 2)
    planted: dict = {"leak_exact": {}, "leak_edit": {}, "leak_passage": {}, "dup_exact": {}, "dup_edit": {},
                     "edit_rate": edit_rate}
    variants = [lambda t: t, lambda t: t.translate(_FULLWIDTH), lambda t: "  " + t.replace("。", "。 \n") + " "]
    k = 0
    for kind in ("leak_exact", "leak_edit", "dup_exact", "dup_edit"):
        for j in range(copies):
            src = train[srcs[k]]
            k += 1
            text = variants[j % 3](src["text"]) if kind.endswith("exact") else _edit(rng, src["text"], edit_rate, alphabet)
            row = {"id": f"{kind}_{j}", "text": text, "label": src["label"]}
            (test if kind.startswith("leak") else train).append(row)
            planted[kind][row["id"]] = src["id"]
    for j in range(2):  # a 30-character passage of a train document appended to a test document
        src, host = train[srcs[k]], test[j]
        k += 1
        starts = [i for i in range(max(1, len(src["text"]) - 30)) if len(_HAN.findall(src["text"][i:i + 30])) >= 25]
        start = rng.choice(starts or [0])  # a Chinese passage (>= 25 Han characters: >= 20 units, one n-gram)
        passage = src["text"][start:start + 30]
        test[j] = {"id": f"leak_passage_{j}", "text": host["text"] + passage, "label": host["label"]}
        planted["leak_passage"][test[j]["id"]] = src["id"]
    train += [{"id": k_, "text": v, "label": "junk"} for k_, v in JUNK.items()]
    train += [{"id": "pii_zh", "text": PII_ZH, "label": "s9"}, {"id": "mixed_zh_en", "text": MIXED, "label": "s1"}]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    facts = {**planted, "train": len(train), "test": len(test), "junk": sorted(JUNK), "source": str(article)}
    (out / "planted.json").write_text(json.dumps(facts, ensure_ascii=False, indent=1), encoding="utf-8")
    return facts


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (1, 2):
        print("usage: python -m llm_dist.analysis.audit.zh_corpus [ARTICLE.md] OUT_DIR", file=sys.stderr)
        return 2
    article, out = (ARTICLE, args[0]) if len(args) == 1 else (args[0], args[1])
    if not Path(article).is_file():
        print(f"error: {article}: no such file", file=sys.stderr)
        return 2
    facts = build(out, article)
    print(f"zh corpus: {facts['train']} train, {facts['test']} test documents in {out} "
          f"(planted: {', '.join(f'{len(facts[k])} {k}' for k in ('leak_exact', 'leak_edit', 'leak_passage', 'dup_exact', 'dup_edit'))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
