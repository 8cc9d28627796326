"""An experiment: a spec (YAML) → variants × seeds, each an ordinary training run with its own config file
and output_dir; run locally one after another or as a SLURM job array; finished runs skipped.

Spec keys (every one but `base` optional):

    name: label-noise                  # report title, W&B group (default: the file's stem)
    claim: "…"                         # the article's claim the experiment tests (shown in the report)
    base: ../classify/tiny.yaml        # the run config every variant starts from (relative to this file)
    overrides: {classify.epochs: 2}    # applied to every variant (a mapping of dotted keys, or ["--k=v", …])
    seeds: [1, 2, 3]                   # each variant runs once per seed; a seed sets `seed` (initialisation,
                                       #   batch order, the subset drawn): variants pair by seed
    output_dir: runs/experiments/noise # default runs/experiments/<name>
    nproc: 1                           # local: processes per run (accelerate launch)
    baseline: clean                    # the variant the others are compared with (default: the first)
    metrics: [accuracy, macro_f1]      # default: every metric the runs report
    variants:                          # named variants …
      - {name: clean, overrides: {}}
      - {name: noise-20, overrides: {data.label_noise.rate: 0.2}}
    grid: {data.label_noise.rate: [0.0, 0.1]}   # … and/or the product of these keys' values
    sweep:                             # a scale sweep: one variant per value, a power law fitted
      key: data.subset.fraction        #   (classify: to training examples; MLM: sweep max_tokens)
      values: [0.1, 0.25, 0.5, 1.0]
      metric: accuracy                 #   err = 1 − metric (a loss / perplexity is used as is)
    removal:                           # counterfactual removal
      scores: auto                     #   auto: a scoring run (the base, dynamics on, the first seed);
                                       #   or a run dir / example_scores.parquet of the same data
      detectors: [aum, confidence]     #   suspicion_<name> columns; top-k% removed
      fractions: [0.1]
      random: true                     #   a random k% (seeded per run) as the control
    curves:                            # learning curves compared: each point a variant at an x; at shared x
      x: examples per class            #   the paired difference; `worth`: at each x of the first curve,
      metric: accuracy                 #   the x where the second reaches its mean (Le Scao & Rush 2021:
      of: {prompt: {prompt-k8: 8, prompt-k32: 32}, head: {head-k8: 8, head-k32: 32}}   # what a prompt is
      worth: [prompt, head]            #   worth in labelled examples)

The split is fixed across seeds (`data.split_seed` = the base's, or its seed) so every run is scored on the
same test examples; only what the seed should change changes.
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ...config import ConfigError, load_config, to_dict, write_text_atomic

SPEC_KEYS = ("name", "claim", "base", "overrides", "seeds", "output_dir", "nproc", "baseline", "metrics",
             "variants", "grid", "sweep", "removal", "curves")
SCORING = "_scoring"  # the removal experiment's scoring run (a variant name no spec can use)


class ExperimentError(ValueError):
    """Bad experiment input: one line naming the file and key, exit 2."""


@dataclass
class Run:
    variant: str
    seed: int
    config: Path  # the full run config (YAML) written by the planner
    out: Path  # its output_dir
    cfg: dict  # the config as a dict (what the run trains)
    needs: str | None = None  # a run that must have finished first (removal: the scoring run)

    @property
    def key(self) -> str:
        return f"{self.variant}/seed{self.seed}"

    def done(self) -> bool:
        return run_done(self.out)


def run_done(out: Path) -> bool:
    """Finished: run.json present, not signalled, and its final metrics written."""
    try:
        rj = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return not rj.get("signalled") and ("test" in rj or "eval" in rj)


@dataclass
class Variant:
    name: str
    overrides: dict
    sweep_value: object = None
    removal: dict | None = None  # {"detector", "fraction"} or {"random", "fraction"}
    slug: str = ""  # the variant's directory name


@dataclass
class Plan:
    spec_path: Path
    spec: dict
    name: str
    out: Path
    variants: list
    seeds: list
    runs: list = field(default_factory=list)
    baseline: str = ""
    nproc: int = 1
    scoring: Run | None = None
    base_cfg: object = None  # the base config with the spec's common overrides (no variant's)
    tokenizer: Path | None = None  # the experiment's shared tokenizer (trained once), when the base trains one


def _where(path: Path, key: str) -> str:
    return f"{path}: key '{key}'"


def _as_overrides(value, path: Path, key: str) -> dict:
    """A mapping {dotted.key: value} or a list of "--k=v" strings → a mapping."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, list):
        from ...config import parse_overrides

        try:
            return dict(parse_overrides([str(v) for v in value]))
        except ConfigError as e:
            raise ExperimentError(f"{_where(path, key)}: {e}") from None
    raise ExperimentError(f"{_where(path, key)}: expected a mapping of config keys (or a list of --key=value)")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_") or "variant"


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _short(key: str) -> str:
    """A key's name in a variant name: its last two parts (data.label_noise.rate → label_noise.rate)."""
    return ".".join(key.split(".")[-2:]) if key.count(".") >= 1 and key.split(".")[0] in ("data", "classify") \
        else key.split(".")[-1]


