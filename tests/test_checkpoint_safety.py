"""Checkpoints never run code on load, a resume never silently starts over, rotation never deletes what this run
did not write, and a full disk while checkpointing is a one-line error that leaves the earlier checkpoints intact
(issue 10: #2, #3, #6). Resumes run in-process through the CLI entry (`train_main`); one 2-rank DeepSpeed launch."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from conftest import launch, run_env
from llm_dist.cli import train_main
from llm_dist.training import checkpoint as ck
from llm_dist.training.checkpoint import CheckpointWriteError, Checkpointer, verify, write_manifest

TINY = "configs/mlm/tiny.yaml"


class Payload:
    """Unpickling this runs `touch PATH`: what a crafted checkpoint would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def env():
    """The launched runs' environment, for in-process runs; the signal handlers a failed run leaves are restored."""
    import signal

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in run_env().items():
            if os.environ.get(k) != v:
                mp.setenv(k, v)
        yield
    for s, h in handlers.items():
        signal.signal(s, h)


def train(out, tokenizer_dir, *extra) -> int:
    return train_main([TINY, f"--output_dir={out}", f"--tokenizer.path={tokenizer_dir}", "--save_every=2",
                       "--tracking.progress=false", *extra])


@pytest.fixture(scope="module")
def base_run(env, tmp_path_factory, tokenizer_dir):
    """A finished 4-step run with checkpoints at steps 2 and 4 (trained once, copied per case)."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert train(out, tokenizer_dir, "--max_steps=4") == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    return out


def copy_run(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)
    return dest


def error_lines(captured) -> list[str]:
    return [ln for ln in (captured.out + captured.err).splitlines() if ln.startswith("error:")]


def snapshot(*paths: Path) -> dict:
    snap = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*"))
        for f in files:
            snap[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "dir"
    return snap


def plant(f: Path, pwned: Path) -> None:
    """Put an os.system pickle into `f`: added to a torch file's real content, or replacing a JSON/safetensors file."""
    if f.suffix in (".pt", ".bin"):
        obj = torch.load(f, weights_only=False, map_location="cpu")  # our own, trusted, file
        torch.save({**obj, "extra": Payload(pwned)} if isinstance(obj, dict) else Payload(pwned), f)
    else:
        f.write_bytes(pickle.dumps(Payload(pwned)))


# ----------------------------------------------------------------------------- #3: nothing runs code on load
PLANTED = ["optimizer.bin", "model.safetensors", "scheduler.json", "rng_state_rank0.json", "data_state_rank0.json",
           "trainer_state.json", "random_states_0.pkl", "custom_checkpoint_0.pkl"]


def test_checkpoint_files_are_plain_data(base_run):
    ckpt = base_run / "checkpoints" / "step_00000004"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["data_state_rank0.json", "manifest.json", "model.safetensors", "optimizer.bin",
                     "rng_state_rank0.json", "scheduler.json", "trainer_state.json"]
    ck.check_loadable(ckpt)  # the one torch file loads with weights_only=True
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["checkpoint_format"] == ck.FORMAT and state["lineage"]


@pytest.mark.parametrize("name", PLANTED)
def test_malicious_pickle_is_refused(name, base_run, tmp_path, tokenizer_dir, capsys):
    out = copy_run(base_run, tmp_path / "run")
    ckpt = out / "checkpoints" / "step_00000004"
    pwned = tmp_path / "PWNED"
    plant(ckpt / name, pwned)  # a new file for the two old accelerate pickle names
    write_manifest(ckpt)  # the manifest guards against corruption, not against an attacker
    assert verify(ckpt) is None
    capsys.readouterr()
    rc = train(out, tokenizer_dir, "--max_steps=6")
    errors = error_lines(capsys.readouterr())
    assert rc == 2 and len(errors) == 1 and name in errors[0], errors
    assert not pwned.exists()


