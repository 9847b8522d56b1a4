"""Orthogonal parametrizations and the Householder projector layer.

Every map here produces an *exactly* (to rounding) semi-orthogonal matrix from unconstrained
parameters, so a plain optimizer (Adam, SGD) can train it and the constraint never drifts:

- :class:`HouseholderOrthogonal`: ``W = H_1 H_2 ... H_k E`` with reflections
  ``H_i = I - 2 u_i u_i^T / ||u_i||^2`` and ``E = [I_q; 0]`` the thin identity.
- :class:`CayleyOrthogonal`: ``W = Q_0 (I - A)(I + A)^{-1} E D_0`` with ``A`` skew-symmetric
  and a fixed base ``(Q_0, D_0)`` set by ``right_inverse``.
- :class:`HouseholderProjector`: a linear layer ``W = Q(U) diag(s) Q(V)^T`` with Householder
  factors and learnable singular values ``s``.
- :func:`orthogonal`: registers either map on a module's weight, like
  :func:`torch.nn.utils.parametrizations.orthogonal`.

Both parametrizations are modules for :func:`torch.nn.utils.parametrize.register_parametrization`
and work on the tall orientation ``p x q`` (``p = max(m, n)``, ``q = min(m, n)``); a wide
``m < n`` weight is the transpose, so ``W W^T = I`` there. Their *original* tensor (the trained
parameter) is always stored tall: ``(p, k)`` reflectors for Householder, ``(p, q)`` for Cayley.

The functional core (pure tensor functions, batched over leading dimensions) carries the math:
:func:`householder_semi_orthogonal` (compact WY form, the fast path) next to
:func:`householder_semi_orthogonal_reference` (one rank-1 update per reflection, the readable
spec), and :func:`cayley_semi_orthogonal` (a ``q x q`` Schur-complement solve) next to
:func:`cayley_reference` (the full ``p x p`` solve).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

__all__ = [
    "CayleyOrthogonal",
    "HouseholderOrthogonal",
    "HouseholderProjector",
    "cayley_reference",
    "cayley_semi_orthogonal",
    "householder_matmul",
    "householder_reflectors",
    "householder_semi_orthogonal",
    "householder_semi_orthogonal_reference",
    "orthogonal",
    "skew_from_tril",
]

OrthogonalMethod = Literal["householder", "cayley"]


# ---------------------------------------------------------------------------- functional core


def _check_int(name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


def _upcast(X: Tensor) -> Tensor:
    # geqrf, triangular and LU solves have no half-precision kernels (and torch's parametrize
    # silently swallows a NotImplementedError from right_inverse), so half weights compute in
    # float32 and are rounded once at the end.
    return X.float() if X.dtype in (torch.float16, torch.bfloat16) else X


def _unit_reflectors(U: Tensor) -> tuple[Tensor, Tensor]:
    """``(Û, T^{-1})``: unit columns and the inverse triangular factor of the UT transform.

    A zero column is read as "no reflection" (the identity), as LAPACK reads ``tau = 0``: its
    normalised column stays zero and its diagonal entry of ``T^{-1}`` is set to 1/2, so it adds
    nothing and never divides by zero. The ``where`` on the norm keeps the gradient finite there.
    """
    norm = torch.linalg.vector_norm(U, dim=-2, keepdim=True)
    nonzero = norm > 0
    Uhat = U / torch.where(nonzero, norm, torch.ones_like(norm))
    gram = Uhat.mT @ Uhat
    # The exact ||û_i||^2 / 2 (not the constant 1/2) keeps each factor an exact reflection even
    # though the normalisation rounds.
    half = torch.where(nonzero.squeeze(-2), gram.diagonal(dim1=-2, dim2=-1) / 2, 0.5)
    Tinv = gram.triu(1) + torch.diag_embed(half)
    return Uhat, Tinv


def householder_matmul(U: Tensor, X: Tensor) -> Tensor:
    r"""``H_1 H_2 \cdots H_k X`` with ``H_i = I - 2 u_i u_i^T / ||u_i||^2``, ``u_i = U[..., :, i]``.

    Uses the compact WY ("UT transform") form of the product (Joffrain, Low, Quintana-Ortí and
    van de Geijn, "Accumulating Householder transformations, revisited", ACM TOMS 2006):

    .. math::  H_1 \cdots H_k = I - \hat U T \hat U^T,\qquad
               T^{-1} = \operatorname{striu}(\hat U^T \hat U) + \tfrac12 \operatorname{diag}
               (\|\hat u_i\|^2)

    with unit columns ``û_i``. Cost ``O(p k^2 + p k c)`` for ``X`` of shape ``(..., p, c)``: two
    GEMMs, one ``k x k`` Gram matrix and a triangular solve, never a ``p x p`` matrix.
    A zero column of ``U`` is the identity.
    """
    Uhat, Tinv = _unit_reflectors(U)
    Z = torch.linalg.solve_triangular(Tinv, Uhat.mT @ X, upper=True)
    return X - Uhat @ Z


def householder_semi_orthogonal(U: Tensor, q: int) -> Tensor:
    """The first ``q`` columns of ``H_1 ... H_k`` for reflectors ``U`` of shape ``(..., p, k)``.

    Equal to :func:`householder_matmul` with ``X = [I_q; 0]`` but uses ``Û^T E = Û[:q]^T``
    (a slice, not a product). Any ``k >= 1`` is allowed; ``k = q`` reaches every ``p x q``
    semi-orthogonal matrix up to column signs (see :func:`householder_reflectors`).
    """
    p = U.shape[-2]
    if not 1 <= q <= p:
        raise ValueError(f"q must be in [1, {p}] for reflectors of length {p}, got {q}")
    Uhat, Tinv = _unit_reflectors(U)
    Z = torch.linalg.solve_triangular(Tinv, Uhat[..., :q, :].mT, upper=True)
    E = torch.eye(p, q, dtype=U.dtype, device=U.device)
    return E - Uhat @ Z


def householder_semi_orthogonal_reference(U: Tensor, q: int) -> Tensor:
    """Readable spec of :func:`householder_semi_orthogonal`: ``k`` rank-1 updates of ``E``.

    Applies ``H_k`` first (the product acts right to left): ``X <- X - 2 u (u^T X) / ||u||^2``.
    """
    p, k = U.shape[-2], U.shape[-1]
    X = torch.eye(p, q, dtype=U.dtype, device=U.device).expand(*U.shape[:-2], p, q)
    for i in reversed(range(k)):
        u = U[..., :, i : i + 1]
        X = X - (2 / (u.mT @ u)) * u @ (u.mT @ X)
    return X


@torch.no_grad()
def householder_reflectors(Y: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
    """Reflectors ``U`` (``(..., p, k)``) and signs ``d`` (``(..., q)``) for a tall ``Y``.

    ``householder_semi_orthogonal(U, q) * d`` is the orthonormal factor ``Q`` of ``Y = Q R``
    with ``diag(R) >= 0``; for a semi-orthogonal ``Y`` that is ``Y`` itself. The signs are
    needed because LAPACK picks each reflector to avoid cancellation, which leaves
    ``Y = H_1 ... H_q E diag(±1)``, and because in the square case a product of ``k``
    reflections has determinant ``(-1)^k``: no reflectors alone reach both components of O(n).

    From LAPACK's ``geqrf``: its ``i``-th reflector is ``v_i = [0, .., 0, 1, A[i+1:, i]]`` with
    ``tau_i = 2 / ||v_i||^2``. Where ``tau_i = 0`` (LAPACK skipped a column already on ``±e_i``)
    we use ``v_i = e_i`` instead, which commutes with the later reflectors and only negates
    column ``i``, absorbed into ``d``. For ``k > q`` the extra reflectors are ``e_j`` with
    ``j >= q`` (they fix ``E``; in the square case each negates the last column, absorbed into
    ``d``). For ``k < q`` only the first ``k`` columns of ``Q`` are reproduced: not every
    semi-orthogonal matrix is a product of fewer than ``q`` reflections applied to ``E``.
    """
    p, q = Y.shape[-2], Y.shape[-1]
    if p < q:
        raise ValueError(f"Y must be tall (rows >= columns), got shape {tuple(Y.shape)}")
    k = q if k is None else _check_int("k", k, 1)
    A, tau = torch.geqrf(Y)
    V = A.tril(-1)
    V.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    skipped = tau == 0
    eye = torch.eye(p, q, dtype=Y.dtype, device=Y.device)
    V = torch.where(skipped.unsqueeze(-2), eye, V)
    R_diag = A.diagonal(dim1=-2, dim2=-1)
    # sign(R_ii) makes diag(R) >= 0 (a zero R_ii, rank-deficient Y, counts as +); a skipped
    # column flips once more for its e_i reflector.
    flip = (R_diag < 0) ^ skipped
    signs = torch.where(flip, -1.0, 1.0).to(Y.dtype)
    if k <= q:
        signs[..., k:] = 1.0
        return V[..., :k].contiguous(), signs
    extra = torch.zeros(*Y.shape[:-2], p, k - q, dtype=Y.dtype, device=Y.device)
    for j in range(k - q):
        if p > q:
            extra[..., q + j % (p - q), j] = 1.0
        else:
            extra[..., q - 1, j] = 1.0
            signs[..., q - 1] *= -1.0
    return torch.cat([V, extra], dim=-1), signs


def skew_from_tril(X: Tensor) -> Tensor:
    """The ``p x p`` skew-symmetric ``A = L - L^T``, ``L = [tril(X, -1) | 0]`` for ``X`` ``(p, q)``.

    ``A = [[Ω, -B^T], [B, 0]]`` with ``Ω`` (``q x q``) skew from the strict lower triangle of
    ``X[:q]`` and ``B = X[q:]``: the ``p q - q (q + 1) / 2`` free entries, as many as the
    dimension of the Stiefel manifold (torch uses the same embedding).
    """
    p, q = X.shape[-2], X.shape[-1]
    L = torch.cat([X.tril(-1), X.new_zeros(*X.shape[:-2], p, p - q)], dim=-1)
    return L - L.mT


def cayley_reference(A: Tensor) -> Tensor:
    """``(I - A)(I + A)^{-1}`` by one ``p x p`` solve (the factors commute)."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(eye + A, eye - A)


