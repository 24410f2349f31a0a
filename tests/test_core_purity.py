"""The sans-I/O core imports no I/O machinery (DESIGN.md, Architecture).

Every module at the top of ``src/tether`` except the package's entry points and
the CLI is core: it must not import asyncio, socket, subprocess, selectors, ssl
or uvloop, nor reach them through ``tether.asyncio``.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BANNED = frozenset({"asyncio", "socket", "subprocess", "selectors", "ssl", "uvloop"})
NOT_CORE = frozenset({"__init__.py", "__main__.py", "cli.py", "cli_agent.py"})

_spec = importlib.util.find_spec("tether")  # finds the package without running it
assert _spec is not None and _spec.submodule_search_locations is not None
PACKAGE_DIR = Path(next(iter(_spec.submodule_search_locations)))
CORE_MODULES = sorted(p for p in PACKAGE_DIR.glob("*.py") if p.name not in NOT_CORE)


def banned_imports(source: str) -> list[str]:
    """Every import in ``source`` that reaches a banned module, as written."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in BANNED]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            # Absolute "from asyncio import x" and relative "from .asyncio import x"
            # (tether.asyncio, the I/O layer) both count.
            if module and module.split(".")[0] in BANNED:
                found.append("." * node.level + module)
            elif not module:  # "from . import asyncio"
                found += ["." * node.level + a.name for a in node.names if a.name in BANNED]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and node.args[0].value.lstrip(".").split(".")[0] in BANNED
        ):
            found.append(node.args[0].value)
    return found


def test_core_modules_are_found() -> None:
    names = {p.stem for p in CORE_MODULES}
    assert {"frames", "messages", "protocol", "limits", "exceptions", "addresses"} <= names
    assert {"pingwire", "tokens"} <= names
    assert not names & {"cli", "__init__", "__main__"}


@pytest.mark.parametrize("path", CORE_MODULES, ids=lambda p: p.name)
def test_core_module_imports_no_io(path: Path) -> None:
    assert banned_imports(path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    "source",
    [
        "import asyncio",
        "import asyncio.subprocess",
        "import os, socket",
        "import ssl as _ssl",
        "from subprocess import PIPE",
        "from selectors import DefaultSelector",
        "from .asyncio import server",
        "from .asyncio.client import connect",
        "from ..asyncio import x",
        "from . import asyncio",
        "def f():\n    import uvloop",
        "import importlib\nimportlib.import_module('socket')",
        "__import__('asyncio')",
    ],
)
def test_the_checker_catches_io_imports(source: str) -> None:
    assert banned_imports(source) != []


@pytest.mark.parametrize(
    "source",
    ["import json", "from .frames import Frame", "from . import limits", "import socketserver_x"],
)
def test_the_checker_allows_other_imports(source: str) -> None:
    assert banned_imports(source) == []


def test_importing_the_core_loads_no_io_module() -> None:
    # `import tether.frames` runs tether/__init__.py first, and that file
    # re-exports the asyncio client and server (the public API), so it does pull
    # in asyncio and socket. What must hold is that the core modules themselves
    # do not: load them under a bare stand-in for the package, which is what
    # another project vendoring the core (or a lazy __init__) would see.
    # The stdlib modules the core does use (json, struct, dataclasses, enum,
    # typing, secrets, pathlib) import none of the banned modules.
    code = textwrap.dedent(
        f"""
        import importlib, sys, types
        package = types.ModuleType("tether")
        package.__path__ = [{str(PACKAGE_DIR)!r}]
        sys.modules["tether"] = package
        for name in ("exceptions", "limits", "frames", "messages", "protocol",
                     "addresses", "pingwire", "tokens"):
            importlib.import_module("tether." + name)
        print(" ".join(sorted(m for m in {sorted(BANNED)!r} if m in sys.modules)))
        print(" ".join(sorted(m for m in sys.modules if m.startswith("tether"))))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    banned_line, tether_line = result.stdout.splitlines()
    assert banned_line == ""
    loaded = set(tether_line.split())
    assert "tether.protocol" in loaded
    assert not any(m.startswith("tether.asyncio") for m in loaded)
    assert "tether.cli" not in loaded


def test_a_command_that_moves_no_files_loads_no_agent_or_transfer_code() -> None:
    """A fresh ``tether exec`` is mostly imports (the performance issue): the
    package loads its parts on first use, so the client path leaves the agent,
    the transfer code, hashing and certificate generation unloaded."""
    probe = textwrap.dedent(
        """
        import sys
        import tether, tether.cli
        tether.connect, tether.run, tether.UsageError, tether.RemoteProcess
        print(" ".join(sorted(sys.modules)))
        """
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
        ).stdout.split()
    )
    assert "tether.asyncio.client" in loaded  # the probe did reach the client
    unwanted = {
        "tether.asyncio.server",
        "tether.asyncio.transfer",
        "tether.asyncio.fileio",
        "blake3",
        "cryptography",
        "secrets",
        "pathlib",  # with urllib.parse and ipaddress: 3-5 ms of every fresh exec
        "tether.cli_agent",  # serve and token: loaded only when one of them runs
    }
    assert loaded & unwanted == set()
