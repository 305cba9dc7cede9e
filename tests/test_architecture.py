"""The house rules that keep the code readable, checked on the source: imports point one way
(edge_llm -> scheduler -> models.engine -> edge -> transport, models), small files, short functions."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("edge_llm", "scheduler", "edge", "models", "transport")
# What each package may import of the others (models.engine is the protocol the front end uses).
ALLOWED = {
    "edge_llm": {"scheduler", "edge", "models", "transport"},
    "scheduler": {"models", "transport"},
    "edge": {"models", "transport"},
    "models": set(),
    "transport": set(),
}
MAX_FILE_LINES = 300  # in edge/, scheduler/, models/
MAX_FUNCTION_LINES = 60


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).glob("*.py"))


def _imported_packages(path: Path) -> set[str]:
    """Top-level names of every import in the file, at any depth (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package):
    wrong = {f"{p.relative_to(ROOT)} imports {bad}"
             for p in _modules(package)
             for bad in (_imported_packages(p) & set(PACKAGES)) - ALLOWED[package] - {package}}
    assert not wrong, sorted(wrong)


def test_the_rule_checker_sees_function_level_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from edge.master import ClusterEngine\n    import scheduler.app\n")
    assert _imported_packages(source) == {"edge", "scheduler"}


@pytest.mark.parametrize("package", ("edge", "scheduler", "models"))
def test_files_stay_small(package):
    big = {str(p.relative_to(ROOT)): n for p in _modules(package) if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not big, big


@pytest.mark.parametrize("package", PACKAGES)
def test_functions_stay_short(package):
    long = {}
    for path in _modules(package):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = length
    assert not long, long


def test_the_front_end_does_not_probe_the_engine():
    """The scheduler uses the engine through models.engine.Engine only: no hasattr/getattr probing."""
    probes = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in _modules("scheduler")
              for n in ast.walk(ast.parse(p.read_text())) if _probes_engine(n)]
    assert not probes, probes


def _probes_engine(node: ast.AST) -> bool:
    """hasattr(anything), or getattr on something named like the engine."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args):
        return False
    return node.func.id == "hasattr" or (node.func.id == "getattr" and "engine" in ast.unparse(node.args[0]).lower())


def test_the_probe_checker_sees_probes():
    calls = ("hasattr(engine, 'x')", "getattr(request.app[ENGINE], 'y', None)", "getattr(types, '__name__')")
    assert [_probes_engine(ast.parse(c).body[0].value) for c in calls] == [True, True, False]