def cayley_semi_orthogonal(X: Tensor) -> Tensor:
    r"""First ``q`` columns of the Cayley transform of ``A = skew_from_tril(X)``, ``X`` ``(p, q)``.

    ``(I - A)(I + A)^{-1} E = 2 (I + A)^{-1} E - E``, and with ``A = [[Ω, -B^T], [B, 0]]`` block
    elimination of ``(I + A) Z = E`` gives ``Z = [M^{-1}; -B M^{-1}]``,
    ``M = I + Ω + B^T B``, so

    .. math:: W = \begin{bmatrix} 2 M^{-1} - I \\ -2 B M^{-1} \end{bmatrix}.

    Only a ``q x q`` system is solved (cost ``O(p q^2)``, not ``O(p^3)``), and it is always
    well posed: the symmetric part of ``M`` is ``I + B^T B \succeq I``, so ``||M^{-1}|| <= 1``.
    """
    p, q = X.shape[-2], X.shape[-1]
    if p < q:
        raise ValueError(f"X must be tall (rows >= columns), got shape {tuple(X.shape)}")
    L = X[..., :q, :].tril(-1)
    B = X[..., q:, :]
    eye = torch.eye(q, dtype=X.dtype, device=X.device)
    M = eye + (L - L.mT) + B.mT @ B
    # solve(M, I) = M^{-1}: one LU, differentiable, and better conditioned than inv + matmul.
    Minv = torch.linalg.solve(M, eye.expand_as(M))
    return torch.cat([2 * Minv - eye, -2 * (B @ Minv)], dim=-2)


