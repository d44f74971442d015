"""Every tolerance and limit of the exact engine, named and explained once.

Change a value here, never a literal in an engine: the tests and the documentation refer to
these names.
"""

ENGINE_RTOL = 1e-12
"""Lanczos stopping tolerance of the exact engine: the Kato-Temple error estimate of the top Ritz
value relative to its size. Observed agreement with dense references: 1e-12 to 1e-14."""

CERTIFY_RTOL = 1e-5
"""Widest proven bracket (relative to the value) around a top eigenvalue that the engine accepts
without a ``CertificationWarning``. The Collatz-Wielandt upper bound is first order in the Ritz
vector's error while the value itself is second order, so a bracket of 1e-5 goes with a value
accurate to about 1e-12 (Kato-Temple); the bracket proves that the value belongs to the top
eigenvalue and not to another one. Measured at n = 5,000, d = 300: 3e-6 on the first try.
A wider bracket is still true, and reported."""

RADIUS_RTOL_FLOOR = 1e-9
"""A spectral radius near 1 is certified relative to ``|1 - rho|`` (``CERTIFY_RTOL`` times it:
clusters of eigenvalues near 1, from directions of tiny curvature, are where Lanczos can settle
on the wrong one), but never tighter than this relative to the value."""

ROUNDING_RTOL = 1e-14
"""Size of rounding, relative to the eigenvalue and multiplied by sqrt(k), that a bracket may
exceed CERTIFY_RTOL by and still count as tight (a value near 0 formed by cancellation is known
only to that); and the allowance of the momentum solver's estimated (unproven) path. The proven
brackets themselves do not use it: they bound every rounding (``_rounding``)."""

DENSE_DIMENSION = 2080
"""Largest operator (dimension k (k + 1) / 2 of the k x k symmetric matrices; 2080 is k = 64)
that a certificate may build densely when the Collatz-Wielandt bracket is not tight, or when
Lanczos stalls (clustered eigenvalues near 1): k (k + 1) / 2 products and one dense eigensolve
(about 0.3 s at 820, 3 s at 2080). Up to this size Lanczos gets at most that many products
before the dense solve takes over."""

POWER_STEPS = 48
"""Power iterates of the identity a certificate may spend, per attempt, when the fast
Collatz-Wielandt bound (from the Ritz vector plus the identity) is not tight: this happens when
the top eigenvector is singular (samples acting on decoupled blocks of parameters)."""

LANCZOS_MEMORY_BYTES = 4e8
"""Memory budget of the stored Krylov basis; longer runs restart from the Ritz vector."""

LANCZOS_MAX_PRODUCTS = 5000
"""Operator products after which a Lanczos run gives up (``ConvergenceError``)."""

RANGE_RTOL = 1e-12
"""Eigenvalues of H (or of the Gram matrix of the factors) below this fraction of the largest are
round-off: those directions are treated as the common null space of the H_i."""

HUGE_UNIT_LR = 1e8
"""Above this ``lr * lambda_1(H)`` the second-moment map is divided by ``(lr lambda_1)^2`` before
it is applied: its entries would otherwise reach ``(lr lambda_1)^2``, which overflows near 1e154
and already makes LAPACK's tridiagonal eigensolver fail near 1e80. The radius and every logged
growth factor are multiplied back in log form. Far above the stable range (lr lambda_1 < 2), so
ordinary answers never take this path."""

ITERATION_CHUNK_FLOPS = 2e8
"""Work per compiled call of a long second-moment trajectory (about a tenth of a second): the
Python loop between calls is where Ctrl-C (KeyboardInterrupt) takes effect."""

MAX_TRAJECTORY_STEPS = 10**9
"""Longest ``second_moment`` trajectory: it returns one float per step (8 GB at the limit). Far
beyond it the asymptotic growth factor (``spectral_radius``) is the answer anyway."""

COHERENCE_RTOL = 1e-10
"""Lanczos tolerance of the Perron root of the coherence matrix S (then certified by the vector
Collatz-Wielandt bound to ``CERTIFY_RTOL``); sigma is compared with thresholds, never to 1e-12."""

