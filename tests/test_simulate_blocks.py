"""The block runner (``fastsgdstab._blocks``): parts of a block on a thread pool, serial kernels.

A run's numbers must not depend on the part, the thread or the block that computed it; the pool
must never use more threads than Numba's thread count of the calling thread, nor change it; and
the modules keep their layering (``simulation`` and ``_distributed`` both use ``_blocks``,
neither reaches into the other).
"""

import ast
import pathlib
import threading
import time
import warnings

import numba
import numpy as np
import pytest

import fastsgdstab
from fastsgdstab import HessianFamily, SimulationWarning, simulate
from fastsgdstab import _blocks
from fastsgdstab._kernels import sgd

PACKAGE_DIR = pathlib.Path(fastsgdstab.__file__).resolve().parent

pytestmark = pytest.mark.filterwarnings("ignore::fastsgdstab.SimulationWarning")


@pytest.mark.parametrize("runs", [1, 2, 7, 64, 1001])
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_parts_partition_the_runs(runs, threads):
    bounds = _blocks.parts(runs, threads)
    assert bounds[0][0] == 0 and bounds[-1][1] == runs
    assert all(stop == start for (_, stop), (start, _) in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    expected = 1 if threads == 1 else min(runs, _blocks.PARTS_PER_THREAD * threads)
    assert len(bounds) == expected


def _family(gradients):
    rng = np.random.default_rng(7)
    factors = rng.standard_normal((11, 4, 2)) / 2.0
    g = rng.standard_normal((11, 4))
    g -= g.mean(axis=0)  # a minimum: the gradients average to zero
    return HessianFamily(factors, gradients=g if gradients else None)


def _bits(result):
    return (result.log_sq_norm.tobytes(), result.first_diverged_step.tobytes(),
            result.excess_loss)


CASES = [(sampling, momentum, gradients)
         for sampling in ("bernoulli", "without_replacement", "with_replacement", "reshuffle")
         for momentum in ({}, dict(momentum=0.6), dict(momentum=0.6, nesterov=True))
         for gradients in (False, True)]


@pytest.mark.parametrize("sampling, momentum, gradients", CASES)
def test_a_runs_bits_do_not_depend_on_its_part(monkeypatch, sampling, momentum, gradients):
    family = _family(gradients)
    lr = 1.5 / family.sharpness()  # unstable enough that some runs diverge
    kwargs = dict(seed=3, sampling=sampling, record_every=4, progress=False, **momentum)
    batch = 3 if sampling != "bernoulli" else 2.5
    whole = _bits(simulate(family, lr, batch, 25, 9, **kwargs))
    # every run alone, then uneven parts, whatever the thread count
    for cut in (lambda runs, threads: [(j, j + 1) for j in range(runs)],
                lambda runs, threads: [(0, 2), (2, 3), (3, runs)]):
        monkeypatch.setattr(_blocks, "parts", cut)
        assert _bits(simulate(family, lr, batch, 25, 9, **kwargs)) == whole


def test_the_pool_uses_at_most_numbas_threads_and_leaves_them_as_set(monkeypatch):
    family = _family(False)
    seen = []
    advance = _blocks.Runs.advance_part

    def recording(self, start, stop, first, last):
        seen.append(threading.get_ident())
        return advance(self, start, stop, first, last)

    monkeypatch.setattr(_blocks.Runs, "advance_part", recording)
    previous = numba.get_num_threads()
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            seen.clear()
            before = threading.active_count()
            simulate(family, 0.1, 2, 40, 50, progress=False)
            assert numba.get_num_threads() == threads  # the caller's setting is untouched
            assert threading.active_count() == before  # the pool is gone
            workers = set(seen[1:])  # (the first call compiles, in the calling thread)
            if threads == 1:
                assert workers == {threading.get_ident()}
            else:
                assert 1 <= len(workers) <= threads and threading.get_ident() not in workers
    finally:
        numba.set_num_threads(previous)


def test_simulations_in_several_threads_share_the_cores(monkeypatch):
    # four callers at once: never more kernel parts running than Numba's threads (the cores)
    family = _family(False)
    lock = threading.Lock()
    running, peak = [0], [0]
    advance = _blocks.Runs.advance_part

    def counting(self, start, stop, first, last):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.01)  # parts that overlap whenever the callers' pools could
            return advance(self, start, stop, first, last)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(_blocks.Runs, "advance_part", counting)
    from concurrent.futures import ThreadPoolExecutor

    simulate(family, 0.1, 2, 5, 8, progress=False)  # compiled (or loaded) once first
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda seed: simulate(family, 0.1, 2, 60, 64, seed=seed,
                                                      progress=False), range(4)))
    assert 1 <= peak[0] <= numba.config.NUMBA_NUM_THREADS
    alone = simulate(family, 0.1, 2, 60, 64, seed=2, progress=False)
    assert _bits(results[2]) == _bits(alone)


def test_no_simulation_kernel_is_compiled_parallel():
    kernels = [value for value in vars(sgd).values() if hasattr(value, "targetoptions")]
    assert kernels and not any(kernel.targetoptions.get("parallel") for kernel in kernels)


def _imports(module):
    """``(module, names)`` of every ``from X import names`` (and ``import X``) in a file."""
    found = []
    for node in ast.walk(ast.parse((PACKAGE_DIR / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            found.append(((node.module or "").rsplit(".", 1)[-1], [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((alias.name.rsplit(".", 1)[-1], []) for alias in node.names)
    return found


def test_simulation_and_distributed_share_the_block_runner_without_a_circle():
    blocks = {module for module, _ in _imports("_blocks")}
    assert not blocks & {"simulation", "_distributed"}, blocks
    distributed = _imports("_distributed")
    assert "simulation" not in {module for module, _ in distributed}
    for module, names in _imports("simulation") + distributed:
        if module in ("_blocks", "_distributed", "simulation"):
            assert not [name for name in names if name.startswith("_")], (module, names)
    # simulation's block interface is _blocks' own
    assert fastsgdstab.simulation.SimulationResult is _blocks.SimulationResult
    assert fastsgdstab.SimulationWarning is _blocks.SimulationWarning


def test_interrupted_chunk_leaves_every_part_whole():
    # an interrupt after the first chunk: every run has completed exactly those steps, in
    # every part (the pool finishes a chunk before the loop looks at the flag)
    family = _family(False)
    stops = []

    def interrupt(done):
        stops.append(done)
        if len(stops) == 1:
            import signal

            signal.raise_signal(signal.SIGINT)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationWarning)
        partial = fastsgdstab.simulation._simulate(
            family, 0.1, 2, 40, 50, seed=1, sampling="bernoulli", init="normal", record_every=1,
            divergence_factor=1000.0, progress=False, chunk_steps=7, on_chunk=interrupt)
        whole = simulate(family, 0.1, 2, 40, 50, seed=1, record_every=1, progress=False)
    assert partial.interrupted and partial.steps_completed == 7
    np.testing.assert_array_equal(partial.log_sq_norm, whole.log_sq_norm[:, :8])
