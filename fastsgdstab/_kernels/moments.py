"""Whole-trajectory kernels of momentum ``second_moment`` (specification page, section "Momentum").

``Sigma = E[z z^T]`` in H's eigenbasis on the range of H, with ``z = (w_t, w_{t-1})`` (heavy
ball) or ``(w_t, lr v_{t-1})`` (Nesterov): entry (j, l) of the 2 x 2 block matrix moves by
``M_j Z_jl M_l^T`` (O(k^2) per step, no 2k x 2k product), and only ``Sigma_11`` feeds the noise
(one ``noise_operator`` per step: two BLAS-3 products). The caller runs long trajectories in
chunks (Ctrl-C between chunks); the state is updated in place.
"""

import numpy as np

from ._jit import jit
from .operators import noise_operator


@jit
def _propagate(M, S11, S12, S22, T11, T12, T22, S21):
    """``T_ab[j, l] = sum_cd M_j[a, c] S_cd[j, l] M_l[b, d]`` (S_21 = S_12^T, written to the
    scratch ``S21``), with T11 and T22 symmetrised (the blocks stand for a symmetric Sigma;
    rounding would leave an antisymmetric part that can grow)."""
    k = S11.shape[0]
    for j in range(k):
        for l in range(k):
            S21[l, j] = S12[j, l]
    for j in range(k):
        a00 = M[j, 0, 0]
        a01 = M[j, 0, 1]
        a10 = M[j, 1, 0]
        a11 = M[j, 1, 1]
        for l in range(k):
            b00 = M[l, 0, 0]
            b01 = M[l, 0, 1]
            b10 = M[l, 1, 0]
            b11 = M[l, 1, 1]
            s00 = S11[j, l]
            s01 = S12[j, l]
            s10 = S21[j, l]
            s11 = S22[j, l]
            # (M_j Z M_l^T)_ab with Z = [[s00, s01], [s10, s11]]
            u0 = a00 * s00 + a01 * s10  # (M_j Z)[0, 0]
            u1 = a00 * s01 + a01 * s11  # (M_j Z)[0, 1]
            v0 = a10 * s00 + a11 * s10  # (M_j Z)[1, 0]
            v1 = a10 * s01 + a11 * s11  # (M_j Z)[1, 1]
            T11[j, l] = u0 * b00 + u1 * b01
            T12[j, l] = u0 * b10 + u1 * b11
            T22[j, l] = v0 * b10 + v1 * b11
    for j in range(k):
        for l in range(j + 1, k):
            v = 0.5 * (T11[j, l] + T11[l, j])
            T11[j, l] = v
            T11[l, j] = v
            v = 0.5 * (T22[j, l] + T22[l, j])
            T22[j, l] = v
            T22[l, j] = v


