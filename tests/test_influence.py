"""`llm-dist influence`: torch.func per-example gradients equal one backward per example; projected TracIn
agrees with brute-force unprojected TracIn (Spearman rising with d); planted test→train copies are their test
example's top proponent; self-influence finds planted label noise; the gradients of a 2-rank influence run equal
a 1-rank one's; a DDP-trained and a LoRA run work; --query and --test FILE; a run dir without checkpoints is
refused with one line naming save_every / keep_checkpoints."""
import csv
import json
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ACCELERATE, ROOT, _free_port, launch, run_env

TINY = "configs/classify/tiny.yaml"
CLASSES = {"sport": ["goal", "match", "striker", "league", "coach", "stadium"],
           "tech": ["software", "chip", "laptop", "network", "robot", "browser"],
           "money": ["bank", "shares", "profit", "market", "budget", "investor"],
           "food": ["recipe", "bread", "cheese", "kitchen", "dinner", "spice"]}
FILLER = ("the a of and to in is was for on with as by at from that this it said new year people one more time day "
          "week last first two other after over about").split()
EXACT, EDITED = 6, 6  # test examples with an exact / a one-word-edited copy planted in train


def _text(rng, lab):
    words = [rng.choice(FILLER) for _ in range(rng.randint(8, 14))]
    for _ in range(3):
        words.insert(rng.randrange(len(words) + 1), rng.choice(CLASSES[lab]))
    return words


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        w.writerows(rows)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train (256 + 12 planted copies) / validation (32) / test (40) CSVs and a fixed WordPiece vocabulary
    (`_tokenizer`)."""
    d = tmp_path_factory.mktemp("infl")
    rng, names = random.Random(3), sorted(CLASSES)
    make = lambda prefix, n: [(f"{prefix}{i:04d}", " ".join(_text(rng, names[i % 4])), names[i % 4])  # noqa: E731
                              for i in range(n)]
    train, val, test = make("tr", 256), make("va", 32), make("te", 40)
    for tid, text, lab in test[:EXACT]:
        train.append((f"copy-{tid}", text, lab))
    for tid, text, lab in test[EXACT:EXACT + EDITED]:
        words = text.split()
        k = max(i for i, w in enumerate(words) if w in FILLER)
        words[k] = "people" if words[k] != "people" else "time"  # the last filler word changed
        train.append((f"edit-{tid}", " ".join(words), lab))
    rng.shuffle(train)
    for name, rows in (("train", train), ("validation", val), ("test", test)):
        _write(d / f"{name}.csv", rows)
    _tokenizer().save_pretrained(str(d / "tokenizer"))
    return d


def _tokenizer():
    """A BERT WordPiece tokenizer over a fixed vocabulary: every word of the task whole, then single letters
    and `##` letters. Not `train_wordpiece`: its trainer breaks frequency ties in hash order, so the learned
    vocabulary (not only the ids) differs between processes — every session got a differently tokenized task,
    a differently trained model and different near-tied influence scores."""
    import string

    from transformers import BertTokenizer

    words = sorted(set(FILLER) | {w for ws in CLASSES.values() for w in ws})
    letters = [c for c in string.ascii_lowercase if c not in words]
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = special + words + letters + ["##" + c for c in string.ascii_lowercase]
    return BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})


def _cache_scores(run_dir: Path, summary: dict):
    """(every test × train score / Σ η_c [M, N], the training rows as in self_influence.csv), recomputed from
    the run's gradient cache: test_topk.jsonl rounds scores to 1e-6, coarser than these margins."""
    from llm_dist.analysis.influence.tracin import FILES, Grads, score_block

    def grads(split):
        return [Grads(*(np.load(next((run_dir / "influence" / "cache" / c["name"]).glob(f"{split}-*")) / f"{f}.npy")
                        for f in FILES)) for c in summary["checkpoints"]]
    weights = [c["weight"] for c in summary["checkpoints"]]
    m, n = summary["test_examples"], summary["train_examples"]
    scores = score_block(grads(summary["split"]), grads("train"), weights, True, slice(0, m), slice(0, n))
    return scores / sum(weights), pd.read_csv(run_dir / "influence" / "self_influence.csv")