# ---------------------------------------------------------------------------- parametrizations


class _TallParametrization(nn.Module):
    """Shape bookkeeping shared by both maps: ``m x n`` weight, tall ``p x q`` computation."""

    def __init__(self, m: int, n: int) -> None:
        super().__init__()
        self.m = _check_int("m", m, 1)
        self.n = _check_int("n", n, 1)
        self.p, self.q = max(m, n), min(m, n)
        self.transposed = m < n

    def _check_weight(self, W: Tensor) -> Tensor:
        """``W`` (``m x n``) as a finite tall ``p x q`` tensor; raises otherwise."""
        if not isinstance(W, Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(W).__name__}")
        if tuple(W.shape) != (self.m, self.n):
            raise ValueError(
                f"weight must have shape ({self.m}, {self.n}) for this parametrization, "
                f"got {tuple(W.shape)}"
            )
        if not W.is_floating_point():
            raise ValueError(f"weight must be a real floating-point tensor, got {W.dtype}")
        if not bool(torch.isfinite(W).all()):
            raise ValueError("weight contains NaN or Inf values")
        return W.mT if self.transposed else W

    def _orient(self, Y: Tensor) -> Tensor:
        return Y.mT if self.transposed else Y

    def extra_repr(self) -> str:
        return f"m={self.m}, n={self.n}"


