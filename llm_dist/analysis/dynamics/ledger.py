"""The training-dynamics ledger: one row per training example per presentation, from the training forward
pass itself (the `LossOutput.logits` / `per_example` the loop hands every callback), written by every rank
to its own parquet shards under `output_dir/dynamics/`.

Row: `id` (stable example id), `idx` (row of the train split), `epoch`, `step`, `presentation` (the
example's position in the epoch's global order: the same on any world size, unique within an epoch, so an
example drawn twice by `classify.resample` has two), `pass` (`train`, or `eval` for the optional
eval-mode pass over the whole training set at each epoch end, `presentation` 0), `label` (the given label
id, noisy when `data.label_noise` planted noise), `p_gold` (softmax probability of the given label),
`margin` (given label's logit minus the largest other: AUM's margin), `pred`, `loss` (the per-example
training loss; plain cross-entropy in the eval pass), `rank`.

Cost: the row statistics are computed on the device and buffered there; the host sees them only at log
steps and checkpoints (`on_log` / `state_dict`), one transfer per window. Padding rows (weight 0) ride
along in the buffer and are dropped on the host. Shards are streamed with pyarrow (one row group per
flush), so memory is one log window.

Exact across resume: a shard is written as a dot-file and closed (renamed to
`rank{R}-{first_step}-{last_step}.parquet`) whenever a checkpoint is taken — in `state_dict()`, i.e.
before the checkpoint itself is written — so every closed shard holds rows of steps that a checkpoint
covers or that a later one will. On a resume from step S the main process removes every shard holding
rows past S and every unclosed one (their steps are replayed), so no row is lost or written twice; the
merge (`read_ledger`) de-duplicates by (pass, id, epoch, presentation) all the same.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

from ...training.callbacks import Callback, Context, StepOutput

SHARD = re.compile(r"^rank(\d+)-(\d+)-(\d+)\.parquet$")
COLUMNS = ("idx", "epoch", "step", "presentation", "label", "p_gold", "margin", "pred", "loss", "weight")
KEY = ["pass", "id", "epoch", "presentation"]


def row_stats(logits: torch.Tensor, labels: torch.Tensor):
    """(p_gold, margin, pred) per row, on the logits' device (float32)."""
    logits = logits.float()
    logp = torch.log_softmax(logits, -1)
    gold = labels.long().unsqueeze(1)
    p_gold = logp.gather(1, gold).squeeze(1).exp()
    gold_logit = logits.gather(1, gold).squeeze(1)
    other = logits.scatter(1, gold, float("-inf")).max(1).values
    return p_gold, gold_logit - other, logits.argmax(-1)


