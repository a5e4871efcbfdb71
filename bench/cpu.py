"""CPU accounting from Linux /proc: who kept the cores busy during a phase (this process, the
servers, the Postgres backends, everything else), and waiting for a quiet machine.

On a shared 2-core machine the share of "everything else" is what explains odd figures.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Sequence

TICK = os.sysconf("SC_CLK_TCK")


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])
    return total - idle, total


def process_jiffies(pid: int) -> int:
    """utime + stime of a process (all its threads); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return int(fields[11]) + int(fields[12])


class CpuMeter:
    """CPU seconds used during a ``with`` block by this process (``bench``), the processes
    ``server_pids`` (``servers``), and everything else on the machine (``others``). Used as
    ``async with``, it also counts the Postgres backends ``postgres_pids()`` lists at the start
    and the end (``postgres``)."""

    def __init__(self, server_pids: Sequence[int] = (),
                 postgres_pids: Callable[[], Awaitable[list[int]]] | None = None) -> None:
        self.server_pids = list(server_pids)
        self.postgres_pids = postgres_pids
        self.postgres = 0.0
        self._postgres0: dict[int, int] = {}

    def __enter__(self) -> CpuMeter:
        self.wall0 = time.perf_counter()
        self.machine0 = machine_jiffies()
        self.self0 = process_jiffies(os.getpid())
        self.servers0 = sum(process_jiffies(p) for p in self.server_pids)
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        busy1, total1 = machine_jiffies()
        self.busy = (busy1 - self.machine0[0]) / TICK
        self.capacity = (total1 - self.machine0[1]) / TICK
        self.bench = (process_jiffies(os.getpid()) - self.self0) / TICK
        self.servers = (sum(process_jiffies(p) for p in self.server_pids) - self.servers0) / TICK

    async def __aenter__(self) -> CpuMeter:
        if self.postgres_pids is not None:
            self._postgres0 = {p: process_jiffies(p) for p in await self.postgres_pids()}
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__()
        if self.postgres_pids is not None:
            pids = await self.postgres_pids()
            # a backend that appeared meanwhile (the pool grew) did all its work in the phase
            self.postgres = sum(max(0, process_jiffies(p) - self._postgres0.get(p, 0)) for p in pids) / TICK

    @property
    def others(self) -> float:
        return max(0.0, self.busy - self.bench - self.servers - self.postgres)

    @property
    def others_share(self) -> float:
        return self.others / self.capacity if self.capacity else 0.0

    def line(self) -> str:
        cores = self.capacity / self.wall if self.wall else float("nan")
        text = f"   cpu: wall {self.wall:.1f}s on {cores:.1f} cores; bench process {self.bench:.1f}s"
        if self.server_pids:
            text += f", server {self.servers:.1f}s"
        share = self.others_share
        warn = "  <-- the machine was shared; figures are pessimistic" if share > 0.1 else ""
        return text + f", other processes {self.others:.1f}s ({share:.0%} of the machine){warn}"

    def to_dict(self) -> dict[str, float]:
        """Cores used on average over the phase, by whom."""
        cores = self.wall or 1.0
        return {"wall_s": round(self.wall, 2), "gm_cores": round(self.servers / cores, 2),
                "postgres_cores": round(self.postgres / cores, 2), "bench_cores": round(self.bench / cores, 2),
                "other_cores": round(self.others / cores, 2),
                "idle_cores": round((self.capacity - self.busy) / cores, 2)}


class OtherLoad:
    """The cores every other process kept busy between two calls (None where /proc cannot
    be read). Anything well above 0 makes the figures noisy."""

    def __init__(self) -> None:
        self.mark = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            busy = machine_jiffies()[0]  # all but idle and iowait, steal included
        except (OSError, ValueError):
            return None
        return time.perf_counter(), busy / TICK, process_jiffies(os.getpid()) / TICK

    def cores(self) -> float | None:
        """Cores the other processes kept busy since the last call (None if unknown)."""
        now, before = self._read(), self.mark
        self.mark = now
        if now is None or before is None or now[0] <= before[0]:
            return None
        return max(0.0, (now[1] - before[1]) - (now[2] - before[2])) / (now[0] - before[0])

    def section(self) -> str:
        other = self.cores()
        return "" if other is None else f"(other processes kept {other:.2f} of {os.cpu_count()} cores busy meanwhile)"


class Quiet:
    """Waits before a measured phase until other processes use under ``threshold`` of the
    machine over ``window`` seconds, at most ``max_wait`` seconds a phase and ``budget``
    seconds in all: on a shared machine this keeps their bursts out of the phase. Its remark
    when it gives up goes to ``say``."""

    def __init__(self, budget: float, say: Callable[[str], None] = print) -> None:
        self.budget = budget
        self.say = say

    async def wait(self, max_wait: float, threshold: float = 0.15, window: float = 1.0) -> None:
        max_wait = min(max_wait, self.budget)
        if max_wait <= 0:
            return
        started = time.perf_counter()
        try:
            while True:
                with CpuMeter() as cpu:
                    await asyncio.sleep(window)
                if cpu.others_share < threshold:
                    return
                if time.perf_counter() - started >= max_wait:
                    self.say(f"   (the machine stayed busy: other processes at {cpu.others_share:.0%} after waiting "
                             f"{max_wait:.0f}s; measuring anyway)")
                    return
        finally:
            self.budget -= time.perf_counter() - started
