"""Dask targets of issue 13, measured side by side in one run, and printed.

    python benchmarks/run_distributed.py [--repeats 3] [--steps 20000] [--runs 1024]
                                         [--families 200] [--settings 20] [--skip-simulate]

1. simulate, n = 1,000 rank-1 samples, d = 64, Bernoulli B = 32, 1,024 runs x 20,000 steps:
   on a 2-worker LocalCluster (1 thread each, processes) against this process with 2 Numba
   threads (the same 2 cores); median wall time over repeats, alternating local and cluster,
   after a warm-up call on each that compiles (or loads) the kernels. Prints the throughput
   ratio (cluster / local; the target is >= 0.8) and checks that the bits are the same.
2. sweep of 200 families x 20 settings (exact answers: verdict, radius bracket, critical lr,
   critical batch size) on the cluster with the live progress bar: rows per second.
3. the same sweep with one worker killed (SIGKILL) as soon as it runs a task: the final table
   must equal the undisturbed one; prints how many tasks the dead worker held and the extra
   wall time (its nanny starts a new worker process meanwhile).

Timing on a machine shared with other work is noisy: quote ratios measured in the same run.
"""

import argparse
import os
import signal
import statistics
import sys
import threading
import time
import warnings

import numba
import numpy as np

import fastsgdstab as fs
from fastsgdstab import _distributed
from fastsgdstab._config import SWEEP_SETTINGS_PER_TASK
from fastsgdstab._sweep import sweep

N, D, BATCH = 1000, 64, 32


def simulate_target(client, args):
    rng = np.random.default_rng(0)
    scales = 1.0 / np.sqrt(np.arange(1, D + 1))
    family = fs.HessianFamily.from_features(rng.standard_normal((N, D)) * scales)
    lr = 1.0 / family.sharpness()
    numba.set_num_threads(2)
    print(f"simulate: n={N} d={D} B={BATCH} runs={args.runs} steps={args.steps} lr={lr:.4g}; "
          f"local: {numba.get_num_threads()} Numba threads; cluster: 2 workers x 1 thread")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fs.SimulationWarning)
        fs.simulate(family, lr, BATCH, 2, 4, progress=False)  # compile / load: not timed
        _distributed.simulate(client, family, lr, BATCH, 2, 4, progress=False)
        local_times, cluster_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            local = fs.simulate(family, lr, BATCH, args.steps, args.runs, seed=1, progress=False)
            local_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            remote = _distributed.simulate(client, family, lr, BATCH, args.steps, args.runs, seed=1,
                                           progress=False)
            cluster_times.append(time.perf_counter() - start)
            same = (np.array_equal(local.log_sq_norm, remote.log_sq_norm)
                    and np.array_equal(local.first_diverged_step, remote.first_diverged_step))
            print(f"  local {local_times[-1]:.2f} s, cluster {cluster_times[-1]:.2f} s, "
                  f"same bits: {same}", flush=True)
            assert same
    run_steps = args.runs * args.steps
    local_median, cluster_median = statistics.median(local_times), statistics.median(cluster_times)
    print(f"  median: local {local_median:.2f} s ({run_steps / local_median:.3g} run-steps/s), "
          f"cluster {cluster_median:.2f} s ({run_steps / cluster_median:.3g} run-steps/s); "
          f"throughput ratio cluster/local = {local_median / cluster_median:.2f} (target >= 0.80)")


def sweep_inputs(count, settings_count):
    rng = np.random.default_rng(1)
    families = {f"family{i:03d}": fs.HessianFamily.from_features(
        rng.standard_normal((100, 16)) * (1.0 + rng.random(16))) for i in range(count)}
    lrs = np.geomspace(0.01, 0.5, max(1, settings_count // 4))
    batch_sizes = [1, 4, 16, 64][: max(1, min(4, settings_count))]
    return families, {"lr": lrs.tolist(), "batch_size": batch_sizes}


def sweep_target(client, args):
    families, settings = sweep_inputs(args.families, args.settings)
    rows = len(families) * len(settings["lr"]) * len(settings["batch_size"])
    print(f"sweep: {len(families)} families (n=100, d=16) x {rows // len(families)} settings = "
          f"{rows} rows on the cluster")
    start = time.perf_counter()
    table = sweep(families, settings, client=client, progress=True)
    elapsed = time.perf_counter() - start
    print(f"  {elapsed:.1f} s, {rows / elapsed:.1f} rows/s, {int((table['error'] != '').sum())} "
          f"failed rows", flush=True)

    pids = client.run(os.getpid)
    held = []
    stop = threading.Event()

    def kill_a_busy_worker():
        while not stop.is_set():
            for address, keys in client.processing().items():
                if any("task_rows" in str(key) for key in keys) and address in pids:
                    held.append(len(keys))
                    os.kill(pids[address], signal.SIGKILL)
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
    start = time.perf_counter()
    killer.start()
    again = sweep(families, settings, client=client, progress=True)
    stop.set()
    killer.join()
    killed_elapsed = time.perf_counter() - start
    per_family = rows // len(families)
    tasks = len(families) * -(-per_family // SWEEP_SETTINGS_PER_TASK)
    print(f"  with one worker killed: {killed_elapsed:.1f} s (+{killed_elapsed - elapsed:.1f} s; "
          f"one task takes about {2 * elapsed / tasks:.2f} s on one of 2 workers); the dead "
          f"worker held {held[0] if held else 'no'} task(s) when killed; same table: "
          f"{again.equals(table)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=1024)
    parser.add_argument("--families", type=int, default=200)
    parser.add_argument("--settings", type=int, default=20)
    parser.add_argument("--skip-simulate", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    print(f"cores: {len(os.sched_getaffinity(0))}; load average {os.getloadavg()[0]:.1f} "
          f"(1 min) at start")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster, Client(cluster) as client:
        if not args.skip_simulate:
            simulate_target(client, args)
            print(f"(numba threading layer: {numba.threading_layer()})")
        if not args.skip_sweep:
            sweep_target(client, args)
    print(f"load average {os.getloadavg()[0]:.1f} (1 min) at the end")


if __name__ == "__main__":
    sys.exit(main())