def _args(d: Path, out: Path, *extra):
    return [f"--output_dir={out}", f"--data.train={d / 'train.csv'}", f"--data.validation={d / 'validation.csv'}",
            f"--data.test={d / 'test.csv'}", "--data.id_column=id", "--data.sources=[]",
            f"--tokenizer.path={d / 'tokenizer'}", "--data.max_length=32", "--eval_every=0", "--log_every=4",
            "--model.hidden_dropout=0", "--model.attention_dropout=0", "--tracking.progress=false", *extra]


@pytest.fixture(scope="module")
def ddp_run(data):
    """Tiny BERT on 2 ranks (DDP), 20% planted label noise, 4 checkpoints (every 34 of 136 steps), the
    training-dynamics ledger on (its `example_scores` table gets the self-influence column). Batches of 4
    per rank: with 8 (68 steps) the model's predictions were still nearly input-independent at the first
    three checkpoints (test accuracy 0.47–0.62), every same-label gradient was parallel (cosines 0.9999) and
    the planted copies won their rows by 1e-6–1e-4 of the score — below fp16 cache rounding and the rounding
    differences between machines; with 4 it learns the task (test accuracy 0.97) and they win by 1e-4–3e-2."""
    out = data / "ddp"
    launch(TINY, *_args(data, out, "--batch_size=4", "--classify.epochs=4", "--save_every=34", "--keep_checkpoints=4",
                        "--data.label_noise.rate=0.2", "--dynamics.enabled=true"), nproc=2)
    assert len(list((out / "checkpoints").glob("step_*"))) == 4
    return out


@pytest.fixture(scope="module")
def ddp_influence(ddp_run):
    from llm_dist.analysis.influence import influence

    return influence(ddp_run, k=5, proj_dim=512, wandb=False)


def test_per_example_grads_equal_one_backward_each(ddp_run):
    from llm_dist.analysis.influence.grads import PerExampleGrads, collate, select_params
    from llm_dist.analysis.influence.tracin import load_weights, open_run

    run = open_run(ddp_run)
    load_weights(run, run.checkpoints[1])
    names = select_params(run.model, False, 1)
    assert "classifier.weight" in names and any(".layer.1." in n for n in names)
    assert not any(".layer.0." in n or "embeddings" in n for n in names)
    split = run.data["train"]
    idx = [0, 1, 2, 3, 4, 5]  # different lengths: padded in the batch, unpadded one by one
    assert len({len(split["input_ids"][i]) for i in idx}) > 1
    pg = PerExampleGrads(run.model, names)
    assert pg.split is not None and pg.split[0] == 1  # layer 0 and the embeddings: one batched forward
    flat, logits = pg(collate(split, idx, run.tokenizer.pad_token_id))
    pg.split = None  # the whole model under vmap: the same numbers
    flat_full, _ = pg(collate(split, idx, run.tokenizer.pad_token_id))
    assert torch.allclose(flat, flat_full, atol=1e-6, rtol=1e-5)
    params = dict(run.model.named_parameters())
    for k, i in enumerate(idx):
        run.model.zero_grad()
        b = collate(split, [i], run.tokenizer.pad_token_id)
        out = run.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"])
        torch.nn.functional.cross_entropy(out.logits, b["labels"]).backward()
        ref = torch.cat([params[n].grad.reshape(-1) for n in names])
        assert torch.allclose(flat[k], ref, atol=1e-5, rtol=1e-4), (flat[k] - ref).abs().max()
        assert torch.allclose(logits[k], out.logits[0].detach(), atol=1e-5)