class HouseholderOrthogonal(_TallParametrization):
    r"""Semi-orthogonal ``m x n`` weight from ``k`` Householder reflections.

    .. math:: W^{(\text{tall})} = H_1 H_2 \cdots H_k \, E \, \operatorname{diag}(d),\qquad
              H_i = I - 2\, u_i u_i^T / \|u_i\|^2,\quad E = [I_q; 0]

    The original tensor holds the reflectors ``u_i`` as the columns of a ``(p, k)`` matrix
    (tall orientation); the signs ``d`` (buffer ``signs``, ``(q,)``, all ones until
    :meth:`right_inverse` sets them) are fixed, not trained. ``k`` defaults to ``q = min(m, n)``,
    which with the signs reaches every semi-orthogonal matrix (Householder QR); any ``k >= 1``
    is allowed. Training moves continuously, so a square weight keeps the determinant it
    started with (the two components of O(n) are not connected; no parametrization crosses).
    ``W^T W = I`` (tall) or ``W W^T = I`` (wide) holds to rounding for every value of the
    reflectors; a zero reflector is the identity. Forward cost ``O(p k^2 + p k q)`` in the
    compact WY form (:func:`householder_matmul`), never a ``p x p`` product.

    Example::

        layer = nn.Linear(8, 16)
        parametrize.register_parametrization(layer, "weight", HouseholderOrthogonal(16, 8))
        # layer.weight is now the orthonormal QR factor of the old weight, and stays orthonormal
    """

    signs: Tensor

    def __init__(self, m: int, n: int, k: int | None = None) -> None:
        super().__init__(m, n)
        self.k = self.q if k is None else _check_int("k", k, 1)
        self.register_buffer("signs", torch.ones(self.q))

    def forward(self, U: Tensor) -> Tensor:
        if U.shape[-2:] != (self.p, self.k):
            raise ValueError(
                f"reflectors must have shape ({self.p}, {self.k}) (tall p x k), "
                f"got {tuple(U.shape)}"
            )
        X = _upcast(U)
        W = householder_semi_orthogonal(X, self.q) * self.signs.to(X.dtype)
        return self._orient(W.to(U.dtype))

    @torch.no_grad()
    def right_inverse(self, W: Tensor) -> Tensor:
        """Reflectors (and signs) whose image is the orthonormal QR factor of ``W``.

        Exact for a semi-orthogonal ``W`` when ``k >= min(m, n)``; for ``k < min(m, n)`` only
        the first ``k`` columns (rows, for wide ``W``) are reproduced.
        """
        Y = self._check_weight(W)
        U, signs = householder_reflectors(_upcast(Y), self.k)
        self.signs = signs
        return U.to(Y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"


class CayleyOrthogonal(_TallParametrization):
    r"""Semi-orthogonal ``m x n`` weight from the Cayley transform of a skew-symmetric matrix.

    .. math:: W^{(\text{tall})} = Q_0\,(I - A)(I + A)^{-1} E\, \operatorname{diag}(d_0),\qquad
              A = -A^T = \begin{bmatrix} \Omega & -B^T \\ B & 0 \end{bmatrix}

    The original tensor ``X`` (``(p, q)``, tall) holds ``A``'s free entries (strict lower
    triangle of ``X[:q]`` gives ``Ω``, ``X[q:] = B``; the rest of ``X`` is unused and gets zero
    gradient). Only the first ``q`` columns are computed, by a ``q x q`` solve
    (:func:`cayley_semi_orthogonal`).

    The -1 limitation: the Cayley transform is a bijection from skew-symmetric matrices onto the
    orthogonal matrices **without eigenvalue -1**, which it approaches only as ``||A|| -> inf``.
    In the square case that excludes every matrix with ``det = -1`` (they all have eigenvalue
    -1), so a plain Cayley parametrization could not even represent half of the random
    initialisations. Hence the fixed base ``(Q_0, d_0)``: buffers ``base`` and ``signs``
    (``(q,)``), the identity until :meth:`right_inverse` puts the target into them and returns
    ``X = 0``. Training then starts at ``A = 0``, as far as possible from the excluded set,
    which becomes ``Q_0`` times the matrices with eigenvalue -1 (measure zero, at infinite
    ``||A||``). This is torch's "trivialization" (``use_trivialization=True``), but ``Q_0`` is
    kept as a dense ``p x p`` matrix only when ``p <= 2 q`` (one GEMM is then cheaper than
    the three of the WY form); taller weights keep its ``q`` Householder reflectors
    (``(p, q)``, zeros = identity), so the base never costs more memory than twice the weight.
    """

    base: Tensor
    signs: Tensor

    def __init__(self, m: int, n: int) -> None:
        super().__init__(m, n)
        self.dense_base = self.p <= 2 * self.q
        base = torch.eye(self.p) if self.dense_base else torch.zeros(self.p, self.q)
        self.register_buffer("base", base)
        self.register_buffer("signs", torch.ones(self.q))

    def forward(self, X: Tensor) -> Tensor:
        if X.shape[-2:] != (self.p, self.q):
            raise ValueError(
                f"X must have shape ({self.p}, {self.q}) (tall p x q), got {tuple(X.shape)}"
            )
        Xc = _upcast(X)
        C = cayley_semi_orthogonal(Xc)
        base = self.base.to(Xc.dtype)
        W = base @ C if self.dense_base else householder_matmul(base, C)
        return self._orient((W * self.signs.to(Xc.dtype)).to(X.dtype))

    @torch.no_grad()
    def right_inverse(self, W: Tensor) -> Tensor:
        """Set the base to the orthonormal QR factor of ``W`` and return ``X = 0``."""
        Y = self._check_weight(W)
        U, self.signs = householder_reflectors(_upcast(Y))
        if self.dense_base:
            U = householder_matmul(U, torch.eye(self.p, dtype=U.dtype, device=Y.device))
        self.base = U
        return torch.zeros_like(Y)


def orthogonal(
    module: nn.Module,
    name: str = "weight",
    method: OrthogonalMethod = "householder",
    *,
    k: int | None = None,
) -> nn.Module:
    """Constrain ``module.<name>`` (a 2-D tensor) to be semi-orthogonal; returns ``module``.

    Like :func:`torch.nn.utils.parametrizations.orthogonal`: registers a
    :class:`HouseholderOrthogonal` (``k`` reflections, default ``min(m, n)``) or a
    :class:`CayleyOrthogonal` parametrization; the weight starts at the orthonormal QR factor of
    its current value. Optimizers must be created after this call (the parameter becomes
    ``module.parametrizations.<name>.original``).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"module {type(module).__name__} has no parameter or buffer {name!r}")
    if weight.ndim != 2:
        raise ValueError(f"{name} must be a matrix (2 dimensions), got shape {tuple(weight.shape)}")
    m, n = weight.shape
    if method == "householder":
        param: nn.Module = HouseholderOrthogonal(m, n, k)
    elif method == "cayley":
        if k is not None:
            raise ValueError("k (number of reflections) applies to method='householder' only")
        param = CayleyOrthogonal(m, n)
    else:
        raise ValueError(f"method must be 'householder' or 'cayley', got {method!r}")
    parametrize.register_parametrization(module, name, param.to(weight.device))
    return module


# ---------------------------------------------------------------------------- projector layer


class HouseholderProjector(nn.Module):
    r"""Linear layer ``y = x W^T + b`` with ``W = Q(U) \operatorname{diag}(s) Q(V)^T``.

    ``Q(U)`` (``out_features x rank``) and ``Q(V)`` (``in_features x rank``) are products of
    ``rank`` Householder reflections applied to the thin identity
    (:func:`householder_semi_orthogonal`), so they are exactly orthonormal for every value of
    the reflector parameters ``U`` and ``V``; the singular values of ``W`` are ``|s|``. The
    forward pass never forms ``W``: ``y = ((x Q(V)) * s) Q(U)^T + b``.

    Initialisation: the best rank-``rank`` approximation (truncated SVD) of a weight drawn like
    :class:`torch.nn.Linear`'s (or of a given layer's, :meth:`from_linear`).

    Args:
        in_features: ``n``.
        out_features: ``m``.
        rank: number of singular values, ``1 <= rank <= min(m, n)``; default ``min(m, n)``.
        bias: learn an additive bias.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int | None = None,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = _check_int("in_features", in_features, 1)
        self.out_features = _check_int("out_features", out_features, 1)
        small = min(in_features, out_features)
        self.rank = small if rank is None else _check_int("rank", rank, 1)
        if self.rank > small:
            raise ValueError(
                f"rank must be <= min(in_features, out_features) = {small}, got {self.rank}"
            )
        kw = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(out_features, self.rank, **kw))
        self.V = nn.Parameter(torch.empty(in_features, self.rank, **kw))
        self.s = nn.Parameter(torch.empty(self.rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        W = torch.empty(self.out_features, self.in_features, dtype=self.s.dtype)
        nn.init.kaiming_uniform_(W, a=math.sqrt(5))  # nn.Linear's default
        self.set_weight(W.to(self.s.device))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def set_weight(self, W: Tensor) -> None:
        """Set ``U, s, V`` to the truncated SVD of ``W`` (``out_features x in_features``)."""
        if tuple(W.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"W must have shape ({self.out_features}, {self.in_features}), got {tuple(W.shape)}"
            )
        if not bool(torch.isfinite(W).all()):
            raise ValueError("W contains NaN or Inf values")
        compute = torch.float64 if W.dtype == torch.float64 else torch.float32
        P, S, Qh = torch.linalg.svd(W.to(compute), full_matrices=False)
        r = self.rank
        U, dU = householder_reflectors(P[:, :r])
        V, dV = householder_reflectors(Qh[:r].mT)
        # Column signs of both factors fold into s: Q(U) D_U diag(S) D_V Q(V)^T.
        self.U.copy_(U)
        self.V.copy_(V)
        self.s.copy_(S[:r] * dU * dV)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None) -> HouseholderProjector:
        """A projector holding the truncated SVD of ``linear``'s weight, and its bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank,
            bias=linear.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        layer.set_weight(w.detach())
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(Q(U), s, Q(V))`` with ``W = Q(U) diag(s) Q(V)^T``."""
        QU = householder_semi_orthogonal(_upcast(self.U), self.rank).to(self.U.dtype)
        QV = householder_semi_orthogonal(_upcast(self.V), self.rank).to(self.V.dtype)
        return QU, self.s, QV

    @property
    def weight(self) -> Tensor:
        QU, s, QV = self.factors()
        return (QU * s) @ QV.mT

    def forward(self, x: Tensor) -> Tensor:
        QU, s, QV = self.factors()
        return F.linear((x @ QV) * s, QU, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )
