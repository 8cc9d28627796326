"""Data experiments: the interventions (nested stratified subsets, imbalance, duplicates, contamination that
the audit finds, removal, the audit filter, truncation), the statistics (power law recovered from synthetic
points, paired tests), and `llm-dist experiment` end to end on a synthetic task (2 variants × 2 seeds; the
re-run skips every run; a removal experiment drops the top-k by a detector and a random k%)."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import PY, ROOT, run_env

TINY = str(ROOT / "configs" / "classify" / "tiny.yaml")


def _splits(*overrides: str):
    from llm_dist.config import load_config
    from llm_dist.data.classify import load_splits

    return load_splits(load_config(TINY, list(overrides)))


def _record(train) -> dict:
    from llm_dist.data.interventions import record_of

    return record_of(train)


# ----------------------------------------------------------------------------- interventions
def test_nested_stratified_subsets_pair_by_seed():
    full = _splits("--seed=5")["train"]  # (the split's seed follows the run's)
    labels = list(full["label"])
    share = {c: labels.count(c) / len(labels) for c in set(labels)}
    prev = None
    for frac in (0.1, 0.25, 0.5):
        sub = _splits(f"--data.subset.fraction={frac}", "--seed=5")["train"]
        ids = set(sub["id"])
        assert len(sub) == round(frac * len(full))
        assert ids <= set(full["id"])
        if prev is not None:
            assert prev <= ids, f"the {frac} subset does not contain the smaller one"
        prev = ids
        got = list(sub["label"])
        for c, p in share.items():  # stratified: each class within one example of its share
            assert abs(got.count(c) - p * len(sub)) <= 1.0 + 1e-9, (frac, c, got.count(c), p * len(sub))
        assert _record(sub)["subset"]["kept"] == len(sub)
    again = set(_splits("--data.subset.fraction=0.1", "--seed=5")["train"]["id"])
    other = set(_splits("--data.subset.fraction=0.1", "--seed=6", "--data.split_seed=5")["train"]["id"])
    assert again == set(_splits("--data.subset.fraction=0.1", "--seed=5")["train"]["id"])
    assert len(again ^ other) > 0.5 * len(again)  # another seed draws another subset
    # per class (few-shot) and count, also nested
    k8 = _splits("--data.subset.per_class=8", "--seed=5")["train"]
    k16 = _splits("--data.subset.per_class=16", "--seed=5")["train"]
    assert sorted(set(list(k8["label"]))) == sorted(share) and all(list(k8["label"]).count(c) == 8 for c in share)
    assert set(k8["id"]) <= set(k16["id"])
    c100 = _splits("--data.subset.count=100", "--seed=5")["train"]
    c200 = _splits("--data.subset.count=200", "--seed=5")["train"]
    assert len(c100) == 100 and set(c100["id"]) <= set(c200["id"])


def test_imbalance_duplicates_removal_and_noise_compose(tmp_path):
    sp = _splits("--data.imbalance.ratio=10")
    rec = _record(sp["train"])["imbalance"]
    counts = rec["after"]
    assert max(counts.values()) / min(counts.values()) == pytest.approx(10, rel=0.05)
    assert sorted(c for c, n in counts.items() if n < 100) == ["politics", "sports", "tech"]  # the default minority
    exp = _record(_splits("--data.imbalance.ratio=10", "--data.imbalance.profile=exponential")["train"])["imbalance"]
    after = list(exp["after"].values())
    assert after == sorted(after, reverse=True) and max(after) / min(after) == pytest.approx(10, rel=0.05)

    dup = _splits("--data.duplicates.rate=0.1", "--data.duplicates.kind=edited")["train"]
    ids = list(dup["id"])
    copies = [i for i in ids if "#dup" in i]
    assert len(copies) == round(0.1 * 1780) and len(dup) == 1780 + len(copies)
    texts = dict(zip(ids, dup["text"]))
    for c in copies[:20]:  # lightly edited: differs, but most words survive
        a, b = texts[c].split(), texts[c.split("#")[0]].split()
        assert a != b and len(set(a) & set(b)) > 0.8 * len(set(b))

    ids_file = tmp_path / "drop.txt"
    full = list(_splits()["train"]["id"])
    ids_file.write_text("# comment\n" + "\n".join(full[:50]) + "\nnot-an-id\n")
    noisy = _splits(f"--data.filter.exclude_ids={ids_file}", "--data.label_noise.rate=0.2",
                    "--data.filter.random_fraction=0.1")
    rec = _record(noisy["train"])
    assert rec["removal"]["exclude_ids"] == {"file": str(ids_file), "ids": 51, "removed": 50}
    assert rec["removal"]["random"]["removed"] == 178 and len(noisy["train"]) == 1780 - 50 - 178
    assert not set(full[:50]) & set(noisy["train"]["id"])
    from llm_dist.data.classify import planted_noise

    flipped = {f["id"] for f in planted_noise(noisy["train"])}
    assert flipped and flipped <= set(noisy["train"]["id"])  # removed examples leave the noise record too


def test_contamination_is_counted_and_the_audit_finds_it(tmp_path):
    from llm_dist.analysis.audit import config_spec, leaked_ids, run_audit

    sp = _splits("--data.contamination.rate=0.2", "--data.contamination.seed=3")
    test = {i: t for i, t in zip(sp["test"]["id"], sp["test"]["text"])}
    copies = [(i, t) for i, t in zip(sp["train"]["id"], sp["train"]["text"]) if i.endswith("#leak")]
    assert len(copies) == round(0.2 * len(test)) == 45
    assert all(t == test[i[:-len("#leak")]] for i, t in copies)
    rec = _record(sp["train"])["contamination"]
    assert rec["copies"] == 45 and sorted(rec["ids"]) == sorted(i[:-5] for i, _ in copies)
    # the audit of the same config sees the contaminated train split and finds every copied test example
    run_audit(config_spec(TINY, ["--data.contamination.rate=0.2", "--data.contamination.seed=3",
                                 "--data.contamination.kind=edited"]), tmp_path / "audit", progress=False)
    found = leaked_ids(tmp_path / "audit" / "audit.json", split="test")
    assert set(rec["ids"]) <= found, f"{len(set(rec['ids']) - found)} edited copies not found by the audit"
    # decontamination from the in-process audit removes them again (and the train examples BBC already leaks)
    clean = _splits("--data.contamination.rate=0.2", "--data.contamination.seed=3", "--data.filter.decontaminate=true")
    r = _record(clean["train"])
    assert r["contamination"]["copies_left_after_filter"] == 0
    assert not [i for i in clean["train"]["id"] if i.endswith("#leak")]
    assert r["audit_filter"]["decontaminate"] >= 45 and r["audit_filter"]["kept"] == len(clean["train"])
    dedup = _record(_splits("--data.filter.dedup=true", "--data.duplicates.rate=0.05")["train"])
    assert dedup["audit_filter"]["dedup"] >= dedup["duplicates"]["copies"]  # every exact copy found


def test_truncation_head_tail_and_head_tail(tmp_path):
    import datasets

    from llm_dist.data.classify import tokenize_split
    from llm_dist.models.build import load_tokenizer, train_wordpiece

    words = [f"w{i}" for i in range(40)]
    tok = train_wordpiece(iter([" ".join(words)] * 20), 200, True)
    tok.save_pretrained(str(tmp_path / "tok"))
    tok = load_tokenizer(str(tmp_path / "tok"))
    ds = datasets.Dataset.from_dict({"id": ["a"], "text": [" ".join(words)], "label": ["x"]})
    full = tok(" ".join(words), add_special_tokens=False)["input_ids"]
    assert len(full) >= 40
    got = {t: tokenize_split(ds, tok, {"x": 0}, 12, t, 0.25)["input_ids"][0] for t in ("head", "tail", "head_tail")}
    cls, sep = tok.cls_token_id, tok.sep_token_id
    assert all(len(g) == 12 and g[0] == cls and g[-1] == sep for g in got.values())
    assert got["head"][1:-1] == full[:10]
    assert got["tail"][1:-1] == full[-10:]
    assert got["head_tail"][1:-1] == full[:2] + full[-8:]  # round(10 × 0.25) = 2 head tokens


# ----------------------------------------------------------------------------- statistics
def test_power_law_fit_recovers_known_parameters():
    from llm_dist.analysis.experiments.stats import power_law, scaling

    rng = np.random.default_rng(0)
    a, b, c = 4.0, 0.5, 0.05
    sizes = [100, 200, 400, 800, 1600, 3200]
    points = {n: list(power_law(n, a, b, c) + rng.normal(0, 0.002, 3)) for n in sizes}
    fit = scaling(points, boot=200)
    assert fit["b"] == pytest.approx(b, abs=0.08) and fit["c"] == pytest.approx(c, abs=0.015)
    assert fit["b_ci95"][0] <= b <= fit["b_ci95"][1]
    assert fit["r2"] > 0.99 and fit["monotone"]
    assert abs(fit["extrapolation_error"]) < 0.01
    assert fit["predicted"]["10x"]["value"] == pytest.approx(power_law(32000, a, b, c), abs=0.01)
    bumpy = dict(points)
    bumpy[800] = [v + 0.2 for v in points[800]]
    assert not scaling(bumpy, boot=10)["monotone"]


def test_paired_statistics_match_scipy():
    from scipy import stats as st

    from llm_dist.analysis.experiments.stats import paired, summary

    s = summary([0.8, 0.82, 0.84])
    assert s["mean"] == pytest.approx(0.82) and s["ci95"][0] < 0.82 < s["ci95"][1]
    a, b = {1: 0.8, 2: 0.83, 3: 0.85}, {1: 0.75, 2: 0.8, 3: 0.79}
    d = paired(a, b)
    assert d["mean"] == pytest.approx(np.mean([0.05, 0.03, 0.06]))
    assert d["p_value"] == pytest.approx(st.ttest_rel([0.8, 0.83, 0.85], [0.75, 0.8, 0.79]).pvalue)
    assert paired({1: 0.5}, {2: 0.5}) is None


# ----------------------------------------------------------------------------- end to end
def _spec(path: Path, data: Path, body: str) -> Path:
    path.write_text(f"""base: {TINY}
