import subprocess

import pytest

from conftest import PY, ROOT, run_env
from llm_dist.config import ConfigError, load_config


def test_defaults_and_overrides():
    cfg = load_config(ROOT / "configs/mlm/tiny.yaml", ["--optim.lr=3e-4", "--max_steps", "7", "--data.sources.0.weight=2"])
    assert cfg.optim.lr == 3e-4 and cfg.max_steps == 7 and cfg.data.sources[0].weight == 2.0
    assert cfg.task == "mlm" and cfg.model.preset == "tiny"


def test_embedded_default_is_the_demo():
    cfg = load_config(None, [])
    assert cfg.then is not None  # the demo pretrains, then fine-tunes


@pytest.mark.parametrize("override, message", [
    ("--optim.lrr=1", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("--max_stepz=3", "unknown config key 'max_stepz' (did you mean 'max_steps'?)"),
    ("--optim.lr=fast", "config key 'optim.lr': expected a number, got 'fast'"),
    ("--max_steps=1.5", "config key 'max_steps': expected an integer"),
    ("--task=regress", "config key 'task': 'regress' is not one of mlm, classify"),
    ("--batch_size", "config key 'batch_size': missing value"),
    ("--data.sources.0.path=x.txt", "config key 'data.sources.0': give exactly one of 'name' or 'path'"),
])
def test_bad_keys_name_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(ROOT / "configs/mlm/tiny.yaml", [override])
    assert message in str(e.value)


def test_bad_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: mlm\noptim:\n  lr: [1,\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(bad) in str(e.value) and ":" in str(e.value)


def test_cli_error_is_one_line_exit_2(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([PY, "train.py", "configs/mlm/tiny.yaml", "--optim.lrr=1", f"--output_dir={out}"],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines == ["error: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"]
    assert not out.exists()  # nothing half-written


def test_unknown_key_in_file_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: mlm\noptim:\n  lrate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(e.value) == f"{bad}:3: unknown config key 'optim.lrate' (did you mean 'optim.lr'?)"  # FILE:LINE


def test_yaml_no_stays_a_string():
    cfg = load_config(ROOT / "configs/mlm/tiny.yaml", ["--mixed_precision=no"])
    assert cfg.mixed_precision == "no"


@pytest.mark.parametrize("launcher, run_value, expected", [("bf16", "auto", "bf16"), ("bf16", "no", "no"),
                                                          ("no", "auto", "no")])
def test_mixed_precision_auto_follows_the_launcher(launcher, run_value, expected, tmp_path):
    """`mixed_precision: auto` takes the launcher's (accelerate config / --mixed_precision → ACCELERATE_MIXED_PRECISION);
    a value in the run config wins over it."""
    import os
    import subprocess
    import sys

    code = ("from llm_dist.config import load_config; from llm_dist.training.loop import build_accelerator\n"
            f"cfg = load_config('configs/mlm/tiny.yaml', ['--mixed_precision={run_value}', '--output_dir={tmp_path}'])\n"
            "print(build_accelerator(cfg).mixed_precision)")
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": launcher}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == expected