def load_spec(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ExperimentError(f"{path}: {e.strerror}") from None
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ExperimentError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(spec, dict):
        raise ExperimentError(f"{path}: an experiment spec is a mapping (base, variants, seeds, …)")
    for k in spec:
        if k not in SPEC_KEYS:
            import difflib

            close = difflib.get_close_matches(str(k), SPEC_KEYS, n=1)
            raise ExperimentError(f"{_where(path, k)}: unknown key" + (f" (did you mean '{close[0]}'?)" if close else ""))
    if "base" not in spec:
        raise ExperimentError(f"{_where(path, 'base')}: missing (the run config every variant starts from)")
    return spec


def _check_curves(curves, names: list[str], path: Path) -> None:
    """`curves: {x: label, metric: m, of: {curve: {variant: x, …}, …}, worth: [curve_a, curve_b]}`."""
    if curves is None:
        return
    of = curves.get("of") if isinstance(curves, dict) else None
    if not isinstance(of, dict) or not of or not all(isinstance(p, dict) and p for p in of.values()):
        raise ExperimentError(f"{_where(path, 'curves.of')}: expected {{curve: {{variant: x, …}}, …}}")
    for cname, pts in of.items():
        for variant, x in pts.items():
            if variant not in names:
                raise ExperimentError(f"{_where(path, f'curves.of.{cname}')}: '{variant}' is not a variant "
                                      f"({', '.join(names)})")
            if isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0:
                raise ExperimentError(f"{_where(path, f'curves.of.{cname}.{variant}')}: x must be a number "
                                      f">= 0, got {x!r}")
    worth = curves.get("worth")
    if worth is not None and (not isinstance(worth, list) or len(worth) != 2 or any(w not in of for w in worth)):
        raise ExperimentError(f"{_where(path, 'curves.worth')}: expected two of the curves ({', '.join(of)}), "
                              f"got {worth!r}")


def _variants(spec: dict, path: Path) -> list[Variant]:
    out: list[Variant] = []
    for i, v in enumerate(spec.get("variants") or []):
        if not isinstance(v, dict) or "name" not in v:
            raise ExperimentError(f"{_where(path, f'variants.{i}')}: expected {{name: …, overrides: {{…}}}}")
        out.append(Variant(str(v["name"]), _as_overrides(v.get("overrides"), path, f"variants.{i}.overrides")))
    grid = spec.get("grid")
    if grid:
        if not isinstance(grid, dict) or not all(isinstance(vals, list) and vals for vals in grid.values()):
            raise ExperimentError(f"{_where(path, 'grid')}: expected a mapping of config keys to lists of values")
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            name = ",".join(f"{_short(k)}={_fmt(v)}" for k, v in zip(keys, combo))
            out.append(Variant(name, dict(zip(keys, combo))))
    sweep = spec.get("sweep")
    if sweep:
        if not isinstance(sweep, dict) or "key" not in sweep or not isinstance(sweep.get("values"), list) \
                or len(sweep["values"]) < 2:
            raise ExperimentError(f"{_where(path, 'sweep')}: expected {{key: …, values: [at least 2], metric: …}}")
        for v in sweep["values"]:
            out.append(Variant(f"{_short(sweep['key'])}={_fmt(v)}", {sweep["key"]: v}, sweep_value=v))
    removal = spec.get("removal")
    if removal:
        if not isinstance(removal, dict) or not removal.get("detectors") and not removal.get("random"):
            raise ExperimentError(f"{_where(path, 'removal')}: expected {{scores: auto|PATH, detectors: [...], "
                                  "fractions: [...], random: true}}")
        fracs = removal.get("fractions") or [0.1]
        if not all(isinstance(f, (int, float)) and 0 < f < 1 for f in fracs):
            raise ExperimentError(f"{_where(path, 'removal.fractions')}: fractions in (0, 1), got {fracs}")
        if not any(v.name == "keep-all" for v in out) and not out:
            out.append(Variant("keep-all", {}))
        for f in fracs:
            for det in removal.get("detectors") or []:
                out.append(Variant(f"remove-{det}-{_fmt(f)}", {}, removal={"detector": str(det), "fraction": f}))
            if removal.get("random", True):
                out.append(Variant(f"remove-random-{_fmt(f)}", {"data.filter.random_fraction": f},
                                   removal={"random": True, "fraction": f}))
    if not out:
        raise ExperimentError(f"{path}: no variants (give variants, grid, sweep or removal)")
    names = [v.name for v in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ExperimentError(f"{path}: variant name '{dup}' used twice")
    for v in out:
        v.slug = _slug(v.name)
    return out


def make_plan(spec_path: str | Path, output_dir: str | None = None, seeds: list[int] | None = None,
              extra: list[str] | None = None, only: list[str] | None = None) -> Plan:
    """Read and check the spec, build and validate every run's config (nothing written). `only`: run just
    these variants (and the baseline)."""
    spec_path = Path(spec_path).resolve()
    spec = load_spec(spec_path)
    name = str(spec.get("name") or spec_path.stem)
    base = Path(str(spec["base"]))
    if not base.is_absolute():
        base = (spec_path.parent / base) if (spec_path.parent / base).exists() else base.resolve()
    if not base.exists():
        raise ExperimentError(f"{_where(spec_path, 'base')}: {spec['base']}: no such file")
    seeds = seeds or spec.get("seeds") or [1]
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**32
                                              for s in seeds) or len(set(seeds)) != len(seeds):
        raise ExperimentError(f"{_where(spec_path, 'seeds')}: expected a list of distinct integers, got {seeds!r}")
    nproc = spec.get("nproc", 1)
    if not isinstance(nproc, int) or nproc < 1:
        raise ExperimentError(f"{_where(spec_path, 'nproc')}: must be an integer >= 1, got {nproc!r}")
    out = Path(output_dir or spec.get("output_dir") or f"runs/experiments/{_slug(name)}").resolve()
    common = _as_overrides(spec.get("overrides"), spec_path, "overrides")
    common.update(dict(_parse_extra(extra or [])))
    variants = _variants(spec, spec_path)
    _check_curves(spec.get("curves"), [v.name for v in variants], spec_path)
    baseline = str(spec.get("baseline") or variants[0].name)
    if baseline not in [v.name for v in variants]:
        raise ExperimentError(f"{_where(spec_path, 'baseline')}: '{baseline}' is not a variant "
                              f"({', '.join(v.name for v in variants)})")
    if only:
        unknown = [n for n in only if n not in [v.name for v in variants]]
        if unknown:
            raise ExperimentError(f"--variants: '{unknown[0]}' is not a variant of {spec_path.name} "
                                  f"({', '.join(v.name for v in variants)})")
        variants = [v for v in variants if v.name in only or v.name == baseline
                    or (v.removal and v.removal.get("random") and any(  # a detector keeps its random control
                        w.removal and w.removal.get("fraction") == v.removal["fraction"] and w.name in only
                        for w in variants))]
    base_cfg = _config(base, common, spec_path, "overrides")
    split_seed = base_cfg.data.split_seed if base_cfg.data.split_seed is not None else base_cfg.seed
    plan = Plan(spec_path, spec, name, out, variants, seeds, baseline=baseline, nproc=nproc, base_cfg=base_cfg)
    from ...models.build import tokenizer_source

    if base_cfg.task == "classify" and tokenizer_source(base_cfg)[0] is None:
        # one tokenizer for every run, trained once on the base's training split: a variant's data must
        # not also change its vocabulary (and each run saves the training time)
        plan.tokenizer = out / "tokenizer"
        common["tokenizer.path"] = str(plan.tokenizer)
    removal = spec.get("removal") or {}
    if removal:
        if base_cfg.task != "classify":
            raise ExperimentError(f"{_where(spec_path, 'removal')}: counterfactual removal needs a classify base")
        scores = removal.get("scores", "auto")
        if scores == "auto":
            cfg = _run_config(base, common, {"dynamics.enabled": True, "dynamics.analyze": True}, seeds[0],
                              split_seed, out / "runs" / SCORING / f"seed{seeds[0]}", name, SCORING, spec_path)
            plan.scoring = Run(SCORING, seeds[0], out / "configs" / SCORING / f"seed{seeds[0]}.yaml",
                               out / "runs" / SCORING / f"seed{seeds[0]}", cfg)
        else:
            p = Path(str(scores))
            p = p if p.is_absolute() else (spec_path.parent / p if (spec_path.parent / p).exists() else p.resolve())
            if p.is_dir():
                p = p / "analysis" / "example_scores.parquet" if (p / "analysis").is_dir() else p / "example_scores.parquet"
            if not p.is_file():
                raise ExperimentError(f"{_where(spec_path, 'removal.scores')}: {scores}: no example_scores.parquet there")
            plan.spec = dict(spec, removal=dict(removal, scores=str(p)))
    for v in variants:
        ov = dict(v.overrides)
        if v.removal and "detector" in v.removal:
            ov["data.filter.exclude_ids"] = str(removal_file(plan, v))
        for seed in seeds:
            run_out = out / "runs" / v.slug / f"seed{seed}"
            cfg = _run_config(base, common, ov, seed, split_seed, run_out, name, f"{v.name}/seed{seed}", spec_path)
            plan.runs.append(Run(v.name, seed, out / "configs" / v.slug / f"seed{seed}.yaml", run_out, cfg,
                                 needs=SCORING if v.removal and "detector" in v.removal and plan.scoring else None))
    return plan


def _parse_extra(extra: list[str]):
    from ...config import parse_overrides

    try:
        return parse_overrides(extra)
    except ConfigError as e:
        raise ExperimentError(str(e)) from None


def _config(base: Path, common: dict, spec_path: Path, key: str, extra: dict | None = None):
    args = [f"--{k}={_yaml_value(v)}" for k, v in {**common, **(extra or {})}.items()]
    try:
        cfg = load_config(base, args)
    except ConfigError as e:
        raise ExperimentError(f"{_where(spec_path, key)}: {e}") from None
    from ..label_issues.folds import _abs_paths

    _abs_paths(cfg)  # runs may start elsewhere (a SLURM job runs in the repository root)
    return cfg


def _yaml_value(v) -> str:
    if isinstance(v, str):
        return v
    return json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)


