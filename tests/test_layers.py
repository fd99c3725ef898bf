"""The layers' import rules, read from the source (ast, nothing imported): storage/ at the bottom imports nothing
from pipeline, flows or lopd; pipeline/ nothing from flows or lopd; flows/ nothing from lopd. Every import counts,
at module level or inside a function (and ``importlib.import_module`` / ``__import__`` of a literal name). Also no
module in pipeline/ or storage/ is over 800 lines, and the offline OPD stage is pipeline/stages/train.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("storage", "pipeline", "flows", "lopd")  # bottom to top
FORBIDDEN = {
    "storage": {"pipeline", "flows", "lopd"},
    "pipeline": {"flows", "lopd"},
    "flows": {"lopd"},
    "lopd": set(),
}
MAX_LINES = 800


def _sources(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (REPO / pkg).rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str, str]]:
    """Every import in ``path``: (line, the absolute module name, the statement as written)."""
    rel = path.relative_to(REPO)
    package = list(rel.parent.parts)  # relative imports resolve against the file's package
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, ast.unparse(node)) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module, ast.unparse(node)))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            out.append((node.lineno, node.args[0].value, ast.unparse(node)))
    return sorted(out)


def test_the_layers_exist():
    for pkg in LAYERS:
        assert (REPO / pkg / "__init__.py").is_file(), pkg
        assert _sources(pkg), pkg


@pytest.mark.parametrize("layer", [layer for layer in LAYERS if FORBIDDEN[layer]])
def test_a_layer_imports_nothing_from_the_layers_above_it(layer):
    violations = []
    for path in _sources(layer):
        for line, module, statement in _imports(path):
            if module.split(".")[0] in FORBIDDEN[layer]:
                violations.append(f"{path.relative_to(REPO)}:{line}: {statement}")
    assert not violations, (f"{layer}/ must import nothing from {', '.join(sorted(FORBIDDEN[layer]))}:\n"
                            + "\n".join(violations))


def test_the_import_reader_sees_imports_inside_functions_and_relative_ones(tmp_path, monkeypatch):
    """The rule checker itself: a function-level import, a relative import and a literal import_module are
    found, with their lines and absolute module names."""
    pkg = tmp_path / "storage" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "mod.py").write_text("import os\n\n\ndef f():\n    from pipeline.train import loop\n"
                                "    from ..x import y\n    from . import z\n"
                                "    return importlib.import_module('flows.stages')\n")
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    found = [(line, module) for line, module, _ in _imports(pkg / "mod.py")]
    assert found == [(1, "os"), (5, "pipeline.train"), (6, "storage.x"), (7, "storage.sub"), (8, "flows.stages")]


def test_no_module_in_pipeline_or_storage_is_over_800_lines():
    long = [f"{p.relative_to(REPO)}: {n} lines" for p in _sources("pipeline", "storage")
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines (split them by concern):\n" + "\n".join(long)


def test_the_offline_opd_stage_is_pipeline_stages_train():
    assert (REPO / "pipeline" / "stages" / "train.py").is_file()