THEORY_RTOL = 1e-11
"""Lanczos tolerance of kappa (the noise norm of Lemma 1): far below anything a condition
compares."""

DECISION_MARGIN = 1e-9
"""Relative margin with which a sufficient condition or a verdict is decided: quantities from
eigensolves carry errors near 1e-11, so at an exact equality (Theorem 2's construction on its
boundary, g = 1) a strict inequality must not fire on the last bit. Within the margin a condition
is reported inconclusive and a spectral radius "marginal"."""

INTEGER_BATCH_RTOL = 1e-9
"""An integer critical batch size is the real threshold lowered by this (relative) and rounded
up: the threshold is accurate to about 1e-12, so an exact integer threshold computed a few ulps
high does not become the next integer."""


# ----------------------------------------------------------------------------- stability maps
MAP_BLOCK = 6
"""Davidson correction vectors added to a map's shared basis per refinement round of a batch size."""

MAP_MAX_ROUNDS = 60
"""Refinement rounds of one batch size before its remaining points fall back to the engine."""

MAP_BASIS_BYTES = 3e8
"""Memory for a map's basis and its images under V (16 k^2 bytes per basis vector)."""

MAP_MAX_BASIS = 240
"""Largest shared basis of a map (vectors), whatever the memory."""

MAP_KEEP = 120
"""Directions of the basis kept from one batch size to the next."""

# ----------------------------------------------------------------------------- simulation
MIN_EFFECTIVE_RUNS = 30.0
"""A sample mean of ||w_t||^2 is flagged untrustworthy when fewer runs than this carry it
(effective sample size of the weights ||w_t||^2) ..."""

MIN_EFFECTIVE_FRACTION = 0.01
"""... or fewer than this fraction of all runs: a mean carried by a small fraction of the runs
signals a heavy tail, whose unseen part may carry far more mass."""

DEFAULT_RECORDS = 1000
"""Default recorded columns of a simulation: every step up to this many ..."""

DEFAULT_RECORD_BUDGET = 1 << 24
"""... and at most this many doubles in log_sq_norm (128 MiB), so memory stays modest."""

FIRST_CHUNK_SECONDS = 0.05
"""Target duration of a simulation's first chunk of steps (sized from a cost model); Python
updates the progress bar and can stop between chunks."""

CHUNK_SECONDS = 0.25
"""Target duration of the later chunks (sized from the measured speed)."""

PROGRESS_AFTER_SECONDS = 2.0
"""Automatic progress bar: shown when a simulation is estimated to take longer than this."""

WILSON_Z = 1.959963984540054
"""Two-sided 95% normal quantile, for the Wilson interval of a divergence fraction."""

# ----------------------------------------------------------------------------- threading (helper D, issue 12)
BLAS_THREADS_MIN_WORK = 10**9
"""Multiply-adds of a call's largest BLAS product below which the library runs BLAS with one
thread (fastsgdstab/_threads.py; measurements in docs/performance.md)."""


# ----------------------------------------------------------------------------- networks (issue 10, helper A)
JACOBIAN_RTOL = 1e-10
"""``HessianFamily.from_jacobians``: relative tolerance of the symmetry/PSD check of the output
Hessians Lambda_i and of the directions of H_i = J_i^T Lambda_i J_i dropped as negligible
(eigenvalues at most this fraction of the largest in the family). Float64 autograd gives
round-off near 1e-16; Jacobians computed in float32 need about 1e-5."""

GAUSS_NEWTON_RTOL = 1e-3
"""``fastsgdstab.torch.family_from_model`` warns when the part of the Hessian that the
Gauss-Newton surrogate leaves out (sum_c dl/df_c grad^2 f_c, its spectral norm estimated by
power iteration) exceeds this fraction of the sharpness."""

GAUSS_NEWTON_POWER_STEPS = 20
"""Power iterations (Hessian-vector products over the data) of that estimate."""

