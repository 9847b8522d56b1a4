r"""Orthogonal dictionary learning, the functional core: Frank–Wolfe steps whose oracle is a polar
factor.

Model and conventions (scikit-learn's): samples are the rows of ``X`` (``m x n``); the dictionary
is ``W = components_`` (``k x n``, ``k <= n``) with orthonormal rows, ``W W^T = I_k`` (the
column dictionary of the papers is ``D = W^T``, ``D^T D = I_k``); codes are ``C = X W^T`` and the
reconstruction is ``C W``. For ``k = n`` the dictionary is an orthogonal basis.

**Objectives.** Both are convex functions of ``W``, maximised over the set of ``k x n`` matrices
with orthonormal rows; its convex hull is the spectral-norm unit ball
``B = {S : ||S||_2 <= 1}``, and a convex function attains its maximum over ``B`` at an extreme
point, i.e. at a matrix with orthonormal rows:

- ``"l4"`` (Zhai, Yang, Liao, Wright, Ma, 2020, "Complete Dictionary Learning via
  l4-Norm Maximization over the Orthogonal Group", JMLR 21):

  .. math:: f(W) = \frac{1}{4m} \|X W^T\|_4^4, \qquad \nabla f(W) = \frac{1}{m} (C^{\circ 3})^T X.

  Maximising the l4 norm of the codes favours spiky (sparse) codes; for ``X = X_0 D_0^T`` with
  i.i.d. Bernoulli–Gaussian ``X_0`` its global maxima are close to signed permutations of
  ``D_0^T`` (Zhai et al.; the tests check recovery at a 0.99 match).
- ``"k_sparse"``: the energy kept by the best ``s``-term code,

  .. math:: f(W) = \frac{1}{2m} \sum_i \|H_s(W x_i)\|_2^2, \qquad
            \partial f(W) \ni \frac{1}{m} H_s(C)^T X,

  with ``H_s`` keeping the ``s`` entries of largest magnitude. Because ``W`` has orthonormal rows,
  ``||x - W^T H_s(W x)||^2 = ||x||^2 - ||H_s(W x)||^2``: maximising ``f`` *is* minimising the
  ``s``-sparse reconstruction error, and the Frank–Wolfe step below is then the Procrustes
  update of alternating orthogonal dictionary learning (the "sufficient statistic" ``X^T H_s(C)``
  of Mairal et al., 2009, "Online dictionary learning for sparse coding", restricted to
  orthogonal dictionaries).

**Frank–Wolfe step.** The linear maximisation oracle of a gradient ``G`` over ``B`` is its polar
factor, ``argmax_{||S||_2 <= 1} <G, S> = U V^T`` for ``G = U S V^T``; then

.. math:: W \leftarrow \mathrm{polar}\big((1 - \gamma) W + \gamma\, \mathrm{polar}(G)\big).

With ``gamma = 1`` this is exactly MSP ("matching, stretching, projection") of Zhai et al. For a
convex ``f`` it ascends monotonically: ``f(S) >= f(W) + <G, S - W> >= f(W)``. The outer polar
re-projects the convex combination (interior to ``B`` when ``gamma < 1``) onto the extreme points.

**Online.** Mini-batch gradients are averaged with a forgetting factor ``rho``,
``G_t = rho G_{t-1} + (1 - rho) grad f_{B_t}(W_t)`` (a stochastic Frank–Wolfe direction; with
``rho`` near 1 and ``"k_sparse"`` it is the running sufficient statistic of Mairal et al.), so
:meth:`~OnlineOrthogonalDictionaryLearning.partial_fit` can continue from any state.

**Codes.** With orthonormal rows every per-sample coding problem separates across atoms, so the
thresholding rules in :func:`sparse_codes` are exact minimisers, not approximations:
top-``s`` hard thresholding is the best ``s``-sparse code, hard thresholding at ``alpha`` solves
``min 1/2||x - W^T c||^2 + alpha^2/2 ||c||_0`` and soft thresholding at ``alpha`` solves the lasso
``min 1/2||x - W^T c||^2 + alpha ||c||_1``.

These functions are pure torch: they import without scikit-learn. The estimator around them,
:class:`~orthotorch.decomposition.OnlineOrthogonalDictionaryLearning`, lives in
:mod:`.dictionary` and needs the ``orthotorch[sklearn]`` extra.
"""

from __future__ import annotations

import math
from numbers import Integral
from typing import Literal

import torch
from torch import Tensor

from orthotorch.linalg import orthogonalize, polar

__all__ = [
    "CODING_ALGORITHMS",
    "OBJECTIVES",
    "CodingAlgorithm",
    "Objective",
    "averaging_weight",
    "frank_wolfe_step",
    "k_sparse_objective_gradient",
    "l4_objective_gradient",
    "objective_gradient",
    "principal_basis",
    "sparse_codes",
    "spectral_lmo",
]