@pytest.mark.deepspeed
def test_malicious_pickle_in_deepspeed_checkpoint_is_refused(env, tmp_path, tokenizer_dir, capsys):
    """One ZeRO-2 run on 2 ranks; its checkpoint passes the probe as saved (the allowlist covers DeepSpeed's
    classes), and a payload added to its model or optimizer states is refused before DeepSpeed reads them."""
    src = tmp_path / "ds"
    launch(TINY, f"--output_dir={src}", "--deepspeed.config=configs/deepspeed/zero2.json",
           f"--tokenizer.path={tokenizer_dir}", "--max_steps=2", "--save_every=2", "--tracking.progress=false",
           deepspeed=True)
    ckpt = src / "checkpoints" / "step_00000002"
    ck.check_loadable(ckpt)
    states = sorted(p.relative_to(ckpt) for p in (ckpt / "pytorch_model").glob("*.pt"))
    assert [str(s) for s in states] == ["pytorch_model/mp_rank_00_model_states.pt",
                                        "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                        "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not list(ckpt.glob("*.pkl")) and not list(ckpt.glob("*rank*.pt"))
    for rel in (states[0], states[2]):
        copy = copy_run(src, tmp_path / f"copy-{rel.name}")
        pwned = tmp_path / f"PWNED-{rel.name}"
        plant(copy / "checkpoints" / ckpt.name / rel, pwned)
        write_manifest(copy / "checkpoints" / ckpt.name)
        capsys.readouterr()
        rc = train(tmp_path / f"resumed-{rel.name}", tokenizer_dir, f"--resume={copy / 'checkpoints'}", "--max_steps=4")
        errors = error_lines(capsys.readouterr())
        assert rc == 2 and len(errors) == 1 and rel.name in errors[0] and "system" in errors[0], errors
        assert not pwned.exists()


# ----------------------------------------------------------------------------- #2: no silent restart
def test_all_checkpoints_bad_refuses_and_deletes_nothing(base_run, tmp_path, tokenizer_dir, capsys):
    out = copy_run(base_run, tmp_path / "run")
    ck_dir = out / "checkpoints"
    (ck_dir / "step_00000004" / "manifest.json").unlink()
    model = ck_dir / "step_00000002" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-10] ^= 0xFF
    model.write_bytes(bytes(data))
    before = snapshot(ck_dir, out / "metrics.jsonl")
    capsys.readouterr()
    rc = train(out, tokenizer_dir, "--max_steps=6")
    errors = error_lines(capsys.readouterr())
    assert rc == 2 and len(errors) == 1, errors
    line = errors[0]
    assert str(ck_dir) in line and "step_00000004 (no manifest.json" in line
    assert "step_00000002 (model.safetensors is corrupt" in line and "--resume=never" in line
    assert snapshot(ck_dir, out / "metrics.jsonl") == before


def test_rotation_keeps_what_it_did_not_write(base_run, tmp_path, tokenizer_dir, capsys):
    """Resuming from step 4 with keep_checkpoints=2 and saves at 6 and 8: the run's own intact step 4 rotates
    away; its corrupt step 2, a foreign run's step 1 and a stale partial save are left (the last removed)."""
    out = copy_run(base_run, tmp_path / "run")
    ck_dir = out / "checkpoints"
    opt = ck_dir / "step_00000002" / "optimizer.bin"
    opt.write_bytes(opt.read_bytes()[:1000])  # truncated: unverifiable
    foreign = ck_dir / "step_00000001"
    shutil.copytree(ck_dir / "step_00000002", foreign)
    shutil.copy(ck_dir / "step_00000004" / "optimizer.bin", foreign / "optimizer.bin")
    st = json.loads((foreign / "trainer_state.json").read_text())
    (foreign / "trainer_state.json").write_text(json.dumps({**st, "step": 1, "lineage": "another-run"}))
    write_manifest(foreign)
    assert verify(foreign) is None
    stale = ck_dir / ".tmp-step_00000099"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    capsys.readouterr()
    assert train(out, tokenizer_dir, "--max_steps=8", "--keep_checkpoints=2") == 0
    captured = capsys.readouterr()
    names = sorted(p.name for p in ck_dir.iterdir())
    assert names == ["latest", "step_00000001", "step_00000002", "step_00000006", "step_00000008"], names
    assert (captured.out + captured.err).count("not rotating away") == 1  # warned once, not at every save
    assert verify(foreign) is None