TORCH_MEMORY_BYTES = 1e9
"""``family_from_model``: memory for the Jacobian rows held at once (float64). The factor route
is taken when the (n, d, C) factors fit in it (and ``reduce`` is not True); otherwise the Gram
route, whose chunks of rows are sized to fit in it."""

ESCAPE_FACTOR = 1000.0
"""``escape_test``: a run has escaped when its excess loss over the minimum grew by this factor
(the paper's criterion)."""

# ----------------------------------------------------------------------------- Dask (issue 13)
DISTRIBUTED_TASKS_PER_SLOT = 4
"""Tasks per worker thread of the cluster when ``simulate`` or ``stability_map`` splits its work
(``client=``): enough for Dask to balance uneven workers and to lose little when one dies, few
enough that the per-task overhead (a few ms, and for maps a basis built per block) stays small."""

SIMULATE_MIN_RUNS_PER_TASK = 16
"""Fewest runs per task of a distributed simulation (unless chosen explicitly): smaller blocks
cost more in scheduling than they save in balance."""

SWEEP_SETTINGS_PER_TASK = 32
"""Settings (rows) of one family per ``sweep`` task: a family's rows share its reduction and
critical learning rates within a task; a worker that dies loses at most this many rows' work."""


# ----------------------------------------------------------------------------- momentum (helper B)
MOMENTUM_RTOL = 1e-11
"""Ritz residual (relative to the Perron root) at which the momentum engine's non-symmetric
Krylov solve of ``g o V`` stops and certifies (specification page, section "Momentum")."""

MOMENTUM_MAX_BASIS = 120
"""Largest shared Krylov basis of the momentum engine (vectors of k x k; with its images 16 k^2
bytes each); a full basis restarts from its Ritz vector."""

MOMENTUM_ROOT_XTOL = 1e-13
"""Root finders of the momentum engine (critical lr, spectral radius) stop when a step moves the
root by less than this (relative)."""

MOMENTUM_ROOT_ROUNDS = 12
"""Outer rounds (converge the basis at the current root, re-solve the projected root) before the
momentum root finder gives up and reports a wider certified bracket."""

MOMENTUM_BRACKET_STEPS = (1e-9, 1e-7, 1e-5, 1e-3)
"""Relative offsets from a momentum root at which the certificate tries to prove stability below
and instability above (the first that succeeds on both sides is the bracket)."""

RARE_RUNS_FRACTION = 0.1
"""A flagged sample mean of ||w_t||^2 is blamed on rare runs (a heavy tail) when its effective
sample size is below this fraction of the runs; above it, on too few runs (every run carries a
similar share, but fewer than MIN_EFFECTIVE_RUNS of them)."""

# ----------------------------------------------------------------------------- escape test, near-minimum check (issue 17)
ESCAPE_LINEARITY_RTOL = 0.1
"""``escape_test``: a run is in the linear regime while its excess loss ``L(theta_t) - L*`` is
within this fraction of the quadratic model ``(1/2) delta^T H delta`` (H the Gauss-Newton
Hessian at the minimum, delta = theta_t - theta*); checked at the start and at every step on
which the run is above a tenth of its starting excess loss. Outside it (cubic terms of the loss,
or the gradient of a point that is not a minimum) descent can mask growth, or noise fake it."""

ESCAPE_NOISE_MARGIN = 10.0
"""``escape_test``'s default start: its excess loss is at least this many times the excess loss
that the per-sample gradients' noise alone would add during the run (so that an escape is the
perturbation's growth, not the noise's)."""

ESCAPE_STEPS_MARGIN = 10.0
"""``escape_test``'s default length at rho(lr) > 1: this many times the steps in which the exact
mean-square growth rate rho(lr) multiplies the excess loss by ``factor`` (typical runs grow more
slowly than the mean square: at B = 2 and 1.3 eta* on a small MLP, three times was too few)."""

ESCAPE_STABLE_STEPS = 200
"""``escape_test``'s default length at rho(lr) <= 1 (no growth predicted: the run checks that the
nonlinear network does not leave either; rho itself is then near 1 from the flattest
directions, whose slow decay sets no useful length)."""

ESCAPE_MIN_STEPS = 20
"""Fewest steps of ``escape_test``'s default length."""

