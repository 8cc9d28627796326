"""Token shards (`llm-dist prepare`, `data.shards`) and document-aware packing (`data.document_mask`)."""
import copy
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import AutoModel

from conftest import launch, read_metrics
from llm_dist.config import ConfigError, DataConfig, MLMConfig, RunConfig, SourceConfig
from llm_dist.data.mlm import (MLMCollator, PackedStream, document_attention_mask, document_positions,
                               document_stream)
from llm_dist.data.shards import ShardCorpus, check_tokenizer, prepare, tokenizer_hash
from llm_dist.data.sources import bbc_news_records
from llm_dist.models.build import load_tokenizer, preset_config, train_wordpiece

FILES, PER_FILE = 7, 40


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """280 BBC articles as 7 text files (one article a line: ids `partK:ROW`)."""
    d = tmp_path_factory.mktemp("corpus")
    recs = bbc_news_records()[::7][:FILES * PER_FILE]
    for k in range(FILES):
        (d / f"part{k}.txt").write_text("".join(" ".join(r["text"].split()) + "\n"
                                                for r in recs[k * PER_FILE:(k + 1) * PER_FILE]))
    return d


@pytest.fixture(scope="module")
def shards(tmp_path_factory, corpus, tok):
    """The corpus prepared as an array of 2 tasks (4 shards), the second with 2 worker processes."""
    out = tmp_path_factory.mktemp("shards")
    src = [SourceConfig(path=str(corpus))]
    first = prepare(src, tok, out, shard_bytes=150_000, task_index=0, num_tasks=2, progress=False)
    second = prepare(src, tok, out, shard_bytes=150_000, task_index=1, num_tasks=2, workers=2, progress=False)
    return {"dir": out, "src": src, "first": first, "second": second}


def test_prepare_writes_every_document_once_with_its_tokens(shards, tok, corpus):
    first, second = shards["first"], shards["second"]
    assert first["manifest"] is None and second["manifest"] is not None  # the last task to finish writes it
    m = json.loads((shards["dir"] / "manifest.json").read_text())
    assert len(m["shards"]) == first["shards"] >= 4 and len(second["done"]) >= 2
    assert sorted(first["done"] + second["done"]) == [s["name"] for s in m["shards"]]
    assert m["dtype"] == "uint16" and m["tokenizer_hash"] == tokenizer_hash(tok)
    assert m["documents"] == FILES * PER_FILE and len(m["sources"][0]["files"]) == FILES
    assert all({"path", "size", "mtime_ns"} <= set(f) for f in m["sources"][0]["files"])
    sc = ShardCorpus(shards["dir"])
    texts = {f"part{k}:{i}": line for k in range(FILES)
             for i, line in enumerate((corpus / f"part{k}.txt").read_text().splitlines())}
    seen = {}
    for i in range(len(m["shards"])):
        for d, doc in enumerate(sc.doc_ids(i)):
            seen[doc] = sc.tokens(i, d)
    assert set(seen) == set(texts) and sum(len(t) for t in seen.values()) == m["tokens"]
    for doc in list(texts)[::23]:  # the stored tokens are the tokenizer's ids of the text ([CLS] … [SEP])
        assert seen[doc].dtype == np.uint16 and seen[doc].tolist() == tok(texts[doc])["input_ids"]


def test_prepare_resumes_and_redoes_only_changed_files(shards, tok, corpus):
    src, out = shards["src"], shards["dir"]
    again = prepare(src, tok, out, shard_bytes=150_000, progress=False)
    assert again["done"] == [] and len(again["skipped"]) == again["shards"]
    f = corpus / "part6.txt"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: its shard is stale
    try:
        redo = prepare(src, tok, out, shard_bytes=150_000, progress=False)
        assert len(redo["done"]) == 1 and redo["manifest"] is not None
    finally:
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        prepare(src, tok, out, shard_bytes=150_000, progress=False)


