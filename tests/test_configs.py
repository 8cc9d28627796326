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


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs" / "prompt").glob("*.yaml")))
def test_prompt_configs_validate(path):
    cfg = load_config(ROOT / path)
    assert cfg.task in ("prompt", "mlm")
    if cfg.task == "prompt":
        assert cfg.prompt.verbalizer and "[MASK]" in cfg.prompt.pattern


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_experiment_specs_plan(path, tmp_path):
    """Every shipped experiment spec plans: its base, overrides and every variant's run config validate."""
    from llm_dist.analysis.experiments.plan import make_plan

    plan = make_plan(path, str(tmp_path / "out"))
    assert plan.runs and len({r.key for r in plan.runs}) == len(plan.runs)
    assert all(r.cfg["task"] in ("classify", "prompt", "mlm") for r in plan.runs)


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


# What each shipped DeepSpeed JSON must resolve to, written out here (not read from the resolver's own table):
# zero_optimization key -> (with CUDA, on CPU ranks). Keys not listed must not be left "auto" by the device
# resolver (accelerate fills the bucket sizes it derives from the model at prepare time).
EXPECTED_DEVICE_VALUES = {
    "zero1.json": {},
    "zero2.json": {"overlap_comm": (True, False)},
    "zero2_offload.json": {"overlap_comm": (True, False)},
    "zero3.json": {"overlap_comm": (True, False), "stage3_max_live_parameters": (1e9, 1e7),
                   "stage3_max_reuse_distance": (1e9, 1e7), "sub_group_size": (1e9, 1e7)},
    "zero3_offload.json": {"overlap_comm": (True, False), "stage3_max_live_parameters": (1e9, 1e7),
                           "stage3_max_reuse_distance": (1e9, 1e7), "sub_group_size": (1e9, 1e7)},
}
ACCELERATE_FILLS = {"reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"}


def test_every_deepspeed_json_has_expected_values():
    assert sorted(p.name for p in (ROOT / "configs" / "deepspeed").glob("*.json")) == sorted(EXPECTED_DEVICE_VALUES)


@pytest.mark.parametrize("name", sorted(EXPECTED_DEVICE_VALUES))
@pytest.mark.parametrize("cuda", [False, True])
def test_deepspeed_device_autos_resolve(name, cuda):
    """The trainer resolves the device-dependent "auto"s: GPU defaults with CUDA, lean ZeRO-3 settings on CPU."""
    from llm_dist.training.accelerator import load_ds_config

    zero = load_ds_config(str(ROOT / "configs" / "deepspeed" / name), cuda=cuda)["zero_optimization"]
    for key, (gpu, cpu) in EXPECTED_DEVICE_VALUES[name].items():
        assert zero[key] == (gpu if cuda else cpu) and type(zero[key]) is type(gpu), (key, zero[key])
    assert {k for k, v in zero.items() if v == "auto"} <= ACCELERATE_FILLS
    assert zero["stage"] == int(name[4])


def test_device_resolver_on_a_json_of_autos():
    """Every device key "auto" in an arbitrary JSON; an explicit value is never touched."""
    from llm_dist.training.accelerator import resolve_device_autos

    keys = ("overlap_comm", "stage3_max_live_parameters", "stage3_max_reuse_distance", "sub_group_size")
    cpu = resolve_device_autos({"zero_optimization": {k: "auto" for k in keys}}, cuda=False)["zero_optimization"]
    gpu = resolve_device_autos({"zero_optimization": {k: "auto" for k in keys}}, cuda=True)["zero_optimization"]
    assert cpu == {"overlap_comm": False, "stage3_max_live_parameters": 10_000_000,
                   "stage3_max_reuse_distance": 10_000_000, "sub_group_size": 10_000_000}
    assert gpu == {"overlap_comm": True, "stage3_max_live_parameters": 1_000_000_000,
                   "stage3_max_reuse_distance": 1_000_000_000, "sub_group_size": 1_000_000_000}
    fixed = resolve_device_autos({"zero_optimization": {"overlap_comm": True, "sub_group_size": 5}}, cuda=False)
    assert fixed["zero_optimization"] == {"overlap_comm": True, "sub_group_size": 5}


def test_deepspeed_config_errors_name_the_file_and_line(tmp_path):
    from llm_dist.config import ConfigError
    from llm_dist.training.accelerator import load_ds_config

    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "zero_optimization": {\n    "stage": 3,\n  }\n}\n')
    with pytest.raises(ConfigError, match=r"ds\.json:4: invalid JSON"):
        load_ds_config(str(bad), cuda=False)
    with pytest.raises(ConfigError, match="deepspeed.config.*missing.json does not exist"):
        load_ds_config(str(tmp_path / "missing.json"), cuda=False)
