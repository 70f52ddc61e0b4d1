"""The README's commands are what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVE = " && sovereign serve"


def test_ci_runs_the_readme_commands() -> None:
    blocks = re.findall(r"^```bash\n(.*?)^```$", (ROOT / "README.md").read_text(), flags=re.M | re.S)
    install, test, lint = (block.strip() for block in blocks[:3])
    assert install.endswith(SERVE), "the main command ends in a running server"
    assert "pytest" in test
    assert "ruff check" in lint and "mypy" in lint
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    # CI runs the install literally up to the server, then the server under a readiness check, then the tests.
    setup = install[: -len(SERVE)]
    serve_check = ". .venv/bin/activate && python scripts/ci_serve_check.py sovereign serve"
    assert setup in ci_lines and serve_check in ci_lines and test in ci_lines and lint in ci_lines
    # The lint gate fails CI before the (much longer) tests start.
    assert ci_lines.index(setup) < ci_lines.index(serve_check) < ci_lines.index(lint) < ci_lines.index(test)