def test_projected_scores_agree_with_unprojected_tracin(ddp_run):
    """Spearman of projected vs exact (unprojected) TracIn-CP over 64 train × 16 test pairs, cosine and raw,
    d = 32 / 128 / 512 (mean over 3 projection seeds): above thresholds, and rising with d. On the head's
    gradients (D ≈ 17k; the projection does not care which parameters they are), to keep it quick."""
    from scipy.stats import spearmanr

    from llm_dist.analysis.influence.grads import PerExampleGrads, Projector, collate, select_params
    from llm_dist.analysis.influence.tracin import Grads, checkpoint_weights, load_weights, open_run, score_block

    run = open_run(ddp_run)
    names = select_params(run.model, False, 0)
    assert names and all("classifier" in n or "pooler" in n for n in names)
    weights = checkpoint_weights(run)
    assert weights[0] > weights[-1] > 0  # linear decay: the mean rate of each checkpoint's interval
    pad = run.tokenizer.pad_token_id
    full = []  # exact per-example gradients at each checkpoint: (train [64, D], test [16, D])
    for c in run.checkpoints:
        load_weights(run, c)
        peg = PerExampleGrads(run.model, names)
        full.append(tuple(peg(collate(run.data[s], list(range(n)), pad))[0] for s, n in (("train", 64), ("test", 16))))
    dim = full[0][0].shape[1]

    def scores(proj, cosine):
        def g(x):
            p = proj(x)
            n = p.norm(dim=1)
            return Grads((p / n[:, None]).numpy(), n.numpy(), (x * x).sum(1).numpy(), None)
        return score_block([g(te) for _, te in full], [g(tr) for tr, _ in full], weights, cosine,
                           slice(0, 16), slice(0, 64)).ravel()

    rho = {}
    for cosine in (True, False):
        exact = scores(Projector(dim, 0), cosine)
        for d in (32, 128, 512):
            projs = [Projector(dim, d, seed=s) for s in range(3)]
            rho[cosine, d] = float(np.mean([spearmanr(exact, scores(p, cosine)).statistic for p in projs]))
    print(f"D = {dim}; Spearman(projected, exact) by (cosine, d): { {k: round(v, 3) for k, v in rho.items()} }")
    for cosine in (True, False):
        assert rho[cosine, 32] < rho[cosine, 128] < rho[cosine, 512], rho
    # measured (D = 17,028): cosine 0.864 / 0.956 / 0.983, raw 0.911 / 0.969 / 0.974 at d = 32 / 128 / 512
    assert rho[True, 32] > 0.85 and rho[True, 128] > 0.94 and rho[True, 512] > 0.975, rho
    assert rho[False, 128] > 0.93 and rho[False, 512] > 0.97, rho
    rg = spearmanr(scores(Projector(dim, 0), True), scores(Projector(dim, 512, seed=1, kind="gaussian"), True)).statistic
    assert rg > 0.9, rg


def test_planted_copies_are_top_proponents_and_noise_has_high_self_influence(ddp_run, ddp_influence):
    s = ddp_influence
    assert s["train_examples"] == 268 and s["test_examples"] == 40 and len(s["checkpoints"]) == 4
    assert s["ranks"] == 1 and s["proj_dim"] == 512 and s["score"] == "cosine"
    rows = {r["id"]: r for r in map(json.loads, (ddp_run / "influence" / "test_topk.jsonl").read_text().splitlines())}
    assert len(rows) == 40
    flipped = {r["id"] for r in json.loads((ddp_run / "noise.json").read_text())["flipped"]}
    planted = [(f"copy-te{i:04d}", f"te{i:04d}") for i in range(EXACT)] + \
              [(f"edit-te{i:04d}", f"te{i:04d}") for i in range(EXACT, EXACT + EDITED)]
    checked = [(c, t) for c, t in planted if c not in flipped]  # a flipped copy is an opponent, rightly
    assert len(checked) >= 8 and any(c.startswith("edit-") for c, _ in checked)
    rank = {c: next((j + 1 for j, p in enumerate(rows[t]["proponents"]) if p["id"] == c), None) for c, t in checked}
    print(f"top-1 proponent is the planted copy for {sum(r == 1 for r in rank.values())}/{len(rank)}; ranks {rank}")
    # measured: all top-1, by 1e-4 to 3e-2 of the score (1e-4: an edited copy against a same-label near-twin);
    # one near-tie may go either way on another machine's rounding. Random or ignored training gradients
    # would put a copy in the top 3 of 268 with p ≈ 0.01 each.
    assert all(r is not None and r <= 3 for r in rank.values()), rank
    assert sum(r == 1 for r in rank.values()) >= len(rank) - 1, rank
    # margins, from the cached gradients: an exact copy's gradient is its test example's own (cosine 1 at every
    # checkpoint: score Σ η_c, within the fp16 cache's rounding); every copy clears the median same-label
    # training example by > 1e-3 of Σ η_c (measured ≥ 4e-3; 0 if the gradients ignored the inputs)
    scores, train = _cache_scores(ddp_run, s)
    test_row = {tid: i for i, tid in enumerate(rows)}
    for c, t in checked:
        row, j = scores[test_row[t]], int(np.flatnonzero(train["id"] == c)[0])
        same = row[(train["label"] == rows[t]["label"]).to_numpy() & (train["id"] != c).to_numpy()]
        assert row[j] > (0.999 if c.startswith("copy-") else 0.99), (c, row[j])
        assert row[j] - np.median(same) > 1e-3, (c, row[j], np.median(same))
    lead = {c: float(scores[test_row[t], train["id"] == c][0] - scores[test_row[t], train["id"] != c].max())
            for c, t in checked}
    print("lead of each copy over its row's best other example, / Σ η_c:", {c: f"{v:+.1e}" for c, v in lead.items()})
    r = rows[checked[0][1]]
    assert set(r) >= {"id", "label", "predicted", "correct", "text", "proponents", "opponents"}
    assert len(r["proponents"]) == 5 and set(r["proponents"][0]) == {"id", "label", "score", "text"}
    assert r["proponents"][0]["score"] >= r["proponents"][1]["score"] > r["opponents"][0]["score"]
    assert all(o["score"] <= p["score"] for o in r["opponents"] for p in r["proponents"])
    # self-influence against the planted noise, in the detector table
    det = s["detectors"]["self_influence"]
    print("self-influence AUROC:", round(det["auroc"], 3))
    assert s["noise"]["flipped"] > 30 and det["auroc"] > 0.9  # chance 0.5 (± 0.045 sd); measured 0.999
    # next to the dynamics detectors, in their table
    assert {"self_influence", "aum", "loss", "confidence"} <= set(s["detectors"]), s["detectors"]
    table = pd.read_parquet(ddp_run / "analysis" / "example_scores.parquet")
    assert len(table) == 268 and table["id"].is_unique and table["suspicion_self_influence"].notna().all()
    assert {"suspicion_aum", "region"} <= set(table.columns)
    from llm_dist.analysis.dynamics.analyze import analyze

    again = analyze(ddp_run, wandb=False)  # re-running analyze keeps the influence detector
    assert "self_influence" in again["detectors"]
    md = (ddp_run / "influence" / "report.md").read_text()
    assert "self_influence" in md and "Misclassified test examples" in md
    assert "data:image/png;base64" in (ddp_run / "influence" / "report.html").read_text()


