"""Prove llama.cpp's fast CPU kernels once per (llama.cpp build, CPU), in a child process, before serving with them.

Some CPUs refuse instructions they advertise: on certain Intel Xeon VMs with AMX, llama.cpp's AMX
kernels (reached through its "extra buffer types", which repack the weights for them) die with
SIGILL on the first prompt. A child process that loads the model and decodes a prompt batch finds
that out without taking sovereign down; if it dies by a signal, models are loaded with the extra
buffer types off (llama-bench's `--repack 0`). The verdict is kept in
`$SOVEREIGN_HOME/kernels/<key>.json`, so the probe runs once per build and CPU.

This module keeps the verdicts, in the server's process; the child is `python -m
sovereign.engine.runtime.kernel_probe MODEL_PATH`, which exits 0 when the kernels ran.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sovereign.engine.process import signal_name
from sovereign.errors import SovereignError
from sovereign.machine import build_identity, cpuinfo

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 120.0  # seconds; a child still running then has proved nothing either way
LOCK_MARGIN = 30.0  # seconds beyond the probe's timeout to wait for another process's probe
OVERRIDES = ("auto", "on", "off")
EXIT_LOAD_FAILED = 3  # the child could not load the model at all: a fact about the file, not the kernels
# Signals by which a refused instruction or a kernel's bug kills a process. SIGKILL and SIGTERM come
# from outside (the OOM killer, a user) and prove nothing about the kernels.
CRASH_SIGNALS = frozenset({"SIGILL", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGABRT"})
# Test-only hook: the probe child kills itself with this signal (e.g. SIGILL) before loading anything,
# standing in for a CPU that refuses the kernels.
TEST_CRASH_ENV = "SOVEREIGN_TEST_PROBE_CRASH_SIGNAL"
# (/proc/cpuinfo flag, name), best first; a fallback is named by the next rung down.
_LADDER = (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"))
# Notes this process has logged already: the warning is said once, not at every model load.
_announced: set[str] = set()


@dataclass(frozen=True)
class KernelChoice:
    """How to load models on this CPU."""

    use_extra_bufts: bool
    note: str | None  # the one plain-words line about a fallback; None when all is well
    probed_seconds: float | None  # how long the probe took, when it ran in this call


@dataclass(frozen=True)
class Machine:
    """What a verdict holds for: one llama.cpp build on one CPU."""

    build: str
    cpu: str
    flags: frozenset[str]

    @property
    def key(self) -> str:
        """Sixteen hex digits naming this build and CPU."""
        text = f"{self.build}|{self.cpu}|{' '.join(sorted(self.flags))}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def instruction_sets(self) -> tuple[str | None, str | None]:
        """The best instruction set this CPU has (AMX, AVX-512, ...) and the one below it."""
        names = [name for _, name in _LADDER]
        for flag, name in _LADDER:
            if flag in self.flags:
                index = names.index(name)
                return name, names[index + 1] if index + 1 < len(names) else None
        return None, None


@dataclass(frozen=True)
class Verdict:
    """A probe's stored outcome."""

    fast_ok: bool
    signal: str | None  # the signal that killed the child, e.g. "SIGILL"
    instruction_set: str | None
    fallback: str | None
    build: str
    cpu: str
    model: str
    seconds: float
    checked_at: float

    def note(self) -> str | None:
        """The plain-words line for a fallback, or None when the fast kernels ran."""
        if self.fast_ok:
            return None
        if self.instruction_set and self.fallback:
            return f"{self.instruction_set} kernels crash on this machine; using {self.fallback} kernels instead"
        return "llama.cpp's fast CPU kernels crash on this machine; using its safe kernels instead"

    def status(self) -> str:
        """A few words for the hardware report."""
        if self.fast_ok:
            return "fast (verified)"
        name = self.instruction_set or "llama.cpp's fast"
        return f"safe: {name} kernels crashed ({self.signal}) on this machine"


