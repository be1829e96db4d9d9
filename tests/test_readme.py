"""The README stays short and points to the quick start first; the Python API example (docs/usage.md) runs."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
USAGE = ROOT / "docs" / "usage.md"


def test_readme_is_short_with_the_two_commands_and_the_quick_start_linked_first() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 60
    commands = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert [line.split("#")[0].strip() for line in commands[0].splitlines()] == ["make demo", "make test"]
    links = re.findall(r"\]\(([^)#]+)\)", text)
    local = [link for link in links if not link.startswith("http")]
    assert local[0] == "docs/quickstart.md"
    for link in local:
        assert (ROOT / link).exists(), link


def test_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", USAGE.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "docs/usage.md has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "docs/usage.md", "exec"), namespace)  # noqa: S102
    assert namespace["result"].final.last_k == 2
    assert os.path.exists(tmp_path / "runs" / "api-example" / "summary.json")
