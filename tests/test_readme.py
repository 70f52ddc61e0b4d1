"""The README's commands are what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVE = " && sovereign serve"


def test_ci_runs_the_readme_commands() -> None:
    blocks = re.findall(r"^```bash\n(.*?)^```$", (ROOT / "README.md").read_text(), flags=re.M | re.S)
    install, test = (block.strip() for block in blocks[:2])
    assert install.endswith(SERVE), "the main command ends in a running server"
    assert "pytest" in test
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    # CI runs the install literally up to the server, then the server under a readiness check, then the tests.
    setup = install[: -len(SERVE)]
    serve_check = ". .venv/bin/activate && python scripts/ci_serve_check.py sovereign serve"
    assert setup in ci_lines and serve_check in ci_lines and test in ci_lines
    assert ci_lines.index(setup) < ci_lines.index(serve_check) < ci_lines.index(test)
