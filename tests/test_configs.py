"""Every shipped config loads and validates (and the accelerate / DeepSpeed files parse)."""
import json
from pathlib import Path

import pytest
import yaml

from llm_dist.config import load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*/*.yaml")
                                        if p.parent.name in ("mlm", "classify")) + ["configs/demo.yaml"])
def test_run_configs_validate(path):
    cfg = load_config(ROOT / path)
    assert cfg.task in ("mlm", "classify")


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")))
def test_accelerate_configs_parse(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["distributed_type"] in ("NO", "MULTI_GPU", "DEEPSPEED")
    if cfg["distributed_type"] == "DEEPSPEED":
        assert (ROOT / cfg["deepspeed_config"]["deepspeed_config_file"]).exists()


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "deepspeed").glob("*.json")))
def test_deepspeed_configs_use_auto(path):
    cfg = json.loads(path.read_text())
    assert cfg["train_micro_batch_size_per_gpu"] == "auto" and cfg["gradient_accumulation_steps"] == "auto"
    assert cfg["zero_optimization"]["stage"] in (1, 2, 3)