ESCAPE_MAX_STEPS = 5000
"""Most steps of ``escape_test``'s default length (near rho = 1 the needed length diverges: the
verdict is then "inconclusive")."""

RELATIVE_GRADIENT_RTOL = 1e-4
"""``fastsgdstab.torch.family_from_model`` warns (``GaussNewtonWarning``) when the relative
gradient (mean per-sample gradient norm / (sharpness ||theta||): the Newton step's length relative
to the parameters) exceeds this: the point is not a minimum (an MLP whose parameters are scaled
by 1.01 gives 4.7e-4; good interpolating minima give 1e-8 or less, a network trained to a loss
of 1e-8 on more equations than parameters about 1e-5)."""

GRADIENT_MEAN_RTOL = 1e-6
"""Per-sample gradients at a minimum have mean zero. ``HessianFamily`` warns when the norm of
their mean exceeds this fraction of their root-mean-square norm ``sqrt((1/n) sum ||g_i||^2)``
(the point is then not a minimum of the loss; float32 gradients of a well-trained network sit
near 1e-7 to 1e-5 and deserve the warning only above this)."""

GRADIENT_RANGE_RTOL = 1e-6
"""Largest part of the per-sample gradients outside the range of H (relative to their
root-mean-square norm) that ``stationary`` treats as round-off: it is dropped. Above it, the
iterates random-walk along flat directions, the covariance grows without limit and
``stationary`` raises an error that names the relative size (specification page, section
"Non-interpolating minima: stationary covariance and the loss floor")."""

STATIONARY_RTOL = 1e-10
"""Relative residual ``||r - A y|| / ||r||`` at which ``stationary``'s preconditioned
conjugate gradients (or GMRES, with momentum) stop."""

STATIONARY_MAX_PRODUCTS = 20000
"""Most operator products ``stationary`` spends on one solve before giving up with an error
(conjugate gradients need about ``sqrt(1 / (1 - lr / eta*))`` times log(1 / tolerance))."""

MOMENTUM_CRITICAL_FIRST_STEP = 1e-10
"""First relative offset below and above a momentum critical lr at which stability and
instability are proven (on the full map, with floating-point error bounds); it grows fourfold
until both proofs hold. The value returned is the proven-stable end, so this sets its accuracy
(then halved toward the root estimate, ``MOMENTUM_CRITICAL_BISECTIONS``)."""

MOMENTUM_CRITICAL_BISECTIONS = 4
"""Bisection steps on the proofs after a momentum critical lr is bracketed: each proven
midpoint halves the bracket (about 1e-10 to 2e-11 relative), at two proofs per step at most."""

RESHUFFLE_ESTIMATE_RTOL = 0.01
"""Relative standard error that ``stationary(..., sampling="reshuffle")`` aims at: its
Monte-Carlo estimate of the reshuffled loss floor adds runs until it is reached (or
``RESHUFFLE_MAX_STEPS`` is spent)."""

RESHUFFLE_MAX_STEPS = 50_000_000
"""Most simulated SGD steps (runs x steps per run) of one reshuffled loss-floor estimate; a
``SimulationWarning`` says when the budget stopped it short of its standard error."""

# ----------------------------------------------------------------------------- map: critical lr
MAP_CRITICAL_DELTA = 2.5e-6
"""A map's critical lr of each batch size is proven from the shared basis by two more points of
the row, at ``x_c (1 -+ MAP_CRITICAL_DELTA)``: the bracket is ``2 MAP_CRITICAL_DELTA`` wide
relative (a quarter of ``CERTIFY_RTOL``), proven stable at its lower end and unstable at its
upper end (phase.py)."""

MAP_CRITICAL_ATTEMPTS = 3
"""Estimates of ``x_c`` a map tries before it solves a batch size's critical lr with the engine."""

MAP_CRITICAL_RTOL_FLOOR = 1e-11
"""The tightest certification a map asks of the two points around a critical lr; a row that
would need tighter (a radius nearly flat in lr at the root) gets the engine's solve instead."""