def test_ranks_read_disjoint_complete_shares_like_the_text_stream(shards):
    """Per epoch each rank gets whole shards (or every world-th document with fewer shards than ranks);
    together they read exactly the training documents the on-the-fly stream reads (same held-out rule)."""
    sc = ShardCorpus(shards["dir"], shards["src"])
    n_shards = len(sc.shards)
    fly = {ex["id"] for ex in document_stream(shards["src"], 0, 0, 0, 1, 0.05, False)}
    for world in (2, 3, n_shards + 1):
        for epoch in (0, 1):
            shares = [[d for _, d, _ in sc.documents(5, epoch, r, world, 0.05, False) if d is not None]
                      for r in range(world)]
            assert all(shares) and sum(map(len, shares)) == len(set().union(*shares))
            assert set().union(*shares) == fly
            if world <= n_shards:  # whole shards: a rank's documents come from its own shards only
                owner = {doc: i for i in range(n_shards) for doc in sc.doc_ids(i)}
                used = [{owner[d] for d in share} for share in shares]
                assert sum(map(len, used)) == len(set().union(*used))
    assert sc.order(5, 0, 0, 2).tolist() != sc.order(5, 1, 0, 2).tolist()  # reshuffled per epoch
    held = {d for _, d, _ in sc.documents(5, 0, 0, 1, 0.05, True) if d is not None}
    assert held == {ex["id"] for ex in document_stream(shards["src"], 0, 0, 0, 1, 0.05, True)}


def test_shard_stream_resumes_exactly_through_the_dataloader(shards, tok):
    """The checkpointed loader state (shard position, pending tokens, shuffle buffer, RNG) gives exactly
    the batches an uninterrupted run sees next — across an epoch boundary, with document runs intact."""
    data = DataConfig(sources=shards["src"], seq_len=64, shuffle_buffer=16, shards=str(shards["dir"]))

    def loader():
        ps = PackedStream(data.sources, tok, data, 3, 1, 2, shards=ShardCorpus(shards["dir"], data.sources))
        return ps, StatefulDataLoader(ps, batch_size=4, collate_fn=lambda b: b)

    ps, dl = loader()
    it = iter(dl)
    per_epoch = sum(len(t) for _, d, t in ps.shards.documents(3, 0, 1, 2, 0.05, False) if d is not None) // 64 // 4
    for _ in range(per_epoch - 3):
        next(it)
    state = copy.deepcopy(dl.state_dict())
    after = [next(it) for _ in range(8)]
    ps2, dl2 = loader()
    dl2.load_state_dict(state)
    again = [b for _, b in zip(range(8), dl2)]
    assert ps.state_dict()["epoch"] == 1  # the 8 batches crossed into the next epoch
    for a, b in zip(after, again):
        assert [x["input_ids"].tolist() for x in a] == [x["input_ids"].tolist() for x in b]
        assert [x["doc_ids"] for x in a] == [x["doc_ids"] for x in b] and [x["doc_lens"] for x in a] == [x["doc_lens"] for x in b]
    assert all(sum(x["doc_lens"]) == 64 and len(x["doc_lens"]) == len(x["doc_ids"]) for b in after for x in b)


def test_the_epoch_a_checkpoint_records_comes_from_the_workers(shards, tok):
    """With DataLoader workers the streams move in the workers (the main process's copy stays at epoch 0):
    `loader_epoch` reads the epoch from the worker snapshots — what a resume on another world size restarts
    after (MLMTask.resume_state)."""
    from llm_dist.data.mlm import loader_epoch

    data = DataConfig(sources=shards["src"], seq_len=64, shuffle_buffer=4, shards=str(shards["dir"]))
    ps = PackedStream(data.sources, tok, data, 3, 0, 1, shards=ShardCorpus(shards["dir"], data.sources))
    dl = StatefulDataLoader(ps, batch_size=4, collate_fn=lambda b: b, num_workers=2)
    per_epoch = sum(len(t) for _, d, t in ps.shards.documents(3, 0, 0, 1, 0.05, False) if d is not None) // 64 // 4
    it = iter(dl)
    assert loader_epoch(dl.state_dict()) == 0
    for _ in range(per_epoch + 6):  # both workers past their share of the first epoch
        next(it)
    state = dl.state_dict()
    assert ps.state_dict()["epoch"] == 0 and loader_epoch(state) == 1
    assert loader_epoch({"x": [1, {"y": 2}]}) is None


