"""The BLAS threading policy (fastsgdstab/_threads.py): limits lowered only inside library calls,
restored after them (also after exceptions and with concurrent callers), a user's limits never
raised, and Numba's thread count never touched."""

import threading
import time

import numba
import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import fastsgdstab as fs
from fastsgdstab import _threads
from fastsgdstab._config import BLAS_THREADS_MIN_WORK
from fastsgdstab._threads import blas_policy, blas_thread_limit, limited_blas, operator_work


def blas_threads() -> list:
    """Thread count of every BLAS library loaded, read independently of the module under test."""
    return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]


pytestmark = pytest.mark.skipif(not blas_threads(), reason="no BLAS library visible to threadpoolctl")

SMALL = 1_000
LARGE = 10 * BLAS_THREADS_MIN_WORK


def test_rule():
    assert blas_thread_limit(None) == 1
    assert blas_thread_limit(SMALL) == 1
    assert blas_thread_limit(BLAS_THREADS_MIN_WORK - 1) == 1
    assert blas_thread_limit(BLAS_THREADS_MIN_WORK) is None
    assert blas_thread_limit(LARGE, parallel=True) == 1
    family = fs.HessianFamily.from_features(np.ones((7, 3)))
    assert operator_work(family) == 7 * 1 * 3 * 3


def test_small_work_runs_with_one_thread_and_restores():
    with threadpool_limits(2, user_api="blas"):
        before = blas_threads()
        assert max(before) == 2
        with limited_blas(SMALL):
            assert blas_threads() == [1] * len(before)
        assert blas_threads() == before


def test_large_work_keeps_the_process_setting():
    with threadpool_limits(2, user_api="blas"):
        before = blas_threads()
        with limited_blas(LARGE):
            assert blas_threads() == before
        assert blas_threads() == before


def test_restored_after_an_exception():
    @blas_policy(size_of=lambda x: SMALL)
    def failing(x):
        assert blas_threads() == [1] * len(before)
        raise KeyError(x)

    with threadpool_limits(2, user_api="blas"):
        before = blas_threads()
        with pytest.raises(KeyError):
            failing(3)
        assert blas_threads() == before
    assert _threads._LIMITER.holders == 0


def test_a_user_limit_is_never_raised():
    with threadpool_limits(1, user_api="blas"):
        for work in (SMALL, LARGE):
            with limited_blas(work):
                assert blas_threads() == [1] * len(blas_threads())
        with limited_blas(parallel=True):
            assert max(blas_threads()) == 1
        assert max(blas_threads()) == 1


def test_nested_calls_restore_once():
    with threadpool_limits(2, user_api="blas"):
        before = blas_threads()
        with limited_blas(SMALL):
            with limited_blas(SMALL):
                assert max(blas_threads()) == 1
            assert max(blas_threads()) == 1  # the inner exit must not restore early
        assert blas_threads() == before


def test_decorated_function_keeps_its_signature_and_doc():
    @blas_policy(size_of=lambda family, lr: operator_work(family))
    def documented(family, lr):
        """Docstring."""
        return lr

    import inspect

    assert documented.__doc__ == "Docstring."
    assert list(inspect.signature(documented).parameters) == ["family", "lr"]
    # a size_of that fails on bad arguments: the function reports them itself
    assert documented("not a family", 2.0) == 2.0


def test_concurrent_callers_restore_the_original_limits():
    """Several threads inside limited calls at once (overlapping in every order): each sees one
    BLAS thread while inside, and the caller's limit is back once all have left."""
    errors = []
    barrier = threading.Barrier(6)

    @blas_policy(size_of=lambda delay: SMALL)
    def call(delay):
        barrier.wait(timeout=10)
        time.sleep(delay)
        if max(blas_threads()) != 1:
            errors.append(blas_threads())

    def worker(delay):
        try:
            for _ in range(5):
                call(delay)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with threadpool_limits(2, user_api="blas"):
        before = blas_threads()
        threads = [threading.Thread(target=worker, args=(0.001 * i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert blas_threads() == before
    assert _threads._LIMITER.holders == 0


def test_concurrent_library_calls_give_the_serial_answers():
    family = fs.HessianFamily.from_features(np.random.default_rng(3).standard_normal((60, 6)))
    expected = [fs.critical_lr(family, b) for b in (2, 5, 9)]
    results = {}

    def worker(index, batch_size):
        with limited_blas(operator_work(family)):
            results[index] = fs.critical_lr(family, batch_size)

    with threadpool_limits(2, user_api="blas"):
        before = blas_threads()
        threads = [threading.Thread(target=worker, args=(i, b)) for i, b in enumerate((2, 5, 9) * 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert blas_threads() == before
    assert [results[i] for i in range(6)] == expected * 2


def test_a_limit_changed_meanwhile_is_left_as_set():
    with threadpool_limits(2, user_api="blas"):
        with limited_blas(SMALL):
            # someone (another thread's threadpool_limits, say) sets a count while we hold ours
            threadpool_limits(2, user_api="blas")
        assert max(blas_threads()) == 2
    # (threadpool_limits(2) outside restored the process's original count on exit)


def test_numba_thread_count_untouched():
    """The policy never sets Numba's (thread-local) count: a caller's value holds inside."""
    family = fs.HessianFamily.from_features(np.random.default_rng(0).standard_normal((20, 3)))
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        seen = []

        @blas_policy(parallel=True)
        def parallel_call():
            seen.append(numba.get_num_threads())
            return fs.non_uniformity(family)

        parallel_call()
        assert seen == [1]
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(previous)
    assert numba.get_num_threads() == previous


def test_policy_in_the_modules_owned_here():
    """geometry, theory and the experiments run their dense work with one BLAS thread."""
    from fastsgdstab import geometry

    seen = []
    original = geometry.np.linalg.eigvalsh

    def spy(*args, **kwargs):
        seen.append(max(blas_threads()))
        return original(*args, **kwargs)

    family = fs.HessianFamily.from_features(np.random.default_rng(0).standard_normal((30, 4)))
    with threadpool_limits(2, user_api="blas"):
        geometry.np.linalg.eigvalsh = spy
        try:
            fs.non_uniformity(family)
        finally:
            geometry.np.linalg.eigvalsh = original
        assert seen == [1]
        assert max(blas_threads()) == 2


def test_policy_can_be_switched_off(monkeypatch):
    for value, enabled in [("off", False), ("0", False), (" False ", False), ("no", False),
                           ("on", True), ("1", True)]:
        monkeypatch.setenv("FASTSGDSTAB_THREAD_POLICY", value)
        assert _threads.policy_enabled() is enabled
    monkeypatch.delenv("FASTSGDSTAB_THREAD_POLICY")
    assert _threads.policy_enabled() is True
    monkeypatch.setattr(_threads, "_ENABLED", False)  # what the variable does at import

    @blas_policy(size_of=lambda: SMALL)
    def call():
        return blas_threads()

    with threadpool_limits(2, user_api="blas"):
        before = blas_threads()
        with limited_blas(SMALL):
            assert blas_threads() == before
        assert call() == before