@jit
def momentum_iteration(rows, rank, m, interaction, M, qq, weight, log_factor, S11, S12, S22, state,
                       out):
    """``out.size`` steps of the renormalised momentum second-moment map from the blocks
    ``S11, S12, S22`` (updated in place, ``tr S11 + tr S22 = 1`` on return).

    Each step: ``W = weight (interaction (m m^T) o S11 + N(S11))`` (``m`` the unit eigenvalues,
    ``interaction`` 0 for Bernoulli, -1 for the other schemes: ``V_s`` of the engine; ``rows``
    the unit family's reduced rows; ``M`` the
    (k, 2, 2) matrices ``M_j`` divided by their scale), ``S_ab <- M S M^T |_ab + qq_ab W``, then
    division by ``tr S11 + tr S22``. ``state[0]`` carries the cumulative log scale (plus
    ``log_factor`` per step) and ``out[t]`` receives ``log tr S11`` at each step; once the state
    vanishes exactly (zero trace) the rest of ``out`` is left untouched (the caller fills it
    with -inf) and 1 is returned, else 0.
    """
    k = S11.shape[0]
    steps = out.shape[0]
    Y = np.empty((k, k))
    W = np.empty((k, k))
    T11 = np.empty((k, k))
    T12 = np.empty((k, k))
    T22 = np.empty((k, k))
    S21 = np.empty((k, k))
    work = np.empty(rows.shape)
    use_noise = weight != 0.0
    log_scale = state[0]
    for t in range(steps):
        if use_noise:
            for j in range(k):
                for l in range(k):
                    Y[j, l] = 0.5 * (S11[j, l] + S11[l, j])
            noise_operator(rows, rank, Y, work, W)
            for j in range(k):
                for l in range(k):
                    W[j, l] = weight * (interaction * m[j] * m[l] * Y[j, l] + W[j, l])
        _propagate(M, S11, S12, S22, T11, T12, T22, S21)
        norm = 0.0
        for j in range(k):
            for l in range(k):
                if use_noise:
                    S11[j, l] = T11[j, l] + qq[0, 0] * W[j, l]
                    S12[j, l] = T12[j, l] + qq[0, 1] * W[j, l]
                    S22[j, l] = T22[j, l] + qq[1, 1] * W[j, l]
                else:
                    S11[j, l] = T11[j, l]
                    S12[j, l] = T12[j, l]
                    S22[j, l] = T22[j, l]
            norm += S11[j, j] + S22[j, j]
        if not norm > 0.0:  # z vanished exactly: E||w||^2 is 0 from here on
            state[0] = log_scale
            return 1
        trace = 0.0
        inverse = 1.0 / norm
        for j in range(k):
            for l in range(k):
                S11[j, l] = S11[j, l] * inverse
                S12[j, l] = S12[j, l] * inverse
                S22[j, l] = S22[j, l] * inverse
            trace += S11[j, j]
        log_scale += np.log(norm) + log_factor
        out[t] = log_scale + np.log(trace) if trace > 0.0 else -np.inf
    state[0] = log_scale
    return 0


