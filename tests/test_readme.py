"""The README is the front door: short, and every command it shows composes."""

from __future__ import annotations

import re
import shlex

import pytest
from conftest import compose_cfg

from fusionbench import ROOT

README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    block = README.split("## What you can type", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [
        line.split("#", 1)[0].strip() for line in block.splitlines() if line.startswith("python train.py")
    ]


def test_readme_stays_a_front_door():
    assert len(README.splitlines()) <= 250
    for link in re.findall(r"\]\(((?:docs|results)/[^)#]+)\)", README):
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"


def first_job(arg: str) -> str:
    """``key=a,b,c`` of a multirun sweep -> ``key=a`` (lists and mappings are values, not sweeps)."""
    key, sep, value = arg.partition("=")
    if sep and "," in value and not value.startswith(("[", "{")):
        return f"{key}={value.split(',')[0]}"
    return arg


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_composes(command):
    # placeholders such as <run> stand for a path the reader fills in
    args = [first_job(a.replace("<run>", "run")) for a in shlex.split(command)[2:] if a != "-m"]
    cfg = compose_cfg(args)
    assert cfg.fusion._target_ and cfg.dataset._target_