def test_another_tokenizer_is_refused_in_one_line(shards, corpus, tmp_path, capsys):
    other = train_wordpiece((line for f in sorted(corpus.glob("*.txt")) for line in f.read_text().splitlines()), 500)
    with pytest.raises(ConfigError, match=r"config key 'data.shards': .* was made with another tokenizer"):
        check_tokenizer(ShardCorpus(shards["dir"]).manifest, other, str(shards["dir"]))
    other.save_pretrained(str(tmp_path / "tok"))
    from llm_dist.cli import main

    rc = main(["train", "configs/mlm/tiny.yaml", f"--output_dir={tmp_path / 'run'}", f"--data.shards={shards['dir']}",
               f"--data.sources.0.path={corpus}", "--data.sources.0.name=null", f"--tokenizer.path={tmp_path / 'tok'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and re.match(r"error: config key 'data.shards': .*another tokenizer", err[0])
    assert not (tmp_path / "run").exists()


def test_document_positions_and_mask():
    pos, seg = document_positions([[3, 2], [5]], 5)
    assert pos.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]] and seg.tolist() == [[0, 0, 0, 1, 1], [0] * 5]
    m = document_attention_mask(seg)
    assert m.shape == (2, 1, 5, 5) and m.dtype == torch.bool
    assert m[0, 0, 0].tolist() == [True, True, True, False, False] and m[1].all()
    add = document_attention_mask(seg, torch.float32)
    assert add[0, 0, 4, 0] == torch.finfo(torch.float32).min and add[0, 0, 4, 3] == 0
    with pytest.raises(ValueError):
        document_positions([[3, 3]], 5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_document_mask_makes_packed_documents_independent(tok, impl):
    """HF BERT fed the 4-D block-diagonal mask and restarting position ids: each document's hidden states
    in the packed sequence equal those of the document alone — and differ without the mask."""
    torch.manual_seed(0)
    model = AutoModel.from_config(preset_config("tiny", tok, RunConfig().model), attn_implementation=impl).eval()
    a, b = torch.randint(5, len(tok), (1, 9)), torch.randint(5, len(tok), (1, 7))
    packed = torch.cat([a, b], 1)
    pos, seg = document_positions([[9, 7]], 16)
    mask = document_attention_mask(seg, None if impl == "sdpa" else torch.float32)
    with torch.no_grad():
        h = model(input_ids=packed, attention_mask=mask, position_ids=pos).last_hidden_state
        ha, hb = model(input_ids=a).last_hidden_state, model(input_ids=b).last_hidden_state
        plain = model(input_ids=packed).last_hidden_state
    torch.testing.assert_close(h[:, :9], ha, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h[:, 9:], hb, rtol=1e-4, atol=1e-5)
    assert (plain[:, 9:] - hb).abs().max() > 1e-2


def test_collator_gives_document_positions(tok):
    data = DataConfig(seq_len=128, shuffle_buffer=1)
    seqs = [s for _, s in zip(range(40), PackedStream(data.sources, tok, data, 0, 0, 1))]
    batch = MLMCollator(tok, MLMConfig(), document_mask=True)(seqs)
    starts = (batch["position_ids"] == 0)
    assert starts[:, 0].all() and int(starts.sum()) == sum(len(s["doc_lens"]) for s in seqs)
    # a document starts with [CLS] wherever a new run begins inside a sequence
    inner = starts.clone()
    inner[:, 0] = False
    assert inner.any() and (torch.stack([s["input_ids"] for s in seqs])[inner] == tok.cls_token_id).all()
    assert "position_ids" not in MLMCollator(tok, MLMConfig())(seqs)


@pytest.mark.slow
def test_two_ranks_train_from_shards_with_document_mask_and_resume_exactly(shards, corpus, tmp_path):
    """2 CPU ranks stream from the shards with document masks; a run resumed from its step-4 checkpoint
    ends with the same weights and saw the same batches as the uninterrupted one."""
    args = [f"--data.shards={shards['dir']}", f"--data.sources.0.path={corpus}", "--data.sources.0.name=null",
            "--data.document_mask=true", "--max_steps=8", "--save_every=4", "--log_every=1", "--batch_size=8",
            "--tracking.progress=false", "--data.max_eval_batches=2", "--eval_every=8"]
    full = tmp_path / "full"
    launch("configs/mlm/tiny.yaml", f"--output_dir={full}", *args)
    rows = [r for r in read_metrics(full) if "loss" in r]
    assert len(rows) == 8 and all(np.isfinite(r["loss"]) for r in rows)
    assert any("eval_loss" in r and np.isfinite(r["eval_loss"]) for r in read_metrics(full))
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "final")
    (cut / "run.json").unlink()
    step4 = [p.name for p in (cut / "checkpoints").glob("step_*") if int(p.name[5:]) == 4]
    for p in (cut / "checkpoints").iterdir():
        if p.is_dir() and p.name not in step4:
            shutil.rmtree(p)
    (cut / "checkpoints" / "latest").write_text(step4[0])
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_metrics(full)
                                               if r.get("step", 0) <= 4))
    resumed = launch("configs/mlm/tiny.yaml", f"--output_dir={cut}", *args)
    assert "at step 4" in resumed.stdout
    a, b = load_file(full / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    fa = {r["step"]: r["batch_fingerprint"] for r in read_metrics(full) if "loss" in r}
    fb = {r["step"]: r["batch_fingerprint"] for r in read_metrics(cut) if "loss" in r}
    assert fa == fb


def test_flash_and_flex_get_position_ids_only_and_transformers_finds_the_documents(tok):
    """For flash / flex attention (GPU) the task passes no dense mask, only the restarting position ids;
    transformers then detects the packed documents itself. Checked on CPU: the same model under SDPA fed
    that way equals the explicit block-diagonal mask."""
    from types import SimpleNamespace

    from llm_dist.tasks.mlm import MLMTask

    pos, seg = document_positions([[6, 10], [16]], 16)
    batch = {"attention_mask": torch.ones(2, 16, dtype=torch.long), "position_ids": pos, "doc_segments": seg}
    task = MLMTask.__new__(MLMTask)
    task.acc = SimpleNamespace(mixed_precision="bf16")
    for impl, want in (("flash_attention_2", None), ("flex_attention", None), ("sdpa", torch.bool),
                       ("eager", torch.bfloat16)):
        task.model = SimpleNamespace(config=SimpleNamespace(_attn_implementation=impl))
        got = task.model_inputs(None, batch)
        assert torch.equal(got["position_ids"], pos)
        assert (got["attention_mask"] is None) if want is None else (got["attention_mask"].dtype == want
                                                                     and got["attention_mask"].shape == (2, 1, 16, 16))
    task.model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"))
    assert "position_ids" not in task.model_inputs(None, {"attention_mask": batch["attention_mask"]})
    torch.manual_seed(0)
    model = AutoModel.from_config(preset_config("tiny", tok, RunConfig().model), attn_implementation="sdpa").eval()
    ids = torch.randint(5, len(tok), (2, 16))
    with torch.no_grad():
        explicit = model(input_ids=ids, attention_mask=document_attention_mask(seg), position_ids=pos).last_hidden_state
        implicit = model(input_ids=ids, attention_mask=None, position_ids=pos).last_hidden_state
    torch.testing.assert_close(explicit, implicit, rtol=1e-4, atol=1e-5)


def test_gpu_bench_plan_skips_compile_until_the_key_exists(monkeypatch):
    """bench/gpu.sh's plan: a compile run per length now that the config has `compile` (inductor on the GPU,
    aot_eager in the CPU dry run), none — with a note — for a config without the key."""
    import sys

    sys.path.insert(0, "bench")
    import gpu_bench

    assert gpu_bench.has_config_key("compile") and gpu_bench.has_config_key("data.shards")
    assert not gpu_bench.has_config_key("data.nope")
    runs, notes = gpu_bench.plan(dry_run=True)
    assert [n for n, _ in runs] == ["seq128_sdpa", "seq128_sdpa_compile", "seq512_sdpa", "seq512_sdpa_compile"]
    assert "--compile_backend=aot_eager" in dict(runs)["seq128_sdpa_compile"] and not any("compile" in n for n in notes)
    gpu, _ = gpu_bench.plan(dry_run=False)
    assert "--compile_backend=inductor" in dict(gpu)["seq512_sdpa_compile"]
    monkeypatch.setattr(gpu_bench, "has_config_key", lambda key: key != "compile")
    runs, notes = gpu_bench.plan(dry_run=True)
    assert [n for n, _ in runs] == ["seq128_sdpa", "seq512_sdpa"] and any("compile: skipped" in n for n in notes)


@pytest.mark.slow
def test_gpu_sh_dry_run_prints_the_table(shards, tmp_path):
    """bench/gpu.sh --dry-run on this CPU: the plan's runs (tiny model, 3 steps each, from the given shards)
    and the table read back from the run dirs."""
    import subprocess
    import sys

    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": os.getcwd(), "SHARDS": str(shards["dir"])}
    proc = subprocess.run(["bash", "bench/gpu.sh", "--dry-run", "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((out / "table.json").read_text())
    assert [r["run"] for r in rows] == ["seq128_sdpa", "seq128_sdpa_compile", "seq512_sdpa", "seq512_sdpa_compile"]
    assert [r["seq_len"] for r in rows] == [128, 128, 512, 512]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_mem_gb"] > 0 and r["mem_kind"] == "rss"
               for r in rows)
    assert "tokens/s" in proc.stdout and "seq512_sdpa_compile" in proc.stdout and "compile: skipped" not in proc.stdout
