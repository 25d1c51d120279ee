"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_as_written(capsys):
    text = README.read_text()
    block = re.search(r"<!-- readme-example.*?-->\n```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 6
    exec(compile(block, "README.md", "exec"), {})
    rate = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= rate <= 1.0
