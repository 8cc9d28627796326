"""W&B / TensorBoard through accelerate's trackers, as a callback (`tracking.report_to`).

W&B runs offline unless `WANDB_MODE` says otherwise (its run dir goes inside `output_dir/wandb`; upload
later with `wandb sync`); TensorBoard writes `output_dir/tensorboard`. The flattened run config is the
tracker's config; every numeric field of every metrics row is logged at its step."""
from __future__ import annotations

import json
import os

from ..config import to_dict
from ..training.callbacks import Callback, Context


def tracker_name(report_to: str) -> str | None:
    """The accelerate `log_with` for `tracking.report_to` (setting W&B offline by default)."""
    if report_to == "none":
        return None
    if report_to == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
    return report_to


class Trackers(Callback):
    name = "trackers"

    def on_train_start(self, ctx: Context) -> None:
        cfg = ctx.cfg
        init_kwargs = {"wandb": {"dir": str(ctx.out), "name": cfg.tracking.run_name or ctx.out.name}}
        if cfg.tracking.group:  # an experiment: its variants × seeds in one W&B group
            init_kwargs["wandb"]["group"] = cfg.tracking.group
        ctx.acc.init_trackers(cfg.tracking.project, config=flat(to_dict(cfg)), init_kwargs=init_kwargs)

    def on_log(self, ctx: Context, row: dict) -> None:
        ctx.acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        elif isinstance(v, list):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out
