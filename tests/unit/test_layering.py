"""Imports flow one way: tools -> integration -> runtime -> schedule, analysis -> schedule, and the
checkpoint package is used by the runtime, never the reverse (docs/design.md, "Import direction")."""

import ast
from pathlib import Path

import pytest

import deepspeed_dualpipe

PACKAGE = Path(deepspeed_dualpipe.__file__).parent

# What each part of the package may import from the package (besides itself).
ALLOWED = {
    "schedule": set(),
    "analysis": {"schedule"},
    "config": {"schedule"},
    "checkpoint": set(),
    "testing": set(),
    "runtime": {"schedule", "config", "checkpoint", "analysis"},  # analysis: the verifier, once at start-up
    "moe": {"runtime"},
    # moe: the Megatron MoE adapter; testing: strict mode from the environment (integration/strict.py)
    # checkpoint: DeepSpeed's own load_checkpoint guarded when the plugin is installed (checkpoint/guard.py)
    "integration": {"runtime", "schedule", "config", "moe", "testing", "checkpoint"},
    "tools": {"schedule", "analysis", "config", "runtime", "moe", "integration", "checkpoint", "testing"},
    "cli": {"schedule", "analysis", "tools"},
    "__main__": {"cli"},
    "__init__": {"schedule", "integration", "runtime", "checkpoint"},
}
# Modules that import nothing from the package at all.
# trace.py reads the step clock (runtime/autograd/clocks.py), which is the leaf now
LEAVES = ["integration/recording.py", "runtime/autograd/clocks.py", "runtime/errors.py", "runtime/slots.py"]


def _part(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imported_parts(path: Path):
    """(line, part) for every import of the package in ``path``, including imports inside functions."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] if node.level == 0 else []
            if node.module == "deepspeed_dualpipe":
                names = [f"deepspeed_dualpipe.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "deepspeed_dualpipe" and len(parts) > 1:
                yield node.lineno, parts[1]


def _violations(path: Path, part: str):
    return [
        f"{path.name}:{line} imports {imported}" for line, imported in _imported_parts(path)
        if imported != part and imported not in ALLOWED[part]
    ]


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_part_of_the_package_is_placed_in_the_layering():
    assert {_part(p) for p in MODULES} <= set(ALLOWED), {_part(p) for p in MODULES} - set(ALLOWED)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_one_way(path):
    assert _violations(path, _part(path)) == []


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_modules_import_nothing_from_the_package(leaf):
    assert list(_imported_parts(PACKAGE / leaf)) == []


def test_the_check_sees_an_import_that_goes_the_wrong_way(tmp_path):
    planted = tmp_path / "layout.py"
    planted.write_text((PACKAGE / "schedule" / "layout.py").read_text() +
                       "\n\ndef late():\n    from deepspeed_dualpipe.runtime import engine\n")
    assert _violations(PACKAGE / "schedule" / "layout.py", "schedule") == []
    assert [v.split(" imports ")[1] for v in _violations(planted, "schedule")] == ["runtime"]


def _module(path: Path, root: Path) -> str:
    return ".".join(("deepspeed_dualpipe", ) + path.relative_to(root).with_suffix("").parts)


def _imported_modules(path: Path):
    """Every module of the package that ``path`` imports, anywhere in it (functions and TYPE_CHECKING included)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deepspeed_dualpipe"):
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("deepspeed_dualpipe"))


def _mutual_imports(paths, root=PACKAGE):
    modules = {_module(p, root): p for p in paths if p.name != "__init__.py"}  # a package imports its own modules
    imports = {name: set(_imported_modules(path)) & set(modules) for name, path in modules.items()}
    return sorted((a, b) for a in imports for b in imports[a] if a < b and a in imports[b])


def test_no_two_modules_import_each_other():
    assert _mutual_imports(MODULES) == []


def test_the_check_sees_two_modules_that_import_each_other(tmp_path):
    (tmp_path / "tools").mkdir()
    for name, other in (("a", "b"), ("b", "a")):
        (tmp_path / "tools" / f"{name}.py").write_text(
            f"from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from deepspeed_dualpipe.tools.{other} import X\n"
        )
    planted = [tmp_path / "tools" / "a.py", tmp_path / "tools" / "b.py"]
    assert _mutual_imports(planted, tmp_path) == [("deepspeed_dualpipe.tools.a", "deepspeed_dualpipe.tools.b")]
