"""Recipes are YAML data. A recipe may name a `base` recipe whose keys it overrides."""
from __future__ import annotations

from pathlib import Path

import yaml

from ..config import ConfigError, deep_merge

RECIPE_DIR = Path(__file__).parent


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict:
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(f"--recipe: no recipe named {name_or_path!r} and no such file "
                          f"(recipes: {', '.join(recipe_names())})")
    if str(path) in _seen:
        raise ConfigError(f"recipe {path}: 'base' chain loops back on itself")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"recipe {path}: not valid YAML{where} ({getattr(e, 'problem', None) or e}); "
                          f"fix the file") from None
    except OSError as e:
        raise ConfigError(f"recipe {path}: cannot be read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is not None:
        data = deep_merge(load_recipe(base, _seen + (str(path),)), data)
    return data


def describe(name: str) -> str:
    """First line of the recipe's description."""
    lines = str(load_recipe(name).get("description", "")).strip().splitlines()
    return lines[0] if lines else ""
