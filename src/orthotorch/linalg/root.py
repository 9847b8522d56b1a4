"""ROOT's shape-adaptive Newton–Schulz coefficients, with a guard that keeps them bounded.

ROOT (He et al., 2025, "ROOT: Robust Orthogonalized Optimizer for Neural Network Training")
picks the quintic ``p(x) = a x + b x^3 + c x^5`` of the Newton–Schulz iteration by the shape of
the (wide) matrix, ``(min side, max side)``, from a table fitted per shape; every other shape
uses Muon's fixed quintic. Five steps, as Muon.

Why a guard. Each step maps every singular value ``x -> p(x)``. For the iteration to stay
bounded, ``p`` must map some interval ``[0, R]`` into itself. ``p`` rises to a peak ``P`` at
``x ~ 0.56``, dips below one, then rises again and crosses the diagonal at the *repelling*
fixed point ``x* > 1``: a value above ``x*`` grows at every further step (slope ``p'(x*) > 1``).
So ``[0, R]`` is invariant iff ``P <= R <= x*``, i.e. iff ``P <= x*``. The paper's square entry
``(2048, 2048): (3.4916, -4.8224, 2.1095)`` has ``P = 1.22459 > x* = 1.22355`` (its coefficients
are rounded to four decimals; the fit sits on the edge): an input singular value whose
normalised size ``sigma / ||G||_F`` lies in about ``[0.545, 0.575]`` lands just above ``x*``
after the first step and is then amplified, to ``3.31`` after five steps and to ``inf`` after
ten, in exact arithmetic (``tests/test_root.py::test_paper_square_coefficients_amplify``).
Momenta with one dominant direction, common in training, have exactly such singular values.

The guard. :func:`guard_coefficients` leaves a quintic alone when ``x* >= (1 + min_margin) P``
(``min_margin = 0.5%``) and otherwise divides it by the smallest ``gamma >= 1`` for which
``x*(p / gamma) >= (1 + margin) P(p / gamma)`` (``margin = 2%``): the invariant interval then
exists with room for bf16 rounding. Muon's quintic has 5.1%; the paper's ``(2048, 3072)`` entry
has 0.87% and never escaped in bf16 sweeps of its peak region at 5, 10 and 20 steps, so it is
kept as published. Scaling the whole quintic keeps its shape (where it peaks, how steeply it
lifts small singular values) and changes the fitted coefficients by the least amount that
restores a bound valid for *any number of steps*; a guard on the last step only could not,
since the amplification builds up over steps 2-5 and ``steps=10`` diverges.

Only the square entry changes: ``gamma = 1.01705``, i.e. ``(3.4331, -4.7416, 2.0741)``, with
exact peak ``1.2041`` and ``x* = 1.2282``. On a 2048x2048 Gaussian input in bf16 the guarded
quintic is also slightly *more* orthogonal than the published one (the published one
overshoots), see ``benchmarks/root_precision.py``.

The ``root`` method also normalises safely: it divides by the max-abs entry before the
Frobenius normalisation, so huge finite inputs (``||G||_F`` overflows) and tiny ones
(``||G||_F`` below ``eps``) are orthogonalized like any other instead of collapsing to zero.
Together: output spectral norm ``<= 1.5`` for every finite input in bf16, float32 or float64
compute (tests/test_root.py). (float16 compute cannot hold inputs above 65504: they become
``inf`` when converted, before any method runs.)
"""

from __future__ import annotations

import math

from torch import Tensor

from .newton_schulz import MUON_COEFFICIENTS, Coefficients, newton_schulz

__all__ = [
    "GUARD_MARGIN",
    "GUARD_MIN_MARGIN",
    "ROOT_COEFFICIENTS",
    "ROOT_GUARDED_COEFFICIENTS",
    "guard_coefficients",
    "quintic_peak",
    "repelling_fixed_point",
    "root_iterate",
    "root_schedule",
]

# Paper's table, keyed by the wide shape (min side, max side); 5 steps of the same quintic.
ROOT_COEFFICIENTS: dict[tuple[int, int], Coefficients] = {
    (2048, 2048): (3.4916, -4.8224, 2.1095),
    (2048, 3072): (3.4509, -4.5790, 1.9325),
    (2048, 8192): (2.9794, -3.6674, 1.6207),
    (2048, 16384): (3.1943, -3.8221, 1.5322),
}