Objective = Literal["l4", "k_sparse"]
CodingAlgorithm = Literal["hard", "soft", "topk"]
OBJECTIVES: tuple[str, ...] = ("l4", "k_sparse")
CODING_ALGORITHMS: tuple[str, ...] = ("hard", "soft", "topk")


# ---------------------------------------------------------------------------------------------
# Functional core: pure tensor functions.
# ---------------------------------------------------------------------------------------------


def _keep_top(C: Tensor, k: int) -> Tensor:
    """``H_k`` row-wise: keep the ``k`` entries of largest magnitude of each row of ``C``."""
    if k >= C.shape[-1]:
        return C.clone()
    idx = torch.topk(C.abs(), k, dim=-1, sorted=False).indices
    return torch.zeros_like(C).scatter_(-1, idx, C.gather(-1, idx))


def l4_objective_gradient(W: Tensor, X: Tensor) -> tuple[Tensor, Tensor]:
    """``f(W) = ||X W^T||_4^4 / (4m)`` and its gradient ``(C^3)^T X / m`` with ``C = X W^T``.

    Args:
        W: ``(k, n)`` dictionary (rows are atoms).
        X: ``(m, n)`` samples as rows.

    Returns:
        ``(f, G)``: the scalar objective and the ``(k, n)`` gradient.
    """
    m = X.shape[0]
    C = X @ W.mT
    C3 = C * C * C
    return (C3 * C).sum() / (4 * m), C3.mT @ X / m


def k_sparse_objective_gradient(
    W: Tensor, X: Tensor, n_nonzero_coefs: int
) -> tuple[Tensor, Tensor]:
    """Energy of the best ``s``-term codes, ``f(W) = sum_i ||H_s(W x_i)||^2 / (2m)``.

    ``f`` is a maximum of convex quadratics (one per support), hence convex; the returned
    ``G = H_s(C)^T X / m`` is the gradient of the active quadratic (a subgradient at ties).
    For orthonormal rows, ``f(W) = ||X||_F^2 / (2m) - (s-sparse reconstruction error) / (2m)``.
    """
    m = X.shape[0]
    H = _keep_top(X @ W.mT, n_nonzero_coefs)
    return (H * H).sum() / (2 * m), H.mT @ X / m


def objective_gradient(
    W: Tensor, X: Tensor, objective: Objective = "l4", n_nonzero_coefs: int | None = None
) -> tuple[Tensor, Tensor]:
    """Dispatch to :func:`l4_objective_gradient` or :func:`k_sparse_objective_gradient`."""
    if objective == "l4":
        return l4_objective_gradient(W, X)
    if objective == "k_sparse":
        if n_nonzero_coefs is None:
            raise ValueError("objective='k_sparse' needs n_nonzero_coefs (a positive int)")
        return k_sparse_objective_gradient(W, X, n_nonzero_coefs)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def _orthogonalize(G: Tensor, method: str) -> Tensor:
    compute = torch.float64 if G.dtype == torch.float64 else torch.float32
    if method == "svd":
        return polar(G)
    return orthogonalize(G, method, dtype=compute)


def spectral_lmo(G: Tensor, W: Tensor | None = None, method: str = "svd") -> Tensor:
    """Linear maximisation oracle over the spectral-norm ball: ``argmax_{||S||_2<=1} <G, S>``.

    The maximiser is the polar factor ``U V^T`` of ``G = U S V^T`` (von Neumann's trace
    inequality). When ``G`` is rank deficient (an atom no sample uses, a batch smaller than
    ``k``) the maximisers form a set, and the plain polar factor — which maps null directions
    to zero — is its one *non*-orthogonal member. Adding ``tau ||G||_F W`` with
    ``tau = sqrt(eps)`` picks, among (near-)maximisers, the one closest to the current iterate
    ``W``, which keeps the rows orthonormal; it moves a well-determined ``G``'s answer by
    ``O(tau)`` only in directions whose singular values are ``O(tau)`` of the largest.

    Args:
        G: ``(k, n)`` gradient, ``k <= n``.
        W: current iterate used for the tie-break, or ``None`` for the plain polar factor.
        method: ``"svd"`` (exact, via :func:`orthotorch.linalg.polar`) or any Newton–Schulz
            method of :func:`orthotorch.linalg.available_methods` (approximate; computed in
            float32/float64, never bf16, since the dictionary must stay orthogonal).
    """
    if W is not None:
        tau = math.sqrt(torch.finfo(G.dtype).eps)
        scale = torch.linalg.matrix_norm(G)
        # A zero gradient (e.g. all-zero batch) has no preferred direction: stay at W.
        G = G + tau * torch.where(scale > 0, scale, torch.ones_like(scale)) * W
    return _orthogonalize(G, method)


def frank_wolfe_step(W: Tensor, G: Tensor, step_size: float = 1.0, method: str = "svd") -> Tensor:
    """One Frank–Wolfe ascent step ``polar((1 - gamma) W + gamma * LMO(G))``.

    ``gamma = 1`` is MSP (Zhai et al., 2020): the new dictionary is the oracle's answer itself.
    For ``gamma < 1`` the convex combination lies inside the spectral-norm ball and is
    re-projected onto matrices with orthonormal rows by an exact polar factor.
    """
    S = spectral_lmo(G, W, method)
    if step_size == 1.0:
        return S if method == "svd" else polar(S)
    return polar((1.0 - step_size) * W + step_size * S)


def sparse_codes(
    W: Tensor,
    X: Tensor,
    mode: CodingAlgorithm = "topk",
    n_nonzero_coefs: int | None = None,
    threshold: float | None = None,
) -> Tensor:
    """Sparse codes of the rows of ``X`` in the orthonormal-rows dictionary ``W`` (``k x n``).

    With ``c = W x`` (the analysis coefficients, exact since ``W W^T = I_k``):

    - ``"topk"``: ``H_s(c)``, the ``s = n_nonzero_coefs`` largest ``|c_j|``: the exact minimiser
      of ``||x - W^T z||`` over ``s``-sparse ``z`` (the error is
      ``||x - W^T W x||^2 + sum_{j not kept} c_j^2``).
    - ``"hard"``: ``c_j 1[|c_j| > alpha]``: exact for ``1/2||x - W^T z||^2 + alpha^2/2 ||z||_0``.
    - ``"soft"``: ``sign(c_j) max(|c_j| - alpha, 0)``: the exact lasso solution for
      ``1/2||x - W^T z||^2 + alpha ||z||_1``.

    Returns ``(m, k)`` codes in ``X``'s dtype.
    """
    if mode not in CODING_ALGORITHMS:
        raise ValueError(f"mode must be one of {CODING_ALGORITHMS}, got {mode!r}")
    if mode == "topk":
        if n_nonzero_coefs is None:
            raise ValueError("mode='topk' needs n_nonzero_coefs (a positive int)")
        if isinstance(n_nonzero_coefs, bool) or not isinstance(n_nonzero_coefs, Integral):
            raise TypeError(f"n_nonzero_coefs must be an int, got {type(n_nonzero_coefs).__name__}")
        if n_nonzero_coefs < 1:
            raise ValueError(f"n_nonzero_coefs must be a positive int, got {n_nonzero_coefs}")
        return _keep_top(X @ W.mT, int(n_nonzero_coefs))
    if threshold is None:
        raise ValueError(f"mode={mode!r} needs threshold (a non-negative float)")
    if not threshold >= 0:
        # A negative soft threshold would inflate every code instead of shrinking it.
        raise ValueError(f"threshold must be a non-negative number, got {threshold!r}")
    C = X @ W.mT
    if mode == "hard":
        return C * (C.abs() > threshold)
    if mode == "soft":
        return C.sign() * (C.abs() - threshold).clamp_min(0)
    raise ValueError(f"mode must be one of {CODING_ALGORITHMS}, got {mode!r}")


def principal_basis(X: Tensor, n_components: int) -> Tensor:
    """Top ``n_components`` right singular vectors of ``X`` (uncentred) as orthonormal rows.

    Taken from the ``n x n`` Gram matrix ``X^T X`` (the SVD of a PSD matrix is its eigen
    decomposition, sorted), which costs ``O(m n^2)`` for any number of rows and completes the
    basis when ``X`` has fewer rows than columns.
    """
    U, _, _ = torch.linalg.svd(X.mT @ X)
    return U[:, :n_components].mT.contiguous()


def averaging_weight(step: int, forget_factor: float) -> float:
    """Weight ``rho_t`` of the old running gradient at step ``t = 0, 1, ...``.

    ``rho_t = min(forget_factor, 1 - 4 / (t + 8)^(2/3))``: the schedule of stochastic
    Frank–Wolfe with averaged gradients (Mokhtari, Hassani, Karbasi, 2020, "Stochastic
    Conditional Gradient Methods", JMLR 21), which trusts fresh gradients while the iterate still
    moves fast, capped by ``forget_factor`` so that old gradients, taken at old dictionaries, are
    forgotten at a fixed minimum rate on a stream.
    """
    return min(forget_factor, max(0.0, 1.0 - 4.0 / (step + 8) ** (2.0 / 3.0)))
