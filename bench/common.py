"""What every benchmark shares: timing a repeatable job, reading a process's memory, and writing a result.

A result is ``bench/results/NAME.json`` with at least ``name``, ``ratio``, ``target``, ``met`` and ``command``:
the ratio of two figures measured in the same run (machines here are shared and noisy, so only ratios compare),
the target it is held to, whether it met it, and the command that re-runs it.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


def best_of(job: Callable[[], Any], repeats: int = 3) -> float:
    """The fastest of ``repeats`` runs of ``job``, in seconds (the least disturbed by other work on the machine)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        job()
        times.append(time.perf_counter() - started)
    return min(times)


def training_steps(optimizer, loss: Callable[[], Any], n: int = 5) -> None:
    """``n`` gradient steps: zero the gradients, ``loss().backward()``, step (what a training-step benchmark times)."""
    for _ in range(n):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()


def memory_mb(pid: int | None = None) -> dict[str, float]:
    """/proc/PID/status in MB: VmRSS (resident) and its parts, RssAnon (the process's own heap: what a leak grows),
    RssShmem (shared memory, e.g. Ray's object store pages) and RssFile (mapped files); {} for a process that has
    gone."""
    try:
        lines = Path(f"/proc/{pid or os.getpid()}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return {line.split(":", 1)[0]: int(line.split()[1]) / 1024 for line in lines
            if line.split(":", 1)[0] in ("VmRSS", "RssAnon", "RssShmem", "RssFile")}


def our_processes(title: bytes) -> dict[int, str]:
    """Processes whose title starts with ``title`` (Ray titles an actor's process ``ray::CLASS`` and, while it runs
    a call, ``ray::CLASS.METHOD``) descended from this process: the Ray it started, never another run's or a test's
    on the same machine -> their titles."""
    parent, titles = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (entry / "cmdline").read_bytes()
                if cmdline.startswith(title):
                    titles[int(entry.name)] = cmdline.split(b"\0")[0].decode(errors="replace")
            except (FileNotFoundError, PermissionError, ProcessLookupError, IndexError, ValueError):
                continue

    def ours(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return {pid: name for pid, name in titles.items() if ours(pid)}


def machine() -> dict[str, Any]:
    import torch

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None}


def write_result(name: str, ratio: float | None, target: float | None, met: bool | None,
                 args: list[str] | None = None, **details: Any) -> dict:
    """Write ``bench/results/NAME.json`` (and return it). ``met`` is the caller's verdict, since a target may be a
    floor or a ceiling; the command is this process's own, with ``args`` for its arguments where the ones it ran
    with would not remake the result."""
    args = sys.argv[1:] if args is None else args
    result = {"name": name, "ratio": ratio, "target": target, "met": met,
              "command": "PYTHONPATH=. .venv/bin/python " + " ".join([os.path.relpath(sys.argv[0]), *args]),
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), **details}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    verdict = "no target" if met is None else ("met" if met else "NOT met")
    print(f"{name}: ratio {ratio if ratio is None else round(ratio, 3)} (target {target}: {verdict})")
    return result


def write_section(name: str, script: str, lines: list[str]) -> None:
    """``lines`` as the section NAME of bench/RESULTS.md, between markers naming ``script`` (which rewrites it on
    every run); appended at the end the first time."""
    begin, end = f"<!-- {name}: written by {script} -->", f"<!-- end of {name} -->"
    path = Path(__file__).resolve().parent / "RESULTS.md"
    text, block = path.read_text(), "\n".join([begin, *lines, end])
    text = text[:text.index(begin)] + block + text[text.index(end) + len(end):] if begin in text else \
        text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