overrides:
  data.train: {data}
  data.id_column: id
  data.max_length: 32
  classify.epochs: 4
  batch_size: 16
  optim.lr: 3.0e-3
  tokenizer.vocab_size: 512
  eval_every: 0
  log_every: 20
  tracking.progress: false
{body}""")
    return path


def _exp(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "llm_dist.cli", "experiment", *args], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from test_label_issues import _synthetic

    return _synthetic(tmp_path_factory.mktemp("exp_data") / "synthetic.csv")


def test_experiment_end_to_end_report_and_rerun(data, tmp_path):
    spec = _spec(tmp_path / "noise.yaml", data, """name: tiny-noise
claim: noisy labels cost accuracy
seeds: [1, 2]
variants:
  - {name: clean, overrides: {}}
  - {name: noisy, overrides: {data.label_noise.rate: 0.45, data.subset.fraction: 0.5}}
""")
    out = tmp_path / "out"
    dry = _exp(str(spec), "--output_dir", str(out), "--dry-run")
    assert dry.returncode == 0 and dry.stdout.count("would run") == 4 and not out.exists(), dry.stdout + dry.stderr
    t0 = time.time()
    p = _exp(str(spec), "--output_dir", str(out), "--quiet")
    print(f"\nexperiment, 2 variants × 2 seeds: {time.time() - t0:.1f} s\n{p.stdout}")
    assert p.returncode == 0, p.stdout + p.stderr
    rep = json.loads((out / "experiment_report.json").read_text())
    assert [v["name"] for v in rep["variants"]] == ["clean", "noisy"] and rep["baseline"] == "clean"
    assert not rep["missing_runs"]
    clean, noisy = rep["variants"]
    for v in rep["variants"]:
        assert v["n_seeds"] == 2 and v["seeds"] == [1, 2]
        for m in ("accuracy", "macro_f1", "balanced_accuracy"):
            s = v["metrics"][m]
            vals = list(s["values"].values())
            assert s["mean"] == pytest.approx(np.mean(vals)) and s["ci95"][0] <= s["mean"] <= s["ci95"][1]
            assert (s["ci95"][1] - s["ci95"][0]) == pytest.approx(2 * 12.706 * s["std"] / np.sqrt(2), rel=1e-3)
        assert v["perf"]["tokens_per_s"]["mean"] > 0
    d = noisy["delta_vs_base"]["accuracy"]
    assert d["seeds"] == [1, 2] and d["p_value"] is not None and "p_value" in d
    assert d["mean"] == pytest.approx(noisy["metrics"]["accuracy"]["mean"] - clean["metrics"]["accuracy"]["mean"])
    assert clean["metrics"]["accuracy"]["mean"] > 0.9 > noisy["metrics"]["accuracy"]["mean"]
    assert clean["train_examples"] == 300 * 0.8 and noisy["train_examples"] == 120
    # each run is an ordinary run: its own config, W&B group / name, the shared tokenizer, the interventions
    run = out / "runs" / "noisy" / "seed2"
    cfg = __import__("yaml").safe_load((run / "config.yaml").read_text())
    assert cfg["seed"] == 2 and cfg["tracking"]["group"] == "tiny-noise" and cfg["data"]["split_seed"] == 42
    assert cfg["tokenizer"]["path"] == str(out / "tokenizer")
    inter = json.loads((run / "interventions.json").read_text())
    assert inter["subset"]["kept"] == 120 and inter["label_noise"]["rate"] == 0.45
    # the same seed draws the same subset in another variant; the test split is the same in every run
    assert (out / "runs" / "clean" / "seed1" / "splits" / "test.txt").read_text() == (run / "splits" / "test.txt").read_text()
    for f in ("experiment_report.md", "experiment_report.html", "bars_accuracy.png"):
        assert (out / f).stat().st_size > 200
    assert "| noisy | 2 |" in (out / "experiment_report.md").read_text()
    # re-running skips every finished run (nothing retrained) and rewrites the same report
    stamp = (run / "run.json").stat().st_mtime_ns
    again = _exp(str(spec), "--output_dir", str(out), "--quiet")
    assert again.returncode == 0 and "4 of 4 runs already finished (skipped)" in again.stdout, again.stdout
    assert (run / "run.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "experiment_report.json").read_text())["variants"] == rep["variants"]
    # a changed spec for a started run is refused (its results would mix)
    spec.write_text(spec.read_text().replace("rate: 0.45", "rate: 0.3"))
    bad = _exp(str(spec), "--output_dir", str(out), "--quiet")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "started with another config" in bad.stderr


def test_removal_by_detector_against_random(data, tmp_path):
    """Counterfactual removal: a scoring run (the base with the dynamics ledger), then the top 15% by AUM
    removed vs a random 15%; with 15% planted noise the removed set is mostly the flipped examples. Every
    run here is a 2-process run (`nproc: 2`: accelerate launch)."""
    spec = _spec(tmp_path / "removal.yaml", data, """name: tiny-removal
