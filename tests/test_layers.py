"""The layers, checked from the source: imports point one way, toward the pure core.

    core  <-  config, store, state  <-  transport  <-  http (the composition root)
    core  <-  node, sim;   core, state, sim  <-  plan

Each layer may import the herd packages listed for it and nothing else of herd's; the core
imports only the standard library's pure modules, attrs and cattrs (no I/O, no clock, no
event loop), and the state and transport layers none of the web server's packages.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERD = Path(__file__).parent.parent / "herd"

ALLOWED_HERD = {
    "herd.core": {"herd.core"},
    "herd.config": {"herd.core", "herd.config"},
    "herd.store": {"herd.core", "herd.store"},
    "herd.state": {"herd.core", "herd.state"},
    "herd.transport": {"herd.core", "herd.config", "herd.state", "herd.transport"},
    # The node is its own role's composition root: it serves HTTP through herd's server
    # wrapper and finds the router with herd's mDNS module, but knows nothing of the router.
    "herd.node": {"herd.core", "herd.config", "herd.server", "herd.discovery", "herd.node"},
    "herd.sim": {"herd.core", "herd.server", "herd.sim"},
    "herd.plan": {"herd.core", "herd.state", "herd.store", "herd.sim", "herd.plan"},
    # Several routers, one fleet: shared counts and records over Valkey / PostgreSQL.
    "herd.shared": {"herd.core", "herd.config", "herd.state", "herd.store", "herd.shared"},
}

# The core's whole world outside the standard library.
CORE_THIRD_PARTY = {"attrs", "cattrs"}
# Standard modules that do I/O, read clocks, or run an event loop: never in the core.
CORE_BANNED_STDLIB = {
    "asyncio",
    "http",
    "importlib",
    "io",
    "logging",
    "os",
    "pathlib",
    "select",
    "shutil",
    "signal",
    "socket",
    "sqlite3",
    "subprocess",
    "sys",
    "tempfile",
    "threading",
    "time",
    "urllib.request",
}
# Web-server packages: the HTTP surface's, nobody else's below it.
SERVER_PACKAGES = {"quart", "quart_trio", "hypercorn", "werkzeug", "trio_websocket"}
NO_SERVER = (
    "herd.core",
    "herd.state",
    "herd.transport",
    "herd.store",
    "herd.config",
    "herd.shared",
)


def modules(package: str) -> Iterator[tuple[str, Path]]:
    relative = package.removeprefix("herd").lstrip(".").replace(".", "/")
    root = HERD / relative
    files = sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]
    for path in files:
        parts = path.relative_to(HERD.parent).with_suffix("").parts
        name = ".".join(parts).removesuffix(".__init__")
        yield name, path


def imports(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "herd":  # from herd import x: the submodules named
                for alias in node.names:
                    yield node.lineno, f"herd.{alias.name}"
            else:
                yield node.lineno, node.module


def layer_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


@pytest.mark.parametrize("layer", sorted(ALLOWED_HERD))
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    found = list(modules(layer))
    assert found, f"no modules in {layer}"
    wrong = [
        f"{name}:{line} imports {target}"
        for name, path in found
        for line, target in imports(path)
        if target.split(".")[0] == "herd" and layer_of(target) not in ALLOWED_HERD[layer]
    ]
    assert not wrong, "\n".join(wrong)


def test_the_core_is_pure() -> None:
    stdlib = sys.stdlib_module_names
    wrong = []
    for name, path in modules("herd.core"):
        for line, target in imports(path):
            top = target.split(".")[0]
            if top in ("herd", "__future__"):
                continue
            if top in stdlib:
                if top in CORE_BANNED_STDLIB or target in CORE_BANNED_STDLIB:
                    wrong.append(f"{name}:{line} imports {target} (I/O, clock or event loop)")
            elif top not in CORE_THIRD_PARTY:
                wrong.append(f"{name}:{line} imports {target} (not attrs or cattrs)")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("layer", NO_SERVER)
def test_only_the_http_surface_knows_the_web_server(layer: str) -> None:
    wrong = [
        f"{name}:{line} imports {target}"
        for name, path in modules(layer)
        for line, target in imports(path)
        if target.split(".")[0] in SERVER_PACKAGES
    ]
    assert not wrong, "\n".join(wrong)


def test_the_rules_cover_every_package() -> None:
    """A new package must be placed in a layer (or be the composition root's)."""
    roots = {"herd.http", "herd.data"}  # the composition root; package data
    packages = {f"herd.{p.name}" for p in HERD.iterdir() if (p / "__init__.py").exists()}
    packages |= {f"herd.{p.name}" for p in HERD.iterdir() if p.is_dir() and p.name == "data"}
    assert packages - roots <= set(ALLOWED_HERD), packages - roots - set(ALLOWED_HERD)


def test_the_checker_sees_a_wrong_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom herd.http import app\nfrom herd import server\n")
    assert [target for _, target in imports(bad)] == ["os", "herd.http", "herd.server"]
