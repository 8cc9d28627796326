"""What the benches share: quiet libraries, a clean accelerate state per run, the CPU's name, optimizer
descriptions, and writing a report. (Each bench measures its baseline and llm_dist in the same run and
prints ratios; nothing here times anything.)"""
from __future__ import annotations

import json
import platform
import warnings
from pathlib import Path


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore", message=".*(set_vital|torch.utils._pytree).*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()


def reset_accelerate_state() -> None:
    """Each run builds its own Accelerator (the baseline's, llm_dist's): start each from a clean state."""
    try:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    except Exception:  # noqa: BLE001 - older/newer accelerate: nothing to reset
        pass


def describe_optimizer(opt) -> str | None:
    inner = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps the torch one
    if inner is None:
        return None
    flags = [k for k in ("fused", "foreach") if inner.defaults.get(k)]
    return type(inner).__name__ + (f"({','.join(flags)})" if flags else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_report(report: dict, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float))
    print(f"wrote {out}")
    return out