# Entries with at least GUARD_MIN_MARGIN of room between peak and repelling fixed point are kept;
# the others are repaired to GUARD_MARGIN. In bf16 sweeps (128x128..128x320, 3 seeds, inputs with
# 1 or 3 singular values in [0.53, 0.60], 5/10/20 steps) margins of 0.5%, 0.87% and 2% all stayed
# below 1.22; 2% also measured the best orthogonality error on 2048x2048 Gaussian input.
GUARD_MIN_MARGIN = 0.005
GUARD_MARGIN = 0.02


def quintic_peak(coefficients: Coefficients) -> tuple[float, float]:
    """``(x_peak, p(x_peak))``: the local maximum of ``p(x) = a x + b x^3 + c x^5`` on ``(0, 1)``.

    ``p'(x) = a + 3 b x^2 + 5 c x^4 = 0`` is a quadratic in ``x^2``; the smaller root is the
    maximum for the Newton–Schulz shape (``a > 0``, ``b < 0``, ``c > 0``).
    """
    a, b, c = coefficients
    disc = 9 * b * b - 20 * a * c
    if c <= 0 or disc < 0:
        raise ValueError(f"quintic {coefficients} has no interior peak; not a Newton–Schulz shape")
    t = (-3 * b - math.sqrt(disc)) / (10 * c)
    x = math.sqrt(t)
    return x, x * (a + b * t + c * t * t)


def repelling_fixed_point(coefficients: Coefficients) -> float:
    """The largest ``x > 0`` with ``p(x) = x``; singular values above it grow at every step."""
    a, b, c = coefficients
    disc = b * b - 4 * c * (a - 1)
    if c <= 0 or disc < 0:
        return math.inf  # p(x) < x for all large x: nothing escapes
    return math.sqrt((-b + math.sqrt(disc)) / (2 * c))


def _margin_ratio(coefficients: Coefficients) -> float:
    return repelling_fixed_point(coefficients) / quintic_peak(coefficients)[1]


def guard_coefficients(
    coefficients: Coefficients,
    margin: float = GUARD_MARGIN,
    min_margin: float = GUARD_MIN_MARGIN,
) -> Coefficients:
    """``coefficients / gamma`` with the smallest ``gamma >= 1`` that keeps the iteration bounded.

    Bounded means ``x* >= (1 + margin) * peak``: then ``[0, x*]`` is mapped into itself, so every
    iterate of an input in ``[0, 1]`` stays below ``max(1, peak)`` for any number of steps, with
    ``margin`` room for rounding. Coefficients with at least ``min_margin`` already are returned
    unchanged (as floats).
    """
    if _margin_ratio(coefficients) >= 1 + min_margin:
        return tuple(map(float, coefficients))  # type: ignore[return-value]
    lo, hi = 1.0, 2.0  # the ratio grows with gamma; 2 is far past any fitted quintic's need
    for _ in range(60):
        mid = (lo + hi) / 2
        if _margin_ratio(tuple(k / mid for k in coefficients)) >= 1 + margin:  # type: ignore[arg-type]
            hi = mid
        else:
            lo = mid
    return tuple(k / hi for k in coefficients)  # type: ignore[return-value]


ROOT_GUARDED_COEFFICIENTS: dict[tuple[int, int], Coefficients] = {
    shape: guard_coefficients(c) for shape, c in ROOT_COEFFICIENTS.items()
}


def root_schedule(rows: int, cols: int, steps: int) -> list[Coefficients]:
    """ROOT's guarded quintic for the wide shape ``(min, max)``, else Muon's, for every step."""
    key = (min(rows, cols), max(rows, cols))
    return [ROOT_GUARDED_COEFFICIENTS.get(key, MUON_COEFFICIENTS)] * steps


def root_iterate(X: Tensor, steps: int | None, *, default_steps: int = 5) -> Tensor:
    """The ``"root"`` method: safe normalisation, then Newton–Schulz with :func:`root_schedule`.

    Dividing by ``max |X|`` first makes ``X_0 = X / ||X||_F`` scale invariant in floating point:
    without it ``||X||_F`` overflows to ``inf`` for entries above ~1e19 (output: zeros) and falls
    below ``eps`` for entries below ~1e-10 (output: a non-orthogonal tiny matrix). One extra pass
    over ``X``, negligible next to the matrix products.
    """
    k = default_steps if steps is None else steps
    scale = X.abs().amax(dim=(-2, -1), keepdim=True)
    # A zero matrix stays zero (0 / 1) instead of becoming NaN (0 / 0).
    X = X / scale.masked_fill(scale == 0, 1)
    return newton_schulz(X, root_schedule(X.shape[-2], X.shape[-1], k))