class DynamicsLedger(Callback):
    name = "dynamics"

    def __init__(self, out: Path, mode: str = "train", analyze: bool = False):
        self.dir = Path(out) / "dynamics"
        self.mode, self.analyze = mode, analyze
        self.active = True  # the overhead bench toggles it
        self.buf: list[torch.Tensor] = []
        self.writer = None
        self.first = self.last = None
        self.rows_written = 0
        self.ids = None
        self.rank = 0

    # --- lifecycle ---------------------------------------------------------------------------------
    def on_train_start(self, ctx: Context) -> None:
        self.rank = ctx.acc.process_index
        self.ids = ctx.task.data["train"]["ids"]
        if ctx.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            resumed = ctx.step
            for f in self.dir.iterdir():  # unclosed shards, and closed ones past the resumed step: replayed
                m = SHARD.match(f.name)
                if f.name.startswith(".") or (m and int(m.group(3)) > resumed):
                    f.unlink(missing_ok=True)
            meta = {"labels": list(ctx.task.names), "pass": self.mode, "world_size": ctx.acc.num_processes,
                    "steps_per_epoch": ctx.task.steps_per_epoch, "train_examples": len(self.ids),
                    "columns": ["id", "pass", *COLUMNS[:-1], "rank"]}
            tmp = self.dir / ".meta.json.tmp"
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, self.dir / "meta.json")
        ctx.acc.wait_for_everyone()

    def on_step_end(self, ctx: Context, out: StepOutput) -> None:
        if not self.active:
            return
        for b, o in zip(out.batches, out.outputs):
            if o.logits is None or "pos" not in b:
                continue
            p, margin, pred = row_stats(o.logits, b["labels"])
            loss = o.per_example if o.per_example is not None else torch.zeros_like(p)
            step = torch.full_like(p, float(out.step), dtype=torch.float64)
            self.buf.append(torch.stack([b["idx"].double(), b["epoch"].double(), step, b["pos"].double(),
                                         b["labels"].double(), p.double(), margin.double(), pred.double(),
                                         loss.double(), b["weight"].double()], 1))
        if self.mode == "eval" and ctx.task.steps_per_epoch and out.step % ctx.task.steps_per_epoch == 0:
            self._eval_pass(ctx, out.step)

    def on_log(self, ctx: Context, row: dict) -> None:
        self.flush()

    def state_dict(self) -> dict:
        """Called as a checkpoint is taken (before it is written): close the shard so the checkpoint covers it."""
        self.close()
        return {"rows_written": self.rows_written}

    def load_state_dict(self, state: dict) -> None:
        self.rows_written = int(state.get("rows_written", 0))

    def on_train_end(self, ctx: Context, result: dict) -> None:
        self.close()
        ctx.acc.wait_for_everyone()  # every rank's shards are closed before anyone reads them
        if self.analyze and ctx.is_main and not result.get("signalled") and not result.get("diverged"):
            from .analyze import analyze

            try:
                summary = analyze(ctx.out, progress=ctx.cfg.tracking.progress)
                result["dynamics"] = {k: summary[k] for k in ("examples", "regions", "detectors") if k in summary}
                print(f"analyze: wrote {ctx.out / 'analysis'}", flush=True)
            except Exception as e:  # noqa: BLE001 - the trained run stands; `llm-dist analyze` can be rerun
                print(f"warning: analyze failed ({type(e).__name__}: {e}); rerun `llm-dist analyze {ctx.out}`",
                      file=sys.stderr, flush=True)

    # --- the eval-mode pass -----------------------------------------------------------------------------
    def _eval_pass(self, ctx: Context, step: int) -> None:
        """Every training example once, model in eval mode, through the task's exact distributed
        evaluation (each rank gets all rows; rank r keeps rows r, r + world, … so each is written once)."""
        from ...training.signals import Interrupted

        try:
            idx, gold, logits = ctx.task.predict(ctx.model, "train")
        except Interrupted:  # a preemption signal: this epoch's eval rows are skipped, the run stops next step
            return
        lg = torch.as_tensor(logits).float()
        lab = torch.as_tensor(gold)
        p, margin, pred = row_stats(lg, lab)
        loss = torch.nn.functional.cross_entropy(lg, lab.long(), reduction="none")
        world, r = ctx.acc.num_processes, ctx.acc.process_index
        keep = slice(r, None, world)
        epoch = step // ctx.task.steps_per_epoch - 1
        n = len(idx[keep])
        rows = np.stack([idx[keep], np.full(n, epoch), np.full(n, step), np.zeros(n), gold[keep],
                         p.numpy()[keep], margin.numpy()[keep], pred.numpy()[keep], loss.numpy()[keep],
                         np.ones(n)], 1).astype(np.float64)
        self._write(rows, "eval")

    # --- host side -------------------------------------------------------------------------------------
    def flush(self) -> None:
        if not self.buf:
            return
        rows = torch.cat(self.buf).cpu().numpy()  # the one device → host transfer of the window
        self.buf = []
        self._write(rows[rows[:, 9] > 0], "train")

    def _write(self, rows: np.ndarray, pass_: str) -> None:
        if not len(rows):
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        i = rows[:, 0].astype(np.int64)
        table = pa.table({
            "id": pa.array([self.ids[k] for k in i], pa.string()),
            "pass": pa.array([pass_] * len(rows), pa.string()),
            "idx": i, "epoch": rows[:, 1].astype(np.int32), "step": rows[:, 2].astype(np.int64),
            "presentation": rows[:, 3].astype(np.int64), "label": rows[:, 4].astype(np.int32),
            "p_gold": rows[:, 5].astype(np.float32), "margin": rows[:, 6].astype(np.float32),
            "pred": rows[:, 7].astype(np.int32), "loss": rows[:, 8].astype(np.float32),
            "rank": np.full(len(rows), self.rank, np.int32)})
        steps = table["step"].to_numpy()
        if self.writer is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.first = int(steps.min())
            self._open = self.dir / f".rank{self.rank:03d}-{self.first:08d}.parquet.open"
            self.writer = pq.ParquetWriter(str(self._open), table.schema, compression="zstd")
        self.last = max(self.last or 0, int(steps.max()))
        self.writer.write_table(table)
        self.rows_written += len(rows)

    def close(self) -> None:
        """Flush, and close the open shard under its final name (steps first-last)."""
        self.flush()
        if self.writer is None:
            return
        self.writer.close()
        os.replace(self._open, self.dir / f"rank{self.rank:03d}-{self.first:08d}-{self.last:08d}.parquet")
        self.writer, self.first, self.last = None, None, None


def read_ledger(run_dir: Path, progress: bool = False):
    """Every closed shard of `run_dir/dynamics/`, merged and de-duplicated by (pass, id, epoch, presentation)
    (a pandas DataFrame sorted by pass, id, epoch, presentation); None when there is none."""
    import pandas as pd
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    d = Path(run_dir) / "dynamics"
    files = sorted(f for f in d.glob("rank*.parquet") if SHARD.match(f.name)) if d.is_dir() else []
    if not files:
        return None
    parts = [pq.read_table(f).to_pandas() for f in tqdm(files, desc="analyze: read ledger", disable=not progress,
                                                         leave=False)]
    df = pd.concat(parts, ignore_index=True)
    df = df.sort_values(["pass", "id", "epoch", "presentation", "step"], kind="stable")
    return df.drop_duplicates(KEY, keep="last").reset_index(drop=True)