def test_two_rank_influence_matches_one_rank(ddp_run, ddp_influence, tmp_path):
    """torchrun on 2 ranks writes the same gradient cache rows (each rank its share) and the same top-k."""
    two = tmp_path / "run"
    shutil.copytree(ddp_run, two, ignore=shutil.ignore_patterns("influence"))
    torchrun = str(Path(ACCELERATE).with_name("torchrun"))
    p = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "llm_dist.cli", "influence",
                        str(two), "--k", "5", "--proj-dim", "512", "--quiet", "--no-wandb"], cwd=ROOT,
                       env=run_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    s2 = json.loads((two / "influence" / "summary.json").read_text())
    assert s2["ranks"] == 2 and not s2["timing"]["train_cached"]
    a = sorted((ddp_run / "influence" / "cache").rglob("units.npy"))
    b = sorted((two / "influence" / "cache").rglob("units.npy"))
    assert len(a) == len(b) == 8 and [x.relative_to(ddp_run) for x in a] == [x.relative_to(two) for x in b]
    for x, y in zip(a, b):
        assert np.abs(np.load(x).astype(np.float32) - np.load(y).astype(np.float32)).max() < 2e-3
    r1 = [json.loads(l) for l in (ddp_run / "influence" / "test_topk.jsonl").read_text().splitlines()]
    r2 = [json.loads(l) for l in (two / "influence" / "test_topk.jsonl").read_text().splitlines()]
    # the same scores up to the fp16 rounding of a few rows (measured 1.4e-6 of Σ η_c; a row's best two are
    # as close as 1.8e-6 there), so the same top-1 proponents except where a row's best two tie within it
    a, train = _cache_scores(ddp_run, ddp_influence)
    b, _ = _cache_scores(two, s2)
    assert np.abs(a - b).max() < 2e-5, np.abs(a - b).max()
    col = {tid: j for j, tid in enumerate(train["id"])}
    top1 = [(r["proponents"][0]["id"], q["proponents"][0]["id"]) for r, q in zip(r1, r2)]
    assert sum(x == y for x, y in top1) >= len(top1) - 2, top1
    assert all(a[i, col[y]] >= a[i].max() - 2e-5 for i, (x, y) in enumerate(top1) if x != y), top1


