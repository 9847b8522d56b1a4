r"""The scikit-learn estimator of online orthogonal dictionary learning (needs scikit-learn).

:class:`OnlineOrthogonalDictionaryLearning` validates, converts and runs the mini-batch loop;
the mathematics (objectives, the polar-factor oracle, Frank–Wolfe steps, exact sparse codes) is
the pure-torch functional core in :mod:`.frank_wolfe`, importable without scikit-learn.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from orthotorch.linalg import available_methods, orthogonality_error, polar

from .frank_wolfe import (
    CODING_ALGORITHMS,
    OBJECTIVES,
    CodingAlgorithm,
    Objective,
    averaging_weight,
    frank_wolfe_step,
    objective_gradient,
    principal_basis,
    sparse_codes,
)

try:
    from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
    from sklearn.utils import check_array, check_random_state
    from sklearn.utils._param_validation import Interval, StrOptions
    from sklearn.utils.validation import check_is_fitted
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "OnlineOrthogonalDictionaryLearning needs scikit-learn: pip install orthotorch[sklearn] "
        "(the pure-torch functions of orthotorch.decomposition.frank_wolfe do not)"
    ) from err

try:
    from sklearn.base import _fit_context
except ImportError:  # pragma: no cover - scikit-learn < 1.3

    def _fit_context(prefer_skip_nested_validation: bool):  # type: ignore[no-redef]
        def decorator(fit_method):
            def wrapper(estimator, *args, **kwargs):
                estimator._validate_params()
                return fit_method(estimator, *args, **kwargs)

            return wrapper

        return decorator


try:
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - scikit-learn < 1.6

    def _validate_data(estimator, X, **kwargs):  # type: ignore[no-redef]
        return estimator._validate_data(X, **kwargs)


__all__ = ["OnlineOrthogonalDictionaryLearning"]

# ---------------------------------------------------------------------------------------------
# Estimator: validation, conversion, the mini-batch loop.
# ---------------------------------------------------------------------------------------------


def _as_tensor(X: Any, what: str = "X") -> Tensor:
    """Validate a torch input the way scikit-learn validates arrays (2-D, real, finite)."""
    if X.layout != torch.strided:
        raise TypeError(f"{what} must be a dense tensor; got layout {X.layout}")
    if X.ndim != 2:
        raise ValueError(
            f"Expected 2D array, got {X.ndim}D tensor of shape {tuple(X.shape)} for {what}; "
            "reshape it to (n_samples, n_features)"
        )
    if X.is_complex():
        raise ValueError(f"Complex data not supported; {what} has dtype {X.dtype}")
    if not X.is_floating_point():
        X = X.to(torch.get_default_dtype())
    elif X.dtype not in (torch.float32, torch.float64):
        X = X.to(torch.float32)
    if X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"{what} must have at least 1 sample and 1 feature, got {tuple(X.shape)}")
    if not bool(torch.isfinite(X).all()):
        raise ValueError(f"Input {what} contains NaN or infinity.")
    return X


def _from_numpy(arr: np.ndarray) -> Tensor:
    """``torch.from_numpy`` for any validated array; we never write to it."""
    if not arr.flags.writeable or any(step < 0 for step in arr.strides):
        # torch.from_numpy warns on read-only memory and refuses negative strides (reversed
        # views), both valid scikit-learn input: a copy is the price.
        arr = arr.copy()
    return torch.from_numpy(arr)


class OnlineOrthogonalDictionaryLearning(
    ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator
):
    r"""Orthogonal dictionary learned online by Frank–Wolfe steps (MSP for ``gamma = 1``).

    Maximises ``l4`` (``||X W^T||_4^4``, Zhai et al. 2020) or ``k_sparse`` (the energy of the
    best ``s``-term codes, i.e. minimises the ``s``-sparse reconstruction error) over
    dictionaries ``W`` (``components_``, ``k x n``) with orthonormal rows; each mini-batch
    updates a running gradient ``G`` and takes one step ``W <- polar((1 - gamma) W +
    gamma polar(G))``. The math and the exactness of the coding rules are in the module
    docstring of :mod:`orthotorch.decomposition.dictionary`.

    Works on numpy arrays (scikit-learn validation; numpy out) and on torch tensors (any device;
    tensors out, on the input's device and dtype). float32 and float64 are preserved; integer
    input becomes float64 (numpy) or the torch default dtype (tensors). Data are not centred:
    centre them first if the mean is not part of the signal.

    Parameters:
        n_components: number of atoms ``k <= n_features``; ``None`` means ``n_features`` (a
            complete orthogonal basis).
        objective: ``"l4"`` or ``"k_sparse"``.
        fit_n_nonzero_coefs: the ``s`` of ``"k_sparse"``; ``None`` uses
            ``transform_n_nonzero_coefs`` or else ``max(1, k // 10)``.
        batch_size: samples per Frank–Wolfe step in :meth:`fit`.
        max_iter: passes (epochs) over the data in :meth:`fit`.
        tol: stop :meth:`fit` when an epoch moves ``W`` by less than
            ``tol`` in ``||Delta W||_F / sqrt(k)``; ``0`` runs all ``max_iter`` epochs.
        step_size: Frank–Wolfe ``gamma`` in ``(0, 1]``.
        forget_factor: ``rho`` in ``[0, 1)`` of the running gradient.
        init: ``"pca"`` (top right singular vectors of the data, the fixed basis to improve on)
            or ``"random"`` (Haar-random orthonormal rows from ``random_state``).
        dict_init: optional ``(n_components, n_features)`` starting dictionary (e.g. a DCT
            basis); its polar factor is used, and it overrides ``init``.
        polar_method: ``"svd"`` (exact) or a Newton–Schulz name of
            :func:`orthotorch.linalg.available_methods` for the oracle.
        transform_algorithm: ``"topk"``, ``"hard"`` or ``"soft"`` (see :func:`sparse_codes`).
        transform_n_nonzero_coefs: ``s`` of ``"topk"``; ``None`` means ``max(1, k // 10)``
            (scikit-learn's default of 10%).
        transform_alpha: threshold of ``"hard"`` / ``"soft"``; ``None`` means ``1.0``.
        shuffle: shuffle samples before each epoch of :meth:`fit`.
        random_state: seed for ``init="random"`` and shuffling.

    Attributes:
        components_: ``(k, n_features)`` array, orthonormal rows.
        n_components_: ``k``.
        n_iter_: epochs run by the last :meth:`fit`.
        n_steps_: Frank–Wolfe steps taken in total (:meth:`fit` resets it, :meth:`partial_fit`
            adds one).
        objective_: objective value of the last mini-batch, measured before its step.
        n_features_in_: feature dimension seen at fit.
    """

    _parameter_constraints: ClassVar[dict] = {
        "n_components": [Interval(Integral, 1, None, closed="left"), None],
        "objective": [StrOptions(set(OBJECTIVES))],
        "fit_n_nonzero_coefs": [Interval(Integral, 1, None, closed="left"), None],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "step_size": [Interval(Real, 0, 1, closed="right")],
        "forget_factor": [Interval(Real, 0, 1, closed="left")],
        "init": [StrOptions({"pca", "random"})],
        "dict_init": ["array-like", None],
        "polar_method": [StrOptions(set(available_methods()))],
        "transform_algorithm": [StrOptions(set(CODING_ALGORITHMS))],
        "transform_n_nonzero_coefs": [Interval(Integral, 1, None, closed="left"), None],
        "transform_alpha": [Interval(Real, 0, None, closed="left"), None],
        "shuffle": ["boolean"],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        n_components: int | None = None,
        *,
        objective: Objective = "l4",
        fit_n_nonzero_coefs: int | None = None,
        batch_size: int = 256,
        max_iter: int = 10,
        tol: float = 1e-6,
        step_size: float = 1.0,
        forget_factor: float = 0.9,
        init: Literal["pca", "random"] = "pca",
        dict_init: Any = None,
        polar_method: str = "svd",
        transform_algorithm: CodingAlgorithm = "topk",
        transform_n_nonzero_coefs: int | None = None,
        transform_alpha: float | None = None,
        shuffle: bool = True,
        random_state: int | np.random.RandomState | None = None,
    ) -> None:
        self.n_components = n_components
        self.objective = objective
        self.fit_n_nonzero_coefs = fit_n_nonzero_coefs
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.tol = tol
        self.step_size = step_size
        self.forget_factor = forget_factor
        self.init = init
        self.dict_init = dict_init
        self.polar_method = polar_method
        self.transform_algorithm = transform_algorithm
        self.transform_n_nonzero_coefs = transform_n_nonzero_coefs
        self.transform_alpha = transform_alpha
        self.shuffle = shuffle
        self.random_state = random_state

    # -- input handling -----------------------------------------------------------------------

    def _check_input(self, X: Any, reset: bool) -> tuple[Tensor, bool]:
        """``(tensor, came_as_torch)``; numpy goes through scikit-learn's validation."""
        if isinstance(X, Tensor):
            X = _as_tensor(X)
            if reset:
                self.n_features_in_ = X.shape[1]
                if hasattr(self, "feature_names_in_"):
                    del self.feature_names_in_
            elif X.shape[1] != self.n_features_in_:
                raise ValueError(
                    f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                    f"{self.n_features_in_} features as input."
                )
            return X, True
        X = _validate_data(self, X, reset=reset, dtype=[np.float64, np.float32])
        return _from_numpy(X), False

    def _resolve_k(self, n_features: int) -> int:
        k = n_features if self.n_components is None else self.n_components
        if k > n_features:
            raise ValueError(
                f"n_components={k} must be <= n_features={n_features}: an orthogonal dictionary "
                "has at most n_features orthonormal atoms"
            )
        return k

    def _fit_sparsity(self, k: int) -> int | None:
        if self.objective != "k_sparse":
            return None
        s = self.fit_n_nonzero_coefs or self.transform_n_nonzero_coefs or max(1, k // 10)
        if s > k:
            raise ValueError(f"fit_n_nonzero_coefs={s} must be <= n_components={k}")
        return s

    def _initial_dictionary(self, X: Tensor, k: int, rng: np.random.RandomState) -> Tensor:
        if self.dict_init is not None:
            D = self.dict_init
            D = (
                _as_tensor(D, "dict_init")
                if isinstance(D, Tensor)
                else _from_numpy(
                    check_array(D, dtype=[np.float64, np.float32], input_name="dict_init")
                )
            )
            if tuple(D.shape) != (k, X.shape[1]):
                raise ValueError(
                    f"dict_init must have shape (n_components, n_features) = {(k, X.shape[1])}, "
                    f"got {tuple(D.shape)}"
                )
            # Copy, then project: the user's array is never written to or aliased.
            W = polar(D.to(X.device, X.dtype).clone())
            # Dependent rows have no orthonormal polar factor (the partial isometry shrinks them),
            # and duplicated atoms get identical gradients, so fitting would never repair it.
            if float(orthogonality_error(W)) > 1e-3:
                raise ValueError(
                    "dict_init must have full row rank (n_components linearly independent rows); "
                    "its rows are linearly dependent, so no orthonormal dictionary is closest to it"
                )
            return W
        if self.init == "pca":
            return principal_basis(X, k)
        n = X.shape[1]
        Q, R = np.linalg.qr(rng.standard_normal((n, n)))
        # Sign fix makes Q Haar-distributed (Mezzadri, 2007).
        Q = Q * np.sign(np.diag(R))
        return torch.from_numpy(Q[:, :k].T.copy()).to(X.dtype).to(X.device)

    def _store(self, W: Tensor) -> None:
        self._W = W
        self.components_ = W.detach().cpu().numpy()
        self.n_components_ = W.shape[0]

    def _step(self, W: Tensor, G: Tensor | None, batch: Tensor, s: int | None):
        f, grad = objective_gradient(W, batch, self.objective, s)
        if not bool(torch.isfinite(grad).all()):
            # Finite data can still overflow: the l4 gradient is cubic in X (float32 overflows
            # near |x W^T| ~ 1e12). Fail here, before the dictionary takes a NaN step.
            raise ValueError(
                f"the {self.objective} gradient overflowed in {batch.dtype}; scale X down "
                "(e.g. to unit variance) or pass float64 data"
            )
        rho = averaging_weight(self.n_steps_, self.forget_factor)
        G = grad if G is None or rho == 0 else rho * G + (1 - rho) * grad
        return frank_wolfe_step(W, G, self.step_size, self.polar_method), G, f

    # -- fitting ------------------------------------------------------------------------------

    @_fit_context(prefer_skip_nested_validation=True)
    @torch.no_grad()
    def fit(self, X: Any, y: None = None) -> OnlineOrthogonalDictionaryLearning:
        """Learn the dictionary from ``X`` (``n_samples x n_features``) in mini-batch epochs.

        Raises:
            ValueError: ``X`` is not 2-D, is empty, or contains NaN/Inf; ``n_components`` (or the
                ``k_sparse`` sparsity) is larger than allowed. ``X`` is never modified.
        """
        X, _ = self._check_input(X, reset=True)
        m, n = X.shape
        k = self._resolve_k(n)
        s = self._fit_sparsity(k)
        rng = check_random_state(self.random_state)
        W = self._initial_dictionary(X, k, rng)
        G = None
        batch = min(self.batch_size, m)
        self.n_steps_ = 0
        self.n_iter_ = 0
        f = torch.zeros((), dtype=X.dtype)
        for _ in range(self.max_iter):
            W_epoch = W
            order = rng.permutation(m) if self.shuffle else np.arange(m)
            index = torch.from_numpy(order).to(X.device)
            for start in range(0, m, batch):
                W, G, f = self._step(W, G, X[index[start : start + batch]], s)
                self.n_steps_ += 1
            self.n_iter_ += 1
            moved = torch.linalg.matrix_norm(W - W_epoch) / math.sqrt(k)
            if float(moved) < self.tol:
                break
        self._G = G
        self.objective_ = float(f)
        self._store(W)
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    @torch.no_grad()
    def partial_fit(self, X: Any, y: None = None) -> OnlineOrthogonalDictionaryLearning:
        """One Frank–Wolfe step on the mini-batch ``X``, continuing the running gradient.

        The first call initialises the dictionary from this batch (``init``); later calls must
        have the same number of features. State follows the batch's device and dtype.
        """
        first = not hasattr(self, "_W")
        X, _ = self._check_input(X, reset=first)
        k = self._resolve_k(X.shape[1])
        s = self._fit_sparsity(k)
        if first:
            rng = check_random_state(self.random_state)
            W, G = self._initial_dictionary(X, k, rng), None
            self.n_steps_ = 0
        else:
            W = self._W.to(X.device, X.dtype)
            G = None if self._G is None else self._G.to(X.device, X.dtype)
        W, G, f = self._step(W, G, X, s)
        self.n_steps_ += 1
        self._G = G
        self.objective_ = float(f)
        self._store(W)
        return self

    # -- coding -------------------------------------------------------------------------------

    def _coding_args(self) -> tuple[int | None, float | None]:
        k = self.n_components_
        if self.transform_algorithm == "topk":
            s = self.transform_n_nonzero_coefs or max(1, k // 10)
            if s > k:
                raise ValueError(
                    f"transform_n_nonzero_coefs={s} must be <= n_components_={k} for "
                    "transform_algorithm='topk'"
                )
            return s, None
        return None, 1.0 if self.transform_alpha is None else float(self.transform_alpha)

    def _output(self, Z: Tensor, as_torch: bool) -> Any:
        return Z if as_torch else Z.cpu().numpy()

    def transform(self, X: Any) -> Any:
        """Sparse codes ``(n_samples, n_components)`` by ``transform_algorithm`` (exact rules).

        Returns an array of ``X``'s kind (numpy or torch), dtype and device.
        """
        check_is_fitted(self, "components_")
        self._validate_params()
        X, as_torch = self._check_input(X, reset=False)
        s, alpha = self._coding_args()
        W = torch.from_numpy(self.components_).to(X.device, X.dtype)
        codes = sparse_codes(W, X, self.transform_algorithm, s, alpha)
        return self._output(codes, as_torch)

    def inverse_transform(self, X: Any) -> Any:
        """Reconstruction ``codes @ components_`` (``n_samples x n_features``)."""
        check_is_fitted(self, "components_")
        k = self.n_components_
        if isinstance(X, Tensor):
            codes, as_torch = _as_tensor(X, "codes"), True
        else:
            arr = check_array(X, dtype=[np.float64, np.float32])
            codes, as_torch = _from_numpy(arr), False
        if codes.shape[1] != k:
            raise ValueError(
                f"codes have {codes.shape[1]} columns, but {type(self).__name__} has "
                f"n_components_={k}"
            )
        W = torch.from_numpy(self.components_).to(codes.device, codes.dtype)
        return self._output(codes @ W, as_torch)

    @property
    def _n_features_out(self) -> int:
        return self.components_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    def _more_tags(self) -> dict:  # scikit-learn < 1.6
        return {"preserves_dtype": [np.float64, np.float32]}