@dataclass(frozen=True)
class ProbeOutcome:
    """How a probe child ended."""

    returncode: int | None  # None: it ran past the timeout and was killed
    seconds: float
    stderr_tail: str

    @property
    def signal(self) -> str | None:
        """The name of the signal that killed the child, if one did."""
        if self.returncode is None or self.returncode >= 0:
            return None
        return signal_name(self.returncode)


def kernel_choice(
    home: Path, model_path: Path, override: str = "auto", *, timeout: float = PROBE_TIMEOUT
) -> KernelChoice:
    """Whether to load with llama.cpp's extra buffer types: as proven once for this build and CPU, or as overridden."""
    check_override(override)
    if override != "auto":
        return KernelChoice(use_extra_bufts=override == "on", note=None, probed_seconds=None)
    machine = current_machine()
    path = verdict_path(home, machine)
    if (verdict := read_verdict(path)) is not None:
        return _announce(KernelChoice(verdict.fast_ok, verdict.note(), None))
    return _announce(_probe_locked(path, machine, model_path, timeout))


def record_crash(home: Path, signal_name: str, model_path: Path, override: str = "auto") -> KernelChoice | None:
    """A model's process died by SIGILL while serving with the fast kernels: remember them as unsafe here.

    The probe proves the kernels its model used; a model of other quantization types may reach
    repacked kernels it never ran. The next load of any model then takes the safe kernels.
    """
    if signal_name != "SIGILL" or override != "auto":
        return None
    machine = current_machine()
    path = verdict_path(home, machine)
    previous = read_verdict(path)
    if previous is not None and not previous.fast_ok:
        return None
    best, fallback = machine.instruction_sets
    verdict = Verdict(
        fast_ok=False,
        signal=signal_name,
        instruction_set=best,
        fallback=fallback,
        build=machine.build,
        cpu=machine.cpu,
        model=model_path.name,
        seconds=0.0,
        checked_at=time.time(),
    )
    write_verdict(path, verdict)
    return _announce(KernelChoice(False, verdict.note(), None))


def kernel_status(home: Path, override: str = "auto") -> str:
    """The kernels verdict in a few words.

    "fast (verified)", "safe: AMX kernels crashed (SIGILL) on this machine", "not yet probed".
    """
    check_override(override)
    if override == "on":
        return "fast (SOVEREIGN_EXTRA_BUFFERS=on)"
    if override == "off":
        return "safe (SOVEREIGN_EXTRA_BUFFERS=off)"
    verdict = read_verdict(verdict_path(home, current_machine()))
    return verdict.status() if verdict else "not yet probed"


def check_override(override: str) -> None:
    """Refuse a SOVEREIGN_EXTRA_BUFFERS value other than auto, on or off."""
    if override not in OVERRIDES:
        raise SovereignError(
            f"SOVEREIGN_EXTRA_BUFFERS={override!r} is not one of auto, on, off", "unset it, or set it to auto"
        )


def _announce(choice: KernelChoice) -> KernelChoice:
    if choice.note and choice.note not in _announced:
        _announced.add(choice.note)
        log.warning(choice.note)
    return choice


def _probe_locked(path: Path, machine: Machine, model_path: Path, timeout: float) -> KernelChoice:
    """Probe under a lock, so that two processes starting together run one probe between them."""
    import filelock

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(path.with_suffix(".lock")), timeout=timeout + LOCK_MARGIN)
        with lock:
            if (verdict := read_verdict(path)) is not None:  # another process probed while this one waited
                return KernelChoice(verdict.fast_ok, verdict.note(), None)
            log.info(
                "proving llama.cpp's CPU kernels on this machine with %s (once per llama.cpp build)", model_path.name
            )
            return _judge(run_probe(model_path, timeout), path, machine, model_path, timeout)
    except filelock.Timeout:
        return _inconclusive(f"another process held the probe lock for {timeout + LOCK_MARGIN:g} s", None)
    except OSError as exc:
        return _inconclusive(f"the probe could not run: {exc}", None)


def _judge(outcome: ProbeOutcome, path: Path, machine: Machine, model_path: Path, timeout: float) -> KernelChoice:
    """Turn a probe's ending into a choice, storing it when it proves something."""
    if outcome.returncode == EXIT_LOAD_FAILED:
        # The model itself does not load: the real load will say why; the kernels are judged another time.
        log.debug("kernel probe: %s did not load:\n%s", model_path.name, outcome.stderr_tail)
        return KernelChoice(True, None, outcome.seconds)
    if outcome.returncode != 0:
        log.debug("kernel probe output:\n%s", outcome.stderr_tail)
    crashed = outcome.signal in CRASH_SIGNALS
    if outcome.returncode != 0 and not crashed:
        if outcome.returncode is None:
            reason = f"the probe ran past {timeout:g} s"
        else:
            reason = f"the probe ended with {outcome.signal or f'exit status {outcome.returncode}'}"
        return _inconclusive(reason, outcome.seconds)
    best, fallback = machine.instruction_sets
    verdict = Verdict(
        fast_ok=not crashed,
        signal=outcome.signal,
        instruction_set=best,
        fallback=fallback,
        build=machine.build,
        cpu=machine.cpu,
        model=model_path.name,
        seconds=round(outcome.seconds, 3),
        checked_at=time.time(),
    )
    write_verdict(path, verdict)
    log.info("kernel probe: %s in %.1f s", verdict.status(), outcome.seconds)
    return KernelChoice(verdict.fast_ok, verdict.note(), outcome.seconds)


def _inconclusive(reason: str, seconds: float | None) -> KernelChoice:
    """Safe kernels for this run only: nothing is stored, so the next start probes again."""
    note = f"could not prove llama.cpp's fast CPU kernels on this machine ({reason}); using safe kernels for this run"
    return KernelChoice(False, note, seconds)


def run_probe(model_path: Path, timeout: float = PROBE_TIMEOUT) -> ProbeOutcome:
    """Run the probe child on a model and report how it ended."""
    command = [sys.executable, "-m", "sovereign.engine.runtime.kernel_probe", str(model_path)]
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        return ProbeOutcome(None, time.perf_counter() - started, _tail(exc.stderr))
    return ProbeOutcome(done.returncode, time.perf_counter() - started, _tail(done.stderr))


def _tail(data: bytes | None, limit: int = 4000) -> str:
    return (data or b"")[-limit:].decode("utf-8", "replace")


# --- the verdict on disk -------------------------------------------------------------------


def verdict_path(home: Path, machine: Machine) -> Path:
    """Where the verdict for this build and CPU is kept."""
    return home / "kernels" / f"{machine.key}.json"


def read_verdict(path: Path) -> Verdict | None:
    """The stored verdict, or None when there is none (or it cannot be read, which means probing again)."""
    try:
        data = json.loads(path.read_text())
        return Verdict(**{name: data[name] for name in Verdict.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_verdict(path: Path, verdict: Verdict) -> None:
    """Store a verdict (written whole, then renamed, so a reader never sees half of one)."""
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(asdict(verdict), indent=1) + "\n")
        os.replace(partial, path)
    except OSError as exc:
        # Not fatal: the choice still holds for this run; the next start probes again.
        log.warning("could not save the kernel verdict in %s: %s", path, exc)


# --- identity of the build and the CPU -----------------------------------------------------


def current_machine() -> Machine:
    """This process's llama.cpp build and CPU."""
    cpu, flags = _cpu()
    return Machine(build=build_identity(), cpu=cpu, flags=flags)


def _cpu() -> tuple[str, frozenset[str]]:
    """The CPU's name and flags, from the first processor in /proc/cpuinfo (or what platform knows)."""
    name, flags = "", ""
    for key, value in cpuinfo():
        if not name and key in ("model name", "Hardware", "cpu model", "Model"):
            name = value
        elif not flags and key in ("flags", "Features"):
            flags = value
    return name or platform.processor() or platform.machine(), frozenset(flags.split())
