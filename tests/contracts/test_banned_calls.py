"""Code under modules/{layers,backbones,vaes,objectives,samplers} never picks a device, talks to
other processes, reads the environment or chooses precision (DESIGN.md, Distributed)."""

from __future__ import annotations

from pathlib import Path

from .banned_calls import banned_calls

REPO = Path(__file__).resolve().parents[2]
SCANNED = [REPO / "modules" / name for name in ("layers", "backbones", "vaes", "objectives", "samplers")]

VIOLATIONS = '''
"""Docstrings may say .cuda(), torch.distributed, os.environ and autocast freely."""
import os
import torch
import torch.distributed as dist  # 4
from torch.distributed import all_reduce  # 5
from os import getenv  # 6
from torch.amp import autocast  # 7


@torch.autocast("cuda")  # 10
def f(x):
    # a comment: x.cuda() os.environ
    y = x.cuda()  # 13
    torch.distributed.all_reduce(y)  # 14
    z = os.environ["HOME"]  # 15
    w = os.getenv("HOME")  # 16
    with torch.amp.autocast("cpu"):  # 17
        pass
    return torch.cuda.is_available()  # a query, not a .cuda() call
'''


def test_modules_make_no_banned_calls():
    assert all(path.is_dir() for path in SCANNED), SCANNED
    found = banned_calls(SCANNED)
    assert not found, "banned in modules/ (see DESIGN.md, Distributed):\n" + "\n".join(found)


def test_scanner_finds_each_banned_use_by_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(VIOLATIONS.lstrip("\n"))
    found = banned_calls([tmp_path])
    lines = sorted({int(f.split(":")[1]) for f in found})
    assert lines == [4, 5, 6, 7, 10, 13, 14, 15, 16, 17], found
    assert all(f.startswith(f"{bad}:") for f in found)
    assert any("import torch.distributed" in f for f in found) and any(".cuda() call" in f for f in found)
    assert sum(":14:" in f for f in found) == 1  # one report per attribute chain
