"""Helpers shared by the benchmarks: peak private memory of a process tree, timed commands."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import psutil


def private_mb(pid: int, exclude: tuple[str, ...]) -> float:
    """Private (USS) memory of a process in MiB, leaving out mappings of `exclude` paths."""
    total, skip = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                first = line.split(None, 1)[0]
                if "-" in first and not first.endswith(":"):  # a mapping header line
                    path = line.split()[-1] if len(line.split()) >= 6 else ""
                    skip = path.startswith(exclude)
                elif not skip and first in ("Private_Clean:", "Private_Dirty:"):
                    total += int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0.0
    return total / 1024


class PeakMemory(threading.Thread):
    """Polls a process tree; keeps the peak private memory of each process."""

    def __init__(self, root: int, exclude: tuple[str, ...], every: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.exclude, self.every = root, exclude, every
        self.peak: dict[int, tuple[float, str]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                procs = [psutil.Process(self.root)] + psutil.Process(self.root).children(recursive=True)
            except psutil.NoSuchProcess:
                break
            for p in procs:
                mb = private_mb(p.pid, self.exclude)
                try:
                    cmd = p.cmdline()
                    name = "python -c (plain)" if cmd[1:2] == ["-c"] else " ".join(cmd[:2])[-50:]
                except psutil.Error:
                    name = "?"
                if mb > self.peak.get(p.pid, (0, ""))[0]:
                    self.peak[p.pid] = (mb, name)
            self.stop.wait(self.every)

    def largest(self) -> tuple[float, str]:
        return max(self.peak.values(), default=(0.0, "-"))


def timed_tree(cmd: list[str], exclude: tuple[str, ...]) -> tuple[float, float, str, int]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    mon = PeakMemory(proc.pid, exclude)
    mon.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    mon.stop.set()
    mon.join()
    if proc.returncode:
        sys.exit(f"{cmd[:3]} failed ({proc.returncode}):\n{err[-3000:]}")
    mb, name = mon.largest()
    return wall, mb, name, len(mon.peak)