# ----------------------------------------------------------------------------- #6: disk full while checkpointing
@pytest.fixture
def small_setup(env):
    from accelerate import Accelerator

    acc = Accelerator()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = acc.prepare(model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return acc, model, opt, sched


def _step(model, opt, sched):
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def _enospc_model(module, path):
    Path(path).write_bytes(b"half a file")
    raise OSError(errno.ENOSPC, "No space left on device")


def _torch_save_full(obj, path):
    Path(path).write_bytes(b"PK\x03\x04 half")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                       "data/3: file write failed")


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(writer, small_setup, tmp_path, monkeypatch):
    acc, model, opt, sched = small_setup
    root = tmp_path / "checkpoints"
    cp = Checkpointer(root, acc, keep=2, model=model, optimizer=opt, scheduler=sched)
    _step(model, opt, sched)
    first = cp.save(1, {"step": 1, "zero_stage": None}, {"pos": 1})
    before = snapshot(root)
    _step(model, opt, sched)
    if writer == "safetensors":
        monkeypatch.setattr(ck, "_write_model", _enospc_model)
    else:
        monkeypatch.setattr(ck, "_write_tensors", _torch_save_full)
    with pytest.raises(CheckpointWriteError) as e:
        cp.save(2, {"step": 2, "zero_stage": None}, {"pos": 2})
    msg = str(e.value)
    assert msg.startswith(f"no space left on device while writing checkpoint {root / 'step_00000002'}")
    assert "\n" not in msg
    assert not list(root.glob(".tmp-*")) and not (root / "step_00000002").exists()
    assert (root / "latest").read_text().strip() == first.name and verify(first) is None
    assert snapshot(root) == before


def test_disk_full_through_the_cli(env, tmp_path, tokenizer_dir, monkeypatch, capsys):
    """A fresh run whose second checkpoint hits a full disk: exit 2, one line, and its first checkpoint (and
    output_dir, which this very run created) stay."""
    calls = []
    real = ck._write_tensors

    def full_on_second(obj, path):
        calls.append(path)
        if len(calls) == 2:
            _torch_save_full(obj, path)
        real(obj, path)

    monkeypatch.setattr(ck, "_write_tensors", full_on_second)
    out = tmp_path / "fresh"
    capsys.readouterr()
    assert train(out, tokenizer_dir, "--max_steps=4") == 2
    errors = error_lines(capsys.readouterr())
    assert len(errors) == 1 and "no space left on device while writing checkpoint" in errors[0], errors
    ck_dir = out / "checkpoints"
    assert sorted(p.name for p in ck_dir.iterdir()) == ["latest", "step_00000002"]
    assert verify(ck_dir / "step_00000002") is None


def test_stale_tmp_dirs_removed_on_start(small_setup, tmp_path, capsys):
    acc, model, opt, sched = small_setup
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_00000007").mkdir(parents=True)
    (root / ".tmp-step_00000007" / "optimizer.bin").write_bytes(b"partial")
    (root / "latest.tmp").write_text("step_00000007\n")
    (root / "step_00000003").mkdir()  # not ours, not a tmp: untouched
    Checkpointer(root, acc, model=model, optimizer=opt, scheduler=sched)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]
    assert ".tmp-step_00000007" in capsys.readouterr().err


def test_json_state_round_trips_exactly():
    import random

    import numpy as np

    state = {"rng": random.Random(3).getstate(), "np": np.random.RandomState(1).get_state(), "t": torch.get_rng_state(),
             "nested": {1: (2, [3, None]), "s": "x", "f": 0.1, "b": True, "__tuple__": 1}, "e": torch.zeros(0, 2)}
    back = ck.from_jsonable(json.loads(json.dumps(ck.to_jsonable(state))))
    assert back["rng"] == state["rng"] and back["nested"] == state["nested"]
    assert back["np"][0] == "MT19937" and (back["np"][1] == state["np"][1]).all() and back["np"][1].dtype == np.uint32
    assert torch.equal(back["t"], state["t"]) and back["e"].shape == (0, 2)
    with pytest.raises(TypeError):
        ck.to_jsonable({"x": object()})


def test_save_moves_aside_a_same_named_checkpoint_it_did_not_write(small_setup, tmp_path, capsys):
    """A step dir left by another run (or an unverifiable one) is moved aside, never overwritten or deleted."""
    acc, model, opt, sched = small_setup
    root = tmp_path / "checkpoints"
    other = Checkpointer(root, acc, model=model, optimizer=opt, scheduler=sched, lineage="other-run")
    theirs = other.save(1, {"step": 1, "zero_stage": None}, {"pos": 1})
    before = snapshot(theirs)
    mine = Checkpointer(root, acc, model=model, optimizer=opt, scheduler=sched)
    _step(model, opt, sched)
    mine.save(1, {"step": 1, "zero_stage": None}, {"pos": 1})
    aside = root / "superseded-step_00000001"
    assert {k.replace(str(aside), str(theirs)): v for k, v in snapshot(aside).items()} == before
    assert json.loads((theirs / "trainer_state.json").read_text())["lineage"] == mine.lineage
    assert "moved it to" in capsys.readouterr().err
