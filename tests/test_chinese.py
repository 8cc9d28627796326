"""Chinese (unspaced) text end to end: the audit finds planted exact and edited duplicates test->train and
inside train on the Chinese fixture corpus (the project's own article), mixed Chinese/English documents are
cut into characters + words, the quality rules keep clean Chinese and reject junk, Chinese PII (ID numbers with
their check digit, mobile numbers, addresses) is counted and scrubbed readably, the WordPiece tokenizer splits
CJK characters and keeps English sub-words (coverage per script), and whole-word masking masks jieba words."""
from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch

from llm_dist.analysis.audit import main
from llm_dist.analysis.audit.config import AuditConfig
from llm_dist.analysis.audit.features import doc_features, permutations
from llm_dist.analysis.audit.pii import cn_id_valid, scrub
from llm_dist.analysis.audit.quality import names, quality_flags
from llm_dist.analysis.audit.text import (exact_hash, is_cjk, ngram_hashes, norm_units, norm_words,
                                          word_hashes)
from llm_dist.analysis.audit.zh_corpus import ARTICLE, JUNK, MIXED, PII_ZH, article_documents, build

HAN = re.compile(r"[\u4e00-\u9fff]")


def _rows(path):
    return [json.loads(x) for x in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def zh(tmp_path_factory):
    """The fixture corpus, a tokenizer trained on its train split, and one audit of it (with cleaned copies)."""
    from llm_dist.models.build import train_wordpiece

    d = tmp_path_factory.mktemp("zh")
    facts = build(d / "data")
    train, test = _rows(d / "data" / "train.jsonl"), _rows(d / "data" / "test.jsonl")
    tok = train_wordpiece([r["text"] for r in train], 3000)
    tok.save_pretrained(str(d / "tok"))
    out = d / "audit"
    assert main(["--data", f"train={d / 'data' / 'train.jsonl'}", "--data", f"test={d / 'data' / 'test.jsonl'}",
                 "--id_column", "id", "--tokenizer", str(d / "tok"), "--output_dir", str(out), "--scrub-pii",
                 "--quiet"]) == 0
    res = json.loads((out / "audit.json").read_text(encoding="utf-8"))
    return {"facts": facts, "train": train, "test": test, "res": res, "out": out, "tok": tok}


def test_corpus_is_the_article(zh):
    f = zh["facts"]
    docs = article_documents(ARTICLE)
    assert len(docs) >= 60 and all(len(HAN.findall(t)) >= 20 for _, t in docs)
    assert sum(is_cjk(norm_units(t)) for _, t in docs) >= 0.95 * len(docs)
    assert not any("```" in t or "**" in t for _, t in docs)  # code and markdown emphasis dropped
    assert f["train"] == len(zh["train"]) and f["test"] == len(zh["test"])
    assert len(f["leak_exact"]) == len(f["leak_edit"]) == len(f["dup_exact"]) == len(f["dup_edit"]) == 4
    # the edited copies really differ from their sources, by about edit_rate of their characters
    by_id = {r["id"]: r["text"] for r in zh["train"] + zh["test"]}
    for kind in ("leak_edit", "dup_edit"):
        for copy, src in f[kind].items():
            diff = sum(a != b for a, b in zip(by_id[copy], by_id[src]))
            assert 2 <= diff <= 0.06 * len(HAN.findall(by_id[src])) + 1, (copy, diff)


def test_planted_duplicates_found(zh):
    """Recall on every planted kind is 1.0 (test->train and inside train); nothing unplanted is reported."""
    res, f = zh["res"], zh["facts"]
    leaks: dict = {}
    for e in res["leakage"]:
        leaks.setdefault(e["id"], {})[e["kind"]] = e["train_ids"]
    for kind, how in (("leak_exact", "exact"), ("leak_edit", "near"), ("leak_passage", "ngram")):
        found = [t for t, src in f[kind].items() if src in leaks.get(t, {}).get(how, [])]
        assert len(found) / len(f[kind]) == 1.0, (kind, found)
    assert set(leaks) == set(f["leak_exact"]) | set(f["leak_edit"]) | set(f["leak_passage"])
    assert all(leaks[t].get("near") == [src] for t, src in f["leak_edit"].items())
    s = res["leakage_summary"]["test"]
    assert (s["exact"], s["any"], s["clean"]) == (4, 10, len(zh["test"]) - 10)
    assert s["cjk_ngram_size"] == 20 and s["cjk_near_threshold"] == 0.7
    dups = res["duplicates"]["train"]
    assert sorted(map(sorted, dups["exact"])) == sorted(sorted([c, s_]) for c, s_ in f["dup_exact"].items())
    assert sorted(map(sorted, dups["near"])) == sorted(sorted([c, s_]) for c, s_ in f["dup_edit"].items())
    assert res["splits"]["test"]["scripts"] == {"spaced": 0, "cjk": len(zh["test"])}
    # the old word-based units see a Chinese paragraph as a handful of "words": no 5-word shingle survives an edit
    src = next(iter(f["leak_edit"].values()))
    text = next(r["text"] for r in zh["train"] if r["id"] == src)
    assert len(norm_words(text)) < len(norm_units(text)) / 10


def test_mixed_script_units_and_shingles():
    units = norm_units("用BERT做预训练，the Tokenizer_2 很好。")
    assert units == ["用", "bert", "做", "预", "训", "练", "the", "tokenizer_2", "很", "好"]
    assert norm_units("The cat sat, twice.") == norm_words("The cat sat, twice.")  # spaced text: unchanged
    assert is_cjk(units) and not is_cjk(norm_units("A long English sentence with one 词 in it"))
    assert exact_hash("数据，模型。 \n 训练") == exact_hash("数据,模型。训练")  # NFKC + no spaces by CJK
    assert exact_hash("data model") != exact_hash("datamodel")
    cfg = AuditConfig()
    perms = permutations(cfg)
    feats, grams, match = doc_features(MIXED, cfg, perms)
    u = norm_units(MIXED)
    assert feats["cjk"] == int(is_cjk(u)) and feats["n_words"] == (len(u) if feats["cjk"] else len(MIXED.split()))
    n = cfg.cjk_ngram_size if feats["cjk"] else cfg.ngram_size
    assert np.array_equal(grams, np.unique(ngram_hashes(word_hashes(u), n)))
    # a mixed document brings both n-gram sizes to the leakage match (a test document of either script)
    assert set(grams.tolist()) < set(match.tolist())
    edited = MIXED.replace("情感", "情绪").replace("English", "english")
    other = "这是一段完全不同的中文文本，讲的是天气、旅行和美食。" * 3 + " Nothing else in common here."
    sim = lambda a, b: float((doc_features(a, cfg, perms)[0]["sig"] == doc_features(b, cfg, perms)[0]["sig"]).mean())  # noqa: E731
    assert sim(MIXED, edited) >= 0.7 and sim(MIXED, other) < 0.2


def test_quality_rules_chinese(zh):
    docs = [t for _, t in article_documents(ARTICLE)]

    def flags(text, cjk=None):
        u = norm_units(text)
        return names(quality_flags(text, u, word_hashes(u), cjk=is_cjk(u) if cjk is None else cjk))

    clean = [d for d in docs if not flags(d)]
    assert len(clean) / len(docs) >= 0.85, [flags(d) for d in docs if flags(d)]
    # the English (whitespace-word) definitions reject nearly every clean Chinese paragraph
    assert sum(1 for d in clean if flags(d, cjk=False)) == len(clean)
    for name, text in JUNK.items():
        assert set(flags(text)) - {"gopher_word_count"}, name
    assert "gopher_dup_lines" in flags(JUNK["junk_repeat"])
    assert "gopher_stop_words" in flags(JUNK["junk_keywords"])
    assert "gopher_ellipsis_lines" in flags(JUNK["junk_ellipsis"])
    q = zh["res"]["quality"]
    flagged = {r["id"] for r in map(json.loads, (zh["out"] / "flags.jsonl").read_text(encoding="utf-8").splitlines())
               if set(r["flags"]) - {"gopher_word_count", "near_empty"}}
    assert set(JUNK) <= flagged
    assert q["train"]["rules"]["gopher_mean_word_length"]["count"] == 0  # not applied to CJK documents


def test_chinese_pii(zh):
    assert cn_id_valid("11010519491231002X") and cn_id_valid("11010519491231002x")
    assert not cn_id_valid("110105194912310021") and not cn_id_valid("11010519491231002")
    text, counts = scrub("身份证号11010519491231002X，错号110105194912310021，日期不对110105194913310023。")
    assert counts["cn_id"] == 1 and counts["card"] == 0
    assert text == "身份证号<ID_NUMBER>，错号110105194912310021，日期不对110105194913310023。"
    text, counts = scrub("手机13812345678、+86 139-1234-5678或0086 150 1234 5678；不是手机：12345678901、1381234567、"
                         "238123456789。")
    assert counts["cn_mobile"] == 3 and counts["phone"] == 0
    assert text.startswith("手机<MOBILE>、<MOBILE>或<MOBILE>；不是手机：12345678901、1381234567")
    text, counts = scrub("我住在北京市朝阳区建国路88号3栋2单元501室，寄到上海市浦东新区世纪大道100号。我知道3号线。")
    assert counts["cn_address"] == 2 and text == "我住在<ADDRESS>，寄到<ADDRESS>。我知道3号线。"
    pii = zh["res"]["pii"]["train"]
    assert {k: (pii[k]["documents"], pii[k]["matches"]) for k in ("cn_id", "cn_mobile", "cn_address")} == \
        {"cn_id": (1, 1), "cn_mobile": (1, 2), "cn_address": (1, 1)}
    assert pii["cn_id"]["examples"] == ["pii_zh"]
    clean = {r["id"]: r["text"] for r in _rows(zh["out"] / "clean" / "train.jsonl")}
    assert clean["pii_zh"] == ("如需报名，请联系张老师，手机 <MOBILE> 或 <MOBILE>，身份证号 <ID_NUMBER>，"
                               "通讯地址：<ADDRESS>。报名截止日期为下周五，逾期不再受理，请大家相互转告。")
    assert PII_ZH != clean["pii_zh"]
    assert "| cn_id | 1 / 1 | 0 / 0 |" in (zh["out"] / "audit.md").read_text(encoding="utf-8")


def test_tokenizer_coverage_per_script(zh):
    """Each Han character is a token of its own; unknown tokens are exactly the test characters the
    tokenizer never saw; English keeps sub-words."""
    from llm_dist.models.build import vocab_report

    tok, res = zh["tok"], zh["res"]
    seen = {c for r in zh["train"] for c in HAN.findall(r["text"])}
    assert tok.tokenize("用BERT做预训练") == ["用", "bert", "做" if "做" in seen else "[UNK]", "预", "训", "练"]
    pieces = tok.tokenize("tokenization")
    assert len(pieces) > 1 and all(p.startswith("##") for p in pieces[1:])
    cov_test = res["splits"]["test"]["coverage"]
    test_han = [c for r in zh["test"] for c in HAN.findall(r["text"])]
    assert cov_test["cjk"]["tokens"] == len(test_han)  # one token per character
    unseen = sum(1 for c in test_han if c not in seen)
    assert cov_test["cjk"]["unknown"] == unseen
    assert res["splits"]["train"]["coverage"]["cjk"]["unknown"] == 0
    rep = vocab_report(tok, [r["text"] for r in zh["test"]])
    assert rep["coverage"]["cjk"] == cov_test["cjk"] and rep["vocab_by_script"]["cjk"] == len(seen)
    rep_en = vocab_report(tok, ["tokenization keeps English sub-words"])
    assert rep_en["coverage"]["cjk"]["tokens"] == 0 and rep_en["coverage"]["latin"]["tokens"] >= 5
    md = (zh["out"] / "audit.md").read_text(encoding="utf-8")
    assert "## Scripts and tokenizer coverage" in md


def test_run_tokenizer_writes_vocab_report(zh, tmp_path):
    """A run that trains its tokenizer saves `tokenizer/vocab_report.json` (the main process; no launch)."""
    from types import SimpleNamespace

    from llm_dist.config import RunConfig
    from llm_dist.models.build import get_tokenizer

    cfg = RunConfig()
    cfg.output_dir, cfg.tokenizer.vocab_size = str(tmp_path / "run"), 2000
    texts = [r["text"] for r in zh["train"]]
    acc = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    tok = get_tokenizer(cfg, acc, lambda n: iter(texts[:n] if n else texts))
    rep = json.loads((tmp_path / "run" / "tokenizer" / "vocab_report.json").read_text())
    han = [c for t in texts for c in HAN.findall(t)]
    assert rep["documents"] == len(texts) and rep["vocab_size"] == len(tok)
    assert rep["coverage"]["cjk"] == {"tokens": len(han), "unknown": 0, "unknown_rate": 0.0}
    assert rep["vocab_by_script"]["cjk"] == len(set(han)) and rep["vocab_by_script"]["latin"] > 0


def _words(flags):
    """Lengths (in tokens) of the words that `flags` (word starts) mark, specials excluded."""
    out = []
    for f in flags:
        if f or not out:
            out.append(1)
        else:
            out[-1] += 1
    return out


def test_whole_word_masking_chinese(zh, tmp_path):
    from llm_dist.config import DataConfig, MLMConfig, SourceConfig
    from llm_dist.data.mlm import MLMCollator, PackedStream, get_segmenter, word_start_flags

    tok = zh["tok"]
    text = "在自然语言处理中，预训练模型很重要。Tokenization works."
    enc = tok.backend_tokenizer.encode(text)
    jieba_flags = word_start_flags(text, enc.offsets, get_segmenter("jieba"))
    char_flags = word_start_flags(text, enc.offsets, get_segmenter("chars"))
    none_flags = word_start_flags(text, enc.offsets, None)
    import jieba

    han_starts, pos = [], 0
    for w in jieba.lcut(text):
        if HAN.match(w):
            han_starts.append(pos)
        pos += len(w)
    starts = [a for (a, b), f in zip(enc.offsets, jieba_flags) if f and b > a and HAN.match(text[a])]
    # the tokens that start a word inside Chinese text are exactly jieba's word starts (unknown characters
    # included: offsets, not token strings); multi-character words are one masking unit
    assert starts == han_starts
    assert any(n > 1 for n in _words(jieba_flags[1:-1]))
    assert sum(char_flags) > sum(jieba_flags) > sum(none_flags)  # chars: every character a word
    assert "##" in "".join(enc.tokens) and not all(jieba_flags)  # English pieces stay joined
    # packed stream + collator: every masked word is masked whole, and Chinese words are not whole clauses
    (tmp_path / "zh.jsonl").write_text("".join(json.dumps({"text": r["text"]}, ensure_ascii=False) + "\n"
                                               for r in zh["train"]), encoding="utf-8")
    data = DataConfig(seq_len=64, shuffle_buffer=1, sources=[SourceConfig(path=str(tmp_path / "zh.jsonl"))])
    it = iter(PackedStream(data.sources, tok, data, 0, 0, 1, with_offsets=True, segmenter="jieba"))
    seqs = [next(it) for _ in range(60)]  # ~3,800 tokens: about half the corpus
    batch = MLMCollator(tok, MLMConfig(whole_word_masking=True, mlm_probability=0.3), seed=3)(seqs)
    masked = batch["labels"] != -100
    for s, m in zip(seqs, masked):
        special = s["special_tokens_mask"].bool()
        start = s["word_start"] | torch.roll(special, 1)
        start[0] = True
        head = torch.where(start, torch.arange(len(start)), 0).cummax(0).values
        for h in torch.unique(head[~special]):
            group = (head == h) & ~special
            assert m[group].all() or not m[group].any()
    lengths = [n for s in seqs for n in _words(s["word_start"][~s["special_tokens_mask"].bool()].tolist())]
    assert 1.2 < np.mean(lengths) < 3.0  # jieba words (without a segmenter a clause, ~10+ tokens, is one word)
    old = [n for s in seqs for n in _words(torch.tensor(word_start_flags("", s["offset_mapping"].tolist(), None))
                                           [~s["special_tokens_mask"].bool()].tolist())]
    assert np.mean(old) > 5


def test_segmenter_fallback(monkeypatch):
    from llm_dist.data.mlm import DataError, get_segmenter

    monkeypatch.setitem(sys.modules, "jieba", None)  # as if jieba were not installed
    with pytest.warns(UserWarning, match="character masking"):
        import llm_dist.data.mlm as m

        m._warned.discard("jieba")
        seg = get_segmenter("auto")
    assert seg("预训练") == ["预", "训", "练"]
    with pytest.raises(DataError, match="mlm.segmenter.*jieba is not installed"):
        get_segmenter("jieba")
    with pytest.raises(DataError, match="mlm.segmenter"):
        get_segmenter("ltp")