@jit
def affine_momentum_trajectory(rows, rank, sharpness, lam, a, b, M, P, q, sigma, mean, constant,
                               gbar, gradients, traces, means_rest, gbar_rest, rest_noise, final,
                               log_mean_sq, excess):
    """Records ``log E||w_t||^2`` and ``(1/2) tr(H Sigma_11)`` into ``log_mean_sq[t]``,
    ``excess[t]`` and then applies one step of momentum SGD with per-sample gradients, for each
    t of the chunk (the last record of the trajectory, ``final`` true, applies no step):

        Sigma <- Abar Sigma Abar^T + (q q^T) (x) (V(Sigma_11) + constant) + C + C^T,
        C = Abar m (q (x) gbar)^T + (q q^T) (x) ((a - 1) H m_1 gbar^T + b (1/n) sum_i H_i m_1 g_i^T),
        m <- Abar m + q (x) gbar,

    ``V(X) = (a - 1) H X H + b N(X)``, ``Abar = P (x) I + (q e_1^T) (x) diag(lam)`` applied as
    the 2 x 2 matrices ``M[j] = P + lam_j q e_1^T`` (O(k^2)); ``sigma`` (2k, 2k) and ``mean``
    (2k,) in H's eigenbasis, ``rows`` the unit family's reduced rows (``H_i = sharpness
    R_i^T R_i``), ``gradients`` (n, k) inside range(H). The flat directions move by ``P``:
    ``traces`` (2, 2) and ``means_rest`` (2, d). Plain floats, all state updated in place.
    """
    k = lam.shape[0]
    n = gradients.shape[0]
    d = gbar_rest.shape[0]
    count = log_mean_sq.shape[0]
    qq = np.empty((2, 2))
    for x in range(2):
        for y in range(2):
            qq[x, y] = q[x] * q[y]
    Y = np.empty((k, k))
    Nz = np.empty((k, k))
    V = np.empty((k, k))
    E1 = np.zeros((k, k))
    new = np.empty((2 * k, 2 * k))
    Am = np.empty(2 * k)
    work = np.empty(rows.shape)
    per_sample = np.empty((k, n))  # (H_i m_1)^T by columns: C-ordered for np.dot
    products = np.empty((k, k))
    projected = np.empty(rank)
    s2 = sharpness * sharpness
    for t in range(count):
        total = traces[0, 0]
        inside = 0.0
        for j in range(k):
            total += sigma[j, j]
            inside += lam[j] * sigma[j, j]
        log_mean_sq[t] = np.log(total) if total > 0.0 else -np.inf
        excess[t] = 0.5 * inside
        if final and t == count - 1:
            break
        if k:
            for j in range(k):
                for l in range(k):
                    Y[j, l] = 0.5 * (sigma[j, l] + sigma[l, j])
            noise_operator(rows, rank, Y, work, Nz)
            for j in range(k):
                for l in range(k):
                    V[j, l] = ((a - 1.0) * lam[j] * Y[j, l] * lam[l] + b * (s2 * Nz[j, l])
                               + constant[j, l])
            for x in range(2):
                for j in range(k):
                    Am[x * k + j] = M[j, x, 0] * mean[j] + M[j, x, 1] * mean[k + j]
            moving = False
            for j in range(2 * k):
                if mean[j] != 0.0:
                    moving = True
                    break
            if moving:
                # H_i m_1 = sharpness R_i^T (R_i m_1)
                for i in range(n):
                    for j in range(k):
                        per_sample[j, i] = 0.0
                    for c in range(rank):
                        s = 0.0
                        for j in range(k):
                            s += rows[i * rank + c, j] * mean[j]
                        projected[c] = s
                    for c in range(rank):
                        for j in range(k):
                            per_sample[j, i] += rows[i * rank + c, j] * projected[c]
                np.dot(per_sample, gradients, products)
                for j in range(k):
                    for l in range(k):
                        E1[j, l] = ((a - 1.0) * (lam[j] * mean[j]) * gbar[l]
                                    + b * sharpness * products[j, l] / n)
            for x in range(2):
                for y in range(2):
                    for j in range(k):
                        for l in range(k):
                            value = (M[j, x, 0] * sigma[j, l] * M[l, y, 0]
                                     + M[j, x, 0] * sigma[j, k + l] * M[l, y, 1]
                                     + M[j, x, 1] * sigma[k + j, l] * M[l, y, 0]
                                     + M[j, x, 1] * sigma[k + j, k + l] * M[l, y, 1]
                                     + qq[x, y] * V[j, l])
                            if moving:
                                value += (Am[x * k + j] * q[y] * gbar[l] + qq[x, y] * E1[j, l]
                                          + Am[y * k + l] * q[x] * gbar[j]
                                          + qq[y, x] * E1[l, j])
                            new[x * k + j, y * k + l] = value
            for j in range(2 * k):
                for l in range(j, 2 * k):
                    v = 0.5 * (new[j, l] + new[l, j])
                    sigma[j, l] = v
                    sigma[l, j] = v
            for x in range(2):
                for j in range(k):
                    mean[x * k + j] = Am[x * k + j] + q[x] * gbar[j]
        # the flat directions: 2 x 2 traces and (2, d) means
        p0 = 0.0
        p1 = 0.0
        for e in range(d):
            p0 += means_rest[0, e] * gbar_rest[e]
            p1 += means_rest[1, e] * gbar_rest[e]
        proj0 = P[0, 0] * p0 + P[0, 1] * p1
        proj1 = P[1, 0] * p0 + P[1, 1] * p1
        old = np.empty((2, 2))
        for x in range(2):
            for y in range(2):
                old[x, y] = traces[x, y]
        for x in range(2):
            for y in range(2):
                value = 0.0
                for c in range(2):
                    for e in range(2):
                        value += P[x, c] * old[c, e] * P[y, e]
                px = proj0 if x == 0 else proj1
                py = proj0 if y == 0 else proj1
                traces[x, y] = value + px * q[y] + q[x] * py + qq[x, y] * rest_noise
        for e in range(d):
            r0 = means_rest[0, e]
            r1 = means_rest[1, e]
            means_rest[0, e] = P[0, 0] * r0 + P[0, 1] * r1 + q[0] * gbar_rest[e]
            means_rest[1, e] = P[1, 0] * r0 + P[1, 1] * r1 + q[1] * gbar_rest[e]
