"""Activation (gradient) checkpointing: the memory it saves and the time it costs, per training step.

For each model preset and sequence length, a BERT sequence classifier (random init, fp32, train mode, the
same batch) runs forward + backward with `model.gradient_checkpointing` off and on (llm_dist's own switch,
`llm_dist.training.speed.enable_gradient_checkpointing`: HF's non-reentrant checkpointing). Reported:

- `saved MiB`: the bytes autograd keeps for backward during the forward pass, counted exactly with
  `torch.autograd.graph.saved_tensors_hooks`, each storage once (activations and the parameters the ops save; with checkpointing, only each layer's input is
  kept — torch's non-reentrant checkpoint replaces the hooks inside a layer, so what it recomputes is not
  stored). This is the peak activation memory of the step, on any device, without allocator noise.
  With checkpointing, backward recomputes one layer at a time, so the true peak adds about one layer's
  activations (off / layers) to the `on` figure — which is why the next column measures the peak itself.
- `peak MiB`: how much the first forward + backward raises the process's memory: on CUDA
  `torch.cuda.max_memory_allocated` minus the memory before the step; on CPU the resident-set high-water
  mark (`ru_maxrss`) minus the RSS before the step, in a fresh child process per setting (allocator
  caching included: what the machine really needs). On the CPU this figure did not drop with checkpointing
  in our runs (glibc keeps freed heap blocks; the recomputation allocates afresh): read `saved MiB` there.
- `step s`: median wall time of a forward + backward over `--repeats` runs (checkpointing recomputes each
  layer's forward in backward: expect ~1.3x).
- `max abs grad diff`: between the two settings' gradients (they compute the same thing; dropout is off).

    .venv/bin/python bench/checkpointing_memory.py                          # mini and small at 128 and 512
    .venv/bin/python bench/checkpointing_memory.py --presets base --lengths 512 --batch 4

Prints a table and one `SUMMARY` line; writes JSON to --out. Nothing here asserts anything.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def build(preset: str, seq_len: int, gc: bool):
    from transformers import BertConfig, BertForSequenceClassification

    from llm_dist.config import ModelConfig
    from llm_dist.models.build import PRESETS
    from llm_dist.training.speed import enable_gradient_checkpointing

    h, layers, heads, inter = PRESETS[preset]
    cfg = BertConfig(vocab_size=8192, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=inter, max_position_embeddings=max(512, seq_len), num_labels=5,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    model.config._attn_implementation = ModelConfig().attn_implementation
    if gc:
        enable_gradient_checkpointing(model)
    return model.train()


def step(model, batch) -> tuple[int, float]:
    """One forward + backward; (bytes saved for backward, seconds)."""
    seen: dict = {}

    def pack(t):  # one storage saved by several ops (a layer's input for Q, K and V) counts once
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return sum(seen.values()), time.perf_counter() - t0


def child_peak(preset: str, L: int, batch_size: int, gc: bool) -> float:
    """CPU: the step's peak RSS increase (MiB), measured in a fresh process (ru_maxrss never goes down)."""
    import subprocess

    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import checkpointing_memory as m; "
            f"print(m._peak_here({preset!r}, {L}, {batch_size}, {gc}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _peak_here(preset: str, L: int, batch_size: int, gc: bool) -> float:
    import resource

    import psutil

    model = build(preset, L, gc)
    batch = make_batch(batch_size, L, torch.device("cpu"))
    rss0 = psutil.Process().memory_info().rss
    step(model, batch)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0) / 2**20


def make_batch(batch_size: int, L: int, device) -> dict:
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(5, 8192, (batch_size, L), generator=g),
             "attention_mask": torch.ones(batch_size, L, dtype=torch.long),
             "labels": torch.randint(0, 5, (batch_size,), generator=g)}
    return {k: v.to(device) for k, v in batch.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="mini,small")
    p.add_argument("--lengths", default="128,512")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/bench/checkpointing_memory.json")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    print(f"{'preset':>6s} {'len':>4s} {'saved MiB off':>13s} {'on':>8s} {'ratio':>6s} {'peak MiB off':>12s} {'on':>8s} "
          f"{'step s off':>10s} {'on':>6s} {'time x':>6s} {'max grad diff':>13s}")
    for preset in args.presets.split(","):
        for L in [int(x) for x in args.lengths.split(",")]:
            batch = make_batch(args.batch, L, device)
            res, grads = {}, {}
            for gc in (False, True):
                model = build(preset, L, gc).to(device)
                step(model, batch)  # warm-up
                peak = child_peak(preset, L, args.batch, gc) if device.type == "cpu" else None
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                saved, _ = step(model, batch)
                if device.type == "cuda":
                    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                times = [step(model, batch)[1] for _ in range(args.repeats)]
                grads[gc] = [q.grad.detach().float().cpu().clone() for q in model.parameters()]
                res[gc] = {"saved_mib": saved / 2**20, "peak_mib": peak, "step_s": statistics.median(times)}
                del model
            diff = max(float((a - b).abs().max()) for a, b in zip(grads[False], grads[True]))
            row = {"preset": preset, "seq_len": L, "batch": args.batch, "off": res[False], "on": res[True],
                   "saved_ratio": res[True]["saved_mib"] / res[False]["saved_mib"],
                   "time_ratio": res[True]["step_s"] / res[False]["step_s"], "max_grad_diff": diff}
            rows.append(row)
            row["peak_ratio"] = res[True]["peak_mib"] / res[False]["peak_mib"]
            pk = f"{res[False]['peak_mib']:12.0f} {res[True]['peak_mib']:8.0f}"
            print(f"{preset:>6s} {L:>4d} {res[False]['saved_mib']:13.1f} {res[True]['saved_mib']:8.1f} "
                  f"{row['saved_ratio']:6.2f} {pk} {res[False]['step_s']:10.3f} {res[True]['step_s']:6.3f} "
                  f"{row['time_ratio']:6.2f} {diff:13.2e}", flush=True)
    report = {"command": "python bench/checkpointing_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(), "batch": args.batch,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    print("SUMMARY checkpointing_memory " + " ".join(
        f"{r['preset']}@{r['seq_len']}: saved {r['off']['saved_mib']:.0f}->{r['on']['saved_mib']:.0f} MiB "
        f"({r['saved_ratio']:.2f}x) peak {r['off']['peak_mib']:.0f}->{r['on']['peak_mib']:.0f} MiB "
        f"({r['peak_ratio']:.2f}x) time {r['time_ratio']:.2f}x;" for r in rows) + f" device={report['device']}")
    return report


if __name__ == "__main__":
    main()
