"""Dask execution (issue 13): the same answers on a LocalCluster as in this process.

One LocalCluster (2 worker processes, 1 thread each, no dashboard, loopback only) is started and
stopped by the module fixture. The references are the local calls, which have their own tests
against dense Kronecker operators (test_moments, test_phase, test_simulate): here equality is
the property. The test that kills a worker mid-sweep (a nanny restart, ~15 s) is marked slow.
simulate and figure1 must be bit-identical (per-run random streams keyed by the
global run index); a stability map equal to its certified bound (every value's proven bracket
overlaps the local one's, and the values differ by at most the two error bounds).
"""

import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from fastsgdstab import HessianFamily, SimulationWarning, simulate, stability_map  # noqa: E402
from fastsgdstab import _distributed  # noqa: E402
from fastsgdstab._sweep import sweep  # noqa: E402
from fastsgdstab.experiments import figure1  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # distributed's own notices (ports, memory limits)
        local_cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                                 dashboard_address=None, host="127.0.0.1")
    client = distributed.Client(local_cluster, set_as_default=False)
    yield local_cluster, client
    client.close()
    local_cluster.close()


@pytest.fixture(scope="module")
def client(cluster):
    return cluster[1]


@pytest.fixture(scope="module")
def family():
    rng = np.random.default_rng(13)
    return HessianFamily.from_features(rng.standard_normal((40, 6)) * np.linspace(1, 0.3, 6))


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationWarning)
        return function(*args, **kwargs)


