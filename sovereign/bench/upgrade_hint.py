"""The line `serve` and `run` print when they start on the tiny default model: a better one this machine runs well.

The default is chosen to arrive in seconds and to answer, not to know things. The better model is
`sovereign fit`'s own choice: the biggest catalog model that fits in memory and generates at reading
speed or faster here. It runs as `python -m sovereign.bench.upgrade_hint MODEL...` in a child process:
finding the machine's GPUs loads llama.cpp, which the server's own process never does.
"""

from __future__ import annotations

import sys

from sovereign.bench import fit as fitting
from sovereign.catalog import Catalog
from sovereign.config import Settings
from sovereign.store import Store
from sovereign.store.files import human_bytes


def upgrade_hint(settings: Settings, store: Store, catalog: Catalog, served: list[str]) -> str | None:
    """The line, or None when the default is not being served or nothing bigger runs well here."""
    default = catalog.get(catalog.default)
    if default is None or str(catalog.default) not in served:
        return None
    budget, _ = fitting.machine_budget(settings.home)
    found, _ = fitting.candidates(catalog, store)
    best = fitting.recommend([fitting.assess(candidate, budget) for candidate in found])
    smallest = default.shape.params if default.shape else 0
    if best is None or best.candidate.name == str(catalog.default) or (best.candidate.params or 0) <= smallest:
        return None
    name = best.candidate.name
    speed = "on the GPU" if best.where == "GPU" else f"about {best.expected_tok_s:.0f} tokens/s here"
    return (
        f"{catalog.default} is tiny: it answers, but knows little. This machine runs {name} "
        f"({human_bytes(best.candidate.size)}, {speed}): sovereign pull {name}"
    )


def main(served: list[str]) -> int:
    """Print the hint for the models `served`, if there is one (run by `serve` and `run` in a child process)."""
    from sovereign.catalog import load_catalog

    settings = Settings.from_env()
    line = upgrade_hint(settings, Store(settings.home), load_catalog(settings), served)
    if line is not None:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