def test_query_and_test_file(ddp_run, ddp_influence, data, tmp_path, capsys):
    t = pd.read_csv(data / "test.csv").iloc[EXACT]  # its edited copy is in train
    from llm_dist.cli import main as cli

    assert cli(["influence", str(ddp_run), "--query", t["text"], "--k", "3", "--proj-dim", "512", "--quiet"]) == 0
    p = capsys.readouterr()
    q = json.loads((ddp_run / "influence" / "query.json").read_text())
    assert q["label_source"] == "predicted" and len(q["proponents"]) == 3 and q["text"] == t["text"]
    assert "proponents:" in p.out and q["proponents"][0]["id"] in p.out
    flipped = {r["id"] for r in json.loads((ddp_run / "noise.json").read_text())["flipped"]}
    assert f"edit-{t['id']}" not in flipped and q["label"] == t["label"]  # seeded noise; a model that learned
    # the edited copy first (measured for te0006 in the test split: by 1e-4 of the score over a same-label
    # near-twin, by 3e-4 over the third): top 2
    assert f"edit-{t['id']}" in [p["id"] for p in q["proponents"][:2]], q["proponents"]
    assert q["proponents"][0]["score"] >= q["proponents"][1]["score"] >= q["proponents"][2]["score"] > 0
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"id": f"q{i}", "text": " ".join(["goal", "match", "the", "league"][: i + 2]),
                                     "label": "sport"}) + "\n" for i in range(3)))
    from llm_dist.analysis.influence import influence

    s = influence(ddp_run, test=str(f), k=2, proj_dim=512, wandb=False)
    assert s["split"] == "file" and s["test_examples"] == 3
    assert s["timing"]["train_cached"] and s["timing"]["train_grad_s"] == 0  # the training gradients came from the cache
    rows = [json.loads(l) for l in (ddp_run / "influence" / "test_topk.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q0", "q1", "q2"]
    assert all(p["label"] == "sport" for r in rows for p in r["proponents"][:1])
    f.write_text(json.dumps({"id": "x", "text": "goal", "label": "weather"}) + "\n")
    from llm_dist.analysis.influence import InfluenceError

    with pytest.raises(InfluenceError, match="mine.jsonl.*weather"):
        influence(ddp_run, test=str(f), wandb=False)


def test_lora_run_uses_the_adapter_and_adam_preconditioning(data):
    """A LoRA run: influence over the adapter and the head; the planted exact copies are top proponents."""
    from llm_dist.analysis.influence import influence

    out = data / "lora"
    launch(TINY, *_args(data, out, "--batch_size=32", "--classify.epochs=2", "--save_every=8", "--keep_checkpoints=2",
                        "--classify.peft.method=lora", "--classify.peft.r=4", "--classify.peft.target_modules=[query,value]",
                        "--optim.lr=5e-3"), nproc=1)
    s = influence(out, k=3, proj_dim=256, wandb=False)
    assert s["peft"] and len(s["checkpoints"]) == 2
    assert s["parameters"] and all("lora_" in n or "classifier" in n for n in s["parameters"])
    assert any("lora_" in n for n in s["parameters"])
    rows = {r["id"]: r for r in map(json.loads, (out / "influence" / "test_topk.jsonl").read_text().splitlines())}
    hits = [rows[f"te{i:04d}"]["proponents"][0]["id"] == f"copy-te{i:04d}" for i in range(EXACT)]
    print(f"LoRA: exact copy top-1 for {sum(hits)}/{EXACT}")
    assert sum(hits) >= EXACT - 1
    # Adam preconditioning (LESS) from the checkpoint's saved moments, against the formula by hand
    from llm_dist.analysis.influence.tracin import adam_for, open_run
    from llm_dist.training.checkpoint import torch_load_safe

    run = open_run(out)
    ckpt = run.checkpoints[-1]
    pre = adam_for(run, ckpt, s["parameters"]).to("cpu")
    st = torch_load_safe(ckpt / "optimizer.bin")
    (b1, b2), eps = st["param_groups"][0]["betas"], st["param_groups"][0]["eps"]
    g = torch.randn(pre.m.numel())
    name = s["parameters"][0]
    from llm_dist.training.optim import param_groups

    param = dict(run.model.named_parameters())[name]
    index = [id(p) for grp in param_groups(run.model, 0.01) for p in grp["params"]].index(id(param))
    assert torch.equal(pre.m[:param.numel()], st["state"][index]["exp_avg"].reshape(-1).float())
    assert torch.equal(pre.v[:param.numel()], st["state"][index]["exp_avg_sq"].reshape(-1).float())
    t = float(max(v["step"] for v in st["state"].values())) + 1
    m = b1 * pre.m + (1 - b1) * g
    v = b2 * pre.v + (1 - b2) * g * g
    want = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    assert torch.allclose(pre(g), want) and not torch.allclose(pre(g), g)


def test_refuses_a_run_without_checkpoints(ddp_run, tmp_path, capsys):
    from llm_dist.analysis.influence import main

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(ddp_run / "config.yaml", bare / "config.yaml")
    shutil.copytree(ddp_run / "splits", bare / "splits")
    for d, why in ((bare, "no checkpoints"), (tmp_path / "missing", "no such run directory")):
        capsys.readouterr()
        assert main([str(d)]) == 2
        err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
        assert len(err) == 1 and err[0].startswith("error: ") and why in err[0], err
    assert main([str(bare)]) == 2
    err = capsys.readouterr().err
    assert "--save_every=N" in err and "--keep_checkpoints=K" in err and "save_every=34" in err, err
    assert not (bare / "influence").exists()


@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero2_run_consolidates_each_checkpoint(data):
    """A ZeRO-2 run on 2 ranks: influence reads each checkpoint's weights consolidated from the DeepSpeed
    shards (the last one equal to the run's exported final/ weights), and each planted exact copy scores as
    its test example's own gradient would (cosine 1 at every checkpoint: the row's best, up to rounding)."""
    from safetensors.torch import load_file

    from llm_dist.analysis.influence import influence
    from llm_dist.analysis.influence.tracin import load_weights, open_run

    out = data / "zero2"
    launch(TINY, *_args(data, out, "--batch_size=8", "--classify.epochs=3", "--save_every=17", "--keep_checkpoints=2",
                        "--deepspeed.config=configs/deepspeed/zero2.json"), nproc=2, deepspeed=True)
    run = open_run(out)
    assert run.zero_stage == 2 and len(run.checkpoints) == 2
    assert not (run.checkpoints[-1] / "model.safetensors").exists()  # only DeepSpeed's shards
    load_weights(run, run.checkpoints[-1])
    final = load_file(out / "final" / "model.safetensors")
    mine = run.model.state_dict()
    assert all(torch.equal(mine[k].float(), v.float()) for k, v in final.items() if k in mine)
    assert sum(k in mine for k in final) >= len(final) - 1
    s = influence(out, k=3, proj_dim=256, wandb=False)
    assert len(s["checkpoints"]) == 2 and json.loads((out / "run.json").read_text())["world_size"] == 2
    rows = {r["id"]: r for r in map(json.loads, (out / "influence" / "test_topk.jsonl").read_text().splitlines())}
    rank = {i: next((j + 1 for j, p in enumerate(rows[f"te{i:04d}"]["proponents"]) if p["id"] == f"copy-te{i:04d}"),
                    None) for i in range(EXACT)}
    print(f"ZeRO-2: exact copy top-1 for {sum(r == 1 for r in rank.values())}/{EXACT}; ranks {rank}")
    # this short run (51 steps) is near-saturated at its checkpoints: many same-label examples score within
    # 1e-4 of an exact copy, so its rank among them is rounding (measured 4 / 6 top-1, the others outside the
    # top 3). What must hold: an exact copy's cosine is 1 at every checkpoint, the most any example can score,
    # so its score is Σ η_c and the row's best up to the fp16 cache's rounding (a random or misloaded
    # gradient scores ≈ 0 of Σ η_c)
    scores, train = _cache_scores(out, s)
    best = []
    for i in range(EXACT):
        row = scores[i]  # te0000… are the test split's first rows
        copy = row[int(np.flatnonzero(train["id"] == f"copy-te{i:04d}")[0])]
        best.append(f"{copy:.5f} (best {row.max():.5f}, median {np.median(row):.3f})")
        assert copy > 0.999 and copy >= row.max() - 2e-4, (i, copy, row.max())
    print("ZeRO-2: exact copy score / Σ η_c:", best)
