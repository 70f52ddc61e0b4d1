"""The runtime a bundle can carry (`export --with-runtime`): wheels of sovereign and every dependency, and their fit.

`build_runtime` collects the wheels (pip, with every pin at the version running here) and the facts of the
interpreter and platform they are for; `runtime_mismatch` says, on the importing side, why they would not install.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path
from typing import Any

from sovereign.errors import BundleError
from sovereign.store.progress import PullReporter


def installed_version(dist: str) -> str:
    """The installed version of a distribution, or 'unknown'."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _tags() -> Any:
    try:
        from packaging import tags, utils
    except ImportError:  # pip always carries a copy
        from pip._vendor.packaging import tags, utils  # type: ignore[no-redef]
    return tags, utils


def runtime_facts() -> dict[str, Any]:
    """The interpreter and platform wheels are built for."""
    tags, _ = _tags()
    first = next(iter(tags.sys_tags()))
    return {
        "python": ".".join(map(str, sys.version_info[:3])),
        "implementation": sys.implementation.name,
        "python_tag": f"{tags.interpreter_name()}{tags.interpreter_version()}",
        "abi": first.abi,
        "platform": sysconfig.get_platform(),
        "platform_tag": first.platform,
    }


def _requirement_closure(root: str) -> dict[str, str]:
    """Every installed distribution `root` needs (markers evaluated, no extras), pinned to its installed version."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[assignment]
    pins: dict[str, str] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise BundleError(
                f"{name}, which sovereign needs, is not installed", "install sovereign fully before --with-runtime"
            ) from None
        key = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if key in pins:
            continue
        pins[key] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return pins


def _project_dir() -> Path:
    """The source folder of this sovereign (an editable or file:// install), to build its wheel from."""
    try:
        text = metadata.distribution("sovereign").read_text("direct_url.json")
        url = json.loads(text or "{}").get("url", "")
    except metadata.PackageNotFoundError:
        url = ""
    candidates = [Path(url.removeprefix("file://"))] if url.startswith("file://") else []
    candidates.append(Path(__file__).resolve().parents[2])
    for folder in candidates:
        if (folder / "pyproject.toml").is_file() and (folder / "sovereign").is_dir():
            return folder
    raise BundleError(
        "cannot find sovereign's source folder to build its wheel",
        "run export --with-runtime from a checkout (pip install -e .)",
    )


def _pip(args: list[str], reporter: PullReporter) -> None:
    reporter.status("pip " + " ".join(args[:2]) + " …")
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BundleError(
            f"pip {args[0]} failed: {last}",
            "check the package index (or pip's cache) is reachable, or export without --with-runtime",
        )


def build_runtime(folder: Path, reporter: PullReporter) -> dict[str, Any]:
    """Wheels of sovereign and every dependency into folder.

    llama-cpp-python comes from pip's wheel cache when it was built here.
    """
    project = _project_dir()
    _pip(["wheel", "--no-deps", "--quiet", "-w", str(folder), str(project)], reporter)
    pins = {k: v for k, v in _requirement_closure("sovereign").items() if k != "sovereign"}
    requirements = folder / "requirements.txt"
    requirements.write_text("".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
    # --no-deps with every pin: exactly the versions running here; a locally built wheel (llama-cpp-python)
    # is a cache hit.
    _pip(["wheel", "--no-deps", "--quiet", "-w", str(folder), "-r", str(requirements)], reporter)
    requirements.unlink()
    wheels = sorted(p.name for p in folder.glob("*.whl"))
    return {
        **runtime_facts(),
        "sovereign": installed_version("sovereign"),
        "llama_cpp_python": installed_version("llama-cpp-python"),
        "requirements": pins,
        "wheels": wheels,
    }


def runtime_mismatch(runtime: dict[str, Any], wheels: list[str]) -> str | None:
    """Why the bundle's wheels cannot install here (None when every wheel fits this interpreter and platform)."""
    tags, utils = _tags()
    here = set(tags.sys_tags())
    misfits = []
    for wheel in wheels:
        try:
            _, _, _, wheel_tags = utils.parse_wheel_filename(wheel)
        except Exception:  # noqa: BLE001 - an odd name is simply not installable
            misfits.append(wheel)
            continue
        if not here & set(wheel_tags):
            misfits.append(wheel)
    if not misfits:
        return None
    mine = runtime_facts()
    return (
        f"the runtime in this bundle is for Python {runtime.get('python', '?')} "
        f"({runtime.get('abi', '?')}, {runtime.get('platform_tag', '?')}); "
        f"this machine runs Python {mine['python']} ({mine['abi']}, {mine['platform_tag']}): "
        "its wheels were not used, only the models were imported"
    )
