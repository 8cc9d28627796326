"""The slurm/ batch scripts on a real SLURM (22.05, Debian packages) running on this machine.

slurm/local-cluster.sh stands up munged + slurmctld + two slurmd ("nodes" n1, n2 on one host);
the module fixture starts it in a private state dir and stops every daemon at the end. The jobs
train the tiny MLM on CPU (LLM_DIST_CPU=1: gloo over loopback). Skipped only when SLURM is not
installed and cannot be installed (no apt-get / not root / no registry).

    pytest -m slurm tests/test_slurm.py -v
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "slurm" / "local-cluster.sh"
CONFIG = "configs/mlm/tiny.yaml"
STEPS = 60  # optimizer steps of the multi-node / preemption runs
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}
# the same run for the reference and the preempted job: one process on each of the 2 nodes
COMMON_ARGS = [f"--max_steps={STEPS}", "--log_every=1", "--seed=7", "--tracking.progress=false",
               "--tracking.report_to=none"]


class Cluster:
    def __init__(self, state_dir: Path, env: dict):
        self.state_dir, self.env = state_dir, env

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, cwd=REPO, capture_output=True, text=True, check=check,
                              timeout=60)

    def sbatch(self, script: str, *args: str, sbatch_opts: tuple[str, ...] = (), **env: str) -> str:
        job_env = {**self.env, **env}
        p = subprocess.run(["sbatch", "--parsable", *sbatch_opts, f"slurm/{script}", *args], env=job_env,
                           cwd=REPO, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, f"sbatch failed: {p.stderr}"
        return p.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict]:
        """One dict per job (an array gives one per task) from `scontrol show job -o`."""
        p = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        out = []
        for line in p.stdout.splitlines():
            if not line.strip():
                continue
            fields = dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))
            out.append(fields)
        return out

    def wait(self, job_id: str, timeout: float, n_tasks: int = 1) -> list[dict]:
        """Poll `scontrol show job` (much faster than `sbatch --wait`) until all tasks are final."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            js = [j for j in self.jobs(job_id) if not j.get("ArrayTaskId", "").startswith("[")]
            if len(js) >= n_tasks and all(j.get("JobState") in TERMINAL for j in js):
                return js
            time.sleep(0.5)
        self.run("scancel", job_id, check=False)
        pytest.fail(f"job {job_id} not finished after {timeout:.0f} s: {self.jobs(job_id)}\n"
                    f"{self.diagnostics()}")

    def diagnostics(self) -> str:
        logs = []
        for f in sorted((self.state_dir / "log").glob("*.log")):
            logs.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(logs)


def _tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else f"(no {path})"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not Path(REPO, "train.py").exists() or not Path(REPO, CONFIG).exists():
        pytest.skip("train.py / configs/mlm/tiny.yaml not present")
    state = tmp_path_factory.mktemp("slurm-cluster")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(LLM_DIST_SLURM_DIR=str(state),
               LLM_DIST_SLURM_PORT_BASE=os.environ.get("LLM_DIST_SLURM_PORT_BASE", "26917"),
               SLURM_CONF=str(state / "etc" / "slurm.conf"))
    t0 = time.time()
    p = subprocess.run(["bash", str(CLUSTER_SH), "start"], env=env, capture_output=True, text=True, timeout=600)
    if p.returncode == 3:
        pytest.skip(f"SLURM is not installed and could not be installed here: {p.stderr.strip()[-500:]}")
    if p.returncode != 0:
        subprocess.run(["bash", str(CLUSTER_SH), "stop"], env=env, capture_output=True, timeout=120)
        pytest.fail(f"local SLURM cluster failed to start (rc {p.returncode}):\n{p.stdout}\n{p.stderr}")
    print(f"\nlocal SLURM cluster up in {time.time() - t0:.1f} s ({state})")
    # the jobs' environment: the Python running the tests, on CPU
    job_env = dict(env, LLM_DIST_CPU="1", CONFIG=CONFIG,
                   ENV_SETUP=f'export PATH="{Path(sys.executable).parent}:$PATH"',
                   PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    c = Cluster(state, job_env)
    try:
        yield c
    finally:
        s = subprocess.run(["bash", str(CLUSTER_SH), "stop"], env=env, capture_output=True, text=True, timeout=120)
        left = subprocess.run(["bash", str(CLUSTER_SH), "status"], env=env, capture_output=True, text=True)
        pids = [int(x) for x in re.findall(r"pid (\d+)", left.stdout)]
        assert s.returncode == 0 and not pids, f"daemons left running: {left.stdout}\n{s.stderr}"


def _final_params(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def _train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r and "step" in r]


@pytest.fixture(scope="module")
def reference_run(cluster, tmp_path_factory):
    """An uninterrupted 2-node run (one process per node) — also the baseline of the preemption test."""
    out = tmp_path_factory.mktemp("mn-ref")
    log = out.parent / (out.name + ".log")
    t0 = time.time()
    job = cluster.sbatch("train_multi_node.sbatch", *COMMON_ARGS,
                         sbatch_opts=("--cpus-per-task=1", f"--output={log}"), OUTPUT_DIR=str(out / "run"))
    (info,) = cluster.wait(job, timeout=240)
    return {"job": job, "info": info, "dir": out / "run", "log": log, "seconds": time.time() - t0}


def test_multi_node_two_slurmd(reference_run):
    run, info, log = reference_run["dir"], reference_run["info"], reference_run["log"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{_tail(log)}"
    assert info["NumNodes"] == "2", info
    res = json.loads((run / "run.json").read_text())
    assert res["world_size"] == 2 and res["num_machines"] == 2, res
    assert res["final_step"] == STEPS
    for f in ("model.safetensors", "config.json"):
        assert (run / "final" / f).exists(), f
    text = log.read_text(errors="replace")
    # srun --label: both node ranks' launchers wrote to the log (task 0 on n1, task 1 on n2)
    assert re.search(r"^0: ", text, re.M) and re.search(r"^1: ", text, re.M), _tail(log)
    assert "--num_machines 2 --num_processes 2" in text
    assert [r["step"] for r in _train_rows(run)] == list(range(1, STEPS + 1))
    print(f"2-node run: {reference_run['seconds']:.1f} s")


def test_preempt_checkpoint_requeue_resume(cluster, reference_run, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.log"
    t0 = time.time()
    job = cluster.sbatch("train_multi_node.sbatch", *COMMON_ARGS,
                         sbatch_opts=("--cpus-per-task=1", f"--output={log}"), OUTPUT_DIR=str(run))
    # wait until training is under way (a few optimizer steps logged), then do what SLURM does at
    # `--signal=B:USR1@<secs>` before the time limit: signal the batch shell only
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        js = cluster.jobs(job)
        if js and js[0].get("JobState") in TERMINAL:
            pytest.fail(f"job ended before it could be signalled: {js[0]}\n{_tail(log)}")
        time.sleep(0.2)
    else:
        pytest.fail(f"training did not start: {_tail(log)}")
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    (info,) = cluster.wait(job, timeout=300)
    elapsed = time.time() - t0
    text = log.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{_tail(log, 100)}"
    assert int(info["Restarts"]) == 1, f"job was not requeued exactly once: {info}\n{_tail(log, 100)}"
    m = re.search(r"checkpoint saved on signal at step (\d+)", text)
    assert m, _tail(log, 100)
    saved_at = int(m.group(1))
    assert 0 < saved_at < STEPS, f"signal was not mid-run (step {saved_at} of {STEPS})"
    assert f"requeueing job {job}" in text
    assert "requeued job (SLURM_RESTART_COUNT=1)" in text
    assert re.search(rf"resumed from \S+step_0*{saved_at} at step {saved_at}", text), _tail(log, 100)

    res = json.loads((run / "run.json").read_text())
    assert res["final_step"] == STEPS and res["world_size"] == 2 and not res.get("signalled")
    # no optimizer step lost or repeated: each step logged once, same batches as the reference ...
    rows = _train_rows(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    ref_rows = _train_rows(reference_run["dir"])
    fingerprints = [r["batch_fingerprint"] for r in rows]  # every train row carries one
    assert fingerprints == [r["batch_fingerprint"] for r in ref_rows]
    assert len(set(fingerprints)) > STEPS // 2  # distinct batches, not a constant
    # ... and the same final parameters as the uninterrupted run
    import torch

    a, b = _final_params(run), _final_params(reference_run["dir"])
    assert a.keys() == b.keys()
    diff = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"final parameters differ from the uninterrupted run: {diff}"
    print(f"preempted at step {saved_at}, requeued, resumed, finished: {elapsed:.1f} s")


def test_array_sweep_two_tasks(cluster, tmp_path):
    out = tmp_path / "sweep"
    t0 = time.time()
    job = cluster.sbatch("sweep_array.sbatch", "--max_steps=10", "--log_every=5", "--tracking.progress=false",
                         sbatch_opts=("--array=0-1", "--cpus-per-task=1", f"--output={tmp_path}/%A_%a.log"),
                         OUTPUT_DIR=str(out), SWEEP_VARIANTS="--seed=1;--seed=2")
    tasks = cluster.wait(job, timeout=240, n_tasks=2)
    logs = {p.name: p.read_text(errors="replace") for p in tmp_path.glob("*.log")}
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1"], tasks
    for t in tasks:
        assert t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0", f"{t}\n{logs}"
    assert len({t["JobId"] for t in tasks}) == 2
    dirs = [out / "task0", out / "task1"]
    for i, d in enumerate(dirs):
        assert (d / "final" / "model.safetensors").exists(), logs
        assert json.loads((d / "run.json").read_text())["final_step"] == 10
        assert re.search(rf"^seed: {i + 1}$", (d / "config.yaml").read_text(), re.M)
    import torch

    a, b = _final_params(dirs[0]), _final_params(dirs[1])
    assert any(not torch.equal(a[k], b[k]) for k in a), "the two seeds trained identical models"
    print(f"array of 2: {time.time() - t0:.1f} s")


def test_single_node_two_processes(cluster, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.log"
    t0 = time.time()
    job = cluster.sbatch("train_single_node.sbatch", "--max_steps=10", "--log_every=5", "--tracking.progress=false",
                         sbatch_opts=("--cpus-per-task=2", f"--output={log}"), OUTPUT_DIR=str(run), NPROC_PER_NODE="2")
    (info,) = cluster.wait(job, timeout=240)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{_tail(log, 100)}"
    res = json.loads((run / "run.json").read_text())
    assert res["world_size"] == 2 and res["num_machines"] == 1 and res["final_step"] == 10, res
    assert (run / "final" / "model.safetensors").exists()
    print(f"1 node x 2 processes: {time.time() - t0:.1f} s")


def test_multi_node_deepspeed_variant(cluster, tmp_path):
    """DS_CONFIG=...: the same 2-node script trains with DeepSpeed ZeRO-2 (DeepSpeed's CPU accelerator
    over gloo here), and its checkpoints are DeepSpeed's (pytorch_model/ with ZeRO shards)."""
    ds = tmp_path / "zero2.json"
    # integer sizes: the trainer hands accelerate no dataloader, so "auto" batch sizes can't be filled
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
                              "gradient_clipping": 1.0, "zero_optimization": {"stage": 2},
                              "bf16": {"enabled": False}, "fp16": {"enabled": False}}))
    run, log = tmp_path / "run", tmp_path / "job.log"
    t0 = time.time()
    job = cluster.sbatch("train_multi_node.sbatch", "--max_steps=4", "--save_every=2", "--batch_size=8",
                         "--log_every=2", "--tracking.progress=false",
                         sbatch_opts=("--cpus-per-task=1", f"--output={log}"), OUTPUT_DIR=str(run), DS_CONFIG=str(ds))
    (info,) = cluster.wait(job, timeout=240)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{_tail(log, 100)}"
    res = json.loads((run / "run.json").read_text())
    assert res["world_size"] == 2 and res["num_machines"] == 2 and res["final_step"] == 4, res
    assert (run / "final" / "model.safetensors").exists()
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    zero = list(ckpt.rglob("*optim_states*"))
    assert len(zero) == 2, f"no DeepSpeed ZeRO shards (one per rank) in {ckpt}: {sorted(p.name for p in ckpt.rglob('*'))}"
    print(f"2-node DeepSpeed run: {time.time() - t0:.1f} s")


def test_label_issues_folds_as_an_array(cluster, tmp_path):
    """`llm-dist label-issues --backend slurm`: one sweep_array task per fold, each in DIR/fold_k; the same
    command once the array has finished skips every fold and scores them."""
    from test_label_issues import _args, _synthetic

    data = _synthetic(tmp_path / "synthetic.csv")
    out = tmp_path / "li"
    args = [sys.executable, "-m", "llm_dist.cli", "label-issues", *_args(data), "--folds", "2", "--output_dir", str(out),
            "--backend", "slurm", "--sbatch_args", "--cpus-per-task=1", "--quiet"]
    t0 = time.time()
    p = subprocess.run(args, env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    job = re.search(r"submitted SLURM array job (\d+) \(folds 0,1", p.stdout).group(1)
    infos = cluster.wait(job, timeout=300, n_tasks=2)
    assert all(i["JobState"] == "COMPLETED" for i in infos), f"{infos}\n{_tail(out / 'logs' / f'slurm-{job}_0.out')}"
    p = subprocess.run(args, env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "2 of 2 folds already finished (skipped)" in p.stdout
    scores = json.loads((out / "scores.json").read_text())
    assert scores["examples"] == 240 and scores["detectors"]["oof_loss"]["auroc"] > 0.8, scores["detectors"]
    print(f"label-issues, 2 folds as a SLURM array: {time.time() - t0:.1f} s")


def test_experiment_runs_as_an_array(cluster, tmp_path):
    """`llm-dist experiment --backend slurm`: one sweep_array task per run (2 variants × 1 seed), each with its
    own config and output_dir; the same command once the array has finished skips them and reports."""
    from test_experiments import _spec
    from test_label_issues import _synthetic

    data = _synthetic(tmp_path / "synthetic.csv")
    spec = _spec(tmp_path / "exp.yaml", data, """name: slurm-exp
seeds: [1]
variants:
  - {name: clean, overrides: {}}
  - {name: half, overrides: {data.subset.fraction: 0.5}}
""")
    out = tmp_path / "exp"
    args = [sys.executable, "-m", "llm_dist.cli", "experiment", str(spec), "--output_dir", str(out), "--backend", "slurm",
            "--sbatch_args", "--cpus-per-task=1", "--quiet"]
    t0 = time.time()
    p = subprocess.run(args, env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    job = re.search(r"submitted SLURM array job (\d+) \(2 runs", p.stdout).group(1)
    infos = cluster.wait(job, timeout=300, n_tasks=2)
    assert all(i["JobState"] == "COMPLETED" for i in infos), f"{infos}\n{_tail(out / 'logs' / f'slurm-{job}_0.out')}"
    for name in ("clean", "half"):
        rj = json.loads((out / "runs" / name / "seed1" / "run.json").read_text())
        assert rj["data"]["train_examples"] == (240 if name == "clean" else 120)
    p = subprocess.run(args, env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "2 of 2 runs already finished (skipped)" in p.stdout
    rep = json.loads((out / "experiment_report.json").read_text())
    assert [v["n_seeds"] for v in rep["variants"]] == [1, 1] and not rep["missing_runs"]
    print(f"experiment, 2 runs as a SLURM array: {time.time() - t0:.1f} s")


def test_scripts_parse_and_quote_node_rank():
    """Cheap checks that need no cluster: bash syntax, and $SLURM_NODEID left for each node."""
    for name in ("train_single_node.sbatch", "train_multi_node.sbatch", "sweep_array.sbatch", "common.sh",
                 "local-cluster.sh"):
        p = subprocess.run(["bash", "-n", str(REPO / "slurm" / name)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    for name in ("train_single_node.sbatch", "train_multi_node.sbatch", "sweep_array.sbatch"):
        text = (REPO / "slurm" / name).read_text()
        assert "#SBATCH --requeue" in text and re.search(r"#SBATCH --signal=B:USR1@\d+", text)
        assert """'trap "" ${LLM_DIST_LAUNCHER_IGNORES:-USR1}; exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"'""" in text
