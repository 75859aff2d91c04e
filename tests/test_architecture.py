"""The tree's architecture, checked: HTTP only at the edge, and layers that import downwards.

Read from the source (every import, function-local ones included), so a shortcut taken in a hurry
fails here rather than in review.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app"

HTTP_EDGE = ("app.api", "app.web", "app.cli")
"""The only modules that may speak HTTP."""

LAYERS: list[tuple[str, ...]] = [
    ("app.times", "app.errors", "app.catalogue"),
    ("app.config",),
    ("app.db", "app.models"),
    ("app.ledger", "app.keys", "app.doorbell", "app.validation", "app.group_commit"),
    ("app.billing",),
    ("app.providers", "app.metering"),
    ("app.inbox",),
    ("app.reconciliation",),
    ("app.queue", "app.tasks"),
    ("app.api",),
    ("app.web", "app.cli"),
]
"""Bottom to top: a module may import its own layer and those below, never above."""

HTTP_NAMES = {"ApiError", "HTTPException", "JSONResponse", "Response", "Request"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def app_modules() -> list[tuple[str, ast.Module]]:
    return [(module_name(path), ast.parse(path.read_text(encoding="utf-8"))) for path in sorted(APP.rglob("*.py"))]


def imports(tree: ast.Module) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def layer_of(name: str) -> int | None:
    for index, members in enumerate(LAYERS):
        if within(name, members):
            return index
    return None


MODULES = app_modules()


def test_every_app_module_has_a_layer():
    assert [name for name, _ in MODULES if name != "app" and layer_of(name) is None] == []


@pytest.mark.parametrize("name, tree", MODULES, ids=[name for name, _ in MODULES])
def test_http_stays_in_the_api_layer(name, tree):
    if within(name, HTTP_EDGE):
        return
    assert [target for target in imports(tree) if within(target, ("starlette", "uvicorn", "httpx"))] == []
    raised = [node.exc for node in ast.walk(tree) if isinstance(node, ast.Raise) and node.exc is not None]
    called = [node.func for node in raised if isinstance(node, ast.Call)]
    names = {func.id for func in called if isinstance(func, ast.Name)} | {
        func.attr for func in called if isinstance(func, ast.Attribute)
    }
    assert names & HTTP_NAMES == set()
    statuses = [
        node.args[0].value
        for node in raised
        if isinstance(node, ast.Call)
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, int)
        and 100 <= node.args[0].value < 600
    ]
    assert statuses == [], f"{name} raises an error built from an HTTP status"


@pytest.mark.parametrize("name, tree", MODULES, ids=[name for name, _ in MODULES])
def test_layers_import_downwards_and_app_never_imports_workers(name, tree):
    own = layer_of(name)
    if own is None:
        return
    targets = set(imports(tree))
    assert [target for target in targets if within(target, ("workers",))] == []
    upward = sorted(target for target in targets if target.startswith("app.") and (layer_of(target) or 0) > own)
    assert upward == [], f"{name} (layer {own}) imports from above it"
