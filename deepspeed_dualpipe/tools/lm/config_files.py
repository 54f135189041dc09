"""Config files that build on another one: ``{"base": "other.json", ...overrides}``.

A config with a ``"base"`` key is that file (a path relative to the config's own directory; it
may have a base of its own) with the rest of the config merged over it, key by key, into
nested sections; ``null`` removes a key of the base. The result is a plain DeepSpeed config
without ``"base"``: that is what a run records (``runs/<name>/metrics.json``, and the
ablations' ``runs/ablation/<name>/config.json``) and what reproduces it alone.

    {"base": "../dualpipe_moe.json", "pipeline": {"schedule": "1f1b"}, "dualpipe": null}
"""

import copy
import json
from pathlib import Path
from typing import Any, Dict, Union


def merge(base: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """``base`` with ``overrides`` merged in: dicts merge recursively, a ``None`` value deletes the key,
    anything else replaces. Neither argument is modified."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load(path: Union[str, Path], _seen=()) -> Dict[str, Any]:
    """The config in ``path`` with its ``base`` chain resolved."""
    path = Path(path).resolve()
    if path in _seen:
        raise ValueError(f"config {path} is its own base (through {' -> '.join(map(str, _seen))})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"config {path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"config {path} must be a JSON object, got {type(config).__name__}")
    base = config.pop("base", None)
    if base is None:
        return config
    if not isinstance(base, str):
        raise ValueError(f"config {path}: \"base\" must be a path to a JSON file, got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ValueError(f"config {path}: its base {base!r} ({base_path}) does not exist")
    return merge(load(base_path, (*_seen, path)), config)
