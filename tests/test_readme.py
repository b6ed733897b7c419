"""The README's registry example runs and its assertions hold."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_registry_example_runs() -> None:
    text = README.read_text()
    section = text[text.index("## The session registry") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    exec(compile(code.group(1), "README.md", "exec"), {})  # noqa: S102 - our own document


def test_quick_start_is_the_two_commands() -> None:
    text = README.read_text()
    quick = text[text.index("## Quick start") :]
    block = re.search(r"```\n(.*?)```", quick, re.S)
    assert block is not None and block.group(1).split("\n")[:2] == ["make demo", "make test"]
