"""Measuring one piece: wall time, CPU time (process + children) and peak RSS of the process tree.

Every measured piece runs in a fresh Python process (``python -m benchmarks _piece ...``) so
that its memory peak is its own: the child prepares its inputs (not timed), then a sampling
thread records the resident memory of the child and all its descendants every 20 ms while the
piece runs. The child prints one JSON line, which the runner reads.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

MARK = "BENCHMARK-RESULT "


class TreeSampler:
    """Peak resident memory (bytes) of a process and its descendants, sampled in a thread."""

    #: samples between two searches for descendants (a search reads every process of the machine)
    CHILDREN_EVERY = 5

    def __init__(self, pid: int | None = None, interval: float = 0.02):
        self.proc = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.peak = 0
        self._children: list = []
        self._count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self, search: bool | None = None) -> int:
        """Resident bytes of the process and its descendants now; the descendants are searched for on
        every ``CHILDREN_EVERY``-th call (or when ``search``), the known ones read on every call. A
        search costs about 0.5 ms of Python holding the interpreter lock, which slows a measured piece
        that makes many short calls."""
        if search if search is not None else self._count % self.CHILDREN_EVERY == 0:
            try:
                self._children = self.proc.children(recursive=True)
            except psutil.Error:
                self._children = []
        self._count += 1
        total = 0
        for p in [self.proc, *self._children]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        self.peak = max(self.peak, total)
        return total

    def _loop(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self.baseline = self.sample()
        self.peak = self.baseline
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()
        return False


def cpu_seconds() -> float:
    """CPU time of this process and of its waited-for children (user + system)."""
    t = psutil.Process().cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def measure(run, state) -> dict:
    """Run ``run(state)`` once, timed and sampled; return the figures and ``run``'s extra output.

    ``run`` returns a dict of extra figures, or a function returning one: a function is called after
    the clock stops, so that counting what the result holds is not timed as part of the work.
    """
    with TreeSampler() as sampler:
        c0, t0 = cpu_seconds(), time.perf_counter()
        extra = run(state) or {}
        wall = time.perf_counter() - t0
        cpu = cpu_seconds() - c0
    if callable(extra):
        extra = extra() or {}
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_mb": sampler.peak / 2**20,
        "baseline_mb": sampler.baseline / 2**20,
        "extra": extra,
    }


def run_piece(case: str, impl: str, mode: str, threads: int, timeout: float = 3600.0) -> dict:
    """Run one piece in a fresh process and return its JSON record (``error`` set on failure)."""
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "NUMBA_NUM_THREADS": str(threads),
    })
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "benchmarks", "_piece", case, impl, "--mode", mode, "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=root)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)}


def machine() -> dict:
    """Cores, memory, CPU model and the load average at the time of the call."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": [round(v, 2) for v in load],
    }


def prefault_memory(fraction: float = 0.8, piece_gb: float = 1.0) -> dict:
    """Write once to ``fraction`` of the available memory, in pieces, then free it.

    On a virtual machine whose memory the host backs lazily, the first write to a guest page that was
    never used is much slower than later ones (host-side faults); which pages a measured piece gets
    is luck, so its fresh output buffers cost 0.01 s or 0.15 s per 64 MB from one process to the next.
    Writing the memory once before measuring gives every row, ours and the peers alike, pages
    that have been used. Returns the gigabytes written and the seconds it took.
    """
    import numpy as np

    target = fraction * psutil.virtual_memory().available
    piece = int(piece_gb * 2**30) // 8
    held = []
    t0 = time.perf_counter()
    done = 0
    while done + piece * 8 <= target:
        held.append(np.ones(piece))
        done += piece * 8
    del held
    return {"gb": round(done / 2**30, 1), "seconds": round(time.perf_counter() - t0, 1)}
