"""Threading policy: how many BLAS threads the library's dense work uses.

The engines do many small dense products (the operator's two BLAS-3 products on an (n r, k)
array, k x k eigensolves, Lanczos vectors). OpenBLAS splits even a small product over all its
threads and its idle threads spin between calls; on a machine shared with other work (a laptop,
a CI runner, a cluster node) those threads fight the other processes, and a threaded product
waits for its slowest, descheduled thread: measured on 2 cores with two busy background
processes, ``fastsgdstab demo`` took 10x and a stability map 15-30x its single-thread time.
The rule, decided from the measurements in docs/performance.md:

* work whose largest BLAS call is below ``BLAS_THREADS_MIN_WORK`` multiply-adds
  (``_config``) runs with **one** BLAS thread;
* larger work keeps whatever the process has (OpenBLAS's default, or the user's setting);
* a call that runs Numba ``parallel`` kernels (``simulate``) always runs its BLAS with one
  thread, so that Numba's threads and BLAS's never oversubscribe the cores.

The policy only ever *lowers* the number of threads, and only while a library call runs:

* an explicit setting by the user wins: ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``,
  ``MKL_NUM_THREADS`` or ``threadpoolctl.threadpool_limits`` around our call set the ceiling,
  and we never raise it; ``numba.set_num_threads`` (thread-local in Numba) is never touched,
  so a caller's value holds inside our calls; ``FASTSGDSTAB_THREAD_POLICY=off`` (environment,
  read once per process) turns the policy off entirely;
* global state is restored: the limit is taken when the first concurrent library call enters
  and the saved thread counts are restored when the last one leaves (a process-wide reference
  count under a lock: BLAS thread counts are process-wide, so two caller threads calling the
  library at once must not save each other's lowered value as "the original"); a count that
  someone else changed meanwhile (e.g. a caller's ``threadpool_limits`` in another thread) is
  left as they set it;
* cheap: one ``threadpoolctl.ThreadpoolController`` per process, created at the first limited
  call (it lists the BLAS libraries loaded then: numpy's and scipy's OpenBLAS, which Numba's
  ``np.dot`` also calls); entering and leaving a limited call costs a few microseconds when
  nothing is to change and about 30 us when the limit is set (docs/performance.md).

Usage, at public entry points::

    @blas_policy(size_of=lambda family, *args, **kwargs: operator_work(family))
    def critical_lr(family, batch_size, ...): ...

    with limited_blas(work):          # or limited_blas(parallel=True) around Numba parallel code
        ...
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

from ._config import BLAS_THREADS_MIN_WORK

__all__ = ["blas_policy", "limited_blas", "blas_thread_limit", "operator_work", "family_work",
           "gram_work",
           "policy_enabled"]

_POLICY_ENV = "FASTSGDSTAB_THREAD_POLICY"


def policy_enabled() -> bool:
    """False when the environment sets ``FASTSGDSTAB_THREAD_POLICY`` to off/0/false/no."""
    return os.environ.get(_POLICY_ENV, "on").strip().lower() not in ("off", "0", "false", "no")


_ENABLED = policy_enabled()


def operator_work(family) -> int:
    """Multiply-adds of the largest BLAS call of the exact engine on ``family``: ``m d k`` with
    ``m = n r`` factor columns and ``k = min(m, d)`` (a bound on the range dimension: no
    reduction is computed). It bounds both the reduction (``m x d x k``: the covariance or the
    Gram matrix of the factors) and one operator product (two ``m x k x k`` products)."""
    family = _unwrapped(family)
    m = int(family.n) * int(family.rank)
    d = int(family.d)
    return m * d * min(m, d)


def _unwrapped(family):
    """A wrapper such as torch's ``ModelFamily`` sized by the family it holds (``family_of``)."""
    from .family import family_of

    return family_of(family) or family