def _run_config(base, common, ov, seed, split_seed, out, group, run_name, spec_path) -> dict:
    extra = {**ov, "seed": seed, "data.split_seed": split_seed, "output_dir": str(out), "resume": "auto",
             "overwrite": False, "then": None, "tracking.group": group, "tracking.run_name": f"{group}/{run_name}"}
    return to_dict(_config(base, common, spec_path, f"variants ({run_name})", extra))


def prepare_tokenizer(plan: Plan) -> None:
    """Train the shared tokenizer (once) on the base config's training split."""
    if plan.tokenizer is None or (plan.tokenizer / "tokenizer.json").exists():
        return
    import os
    import shutil

    from ...data.classify import load_splits
    from ...models.build import train_wordpiece

    cfg = plan.base_cfg
    texts = list(load_splits(cfg)["train"]["text"])
    n = cfg.tokenizer.train_documents
    tok = train_wordpiece(iter(texts[:n] if n else texts), cfg.tokenizer.vocab_size, cfg.tokenizer.lowercase)
    tmp = plan.tokenizer.with_name("tokenizer.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    os.replace(tmp, plan.tokenizer)


def removal_file(plan: Plan, v: Variant) -> Path:
    return plan.out / "removal" / f"{_slug(v.removal['detector'])}-{_fmt(v.removal['fraction'])}.txt"


def scores_path(plan: Plan) -> Path:
    if plan.scoring is not None:
        return plan.scoring.out / "analysis" / "example_scores.parquet"
    return Path(plan.spec["removal"]["scores"])


def write_removal_ids(plan: Plan) -> dict:
    """The top-k% training ids by each detector's suspicion (ties by id), one file per (detector, fraction)."""
    import pandas as pd

    df = pd.read_parquet(scores_path(plan))
    out = {}
    for v in plan.variants:
        if not (v.removal and "detector" in v.removal):
            continue
        col = f"suspicion_{v.removal['detector']}"
        if col not in df.columns:
            have = ", ".join(c[len("suspicion_"):] for c in df.columns if c.startswith("suspicion_"))
            raise ExperimentError(f"{_where(plan.spec_path, 'removal.detectors')}: no column {col} in "
                                  f"{scores_path(plan)} (detectors there: {have})")
        k = round(v.removal["fraction"] * len(df))
        top = df.sort_values([col, "id"], ascending=[False, True])["id"].astype(str).head(k).tolist()
        f = removal_file(plan, v)
        text = f"# top {k} of {len(df)} training examples by {col} ({scores_path(plan)})\n" + "".join(
            f"{i}\n" for i in top)
        if not (f.is_file() and f.read_text() == text):
            f.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(f, text)
        out[v.name] = {"file": str(f), "removed": k, "column": col}
    return out


def write_plan(plan: Plan) -> None:
    """Each run's config file and plan.json. A run planned before with another config and already started
    is refused (its results would be mixed with the new spec's)."""
    plan.out.mkdir(parents=True, exist_ok=True)
    pj = plan.out / "plan.json"
    old = {}
    if pj.exists():
        try:
            old = json.loads(pj.read_text()).get("runs", {})
        except ValueError:
            old = {}
    runs = ([plan.scoring] if plan.scoring else []) + plan.runs
    for r in runs:
        prev = old.get(r.key)
        if prev is not None and (r.out / "config.yaml").exists() and _first_diff(prev, r.cfg) is not None:
            diff = _first_diff(prev, r.cfg)
            raise ExperimentError(f"{plan.out}: run {r.key} was started with another config ({diff}); use a new "
                                  f"output_dir, or remove {r.out}")
    for r in runs:
        text = yaml.safe_dump(r.cfg, sort_keys=False, allow_unicode=True)
        if not (r.config.is_file() and r.config.read_text() == text):
            r.config.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(r.config, text)
    merged = dict(old, **{r.key: r.cfg for r in runs})
    write_text_atomic(pj, json.dumps({"name": plan.name, "spec": str(plan.spec_path), "runs": merged}, indent=1,
                                     default=str))


def _first_diff(old, new, prefix=""):
    """The first key whose value differs ("key: old → new"), None when none does. A key the old config
    lacks is not a difference: a newer llm_dist adds keys whose defaults keep the old behaviour."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(old):
            d = _first_diff(old[k], new.get(k), f"{prefix}{k}.")
            if d is not None:
                return d
        return None
    if old != json.loads(json.dumps(new, default=str)):
        return f"{prefix.rstrip('.')}: {old!r} → {new!r}"
    return None
