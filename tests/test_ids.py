"""One id scheme for local files everywhere (issue 11 §2g): without an id column a document is
`<file>:<row>` in classify splits (`load_table`), MLM streams and the audit; a run joining an audit's
leakage ids with its test split checks the audit saw that split."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_dist.analysis.audit import AuditError, leaked_ids, main as audit_main
from llm_dist.analysis.audit.reader import SplitSource
from llm_dist.cli import main
from llm_dist.config import SourceConfig
from llm_dist.data.mlm import document_stream
from llm_dist.data.sources import load_table, resolve_files

ROOT = Path(__file__).resolve().parent.parent
CLASSIFY = str(ROOT / "configs/classify/tiny.yaml")
LABELS = ("sport", "money", "tech")


def _doc(i: int, salt: str = "") -> dict:
    words = " ".join(f"w{(i * 7 + k * 13) % 97}{salt}" for k in range(30))
    return {"text": f"document {i} {salt} about {LABELS[i % 3]}: {words}", "label": LABELS[i % 3]}


def _jsonl(path: Path, rows, blank_after: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) + "\n" for r in rows]
    if blank_after is not None:  # a blank line is not a record: row numbers count records
        lines.insert(blank_after, "\n")
    path.write_text("".join(lines))
    return path


def _audit_ids(path: str) -> list[str]:
    return [row[1] for row in SplitSource("x", path, files=resolve_files(path), label_column=None).rows()]


def test_same_ids_in_training_streams_and_audit(tmp_path):
    d = tmp_path / "corpus"
    _jsonl(d / "en" / "part-0.jsonl", [_doc(i) for i in range(5)], blank_after=2)
    _jsonl(d / "en" / "part-1.jsonl", [_doc(i) for i in range(5, 9)])
    _jsonl(d / "fr" / "part-0.jsonl", [_doc(i) for i in range(9, 12)])
    want = [f"en/part-0:{i}" for i in range(5)] + [f"en/part-1:{i}" for i in range(4)] + [f"fr/part-0:{i}" for i in range(3)]
    assert list(load_table(str(d), "text", "label", None)["id"]) == want
    assert _audit_ids(str(d)) == want
    src = [SourceConfig(path=str(d))]
    shares = [[ex["id"] for ex in document_stream(src, 0, 0, r, 2, 0, False)] for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(want) and shares[0] and shares[1]  # whatever a rank's files
    # one file: its stem (as the audit of `--data test=FILE` names it), not a bare row number
    one = _jsonl(tmp_path / "test.jsonl", [_doc(i) for i in range(3)])
    assert list(load_table(str(one), "text", "label", None)["id"]) == _audit_ids(str(one)) == ["test:0", "test:1", "test:2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Train / test folders of several files (no id column); 3 test documents copy train documents."""
    d = tmp_path_factory.mktemp("ids")
    train = [_doc(i) for i in range(60)]
    _jsonl(d / "train" / "a.jsonl", train[:30])
    _jsonl(d / "train" / "b.jsonl", train[30:])
    test = [_doc(i, "t") for i in range(100, 112)]
    test[4], test[9] = dict(train[3]), dict(train[40])
    _jsonl(d / "test" / "a.jsonl", test[:6])
    _jsonl(d / "test" / "b.jsonl", test[6:])
    _jsonl(d / "other" / "c.jsonl", test)  # the same texts under other file names: other ids
    audit = d / "audit"
    assert audit_main(["--data", f"train={d / 'train'}", "--data", f"test={d / 'test'}", "--output_dir", str(audit),
                       "--quiet"]) == 0
    wrong = d / "audit_other"
    assert audit_main(["--data", f"train={d / 'train'}", "--data", f"test={d / 'other'}", "--output_dir", str(wrong),
                       "--quiet"]) == 0
    return d, audit / "audit.json", wrong / "audit.json"


def test_audit_of_the_split_joins(files):
    d, audit, _ = files
    test_ids = list(load_table(str(d / "test"), "text", "label", None)["id"])
    leaked = leaked_ids(audit, "test", expected_ids=test_ids)
    assert {"a:4", "b:3"} <= leaked <= set(test_ids)
    assert json.loads(audit.read_text())["split_ids"]["test"] == test_ids


def test_audit_of_other_ids_is_an_error(files):
    d, audit, wrong = files
    test_ids = list(load_table(str(d / "test"), "text", "label", None)["id"])
    with pytest.raises(AuditError) as e:
        leaked_ids(wrong, "test", expected_ids=test_ids)
    msg = str(e.value)
    assert msg.startswith(f"{wrong}: only 0 of this run's 12 test ids (0%) are in the audit's test split")
    assert "\n" not in msg
    with pytest.raises(AuditError, match="only 0 of this run's 12"):  # the old scheme: bare row numbers
        leaked_ids(audit, "test", expected_ids=[str(i) for i in range(12)])
    # an audit.json from before split_ids: its leakage ids must be the run's
    old = json.loads(audit.read_text())
    del old["split_ids"]
    legacy = d / "legacy.json"
    legacy.write_text(json.dumps(old))
    assert leaked_ids(legacy, "test", expected_ids=test_ids) <= set(test_ids)
    with pytest.raises(AuditError, match=r"leaked test ids are not ids of this run's test split"):
        leaked_ids(legacy, "test", expected_ids=[str(i) for i in range(12)])


def test_training_with_a_mismatched_audit_stops_before_writing(files, tokenizer_dir, tmp_path, capsys):
    d, audit, wrong = files
    out = tmp_path / "run"
    args = ["train", CLASSIFY, f"--output_dir={out}", "--tracking.progress=false", f"--tokenizer.path={tokenizer_dir}",
            f"--data.train={d / 'train'}", f"--data.test={d / 'test'}", "--max_steps=2", "--log_every=1"]
    assert main([*args, f"--data.audit={wrong}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {wrong}: only 0 of this run's 12 test ids") and err.count("\n") == 1, err
    assert not out.exists()
    # the audit of the same files joins: some test examples leaked, the clean subset is the rest
    assert main([*args, f"--data.audit={audit}"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["test"]["leaked_examples"] >= 2 and run["test_clean"]["examples"] == 12 - run["test"]["leaked_examples"]
