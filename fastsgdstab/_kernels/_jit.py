"""The one place that sets Numba's compilation options.

* Disk cache: compiled machine code is written next to the sources (or to ``NUMBA_CACHE_DIR``,
  wherever Numba's own ``cache=True`` would put it) so that a second Python process does not pay
  the compile time again. Numba checks a cached kernel against its own source file only, but a
  kernel's machine code contains every kernel it calls, compiled in: after a change to
  ``rng.py`` alone, the cached simulation kernels of ``sgd.py`` would still run the old random
  streams. Here every cache index is stamped, in addition, with a hash of the contents of all
  ``_kernels/*.py`` files, taken when this module is imported, that is with the sources this
  process compiles: a change to any kernel file invalidates every cached kernel, and the next
  call recompiles. Alternatives rejected: tracking each kernel's own dependencies (finer, but a
  hand-kept graph that goes stale exactly like the cache; kernel files change only in
  development, where one cold start, about 20 s for the simulation kernels, is the price); one
  file for all kernels (unreadable); a cache directory per hash or a different
  ``NUMBA_CACHE_DIR`` (a setting the caller owns; stale directories pile up). The
  stamp is complete because kernel modules import nothing from the rest of the package (Numba
  freezes a kernel's globals into its code), which a test checks. If the sources cannot be read
  (a zip or frozen install), kernels are compiled without a disk cache rather than risk stale
  code. The hook uses two Numba internals (a dispatcher's ``_cache``, a cache implementation's
  ``_locator``); the tests check that every kernel's cache carries the stamp.
* Not the blanket fastmath flag (all of LLVM's fast-math flags): its ``nnan``/``ninf`` flags
  let LLVM assume that no value is ever inf or NaN, which silently breaks overflow and
  divergence detection. The subset below allows contraction into fused multiply-adds,
  reciprocal approximations of divisions, ignoring the sign of zero and reassociation (which
  lets reductions such as dot products vectorise: 1.8x faster in the simulation kernel), none of
  which changes how inf and NaN propagate. Reassociation means results can differ in the last
  bits between CPUs with different vector widths; on one machine they are deterministic and do
  not depend on the number of threads.
"""

import hashlib
import os

from numba import njit
from numba.core.caching import CompileResultCacheImpl, FunctionCache
from numba.core.dispatcher import Dispatcher

FASTMATH_FLAGS = {"contract", "arcp", "nsz", "reassoc"}


def sources_stamp(directory):
    """SHA-256 (hex) of the names and contents of the ``*.py`` files in ``directory``, or None."""
    digest = hashlib.sha256()
    try:
        names = sorted(name for name in os.listdir(directory) if name.endswith(".py"))
        for name in names:
            with open(os.path.join(directory, name), "rb") as source:
                content = source.read()
            digest.update(f"{name}\0{len(content)}\0".encode())
            digest.update(content)
    except OSError:
        return None
    return digest.hexdigest() if names else None


KERNEL_SOURCES_STAMP = sources_stamp(os.path.dirname(os.path.abspath(__file__)))
"""Hash of every kernel source, as imported by this process."""


class _StampedLocator:
    """Numba's cache locator for the kernel, with ``KERNEL_SOURCES_STAMP`` added to its stamp."""

    def __init__(self, locator):
        self._locator = locator

    def get_source_stamp(self):
        return self._locator.get_source_stamp(), KERNEL_SOURCES_STAMP

    def __getattr__(self, name):
        return getattr(self._locator, name)


class _KernelCacheImpl(CompileResultCacheImpl):
    def __init__(self, py_func):
        super().__init__(py_func)  # Numba's choice of directory, NUMBA_CACHE_DIR included
        self._locator = _StampedLocator(self._locator)


class KernelCache(FunctionCache):
    """Numba's per-function disk cache, fresh only if no kernel source has changed."""

    _impl_class = _KernelCacheImpl


def _kernel_decorator(**options):
    compile_ = njit(cache=False, **options)

    def decorate(function):
        dispatcher = compile_(function)
        # (NUMBA_DISABLE_JIT returns the Python function itself)
        if isinstance(dispatcher, Dispatcher) and KERNEL_SOURCES_STAMP is not None:
            dispatcher._cache = KernelCache(dispatcher.py_func)  # what cache=True would do
        return dispatcher

    return decorate


# ``no_cfunc_wrapper``: Numba otherwise compiles, beside every kernel, a C-callable wrapper used
# only when a kernel is passed as a first-class function (never here): about 5% of a cold start.
jit = _kernel_decorator(nogil=True, fastmath=FASTMATH_FLAGS, no_cfunc_wrapper=True)
"""Serial kernel decorator."""

jit_inline = _kernel_decorator(nogil=True, fastmath=FASTMATH_FLAGS, inline="always",
                               no_cfunc_wrapper=True)
"""Serial kernel inlined into its callers at Numba IR level (no call, no reference counting of
its array arguments per call); still compiled and cached on its own when called from Python."""

jit_parallel = _kernel_decorator(nogil=True, parallel=True, fastmath=FASTMATH_FLAGS)
"""Decorator for kernels with a ``prange`` loop over independent units (none at present: its
compilation is several times a serial kernel's, and every call must go through
``_threading.parallel_launch``)."""
