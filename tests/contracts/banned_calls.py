"""What code under modules/{layers,backbones,vaes,objectives,samplers} must not do (DESIGN.md,
Distributed): pick a device (``.cuda()``), talk to other processes (``torch.distributed``), read
the environment (``os.environ``, ``os.getenv``) or choose precision (``autocast``). Placement,
parallelism and precision are applied from outside the model (modules/parallel.py, the trainer).

The scan reads the syntax tree, so docstrings and comments that mention these names are fine.
A plugin can scan its own package: ``banned_calls([Path(my_plugin.__file__).parent])``.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable

BANNED_MODULES = ("torch.distributed",)
BANNED_ATTRIBUTES = ("os.environ", "os.getenv", "os.putenv")
BANNED_NAMES = ("autocast",)


def _dotted(node: ast.AST) -> str:
    """``torch.distributed.all_reduce`` for the Attribute chain, '' when it does not start at a Name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    return ".".join([node.id, *reversed(parts)])


def _violations(tree: ast.AST) -> Iterable[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "cuda":
            yield node.lineno, ".cuda() call"
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if any(dotted == m or dotted.startswith(m + ".") for m in BANNED_MODULES + BANNED_ATTRIBUTES):
                if not isinstance(getattr(node, "parent", None), ast.Attribute):
                    yield node.lineno, dotted
            if node.attr in BANNED_NAMES:
                yield node.lineno, f"{dotted or '...'} (autocast)"
        elif isinstance(node, ast.Name) and node.id in BANNED_NAMES:
            yield node.lineno, f"{node.id} (autocast)"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if any(alias.name == m or alias.name.startswith(m + ".") for m in BANNED_MODULES):
                    yield node.lineno, f"import {alias.name}"
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                banned = BANNED_MODULES + BANNED_ATTRIBUTES
                if any(node.module == m or node.module.startswith(m + ".") or full == m for m in banned) or (
                    alias.name in BANNED_NAMES
                ):
                    yield node.lineno, f"from {node.module} import {alias.name}"


def banned_calls(roots: Iterable[Path]) -> list[str]:
    """``"path:line: what"`` for every banned use in the .py files under ``roots`` (sorted)."""
    found = []
    for root in roots:
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for path in files:
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):  # let an Attribute know it is inside a longer chain
                for child in ast.iter_child_nodes(node):
                    child.parent = node  # type: ignore[attr-defined]
            found += [f"{path}:{line}: {what}" for line, what in sorted(set(_violations(tree)))]
    return found
