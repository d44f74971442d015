"""Thread safety of parallel kernel launches under every Numba threading layer.

(No kernel of the package is compiled ``parallel=True`` at present: the simulation's kernels are
serial and ``_blocks`` runs them on its own threads, which is safe under every layer. This guard
stays for any future parallel kernel; ``tests/test_concurrency.py`` checks that each call of one
goes through it.)

Numba runs ``parallel=True`` kernels on one of three threading layers. ``tbb`` and ``omp`` accept
launches from several Python threads at once; ``workqueue`` (the fallback when neither library
is found, e.g. many pip installs on macOS) does not: a second concurrent launch makes it abort
the whole process (SIGABRT, "Concurrent access has been detected"), which no ``try`` can catch.
A library that thread pools call (Dask, web servers) must never do that, so every call of a
``@jit_parallel`` kernel goes through ``parallel_launch``::

    with parallel_launch():
        kernel(...)

Under ``workqueue`` the launches are serialised by one process-wide lock; under ``tbb`` and
``omp`` the context manager does nothing. Before the first parallel launch of the process Numba
has not chosen its layer yet (``numba.threading_layer()`` raises ValueError), so such a launch
takes the lock too. The layer is observed, never predicted from configuration and importable
libraries: a thread skips the lock only after seeing that the layer in use is tbb or omp.

Serialising rather than falling back to a serial kernel (numbagg compiles a second, serial
version and uses it inside ``ThreadPoolExecutor`` threads) keeps one compiled signature per
kernel (cold start) and bit-identical results whatever the thread: each launch still uses all
of Numba's threads, one after the other. Nothing global is changed: not the threading layer, not
the number of threads. Limits: the lock covers this package's kernels only; another library's
parallel workqueue kernels running at the same time in another thread can still make Numba
abort.
"""

import contextlib
import threading

import numba

# Reentrant, so that Python code run by the same thread inside the ``with`` block (a signal
# handler, say) that launches a kernel again waits for nothing rather than for itself.
_LAUNCH_LOCK = threading.RLock()


def launches_are_serialised() -> bool:
    """True if parallel launches must take the lock: the layer is workqueue or not chosen yet."""
    try:
        return numba.threading_layer() == "workqueue"
    except ValueError:  # no parallel launch yet in this process
        return True


@contextlib.contextmanager
def parallel_launch():
    """Context manager around a call of a parallel kernel: serialises it under workqueue."""
    if launches_are_serialised():
        with _LAUNCH_LOCK:
            yield
    else:
        yield