def family_work(family, *args, **kwargs) -> int:
    """``operator_work(family)`` with a public function's other arguments ignored: the
    ``size_of`` of the exact engine's entry points."""
    return operator_work(family)


def gram_work(family, block_rows: int) -> int:
    """Multiply-adds of one block of the factor Gram matrix, ``b x b x k`` with
    ``b = min(n r, block_rows)`` and ``k = min(n r, d)`` (coherence)."""
    family = _unwrapped(family)
    m = int(family.n) * int(family.rank)
    b = min(m, int(block_rows))
    return b * b * min(m, int(family.d))


def blas_thread_limit(work=None, *, parallel: bool = False):
    """The rule: 1 for Numba-parallel calls and for work below ``BLAS_THREADS_MIN_WORK``
    multiply-adds, None (no limit: keep the process's setting) for larger work."""
    if parallel:
        return 1
    if work is None or work < BLAS_THREADS_MIN_WORK:
        return 1
    return None


def _set_threads(library, count: int) -> None:
    """Set a BLAS library's (process-wide) thread count from whichever thread we are in.

    threadpoolctl >= 3.8 lets only one "controlling" Python thread change OpenBLAS's count (the
    first that set it; a call from any other thread is silently ignored), so that its own
    limiters do not fight. The library calls us from any thread (Dask, thread pools) and
    coordinates its threads itself (``_Limiter``), so it calls the setter underneath, which
    leaves threadpoolctl's choice of controlling thread as the caller made it.
    """
    setter = getattr(library, "_real_set_num_threads", None) or library.set_num_threads
    setter(count)


class _Limiter:
    """Process-wide reference-counted BLAS limit (only ever to one thread)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._controller = None
        self._holders = 0
        self._saved = []  # (library controller, original count) for each library we lowered

    def _libraries(self):
        if self._controller is None:
            from threadpoolctl import ThreadpoolController

            self._controller = ThreadpoolController().select(user_api="blas")
        return self._controller.lib_controllers

    def enter(self) -> None:
        with self._lock:
            self._holders += 1
            if self._holders > 1:
                return
            try:
                saved = []
                for library in self._libraries():
                    original = library.get_num_threads()
                    if original is not None and original > 1:
                        _set_threads(library, 1)
                        if library.get_num_threads() == 1:
                            saved.append((library, original))
                self._saved = saved
            except BaseException:
                self._holders -= 1
                raise

    def leave(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders > 0:
                return
            saved, self._saved = self._saved, []
            for library, original in saved:
                # Restore only what is still as we left it: a count someone else set meanwhile
                # (threadpool_limits in another thread) is theirs.
                if library.get_num_threads() == 1:
                    _set_threads(library, original)

    @property
    def holders(self) -> int:
        return self._holders


_LIMITER = _Limiter()


@contextlib.contextmanager
def limited_blas(work=None, *, parallel: bool = False):
    """Run the block under the policy for ``work`` multiply-adds (see ``blas_thread_limit``).

    Reentrant and thread-safe; restores the thread counts when the last concurrent limited
    block leaves, also after an exception.
    """
    if not _ENABLED or blas_thread_limit(work, parallel=parallel) is None:
        yield
        return
    _LIMITER.enter()
    try:
        yield
    finally:
        _LIMITER.leave()


def blas_policy(size_of=None, *, parallel: bool = False):
    """Decorator: run the function under ``limited_blas(size_of(*args, **kwargs), parallel=...)``.

    ``size_of`` receives the call's arguments and returns the work in multiply-adds of its
    largest BLAS call (``operator_work``, ``gram_work``); an exception in it (bad arguments,
    which the function itself reports) means "small". Without ``size_of`` the work is small.
    """

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if not _ENABLED:
                return function(*args, **kwargs)
            work = None
            if size_of is not None and not parallel:
                try:
                    work = size_of(*args, **kwargs)
                except Exception:
                    work = None
            with limited_blas(work, parallel=parallel):
                return function(*args, **kwargs)

        return wrapper

    return decorate
