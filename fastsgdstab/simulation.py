"""Monte-Carlo simulation of linearised SGD: typical growth and how often runs blow up.

The exact second-moment map (``second_moment``) is the authority on the mean square. Simulation
answers the questions about typical runs and probabilities (the specification page, section "What a
Monte-Carlo simulation does and does not estimate"): the top Lyapunov exponent, the fraction of
runs the paper's divergence rule flags, and, with a warning when it cannot be trusted, a sample
estimate of the mean square.
"""

from __future__ import annotations

import time

from ._blocks import SimulationResult, SimulationWarning, check_arguments, combine, run_block
from ._threads import blas_policy

__all__ = ["SimulationResult", "SimulationWarning", "simulate"]


@blas_policy(parallel=True)
def simulate(family, lr, batch_size, steps, runs, *, seed=0, sampling="bernoulli", init="normal",
             record_every=None, divergence_factor=1000.0, progress=None, momentum=0.0,
             nesterov=False, drop_last=False, burn_in=None, client=None) -> SimulationResult:
    """Simulate many independent runs of linearised SGD, ``w_{t+1} = (I - lr H_batch) w_t``.

    ``H_batch = (1/B) sum_{i in batch} H_i`` with B the nominal batch size for every i.i.d.
    scheme (under Bernoulli sampling each sample is included with probability B / n and the
    realised batch size is random); see the specification page, section "Setting". Also random
    reshuffling (``sampling="reshuffle"``: each epoch a uniform permutation of the samples cut
    into consecutive batches of B, as ``DataLoader(shuffle=True)``; a short last batch is
    averaged over its own size, or dropped with ``drop_last=True``) and momentum with
    ``torch.optim.SGD``'s conventions (section "Momentum"). The cost of a step depends on B,
    d and the rank, not on n. Each run is renormalised as
    it goes, so ``log ||w_t||^2`` is exact however far it grows or shrinks. The estimates
    (section "What a Monte-Carlo simulation does and does not estimate"):

    * typical growth: the Lyapunov exponent ``(1/t) E log(||w_t|| / ||w_0||)`` with its standard
      error;
    * the paper's divergence rule, ``||w_t||^2 >= divergence_factor ||w_0||^2`` at some step,
      per run, with the fraction of runs and its Wilson 95% interval;
    * ``log`` of the sample mean of ``||w_t||^2``, flagged (with a ``SimulationWarning``) where
      too few runs carry it. Near the mean-square threshold the mean is dominated by rare runs:
      use ``second_moment`` for the mean square itself.

    A family with per-sample gradients (``HessianFamily(..., gradients=g)``: a minimum that does
    not interpolate, section "Non-interpolating minima: stationary covariance and the loss
    floor") is simulated as the affine iteration ``w_{t+1} = (I - lr H_batch) w_t - lr g_batch``,
    ``g_batch`` the batch mean of the g_i with the same batch and normalisation as ``H_batch``
    (every scheme, reshuffle and momentum: ``H_batch w_t + g_batch`` replaces ``H_batch w_t``).
    Its runs are not renormalised (plain floats; a run whose ``||w_t||^2`` passes 1e250 is
    stopped, counted as diverged and recorded as +inf), and the result carries the
    time-averaged excess loss ``(1/2) w_t^T H w_t`` after ``burn_in`` steps with its standard
    error: a Monte-Carlo check of :func:`fastsgdstab.stationary`'s exact floor, and the floor
    under reshuffling, for which no exact formula exists. A step then also costs O(k d) for the
    loss (k = rank of H). The Lyapunov exponent and the divergence rule keep their
    definitions (at a stationary state the exponent tends to 0).

    Run j draws all its random numbers (w_0 and every batch) from its own counter-based stream
    keyed by ``(seed, j)``: the same arguments give bit-identical results on every call, for
    any number of Numba threads, and for any split of the runs into blocks computed apart (the
    distributed version does that), on the same machine and build.

    Parameters
    ----------
    family : HessianFamily
        A probe (``population_size`` N > n) is simulated as the training set of N = m n
        samples made of m copies of each probe sample, which has the probe's curvature and
        noise and the batch law with N (specification page, section "A probe subset of a
        large training set"): Bernoulli includes each of the N members with probability B/N
        (a Binomial(m, B/N) count per probe sample), "without_replacement" and "reshuffle"
        draw from the N members, "with_replacement" from the probe itself (the same law).
        N must be a multiple of n except with replacement (a ValueError says so); the copies
        cost N r d floats of memory.
    lr : float
        Learning rate, > 0.
    batch_size : float
        In [1, N] (N the family's ``population_size``, n by default); an integer for
        "without_replacement", "with_replacement" and "reshuffle".
    steps : int
        SGD steps per run, >= 1.
    runs : int
        Independent runs, >= 1.
    seed : int, default 0
        In [0, 2**63).
    sampling : {"bernoulli", "without_replacement", "with_replacement", "reshuffle"}
        "reshuffle" keeps a permutation of the n samples per run: memory O(runs x n), checked
        before allocating. Steps count SGD steps (an epoch is ``ceil(n / B)`` steps, or
        ``floor(n / B)`` with ``drop_last``), and growth is reported per step.
    init : "normal", "uniform" or array (d,), default "normal"
        The same vocabulary as :func:`fastsgdstab.second_moment`: "normal" (or None) is
        ``w_0 ~ N(0, I)`` per run; "uniform" is ``w_0 ~ Uniform[0, 1)^d`` per run (the paper's
        experiment); a vector is that ``w_0`` for every run. (A covariance matrix, which
        second_moment accepts, is not drawn from here: pass the runs' own vectors instead.)
    record_every : int, optional
        Record ``log ||w_t||^2`` every this many steps (and at the last step). Default: every
        step up to 1000 records, at most 2**24 numbers in all. Memory is O(runs x records).
    divergence_factor : float, default 1000
        Threshold of the divergence rule, > 1.
    progress : bool, optional
        Show a tqdm progress bar. None: only if the run is estimated to take over 2 s.
    momentum : float, default 0.0
        Momentum coefficient mu in [0, 1), as ``torch.optim.SGD(momentum=mu)`` with dampening 0.
        Heavy ball: ``w_{t+1} = w_t - lr H_batch w_t + mu (w_t - w_{t-1})`` with ``w_{-1} =
        w_0`` (the first step has no momentum). 0: plain SGD, bit for bit the same as without
        the keyword.
    nesterov : bool, default False
        Nesterov momentum as torch: ``v_t = mu v_{t-1} + H_batch w_t``, ``w_{t+1} = w_t -
        lr (H_batch w_t + mu v_t)``, ``v_{-1} = 0``. Requires momentum > 0.
    drop_last : bool, default False
        With ``sampling="reshuffle"``, skip an epoch's short last batch (n not a multiple of
        B), as ``DataLoader(drop_last=True)``.
    burn_in : int, optional
        Families with per-sample gradients only: steps left out of the excess loss's time
        average, in [0, steps); default ``steps // 4``. (A ValueError for a family without
        gradients.)
    client : dask.distributed.Client, optional
        Run on this Dask cluster in blocks of runs (see "Running on a cluster"): bit for bit
        the same result, since run j's stream depends only on (seed, j). Default None: in this
        process (dask is never imported).

    Returns
    -------
    SimulationResult

    Raises
    ------
    TypeError, ValueError
        Invalid arguments; the message names the argument.

    Warns
    -----
    SimulationWarning
        The sample mean square is untrustworthy at some recorded step, or the simulation was
        interrupted (Ctrl-C) and the result covers the completed steps only. The message says
        why: "rare runs dominate" when the effective sample size is below 10% of the runs (a
        heavy tail: more runs do not cure it), "too few runs" otherwise (fewer than 30, or 1%
        of the runs, carry the mean although the runs agree).

    Examples
    --------
    >>> import numpy as np
    >>> from fastsgdstab import HessianFamily, simulate
    >>> family = HessianFamily.from_features(np.eye(4))
    >>> result = simulate(family, lr=0.5, batch_size=2, steps=20, runs=1000, seed=1)
    >>> result.log_sq_norm.shape
    (1000, 21)
    >>> round(result.lyapunov_exponent, 2), result.diverged_fraction
    (-0.13, 0.0)
    >>> bool(result.log_mean_sq_untrustworthy.any())
    False

    Momentum and reshuffled epochs (an epoch of 4 samples is 2 steps of B = 2):

    >>> heavy = simulate(family, lr=0.5, batch_size=2, steps=20, runs=1000, seed=1, momentum=0.5)
    >>> epochs = simulate(family, lr=0.5, batch_size=2, steps=20, runs=1000, seed=1,
    ...                   sampling="reshuffle")
    >>> bool(heavy.lyapunov_exponent < 0), heavy.momentum, epochs.sampling
    (True, 0.5, 'reshuffle')

    With per-sample gradients, the loss floor (d = 1, h = 1, gradients +-1, exact 1/6 at
    lr = 0.5 and B = 1 with replacement; see :func:`fastsgdstab.stationary`):

    >>> noisy = HessianFamily.from_features([[1.0], [1.0]], gradients=[[1.0], [-1.0]])
    >>> floor = simulate(noisy, lr=0.5, batch_size=1, steps=4000, runs=200, seed=1,
    ...                  sampling="with_replacement")
    >>> bool(abs(floor.excess_loss - 1 / 6) < 5 * floor.excess_loss_stderr), floor.burn_in
    (True, 1000)
    """
    if client is not None:
        from ._distributed import simulate as distributed_simulate

        return distributed_simulate(client, family, lr, batch_size, steps, runs, seed=seed,
                                    sampling=sampling, init=init, record_every=record_every,
                                    divergence_factor=divergence_factor, progress=progress,
                                    momentum=momentum, nesterov=nesterov, drop_last=drop_last,
                                    burn_in=burn_in)
    return _simulate(family, lr, batch_size, steps, runs, seed=seed, sampling=sampling, init=init,
                     record_every=record_every, divergence_factor=divergence_factor,
                     progress=progress, momentum=momentum, nesterov=nesterov, drop_last=drop_last,
                     burn_in=burn_in)


def _simulate(family, lr, batch_size, steps, runs, *, seed, sampling, init, record_every,
              divergence_factor, progress, momentum=0.0, nesterov=False, drop_last=False,
              burn_in=None, chunk_steps=None, on_chunk=None) -> SimulationResult:
    """``simulate`` with test hooks: a fixed ``chunk_steps``; ``on_chunk(steps_done)`` after each chunk."""
    started = time.perf_counter()
    settings = check_arguments(family, lr, batch_size, steps, runs, seed, sampling, init,
                                record_every, divergence_factor, progress, momentum, nesterov,
                                drop_last, burn_in)
    block = run_block(settings, 0, settings.runs, chunk_steps=chunk_steps, on_chunk=on_chunk)
    return combine(settings, [block], time.perf_counter() - started)



# The block interface under its earlier private names (tests written against them).
_check_arguments, _run_block, _combine = check_arguments, run_block, combine
