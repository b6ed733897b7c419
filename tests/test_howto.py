"""The how-to programs in docs/howto run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HOWTO = Path(__file__).resolve().parent.parent / "docs" / "howto"


@pytest.mark.parametrize("program", ["asyncio_server.py", "trio_server.py"])
def test_howto_program_selftest(program: str) -> None:
    result = subprocess.run(
        [sys.executable, str(HOWTO / program), "--selftest"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest ok" in result.stdout
