"""Deciders are pure: no Ray, database, protocol, network, clock or randomness.

Every module under `actors/` that builds a `Decider(...)` is checked, and so is
every project module it imports (a helper must not smuggle in what the decider may
not import). The host and the gateways are the impure edge and are not checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ACTORS = ROOT / "actors"
PROJECT_PACKAGES = ("actors", "events", "projections", "cluster")
NOT_DECIDERS = {ACTORS / "host.py"}
EDGE = ACTORS / "gateways"

FORBIDDEN_MODULES = {
    "ray",
    "duckdb",
    "ocpp",
    "pymodbus",
    "aiomqtt",
    "websockets",
    "socket",
    "asyncio",
    "time",
    "random",
}
# attribute calls that read the clock: datetime.now(), datetime.utcnow(), date.today()
CLOCK_READS = {("datetime", "now"), ("datetime", "utcnow"), ("datetime", "today")}
CLOCK_READS |= {("date", "today"), ("time", "time")}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _builds_a_decider(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name == "Decider":
                return True
    return False


def decider_modules() -> list[Path]:
    found = []
    for path in sorted(ACTORS.rglob("*.py")):
        if path in NOT_DECIDERS or EDGE in path.parents:
            continue
        if _builds_a_decider(_tree(path)):
            found.append(path)
    return found


def _imported_modules(tree: ast.Module) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def impurities(source: str, filename: str = "<source>") -> list[str]:
    """What makes this module impure, one line each (empty: pure)."""
    tree = ast.parse(source, filename=filename)
    found = []
    for module in _imported_modules(tree):
        if module.split(".")[0] in FORBIDDEN_MODULES:
            found.append(f"{filename}: imports {module}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = _dotted(node.func.value).split(".")[-1]
            if (owner, node.func.attr) in CLOCK_READS:
                found.append(f"{filename}:{node.lineno}: calls {owner}.{node.func.attr}()")
    return found


def _project_file(module: str) -> Path | None:
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def with_project_imports(path: Path) -> list[Path]:
    """The module and every project module it imports, transitively."""
    seen: list[Path] = []
    todo = [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        for module in _imported_modules(_tree(current)):
            imported = _project_file(module)
            if imported is not None and imported not in seen:
                todo.append(imported)
    return seen


def test_the_vehicle_is_found_as_a_decider() -> None:
    assert ACTORS / "vehicle.py" in decider_modules()


@pytest.mark.parametrize("path", decider_modules(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_a_decider_and_what_it_imports_stay_pure(path: Path) -> None:
    problems = [
        problem
        for module in with_project_imports(path)
        for problem in impurities(
            module.read_text(encoding="utf-8"), module.relative_to(ROOT).as_posix()
        )
    ]
    assert problems == []


@pytest.mark.parametrize(
    "source",
    [
        "import ray",
        "import ray.util",
        "from duckdb import connect",
        "import asyncio as aio",
        "from time import time",
        "import random",
        "from datetime import datetime\nx = datetime.now()",
        "import datetime\nx = datetime.datetime.utcnow()",
        "from datetime import date\nx = date.today()",
    ],
)
def test_the_check_catches_an_impure_module(source: str) -> None:
    assert impurities(source) != []


def test_the_check_lets_a_pure_module_pass() -> None:
    source = "from datetime import datetime, timedelta\nx = datetime(2025, 1, 1) + timedelta(1)"
    assert impurities(source) == []