seeds: [1]
nproc: 2
overrides: {data.label_noise.rate: 0.15, data.label_noise.seed: 1}
removal: {scores: auto, detectors: [aum], fractions: [0.15], random: true}
""")
    # the overrides key appears twice in YAML: merge them into one mapping
    text = spec.read_text().replace("overrides: {data.label_noise.rate: 0.15, data.label_noise.seed: 1}\n", "")
    text = text.replace("  tracking.progress: false\n", "  tracking.progress: false\n  data.label_noise.rate: 0.15\n"
                        "  data.label_noise.seed: 1\n")
    spec.write_text(text)
    out = tmp_path / "out"
    t0 = time.time()
    p = _exp(str(spec), "--output_dir", str(out), "--quiet")
    print(f"\nremoval experiment (scoring run + 3 runs): {time.time() - t0:.1f} s\n{p.stdout}")
    assert p.returncode == 0, p.stdout + p.stderr
    rep = json.loads((out / "experiment_report.json").read_text())
    names = [v["name"] for v in rep["variants"]]
    assert names == ["keep-all", "remove-aum-0.15", "remove-random-0.15"]
    removed = [line for line in (out / "removal" / "aum-0.15.txt").read_text().splitlines() if not line.startswith("#")]
    assert len(removed) == round(0.15 * 240)
    flipped = {f["id"] for f in json.loads((out / "runs" / "_scoring" / "seed1" / "noise.json").read_text())["flipped"]}
    precision = len(set(removed) & flipped) / len(removed)
    assert precision > 2 * len(flipped) / 240, precision  # the detector removes mislabeled examples, not random ones
    inter = json.loads((out / "runs" / "remove-aum-0.15" / "seed1" / "interventions.json").read_text())
    assert inter["removal"]["exclude_ids"]["removed"] == len(removed)
    rnd = json.loads((out / "runs" / "remove-random-0.15" / "seed1" / "interventions.json").read_text())
    assert rnd["removal"]["random"]["removed"] == len(removed)
    for name in ("_scoring", "keep-all", "remove-aum-0.15", "remove-random-0.15"):
        assert json.loads((out / "runs" / name / "seed1" / "run.json").read_text())["world_size"] == 2
    det = rep["variants"][1]
    assert det["random_variant"] == "remove-random-0.15" and "accuracy" in det["delta_vs_random"]


@pytest.mark.parametrize("body, needle", [
    ("seeds: [1, 1]\nvariants: [{name: a}]\n", "key 'seeds'"),
    ("variants: [{name: a}]\nbaseline: b\n", "key 'baseline'"),
    ("varients: [{name: a}]\n", "did you mean 'variants'"),
    ("variants: [{name: a, overrides: {optim.lr: -1}}]\n", "optim.lr"),
    ("sweep: {key: data.subset.fraction, values: [0.5]}\n", "key 'sweep'"),
])
def test_bad_spec_is_one_line_exit_2(tmp_path, capsys, body, needle, data):
    from llm_dist.cli import main

    spec = _spec(tmp_path / "bad.yaml", data, body)
    rc = main(["experiment", str(spec), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "out").exists()


def test_mlm_token_sweep_report_and_wandb_from_run_dirs(tmp_path, monkeypatch):
    """The report recomputes from run dirs: an MLM sweep over max_tokens whose runs' eval losses follow a
    known law (run.json written here, no training) gives tokens as n, the fitted law, the plots, and a W&B
    report run (offline) in the experiment's group."""
    from llm_dist.analysis.experiments import report
    from llm_dist.analysis.experiments.plan import make_plan, write_plan
    from llm_dist.analysis.experiments.stats import power_law

    spec = tmp_path / "mlm.yaml"
    spec.write_text(f"""name: mlm-scale
base: {ROOT / 'configs' / 'mlm' / 'tiny.yaml'}
overrides: {{tracking.report_to: wandb, max_steps: 100000}}
seeds: [1, 2]
sweep: {{key: max_tokens, values: [20000, 40000, 80000, 160000], metric: eval_loss}}
""")
    plan = make_plan(spec, str(tmp_path / "out"))
    assert plan.tokenizer is None and len(plan.runs) == 8  # MLM runs train their own tokenizer on the stream
    write_plan(plan)
    for r in plan.runs:
        n = r.cfg["max_tokens"]
        loss = power_law(n, 300.0, 0.6, 2.0) + (0.01 if r.seed == 1 else -0.01)
        r.out.mkdir(parents=True)
        (r.out / "run.json").write_text(json.dumps({"tokens_seen": n, "train_seconds": n / 1000, "signalled": False,
                                                    "eval": {"eval_loss": loss, "perplexity": float(np.exp(loss))}}))
    rep = report.build(plan)
    assert rep["metrics"][:2] == ["eval_loss", "perplexity"] and not rep["missing_runs"]
    sc = rep["scaling"]
    assert sc["x"] == "tokens" and sc["metric"] == "eval_loss" and sc["error_is"] == "eval_loss"
    assert sc["b"] == pytest.approx(0.6, abs=0.05) and sc["c"] == pytest.approx(2.0, abs=0.05)
    assert rep["variants"][0]["perf"]["tokens_per_s"]["mean"] == pytest.approx(1000)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    paths = report.write(plan, rep)
    assert paths["learning_curve"].stat().st_size > 1000
    report.log_wandb(plan, rep, paths)
    runs = list((plan.out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_learning_curves_and_what_one_is_worth_in_the_other(tmp_path):
    """`curves`: a prompt curve and a head curve (run.json written here, with known accuracies); the report
    gives the paired difference at each shared k, reads the head's k equivalent to each prompt point off the
    head's curve (log-linear interpolation), says 'above' / 'below' outside its range, and plots both; a
    curve naming an unknown variant is refused."""
    from llm_dist.analysis.experiments import report
    from llm_dist.analysis.experiments.plan import ExperimentError, make_plan
    from llm_dist.analysis.experiments.stats import equivalent_x

    assert equivalent_x(0.6, [8, 32], [0.5, 0.7]) == (pytest.approx(2 ** ((np.log2(9) + np.log2(33)) / 2) - 1), "within")
    assert equivalent_x(0.4, [8, 32], [0.5, 0.7]) == (None, "below")
    assert equivalent_x(0.9, [8, 32], [0.5, 0.7]) == (None, "above")
    head = {8: 0.40, 16: 0.50, 32: 0.60, 128: 0.80}
    prompt = {0: 0.45, 8: 0.55, 32: 0.70, 128: 0.90}
    spec = tmp_path / "pvh.yaml"
    names = [f"head-k{k}" for k in head] + [f"prompt-k{k}" for k in prompt]
    spec.write_text(f"""name: pvh
base: {TINY}
seeds: [1, 2, 3]
variants: [{', '.join('{name: %s}' % n for n in names)}]
curves:
  x: examples per class
  of:
    prompt: {{{', '.join(f'prompt-k{k}: {k}' for k in prompt)}}}
    head: {{{', '.join(f'head-k{k}: {k}' for k in head)}}}
  worth: [prompt, head]
""")
    plan = make_plan(spec, str(tmp_path / "out"))
    for r in plan.runs:
        kind, k = r.variant.split("-k")
        acc = (head if kind == "head" else prompt)[int(k)] + 0.01 * (r.seed - 2)
        r.out.mkdir(parents=True)
        (r.out / "run.json").write_text(json.dumps({"tokens_seen": 1, "train_seconds": 1.0, "signalled": False,
                                                    "test": {"accuracy": acc}, "data": {"train_examples": 5 * int(k)}}))
    rep = report.build(plan)
    cv = rep["curves"]
    assert [r["x"] for r in cv["curves"]["prompt"]] == [0, 8, 32, 128] and cv["metric"] == "accuracy"
    pts = {p["x"]: p for p in cv["worth"]["points"]}
    assert pts[0]["where"] == "within" and "delta" not in pts[0]  # 0.45: between head k=8 and k=16
    assert 8 < pts[0]["equivalent_x"] < 16
    assert pts[8]["delta"]["mean"] == pytest.approx(0.15) and pts[8]["delta"]["p_value"] == 0.0
    assert pts[32]["equivalent_x"] == pytest.approx(2 ** ((np.log2(33) + np.log2(129)) / 2) - 1)  # 0.70: midway
    assert pts[128]["where"] == "above" and pts[128]["worth"] is None
    paths = report.write(plan, rep)
    md = paths["md"].read_text()
    assert "## Learning curves (accuracy against examples per class)" in md and "above the head curve's range" in md
    assert paths["curves"].stat().st_size > 1000
    spec.write_text(spec.read_text().replace("head-k128: 128}", "head-k256: 256}"))
    with pytest.raises(ExperimentError, match="curves.of.head.*'head-k256' is not a variant"):
        make_plan(spec, str(tmp_path / "out2"))