def test_importing_and_local_calls_never_import_dask():
    code = (
        "import sys, numpy as np, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "import fastsgdstab\n"
        "from fastsgdstab import HessianFamily, simulate, stability_map\n"
        "from fastsgdstab._sweep import sweep\n"
        "family = HessianFamily.from_features(np.eye(3))\n"
        "simulate(family, 0.5, 1, 5, 4, progress=False)\n"
        "stability_map(family, [0.5], [1, 2])\n"
        "sweep([family], [dict(lr=0.5, batch_size=1)], simulate=dict(steps=5, runs=4), progress=False)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


@pytest.mark.parametrize("runs_per_task", [None, 1, 7, 33, 50])
def test_simulate_is_bit_identical(client, family, runs_per_task):
    lr = 0.9 / family.sharpness()
    kwargs = dict(seed=5, sampling="without_replacement", init="uniform", record_every=7)
    local = _quiet(simulate, family, lr, 3, 60, 50, progress=False, **kwargs)
    remote = _quiet(_distributed.simulate, client, family, lr, 3, 60, 50, progress=False,
                    runs_per_task=runs_per_task, **kwargs)
    np.testing.assert_array_equal(remote.log_sq_norm, local.log_sq_norm)
    np.testing.assert_array_equal(remote.recorded_steps, local.recorded_steps)
    np.testing.assert_array_equal(remote.first_diverged_step, local.first_diverged_step)
    assert remote.lyapunov_exponent == local.lyapunov_exponent
    assert remote.diverged_fraction_interval == local.diverged_fraction_interval
    assert (remote.runs, remote.steps, remote.seed, remote.init) == (50, 60, 5, "uniform")


def test_simulate_with_gradients_is_bit_identical(client):
    # the affine path (a family with per-sample gradients): blocks carry the loss sums
    rng = np.random.default_rng(4)
    features = rng.standard_normal((12, 3))
    gradients = rng.standard_normal((12, 3))
    gradients -= gradients.mean(axis=0)
    noisy = HessianFamily.from_features(features, gradients=gradients)
    kwargs = dict(seed=2, sampling="reshuffle", momentum=0.4, burn_in=30)
    local = _quiet(simulate, noisy, 0.05, 3, 120, 40, progress=False, **kwargs)
    remote = _quiet(_distributed.simulate, client, noisy, 0.05, 3, 120, 40, progress=False,
                    runs_per_task=7, **kwargs)
    np.testing.assert_array_equal(remote.log_sq_norm, local.log_sq_norm)
    assert remote.excess_loss == local.excess_loss > 0
    assert remote.excess_loss_stderr == local.excess_loss_stderr
    assert remote.burn_in == 30


def test_simulate_on_one_worker_with_two_threads_is_bit_identical(family):
    # Another worker count, and two tasks running kernels at once in one process: whatever
    # Numba's threading layer, parallel launches are serialised or safe (_kernels/_threading).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        threaded = distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                            dashboard_address=None)
    with threaded, distributed.Client(threaded, set_as_default=False) as local_client:
        lr = 0.5 / family.sharpness()
        local = _quiet(simulate, family, lr, 8, 200, 64, seed=9, progress=False)
        remote = _quiet(_distributed.simulate, local_client, family, lr, 8, 200, 64, seed=9,
                        runs_per_task=5, progress=False)
    np.testing.assert_array_equal(remote.log_sq_norm, local.log_sq_norm)
    np.testing.assert_array_equal(remote.first_diverged_step, local.first_diverged_step)


def test_simulate_rejects_what_simulate_rejects(client, family):
    with pytest.raises(ValueError, match="batch_size"):
        _distributed.simulate(client, family, 0.1, 41, 10, 10)
    with pytest.raises(TypeError, match="unexpected keyword|momentun"):
        _distributed.simulate(client, family, 0.1, 4, 10, 10, momentun=0.9)
    with pytest.raises(ValueError, match="runs_per_task"):
        _distributed.simulate(client, family, 0.1, 4, 10, 10, runs_per_task=0)
    with pytest.raises(TypeError, match="dask.distributed.Client"):
        _distributed.simulate("tcp://127.0.0.1:1", family, 0.1, 4, 10, 10)


def _assert_maps_agree(remote, local, critical_rtol=1e-9):
    np.testing.assert_array_equal(remote.lrs, local.lrs)
    np.testing.assert_array_equal(remote.batch_sizes, local.batch_sizes)
    # Each block finds the critical lrs through its own shared basis: equal to the engine's
    # tolerance, and (plain SGD) both proven brackets hold the value and overlap.
    np.testing.assert_allclose(remote.critical_lr, local.critical_lr, rtol=critical_rtol, atol=0)
    if local.critical_lr_lower is not None:
        for result in (remote, local):
            assert np.all(result.critical_lr_lower <= result.critical_lr)
            assert np.all(result.critical_lr <= result.critical_lr_upper)
        assert np.all(np.maximum(remote.critical_lr_lower, local.critical_lr_lower)
                      <= np.minimum(remote.critical_lr_upper, local.critical_lr_upper))
    # Both brackets are proven to hold the true radius: they must overlap, and the values can
    # differ by at most the two error bounds.
    assert np.all(np.maximum(remote.radius_lower, local.radius_lower)
                  <= np.minimum(remote.radius_upper, local.radius_upper))
    assert np.all(np.abs(remote.spectral_radius - local.spectral_radius)
                  <= remote.radius_error + local.radius_error)
    assert remote.sampling == local.sampling and remote.n == local.n


@pytest.mark.parametrize("split_by, tasks, sampling", [("auto", None, "bernoulli"),
                                                        ("batch_sizes", 3, "without_replacement"),
                                                        ("lrs", 2, "with_replacement")])
def test_stability_map_equals_the_local_map(client, family, split_by, tasks, sampling):
    lrs = np.array([1.5, 0.2, 0.9, 2.5, 0.05]) / family.sharpness()
    batch_sizes = [8, 1, 40, 3, 20]  # unsorted: the blocks are cut from the sorted grid
    local = stability_map(family, lrs, batch_sizes, sampling=sampling)
    remote = _distributed.stability_map(client, family, lrs, batch_sizes, sampling=sampling,
                                        split_by=split_by, tasks=tasks)
    _assert_maps_agree(remote, local)
    with pytest.raises(ValueError, match="split_by"):
        _distributed.stability_map(client, family, lrs, batch_sizes, split_by="rows")


def test_stability_map_with_momentum_equals_the_local_map(client, family):
    import inspect

    if "momentum" not in inspect.signature(stability_map).parameters:
        pytest.skip("stability_map has no momentum in this version")
    lrs = np.array([0.2, 0.9, 1.5]) / family.sharpness()
    local = stability_map(family, lrs, [1, 4, 40], momentum=0.5, nesterov=True)
    remote = _distributed.stability_map(client, family, lrs, [1, 4, 40], momentum=0.5,
                                        nesterov=True, tasks=2)
    # With momentum the map's critical lrs are roots found through a basis shared by its block
    # (no bracket is stored): equal to the engine's certification tolerance, not bit for bit;
    # 1e-9 is the library's decision margin (_config.DECISION_MARGIN).
    _assert_maps_agree(remote, local, critical_rtol=1e-9)
    assert (remote.momentum, remote.nesterov) == (0.5, True)


def test_figure1_is_bit_identical(client):
    grid = dict(sigmas=[1, 20, 50], batch_sizes=[1, 10, 49], runs=4, steps=100, seed=11)
    local = figure1([0.5, 0.8], ["bernoulli", "without_replacement"], progress=False, **grid)
    remote = _distributed.figure1(client, [0.5, 0.8], ["bernoulli", "without_replacement"],
                                  progress=False, **grid)
    for name in ("lr", "sampling", "batch_size", "sigma", "diverged_runs", "simulated_diverges",
                 "exact_diverges", "theorem1_diverges", "critical_lr"):
        np.testing.assert_array_equal(getattr(remote, name), getattr(local, name), err_msg=name)
    assert (remote.runs, remote.steps, remote.seed, remote.n) == (4, 100, 11, 100)
    with pytest.raises(ValueError, match="sigmas must not repeat"):
        _distributed.figure1(client, [0.5], ["bernoulli"], sigmas=[1, 1])


def test_tasks_run_with_one_numba_and_blas_thread_per_slot(client):
    def inside():
        import numba
        from threadpoolctl import threadpool_info

        return numba.get_num_threads(), [pool["num_threads"] for pool in threadpool_info()]

    slots = _distributed.task_slots(client)
    assert list(slots.values()) == [2, 2]  # two workers of one thread each, on one host
    futures = [client.submit(_distributed.run_task, slots, inside, pure=False) for _ in range(4)]
    cores = len(os.sched_getaffinity(0))
    expected = max(1, cores // 2)
    for future in futures:
        (numba_threads, blas_threads), _ = future.result()
        assert numba_threads == expected
        assert all(threads <= expected for threads in blas_threads)


def test_on_scheduler_runs_through_an_address(cluster, family):
    local_cluster, _ = cluster
    lrs, batch_sizes = [0.3 / family.sharpness(), 1.0 / family.sharpness()], [2, 10]
    remote = _distributed.on_scheduler(local_cluster.scheduler_address, _distributed.stability_map,
                                       family, lrs, batch_sizes)
    _assert_maps_agree(remote, stability_map(family, lrs, batch_sizes))


def test_connect_names_an_address_without_a_scheduler():
    import socket

    with socket.socket() as probe:  # a free port: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
        with _distributed.connect(f"tcp://127.0.0.1:{port}", timeout=1):
            pass
    with pytest.raises(ValueError, match="--scheduler"):
        with _distributed.connect(" "):
            pass


def _docs_example() -> str:
    """The python block of docs/cluster.md's section "A cluster on this machine"."""
    import pathlib

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "cluster.md").read_text()
    section = text.split("## A cluster on this machine", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_docs_local_cluster_example_runs(cluster, monkeypatch, capsys):
    import contextlib
    import inspect

    import fastsgdstab
    from fastsgdstab import _sweep

    local_cluster, _ = cluster

    def same_cluster(**kwargs):
        # The example's cluster is this module's (starting another costs seconds): the same
        # settings, checked.
        assert kwargs == dict(n_workers=2, threads_per_worker=1, processes=True,
                              dashboard_address=None, host="127.0.0.1")
        return contextlib.nullcontext(local_cluster)

    monkeypatch.setattr(distributed, "LocalCluster", same_cluster)
    # Until the package exports the hooks (client= on simulate and stability_map, sweep), the
    # example runs through this module's functions under the public names.
    for name, function in [("simulate", _distributed.simulate),
                           ("stability_map", _distributed.stability_map)]:
        public = getattr(fastsgdstab, name)
        if "client" not in inspect.signature(public).parameters:
            def hooked(*args, client=None, _public=public, _remote=function, **kwargs):
                if client is None:
                    return _public(*args, **kwargs)
                return _remote(client, *args, **kwargs)

            monkeypatch.setattr(fastsgdstab, name, hooked)
    if not hasattr(fastsgdstab, "sweep"):
        monkeypatch.setattr(fastsgdstab, "sweep", _sweep.sweep, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationWarning)
        exec(compile(_docs_example(), "docs/cluster.md", "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out
    assert "verdict" in printed and "diverged_fraction" in printed and "seed 3" in printed


def test_command_line_scheduler_option(cluster, tmp_path):
    from fastsgdstab import cli

    if "--scheduler" not in cli.build_parser()._subparsers._group_actions[0].choices[
            "reproduce"].format_help():
        pytest.skip("the command line has no --scheduler option yet (the lead's hook)")
    local_cluster, _ = cluster
    common = ["reproduce", "figure1", "--quick", "--no-plot", "--no-progress", "--runs", "2",
              "--steps", "20", "--lr", "0.5", "--sampling", "bernoulli"]
    assert cli.main(common + ["--out", str(tmp_path / "local")], out=open(os.devnull, "w")) == 0
    assert cli.main(common + ["--out", str(tmp_path / "cluster"), "--scheduler",
                              local_cluster.scheduler_address], out=open(os.devnull, "w")) == 0
    assert ((tmp_path / "cluster" / "figure1.csv").read_text()
            == (tmp_path / "local" / "figure1.csv").read_text())


def _families(count, n=30, d=5):
    rng = np.random.default_rng(7)
    return {f"f{i}": HessianFamily.from_features(rng.standard_normal((n, d)) * (1 + i / 4))
            for i in range(count)}


def _frames_equal(left, right):
    import pandas

    pandas.testing.assert_frame_equal(left, right, check_exact=True)


def test_sweep_on_the_cluster_equals_the_local_sweep(client):
    families = _families(3)
    settings = {"lr": [0.05, 0.4], "batch_size": [1, 8], "sampling": ["bernoulli", "with_replacement"]}
    simulate_kwargs = dict(steps=50, runs=20, seed=3)
    local = _quiet(sweep, families, settings, simulate=simulate_kwargs, progress=False)
    remote = _quiet(sweep, families, settings, simulate=simulate_kwargs, client=client,
                    progress=False)
    _frames_equal(remote, local)
    assert (local["error"] == "").all()


def test_sweep_keeps_every_other_row_when_a_task_and_a_row_fail(client, tmp_path):
    families = _families(2)
    families["missing"] = str(tmp_path / "no-such-family.npz")  # the whole task fails
    saved = tmp_path / "saved.npz"
    families["f0"].save(saved)
    families["saved"] = str(saved)  # read by the worker
    settings = [dict(lr=0.1, batch_size=4), dict(lr=0.1, batch_size=31)]  # 31 > n: the row fails
    with pytest.warns(RuntimeWarning, match="rows failed"):
        table = sweep(families, settings, client=client, progress=False)
    assert list(table["family"]) == ["f0", "f0", "f1", "f1", "missing", "missing", "saved", "saved"]
    errors = list(table["error"])
    assert errors[0] == errors[2] == errors[6] == ""
    assert all(errors[i].startswith("ValueError: batch_size must lie in [1, n] = [1, 30]")
               for i in (1, 3, 7))
    assert errors[4] == errors[5] and errors[4].startswith("FileNotFoundError")
    assert np.isnan(table["spectral_radius"][4]) and table["verdict"][4] == ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        local = sweep({"f0": families["f0"], "f1": families["f1"]}, settings, progress=False)
    for row, local_row in [(0, 0), (2, 2), (6, 0)]:
        assert table["spectral_radius"][row] == local["spectral_radius"][local_row]
        assert table["critical_lr"][row] == local["critical_lr"][local_row]


@pytest.mark.slow
def test_sweep_survives_a_worker_killed_midway(cluster):
    # Last in the module: it kills a worker process (its nanny starts a new one). Dask reruns
    # the tasks the dead worker held, and recomputes the shared families it held.
    local_cluster, client = cluster
    families = _families(8, n=200, d=12)
    settings = [dict(lr=0.3 / 1.5, batch_size=b) for b in (2, 16)]
    simulate_kwargs = dict(steps=3000, runs=64, seed=1)
    local = _quiet(sweep, families, settings, simulate=simulate_kwargs, progress=False)
    pids = client.run(os.getpid)
    killed = []
    stop = threading.Event()

    def kill_a_busy_worker():
        # As soon as a worker is running a sweep task, kill its process (SIGKILL: no goodbye).
        while not stop.is_set():
            for address, keys in client.processing().items():
                if any("task_rows" in str(key) for key in keys) and address in pids:
                    os.kill(pids[address], signal.SIGKILL)
                    killed.append(time.perf_counter())
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
    started = time.perf_counter()
    killer.start()
    try:
        remote = _quiet(sweep, families, settings, simulate=simulate_kwargs, client=client,
                        progress=False)
    finally:
        stop.set()
        killer.join()
    finished = time.perf_counter()
    assert killed and started < killed[0] < finished, "the worker was not killed during the sweep"
    _frames_equal(remote, local)
