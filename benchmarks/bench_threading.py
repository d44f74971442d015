"""asv benchmarks of the shared machine (issue 12, item 2): the exact engine and the demo with
two busy background processes on the cores, beside the same call with one BLAS thread.

The target: each public call within 1.5x of its one-BLAS-thread time while the machine is
busy (OpenBLAS's default threads made ``demo`` 10x and a map 15-30x slower). ``time_*_public``
is what a user gets (the library's threading policy, fastsgdstab/_threads.py); ``*_one_thread``
the reference, under ``threadpoolctl.threadpool_limits(1)``; compare them in the same run.
``python benchmarks/run_threading.py`` prints the same comparison, and the policy's modes.
"""

import io
import subprocess
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

import fastsgdstab as fs
from fastsgdstab.cli import main as command_line

try:
    from baselines import QUICK
except ImportError:  # asv imports benchmark modules as a package
    from .baselines import QUICK

BUSY_PROCESSES = 2
MAP_GRID = (np.linspace(0.01, 1.0, 12 if QUICK else 100), np.linspace(1, 64, 8 if QUICK else 64))


def _family(n, d, seed=0):
    family = fs.HessianFamily.from_features(np.random.default_rng(seed).standard_normal((n, d)))
    family._reduced
    return family


def _busy():
    processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                 for _ in range(BUSY_PROCESSES)]
    time.sleep(0.3)
    return processes


def _stop(processes):
    for process in processes:
        process.kill()
        process.wait()


class SharedMachine:
    number = 1
    repeat = 3
    timeout = 900

    def setup(self):
        self.small = _family(1000, 50)  # the README's family
        fs.critical_lr(self.small, 32)
        if not QUICK:  # quick mode: one process per method, the kernels from the disk cache
            fs.stability_map(self.small, [0.1, 0.2], [1.0, 4.0])
            command_line(["demo"], out=io.StringIO())
        self.busy = _busy()

    def teardown(self):
        _stop(getattr(self, "busy", []))

    def time_critical_lr_1000x50_public(self):
        fs.critical_lr(self.small, 32)

    def time_critical_lr_1000x50_one_thread(self):
        with threadpool_limits(1, user_api="blas"):
            fs.critical_lr(self.small, 32)

    if not QUICK:  # quick mode keeps critical_lr only: the demo and the map, each beside busy
        # processes, cost about 40 s of the quick run's CPU and are not the targets
        def time_demo_public(self):
            command_line(["demo"], out=io.StringIO())

        def time_demo_one_thread(self):
            with threadpool_limits(1, user_api="blas"):
                command_line(["demo"], out=io.StringIO())

        def time_readme_map_public(self):
            fs.stability_map(self.small, *MAP_GRID)

        def time_readme_map_one_thread(self):
            with threadpool_limits(1, user_api="blas"):
                fs.stability_map(self.small, *MAP_GRID)


class SharedMachineLarge:
    """critical_lr at n = 5,000, d = 300 (the issue's size); not in quick mode (not defined)."""

    number = 1
    repeat = 3
    timeout = 900

    def setup(self):
        if QUICK:
            raise NotImplementedError("skipped in quick mode (FASTSGDSTAB_ASV_QUICK)")
        self.large = _family(5000, 300)
        fs.critical_lr(_family(20, 4), 2)
        self.busy = _busy()

    def teardown(self):
        _stop(getattr(self, "busy", []))

    def time_critical_lr_5000x300_public(self):
        fs.critical_lr(self.large, 32)

    def time_critical_lr_5000x300_one_thread(self):
        with threadpool_limits(1, user_api="blas"):
            fs.critical_lr(self.large, 32)


if QUICK:  # a class skipped in quick mode would still cost asv a process each method
    del SharedMachineLarge
