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
        # beside a deepspeed_config_file accelerate refuses these (DeepSpeedPlugin._deepspeed_config_checks)
        assert set(cfg["deepspeed_config"]) <= {"deepspeed_config_file", "zero3_init_flag", "deepspeed_multinode_launcher"}
        assert "mixed_precision" not in cfg


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "deepspeed").glob("*.json")))
def test_deepspeed_configs_use_auto(path):
    cfg = json.loads(path.read_text())
    assert cfg["train_micro_batch_size_per_gpu"] == "auto" and cfg["gradient_accumulation_steps"] == "auto"
    assert cfg["zero_optimization"]["stage"] in (1, 2, 3)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "deepspeed").glob("*.json")))
@pytest.mark.parametrize("cuda", [False, True])
def test_deepspeed_device_autos_resolve(path, cuda):
    """The trainer resolves the device-dependent "auto"s: GPU defaults with CUDA, lean ZeRO-3 settings on CPU."""
    from llm_dist.training.accelerator import DEVICE_AUTO, load_ds_config

    zero = load_ds_config(str(path), cuda=cuda)["zero_optimization"]
    raw = json.loads(path.read_text())["zero_optimization"]
    for key, (gpu, cpu) in DEVICE_AUTO.items():
        if raw.get(key) == "auto":
            assert zero[key] == (gpu if cuda else cpu)
    if zero["stage"] == 3:  # what bench/zero_memory.py showed ZeRO-3 needs on CPU ranks
        assert all(raw[k] == "auto" for k in DEVICE_AUTO)
        assert (zero["stage3_max_live_parameters"], zero["sub_group_size"], zero["overlap_comm"]) == (
            (1e9, 1e9, True) if cuda else (1e7, 1e7, False))


def test_deepspeed_config_errors_name_the_file_and_line(tmp_path):
    from llm_dist.config import ConfigError
    from llm_dist.training.accelerator import load_ds_config

    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "zero_optimization": {\n    "stage": 3,\n  }\n}\n')
    with pytest.raises(ConfigError, match=r"ds\.json:4: invalid JSON"):
        load_ds_config(str(bad), cuda=False)
    with pytest.raises(ConfigError, match="deepspeed.config.*missing.json does not exist"):
        load_ds_config(str(tmp_path / "missing.json"), cuda=False)
