"""The data audit (`llm-dist audit`): planted duplicates / leaks are found, the clean subset excludes them,
sharded == unsharded, bad input is a one-line error, and the BBC News figures match an independent count."""
from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from llm_dist.analysis.audit import AuditConfig, file_spec, leaked_ids, main, run_audit
from llm_dist.analysis.audit.pii import scrub
from llm_dist.analysis.audit.quality import names, quality_flags
from llm_dist.analysis.audit.text import norm_words, word_hashes

ROOT = Path(__file__).resolve().parents[1]
STOP = ["the", "of", "and", "to", "with", "that", "have", "be"]


def _vocab(rng: random.Random, n: int = 3000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def _doc(rng: random.Random, vocab: list[str], words: int = 120) -> str:
    out, sent = [], []
    for _ in range(words):
        sent.append(rng.choice(STOP) if rng.random() < 0.25 else rng.choice(vocab))
        if len(sent) >= rng.randint(8, 16):
            out.append(" ".join(sent).capitalize() + ".")
            sent = []
    if sent:
        out.append(" ".join(sent).capitalize() + ".")
    return " ".join(out)


def _edit(rng: random.Random, vocab: list[str], text: str, k: int) -> str:
    w = text.split()
    for i in rng.sample(range(10, len(w) - 10), k):
        w[i] = rng.choice(vocab)
    return " ".join(w)


def _write(path: Path, rows: list[dict]) -> Path:
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """train/test jsonl with planted duplicates, leaks, and problem texts; returns (dir, facts)."""
    rng = random.Random(0)
    vocab = _vocab(rng)
    d = tmp_path_factory.mktemp("planted")
    labels = ["a", "b", "c"]
    train = [{"id": f"t{i}", "text": _doc(rng, vocab, rng.randint(80, 200)), "label": labels[i % 3]}
             for i in range(240)]
    test = [{"id": f"e{i}", "text": _doc(rng, vocab, rng.randint(80, 200)), "label": labels[i % 3]}
            for i in range(60)]
    src_e, src_n, src_g = train[10], train[11], train[12]
    base = _doc(rng, vocab, 200)
    train += [
        # exact duplicate (case + whitespace differ) with a different label: a label-noise signal
        {"id": "dupA1", "text": base, "label": "a"},
        {"id": "dupA2", "text": "  " + base.upper().replace(" ", "\n", 3) + " ", "label": "b"},
        # near duplicate: 2 words of 200 changed
        {"id": "nearB1", "text": (b := _doc(rng, vocab, 200)), "label": "c"},
        {"id": "nearB2", "text": _edit(rng, vocab, b, 2), "label": "c"},
        # problem texts
        {"id": "empty", "text": "   ", "label": "a"},
        {"id": "tiny", "text": "ok", "label": "a"},
        {"id": "pii", "text": _doc(rng, vocab, 60) + " Mail jane.doe@example.com or call 020 7946 0958, see "
                              "https://example.org/x. Card 4111 1111 1111 1111.", "label": "b"},
        {"id": "moji", "text": "The cafÃ© was closed â€” it was the end of the season and all of that." * 3,
         "label": "b"},
        {"id": "replines", "text": "\n".join(["Buy now and save with the best deals."] * 8 + [_doc(rng, vocab, 30)]),
         "label": "c"},
        {"id": "symbols", "text": "#### 123 ### 456 ## 789 !!! ??? 2024-01-01 $$$ %%% 42 " * 4, "label": "c"},
    ]
    g_words = src_g["text"].split()
    test += [
        {"id": "leakE", "text": src_e["text"].lower(), "label": "c" if src_e["label"] != "c" else "a"},
        {"id": "leakN", "text": _edit(rng, vocab, src_n["text"], 1), "label": src_n["label"]},
        # a 25-word passage of a train document inside new text: a 13-gram leak, not a near duplicate
        {"id": "leakG", "text": _doc(rng, vocab, 40) + " " + " ".join(g_words[20:45]) + " " + _doc(rng, vocab, 40),
         "label": "a"},
    ]
    _write(d / "train.jsonl", train)
    _write(d / "test.jsonl", test)
    facts = {"src_e": src_e["id"], "src_n": src_n["id"], "src_g": src_g["id"], "train": train, "test": test}
    return d, facts


@pytest.fixture(scope="module")
def audited(planted, tmp_path_factory):
    d, facts = planted
    out = tmp_path_factory.mktemp("audit") / "out"
    rc = main(["--data", f"train={d / 'train.jsonl'}", "--data", f"test={d / 'test.jsonl'}", "--id_column", "id",
               "--output_dir", str(out), "--dedup", "--scrub-pii", "--decontaminate", "eval", "--quiet"])
    assert rc == 0
    return out, json.loads((out / "audit.json").read_text()), facts


def test_outputs_and_profile(audited, planted):
    out, res, facts = audited
    for f in ("audit.json", "audit.md", "audit.html", "flags.jsonl"):
        assert (out / f).is_file()
    html = (out / "audit.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "<script" not in html  # self-contained, 4 plots
    assert "## Leakage into train" in (out / "audit.md").read_text()
    tr, te = res["splits"]["train"], res["splits"]["test"]
    assert tr["documents"] == len(facts["train"]) and te["documents"] == len(facts["test"])
    assert tr["tokens"] == sum(len(r["text"].split()) for r in facts["train"])  # no tokenizer: words
    assert set(tr["class_counts"]) == {"a", "b", "c"} and sum(tr["class_counts"].values()) == tr["documents"]
    counts = Counter(r["label"] for r in facts["train"])
    assert tr["imbalance_ratio"] == round(max(counts.values()) / min(counts.values()), 3)
    assert sum(tr["length"]["histogram"]["counts"]) == tr["documents"]
    assert tr["empty"]["examples"] == ["empty"]
    assert tr["near_empty"]["examples"] == ["tiny"]
    assert tr["mojibake"]["examples"] == ["moji"]
    assert "symbols" in tr["high_nonletter"]["examples"]
    pii = res["pii"]["train"]
    assert {k: pii[k]["examples"] for k in ("email", "url", "card", "phone")} == \
        {"email": ["pii"], "url": ["pii"], "card": ["pii"], "phone": ["pii"]}
    q = res["quality"]["train"]["rules"]
    assert "replines" in q["gopher_dup_lines"]["examples"]
    assert "symbols" in q["gopher_symbol_ratio"]["examples"]
    assert q["gopher_word_count"]["count"] >= 4  # empty, tiny, moji, symbols: under 50 words
    rows = [json.loads(x) for x in (out / "flags.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in rows if r["split"] == "train"}
    assert "empty" in by_id["empty"]["flags"] and by_id["pii"]["pii"] == {"email": 1, "url": 1, "card": 1, "phone": 1}


def test_duplicates_found(audited):
    _, res, _ = audited
    dups = res["duplicates"]["train"]
    assert dups["exact"] == [["dupA1", "dupA2"]]
    assert dups["near"] == [["nearB1", "nearB2"]]
    assert dups["exact_extra_copies"] == 1 and dups["near_extra_copies"] == 1
    conflicts = dups["label_conflicts"]
    assert conflicts == [{"kind": "exact", "ids": ["dupA1", "dupA2"], "labels": {"a": 1, "b": 1}}]
    assert res["duplicates"]["test"]["exact"] == [] and res["duplicates"]["test"]["near"] == []


def test_leakage_found_and_clean_subset(audited):
    out, res, facts = audited
    by = {(e["id"], e["kind"]): e for e in res["leakage"]}
    assert {k for k in by} == {("leakE", "exact"), ("leakE", "near"), ("leakE", "ngram"),
                               ("leakN", "near"), ("leakN", "ngram"), ("leakG", "ngram")}
    assert all(e["split"] == "test" for e in res["leakage"])
    assert by[("leakE", "exact")]["train_ids"] == [facts["src_e"]] and by[("leakE", "exact")]["score"] == 1.0
    assert by[("leakN", "near")]["train_ids"] == [facts["src_n"]] and 0.8 <= by[("leakN", "near")]["score"] < 1
    g = by[("leakG", "ngram")]
    assert g["train_ids"] == [facts["src_g"]] and 0.1 < g["score"] < 0.3
    assert g["matched_ngrams"] == 25 - 13 + 1
    s = res["leakage_summary"]["test"]
    assert (s["exact"], s["near"], s["ngram"], s["any"], s["clean"]) == (1, 2, 3, 3, len(facts["test"]) - 3)
    assert s["label_mismatch"] == 1  # leakE's label differs from its train copy
    assert leaked_ids(out / "audit.json") == {"leakE", "leakN", "leakG"}
    assert leaked_ids(out, kinds=("exact",)) == {"leakE"}
    assert leaked_ids(out / "audit.json", split="train") == set()
    # cleaned copies: new files; duplicates and (decontaminate=eval) leaked test examples gone, PII replaced
    clean_test = [json.loads(x) for x in (out / "clean" / "test.jsonl").read_text().splitlines()]
    assert {r["id"] for r in clean_test} == {r["id"] for r in facts["test"]} - {"leakE", "leakN", "leakG"}
    clean_train = {json.loads(x)["id"]: json.loads(x) for x in (out / "clean" / "train.jsonl").read_text().splitlines()}
    assert "dupA2" not in clean_train and "nearB2" not in clean_train and "dupA1" in clean_train
    assert "<EMAIL>" in clean_train["pii"]["text"] and "jane.doe" not in clean_train["pii"]["text"]
    c = res["clean"]["splits"]
    assert c["train"]["removed"]["duplicate"] == 2 and c["test"]["removed"]["leaked"] == 3
    assert c["train"]["pii_replaced"] == {"email": 1, "url": 1, "card": 1, "phone": 1, "cn_id": 0, "cn_mobile": 0,
                                          "cn_address": 0}


def test_decontaminate_train_side_and_tokenizer(planted, tmp_path):
    """decontaminate=train drops the train sources of leaks; a real tokenizer gives token counts and
    the share of texts over max_length; two worker processes give the same answer as one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    d, facts = planted
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([r["text"] for r in facts["train"][:50]],
                            trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    spec = file_spec([f"train={d / 'train.jsonl'}", f"test={d / 'test.jsonl'}"], "text", "label", "id", False)
    res = run_audit(spec, tmp_path / "a", AuditConfig(max_length=64), tokenizer=str(tmp_path / "tok"),
                    num_proc=2, progress=False, decontaminate="train")
    tr = res["splits"]["train"]
    assert tr["tokens"] > sum(len(r["text"].split()) for r in facts["train"])  # sub-word tokens
    assert 0 < tr["over_max_length"]["count"] <= tr["documents"]
    kept = {json.loads(x)["id"] for x in (tmp_path / "a" / "clean" / "train.jsonl").read_text().splitlines()}
    assert {facts["src_e"], facts["src_n"], facts["src_g"]}.isdisjoint(kept)
    assert len(kept) == len(facts["train"]) - 3
    one = json.loads((tmp_path / "a" / "audit.json").read_text())
    res1 = run_audit(spec, tmp_path / "b", AuditConfig(max_length=64), tokenizer=str(tmp_path / "tok"),
                     num_proc=1, progress=False)
    for key in ("splits", "duplicates", "leakage", "quality", "pii"):
        assert res1[key] == one[key], key


def test_sharded_equals_unsharded(planted, tmp_path, audited):
    """SLURM-array style: shards of a multi-file train dir (by file) and of a single test file (by row),
    then merge — the same audit as one run."""
    d, facts = planted
    shards = tmp_path / "train_dir"
    shards.mkdir()
    rows = facts["train"]
    for k in range(4):
        _write(shards / f"part-{k}.jsonl", rows[k::4])
    ref = tmp_path / "ref"
    args = ["--data", f"train={shards}", "--data", f"test={d / 'test.jsonl'}", "--id_column", "id", "--quiet"]
    assert main(args + ["--output_dir", str(ref)]) == 0
    for i in range(3):
        assert main(args + ["--output_dir", str(tmp_path / "parts"), "--shard", f"{i}/3"]) == 0
    assert main(["merge", str(tmp_path / "parts"), "--output_dir", str(tmp_path / "merged"), "--quiet",
                 "--dedup"]) == 0
    a = json.loads((ref / "audit.json").read_text())
    b = json.loads((tmp_path / "merged" / "audit.json").read_text())
    assert b["shards"] == 3
    for key in ("splits", "duplicates", "leakage", "leakage_summary", "quality", "pii", "config", "data"):
        assert a[key] == b[key], key
    assert a["duplicates"] == audited[1]["duplicates"]  # ids come from the id column, not the file layout
    assert len((tmp_path / "merged" / "clean" / "train.jsonl").read_text().splitlines()) == len(rows) - 2


def test_slurm_script_stages(planted, tmp_path, audited):
    """slurm/audit_array.sh's shard and merge stages (`python -m llm_dist.analysis.audit`), run as SLURM would run
    them (array task ids); with a validation split instead of test."""
    d, _ = planted
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "SHARDS": "2", "PARTS_DIR": str(tmp_path / "parts"),
           "OUT_DIR": str(tmp_path / "out"), "ENV_SETUP": "true", "CPUS": "1", "HOME": str(tmp_path)}
    args = ["--data", f"train={d / 'train.jsonl'}", "--data", f"validation={d / 'test.jsonl'}", "--id_column", "id"]
    for i in range(2):
        r = subprocess.run(["bash", "slurm/audit_array.sh", *args], cwd=ROOT, capture_output=True, text=True,
                           env={**env, "AUDIT_STAGE": "shard", "SLURM_ARRAY_TASK_ID": str(i)}, timeout=120)
        assert r.returncode == 0, r.stderr
    r = subprocess.run(["bash", "slurm/audit_array.sh"], cwd=ROOT, capture_output=True, text=True,
                       env={**env, "AUDIT_STAGE": "merge"}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "validation leaks: 1 exact, 2 near, 3 ngram" in r.stdout
    res = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert res["shards"] == 2
    assert [{**e, "split": "test"} for e in res["leakage"]] == audited[1]["leakage"]
    assert leaked_ids(tmp_path / "out" / "audit.json", split="validation") == {"leakE", "leakN", "leakG"}


def test_config_mode(planted, tmp_path):
    """`llm-dist audit CONFIG.yaml`: the run's own split (load_splits), overrides, the run's tokenizer;
    an MLM config audits its sources as one corpus."""
    from llm_dist.config import load_config
    from llm_dist.data.classify import load_splits

    d, facts = planted
    rows = [r for r in facts["train"] + facts["test"] if len(r["text"].split()) >= 3]
    _write(tmp_path / "all.jsonl", rows)
    (tmp_path / "c.yaml").write_text(
        f"task: classify\noutput_dir: {tmp_path / 'run'}\nmodel: {{preset: tiny}}\ntokenizer: {{vocab_size: 300}}\n"
        f"data:\n  train: {tmp_path / 'all.jsonl'}\n  id_column: id\n  split: [0.8, 0.1, 0.1]\n  max_length: 64\n")
    assert main([str(tmp_path / "c.yaml"), "--seed=7", "--quiet"]) == 0
    res = json.loads((tmp_path / "run" / "audit" / "audit.json").read_text())  # default: <output_dir>/audit
    want = load_splits(load_config(tmp_path / "c.yaml", ["--seed=7"]))
    assert {n: s["documents"] for n, s in res["splits"].items()} == {n: len(ds) for n, ds in want.items()}
    test_ids = set(want["test"]["id"])
    assert leaked_ids(tmp_path / "run" / "audit", split="test") <= test_ids
    assert "WordPiece" in res["tokenizer"] and res["config"]["max_length"] == 64
    assert res["splits"]["train"]["tokens"] > sum(len(t.split()) for t in want["train"]["text"])
    assert not (tmp_path / "run" / "tokenizer").exists() and not (tmp_path / "run" / "splits").exists()
    train_ids = set(want["train"]["id"])
    for split in ("validation", "test"):
        found = leaked_ids(tmp_path / "run" / "audit", split=split)
        for leak, src in (("leakE", facts["src_e"]), ("leakN", facts["src_n"]), ("leakG", facts["src_g"])):
            if leak in set(want[split]["id"]) and src in train_ids:
                assert leak in found, (split, leak)
    (tmp_path / "m.yaml").write_text(f"task: mlm\noutput_dir: {tmp_path / 'mlm'}\ndata:\n  sources:\n"
                                     f"    - path: {d / 'train.jsonl'}\n      id_column: id\n")
    assert main([str(tmp_path / "m.yaml"), "--output_dir", str(tmp_path / "ma"), "--quiet"]) == 0
    res = json.loads((tmp_path / "ma" / "audit.json").read_text())
    assert list(res["splits"]) == ["train"] and res["duplicates"]["train"]["exact"] == [["dupA1", "dupA2"]]


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_input_one_line_errors(planted, tmp_path, capsys):
    d, _ = planted
    tr, te = f"train={d / 'train.jsonl'}", f"test={d / 'test.jsonl'}"
    out = ["--output_dir", str(tmp_path / "o"), "--quiet"]
    assert "no train split" in _err(capsys, ["--data", te] + out)
    assert "no column 'body'" in _err(capsys, ["--data", tr, "--text_column", "body"] + out)
    assert "train.jsonl" in _err(capsys, ["--data", tr, "--label_column", "topic"] + out)
    assert "no column 'uid'" in _err(capsys, ["--data", tr, "--id_column", "uid"] + out)
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty dataset" in _err(capsys, ["--data", f"train={tmp_path / 'empty.jsonl'}"] + out)
    assert "no data files found" in _err(capsys, ["--data", f"train={tmp_path / 'nope.jsonl'}"] + out)
    assert "unknown split" in _err(capsys, ["--data", "dev=x.jsonl"] + out)
    assert "not unique" in _err(capsys, ["--data", tr, "--id_column", "label"] + out)
    assert "--near_threshold" in _err(capsys, ["--data", tr, "--near_threshold", "1.5"] + out)
    assert "--shard" in _err(capsys, ["--data", tr, "--shard", "3/2"] + out)
    assert "nothing to audit" in _err(capsys, out)
    assert "required" in _err(capsys, ["--data", tr, "--quiet"])
    assert main(["--data", tr, "--output_dir", str(tmp_path / "p"), "--shard", "0/2", "--quiet"]) == 0
    capsys.readouterr()
    assert "missing shard(s) 1 of 2" in _err(capsys, ["merge", str(tmp_path / "p"), "--output_dir", str(tmp_path / "m")])
    assert not (tmp_path / "o").exists() and not (tmp_path / "m").exists()  # nothing half-written
    assert not list(tmp_path.glob(".*tmp-*"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "model.bin").write_text("x")
    assert "not an audit output directory" in _err(capsys, ["--data", tr, "--output_dir", str(tmp_path / "taken"),
                                                            "--quiet"])


def test_unit_rules():
    text, counts = scrub("write to a.b@c.org, www.x.com/p; 1998 2004 2010 and 3-1 are not phones: +1 (212) 555-0100")
    assert counts == {"email": 1, "url": 1, "card": 0, "phone": 1, "cn_id": 0, "cn_mobile": 0, "cn_address": 0}
    assert text == "write to <EMAIL>, <URL>; 1998 2004 2010 and 3-1 are not phones: <PHONE>"
    assert scrub("4111 1111 1111 1112")[1]["card"] == 0  # fails Luhn
    rep = "the cat sat with the dog and that was that " * 10
    w = norm_words(rep)
    assert {"gopher_top_ngram", "gopher_dup_ngram"} <= set(names(quality_flags(rep, w, word_hashes(w))))
    ok = ("The river was calm this morning, and we walked along the bank with the dog. Later the wind rose "
          "from the west, bringing rain that lasted until the evening. By then the fishermen had gone home, the "
          "boats were tied to the old pier, and the town was quiet. Nobody expected the storm that arrived at "
          "midnight, nor the damage it would leave behind in the harbour and the fields beyond it.")
    w = norm_words(ok)
    assert names(quality_flags(ok, w, word_hashes(w))) == []


# ----------------------------------------------------------------------------- BBC News
def _norm_md5(text: str) -> str:
    return hashlib.md5(" ".join(text.lower().split()).encode()).hexdigest()


def test_bbc_news_duplicates_and_leaks(tmp_path):
    """One audit of an 80/20 stratified split (seed 0): within-split clusters plus test->train exact leaks
    hold all of BBC News's 98 md5 duplicates, and the exact leaks equal an independent md5 count."""
    from sklearn.model_selection import train_test_split

    from llm_dist.data.sources import bbc_news_records

    recs = bbc_news_records()
    tr, te = train_test_split(recs, test_size=0.2, stratify=[r["label"] for r in recs], random_state=0)
    _write(tmp_path / "train.jsonl", tr)
    _write(tmp_path / "test.jsonl", te)
    res = run_audit(file_spec([f"train={tmp_path / 'train.jsonl'}", f"test={tmp_path / 'test.jsonl'}"], "text",
                              "label", "id", True), tmp_path / "split", progress=False, num_proc=2)
    # exact leaks: every test article whose normalised text (case, whitespace) is also in train
    train_hashes = {_norm_md5(r["text"]) for r in tr}
    expected = {r["id"] for r in te if _norm_md5(r["text"]) in train_hashes}
    got = {e["id"] for e in res["leakage"] if e["kind"] == "exact"}
    assert 20 <= len(expected) <= 45
    assert got == expected
    strict_train = {hashlib.md5(r["text"].strip().encode()).hexdigest() for r in tr}
    assert {r["id"] for r in te if hashlib.md5(r["text"].strip().encode()).hexdigest() in strict_train} <= got
    # the corpus's duplicate groups = clusters inside train, inside test, and across (leaks)
    found = {frozenset(c) for n in ("train", "test") for c in res["duplicates"][n]["exact"]}
    found |= {frozenset([e["id"], *e["train_ids"]]) for e in res["leakage"] if e["kind"] == "exact"}
    by_md5: dict[str, set[str]] = {}
    for r in recs:
        by_md5.setdefault(hashlib.md5(r["text"].strip().encode()).hexdigest(), set()).add(r["id"])
    strict = [g for g in by_md5.values() if len(g) > 1]
    assert sum(len(g) - 1 for g in strict) == 98  # the figure: md5 of the stripped text
    assert all(any(g <= f for f in found) for g in strict)
    by_norm = Counter(_norm_md5(r["text"]) for r in recs)
    assert sum(len(f) - 1 for f in found) == sum(v - 1 for v in by_norm.values() if v > 1)  # 101: 3 differ in case/space
    assert res["duplicates"]["train"]["near_extra_copies"] > 0 and res["leakage_summary"]["test"]["near"] > len(got)
    clean = {r["id"] for r in te} - leaked_ids(tmp_path / "split" / "audit.json")
    assert clean and clean.isdisjoint(expected)
