"""docs/quickstart.md cannot go stale: its commands run, on the synthetic ``smoke`` setting, and print what it shows.

The page's convention (stated in a comment at its top): every fenced ``bash`` block is a step the test runs, in
order, in one temporary folder, with ``bash -euo pipefail``; ``bash slow`` blocks run only in the slow test (the
demo, Flower, the plug-in's install). A ``text`` block after a step shows its output, shortened with ``…``; the
comment ``<!-- check: "…" '…' -->`` after it names key lines (in double or single quotes): each must appear in the
shown output and in the real one. Blocks of other languages (``sh``: the install, which needs the network) are
shown, never run.

Before a block runs, :func:`substitute` replaces the page's settings by the synthetic ``smoke`` preset (4 clients,
2 rounds, 1 local epoch), mechanically:

* ``--preset demo`` and ``--preset quick-fmnist`` become ``--preset smoke``, ``--quick`` gets ``--preset smoke``;
  ``preset = "…"`` in a grid file and ``"preset": "…"`` in Python likewise;
* ``pip install -e DIR`` becomes ``pip install --no-deps --no-build-isolation --no-index --target SITE DIR``
  (no network, nothing installed in the test's Python; ``SITE`` is on ``PYTHONPATH``).

``spmc``, ``python`` and ``pip`` are this Python's (small scripts first on ``PATH``), with ``src/`` on
``PYTHONPATH``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "quickstart.md"
PRESETS = r"(?:demo|quick-fmnist)"
#: (pattern, replacement) of the mechanical substitution, in order.
SUBSTITUTIONS: tuple[tuple[str, str], ...] = (
    (r"spmc demo --quick\b", "spmc demo --quick --preset smoke"),
    (rf"--preset {PRESETS}\b", "--preset smoke"),
    (rf'\bpreset = "{PRESETS}"', 'preset = "smoke"'),
    (rf'"preset": "{PRESETS}"', '"preset": "smoke"'),
    (r"\bpip install -e ", 'pip install --no-deps --no-build-isolation --no-index --target "$QS_SITE" '),
)


@dataclass
class Step:
    """A ``bash`` block of the page, its tags (``slow``), the ``text`` block shown after it and its checks."""

    script: str
    tags: tuple[str, ...]
    shown: str
    checks: tuple[str, ...]
    line: int


def substitute(script: str) -> str:
    """The page's command with the smoke setting (:data:`SUBSTITUTIONS`)."""
    for pattern, replacement in SUBSTITUTIONS:
        script = re.sub(pattern, replacement, script)
    return script


def steps(text: str) -> list[Step]:
    """The page's ``bash`` blocks in order, each with the output block and checks that follow it."""
    fence = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)
    blocks = list(fence.finditer(text))
    out: list[Step] = []
    for i, m in enumerate(blocks):
        if m.group(1) != "bash":
            continue
        shown, checks = "", ()
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        if nxt is not None and nxt.group(1) == "text" and not text[m.end() : nxt.start()].strip():
            shown = nxt.group(3)
            after = text[nxt.end() :].lstrip()
            comment = re.match(r"<!-- check: (.*?)-->", after, re.S)
            if comment:
                checks = tuple(a or b for a, b in re.findall(r'"([^"]+)"|\'([^\']+)\'', comment.group(1)))
        out.append(Step(m.group(3), tuple(m.group(2).split()), shown, checks, text.count("\n", 0, m.start()) + 1))
    return out


def _shims(folder: Path) -> Path:
    """``spmc``, ``python``, ``pip`` for this Python, in ``folder``."""
    folder.mkdir()
    for name, target in (("spmc", "-m spmc"), ("python", ""), ("python3", ""), ("pip", "-m pip")):
        path = folder / name
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" {target} "$@"\n')
        path.chmod(0o755)
    return folder


def run_page(work: Path, slow: bool, smoke: bool = True) -> list[tuple[Step, str]]:
    """Run the page's steps (the slow ones only if ``slow``) in ``work``; each step's output. A step that fails
    fails the test with its output."""
    site = work / "_site"
    site.mkdir(parents=True)
    env = {
        **os.environ,
        "PATH": f"{_shims(work / '_bin')}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(site)]),
        "QS_SITE": str(site),
        "COLUMNS": "120",
        "OMP_NUM_THREADS": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    results = []
    for step in steps(PAGE.read_text(encoding="utf-8")):
        if "slow" in step.tags and not slow:
            continue
        script = substitute(step.script) if smoke else step.script
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"docs/quickstart.md line {step.line}: exit {proc.returncode}\n{script}\n{output}"
        results.append((step, output))
    return results


def _check(results: list[tuple[Step, str]]) -> None:
    for step, output in results:
        flat = " ".join(output.split())
        for key in step.checks:
            assert key in step.shown, f"line {step.line}: {key!r} is not in the output the page shows"
            assert " ".join(key.split()) in flat, f"line {step.line}: {key!r} not in the real output:\n{output}"


def test_the_page_follows_its_convention() -> None:
    all_steps = steps(PAGE.read_text(encoding="utf-8"))
    assert len(all_steps) >= 8
    assert all(step.checks for step in all_steps), [s.line for s in all_steps if not s.checks]
    assert substitute("spmc demo --quick") == "spmc demo --quick --preset smoke"
    assert substitute('spmc run --preset demo\npreset = "quick-fmnist"') == (
        'spmc run --preset smoke\npreset = "smoke"'
    )
    assert substitute("spmc run --preset paper-fmnist") == "spmc run --preset paper-fmnist"  # only the named ones


def test_quickstart_commands_run_and_print_what_the_page_shows(tmp_path: Path) -> None:
    _check(run_page(tmp_path, slow=False))


@pytest.mark.slow
def test_quickstart_every_command_runs_and_prints_what_the_page_shows(tmp_path: Path) -> None:
    _check(run_page(tmp_path, slow=True))
