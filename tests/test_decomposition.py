"""orthotorch.decomposition: the Frank–Wolfe core against explicit references, the estimator."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import Lasso
from sklearn.utils.estimator_checks import parametrize_with_checks

from orthotorch.decomposition import (
    OnlineOrthogonalDictionaryLearning,
    averaging_weight,
    frank_wolfe_step,
    k_sparse_objective_gradient,
    l4_objective_gradient,
    principal_basis,
    sparse_codes,
    spectral_lmo,
)

Est = OnlineOrthogonalDictionaryLearning


def haar(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    return Q * np.sign(np.diag(R))


def planted(n: int = 16, m: int = 3000, theta: float = 0.15, seed: int = 0):
    """``Y = X0 D0^T``: Bernoulli(theta)-Gaussian codes in a Haar-random orthogonal basis."""
    rng = np.random.default_rng(seed)
    D0 = haar(n, seed + 1)
    X0 = rng.standard_normal((m, n)) * (rng.random((m, n)) < theta)
    return X0 @ D0.T, D0


def orthonormal_rows_error(W: np.ndarray) -> float:
    return float(np.abs(W @ W.T - np.eye(W.shape[0])).max())


# --- functional core --------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["l4", "k_sparse"])
def test_gradient_matches_autograd(objective: str) -> None:
    X = torch.randn(50, 8, dtype=torch.float64)
    W = torch.linalg.qr(torch.randn(8, 6, dtype=torch.float64))[0].mT.requires_grad_(True)
    if objective == "l4":
        f, G = l4_objective_gradient(W.detach(), X)
        f_auto = ((X @ W.mT) ** 4).sum() / (4 * len(X))
    else:
        f, G = k_sparse_objective_gradient(W.detach(), X, 3)
        C = X @ W.mT
        # The support is locally constant away from ties, so the active quadratic is f itself.
        support = torch.zeros_like(C).scatter_(1, C.abs().topk(3, dim=1).indices, 1.0).detach()
        f_auto = ((C * support) ** 2).sum() / (2 * len(X))
    (g_auto,) = torch.autograd.grad(f_auto, W)
    assert torch.allclose(f, f_auto.detach(), rtol=1e-12)
    assert torch.allclose(G, g_auto, rtol=1e-10, atol=1e-12)


def test_k_sparse_energy_is_the_reconstruction_error() -> None:
    """For orthonormal rows (k < n too): ||x - W^T H_s(Wx)||^2 = ||x||^2 - ||H_s(Wx)||^2."""
    X = torch.randn(40, 10, dtype=torch.float64)
    W = torch.linalg.qr(torch.randn(10, 7, dtype=torch.float64))[0].mT
    f, _ = k_sparse_objective_gradient(W, X, 3)
    codes = sparse_codes(W, X, "topk", n_nonzero_coefs=3)
    err = ((X - codes @ W) ** 2).sum()
    assert torch.allclose(err, (X**2).sum() - 2 * len(X) * f, rtol=1e-12)


def test_lmo_maximises_the_linear_function() -> None:
    """<G, polar(G)> = ||G||_* (von Neumann), the maximum over the spectral-norm ball."""
    G = torch.randn(6, 9, dtype=torch.float64)
    S = spectral_lmo(G)
    nuclear = torch.linalg.svdvals(G).sum()
    assert torch.allclose((G * S).sum(), nuclear, rtol=1e-12)
    for _ in range(20):
        R = torch.randn(6, 9, dtype=torch.float64)
        R = R / torch.linalg.matrix_norm(R, ord=2)
        assert (G * R).sum() <= nuclear


def test_lmo_rank_deficient_gradient_keeps_rows_orthonormal() -> None:
    """A rank-1 gradient (one sample) would leave all but one row zero without the tie-break."""
    W = torch.from_numpy(haar(8, 3))
    x = torch.randn(1, 8, dtype=torch.float64)
    _, G = l4_objective_gradient(W, x)
    S = spectral_lmo(G, W)
    assert orthonormal_rows_error(S.numpy()) < 1e-12
    # It still maximises <G, S> up to the tie-break's O(sqrt(eps)) share.
    assert (G * S).sum() >= torch.linalg.svdvals(G).sum() * (1 - 1e-6)
    assert torch.linalg.matrix_rank(spectral_lmo(G)) == 1


@pytest.mark.parametrize("objective", ["l4", "k_sparse"])
def test_full_batch_frank_wolfe_ascends(objective: str) -> None:
    """f convex => f(polar(grad f(W))) >= f(W) + <G, S - W> >= f(W): MSP is monotone."""
    Y, _ = planted(n=12, m=500)
    X = torch.from_numpy(Y)
    W = torch.from_numpy(haar(12, 5))
    grad = (
        l4_objective_gradient
        if objective == "l4"
        else lambda W, X: k_sparse_objective_gradient(W, X, 2)
    )
    values = []
    for _ in range(15):
        f, G = grad(W, X)
        values.append(float(f))
        W = frank_wolfe_step(W, G)
    assert all(b >= a * (1 - 1e-9) for a, b in itertools.pairwise(values))
    assert values[-1] > values[0]


def test_frank_wolfe_partial_step_and_newton_schulz_oracle_stay_orthogonal() -> None:
    W = torch.from_numpy(haar(10, 1))
    G = torch.randn(10, 10, dtype=torch.float64)
    assert orthonormal_rows_error(frank_wolfe_step(W, G, step_size=0.3).numpy()) < 1e-12
    S = frank_wolfe_step(W, G, method="polar_express")
    assert orthonormal_rows_error(S.numpy()) < 1e-12
    # The approximate oracle lands near the exact one (same maximiser, bf16-free compute).
    assert (S - frank_wolfe_step(W, G)).abs().max() < 0.05


def test_topk_codes_are_the_best_k_sparse_codes_brute_force() -> None:
    n, k, s = 6, 5, 2
    W = torch.from_numpy(haar(n, 2)[:k])
    X = torch.randn(7, n, dtype=torch.float64)
    codes = sparse_codes(W, X, "topk", n_nonzero_coefs=s)
    assert ((codes != 0).sum(1) == s).all()
    ours = ((X - codes @ W) ** 2).sum(1)
    for i, x in enumerate(X):
        best = min(
            float(((x - torch.linalg.lstsq(W[list(S)].mT, x).solution @ W[list(S)]) ** 2).sum())
            for S in itertools.combinations(range(k), s)
        )
        assert ours[i] == pytest.approx(best, rel=1e-10, abs=1e-12)


def test_hard_threshold_solves_the_l0_penalised_problem_brute_force() -> None:
    n, alpha = 5, 0.7
    W = torch.from_numpy(haar(n, 4))
    X = torch.randn(6, n, dtype=torch.float64)
    codes = sparse_codes(W, X, "hard", threshold=alpha)
    for i, x in enumerate(X):
        c = W @ x

        def penalised(z: torch.Tensor, x: torch.Tensor = x) -> float:
            return float(0.5 * ((x - z @ W) ** 2).sum() + alpha**2 / 2 * (z != 0).sum())

        best = min(
            penalised(torch.where(torch.tensor(mask, dtype=torch.bool), c, 0.0))
            for mask in itertools.product([0, 1], repeat=n)
        )
        assert penalised(codes[i]) == pytest.approx(best, rel=1e-12)


def test_soft_threshold_is_the_lasso_solution() -> None:
    n, alpha = 8, 0.3
    W = torch.from_numpy(haar(n, 6))
    X = torch.randn(4, n, dtype=torch.float64)
    codes = sparse_codes(W, X, "soft", threshold=alpha)
    # sklearn's Lasso minimises ||y - A w||^2 / (2 n) + a ||w||_1; here A = W^T, n rows.
    lasso = Lasso(alpha=alpha / n, fit_intercept=False, tol=1e-14, max_iter=100_000)
    for i, x in enumerate(X):
        ref = lasso.fit(W.mT.numpy(), x.numpy()).coef_
        assert np.allclose(codes[i].numpy(), ref, atol=1e-8)


def test_coding_argument_errors() -> None:
    W, X = torch.eye(3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="needs n_nonzero_coefs"):
        sparse_codes(W, X, "topk")
    with pytest.raises(ValueError, match="needs threshold"):
        sparse_codes(W, X, "soft")
    with pytest.raises(ValueError, match="mode must be one of"):
        sparse_codes(W, X, "omp", threshold=1.0)  # type: ignore[arg-type]


def test_averaging_weight_schedule() -> None:
    assert averaging_weight(0, 0.9) == pytest.approx(0.0)  # 1 - 4 / 8^(2/3) = 0
    assert averaging_weight(10, 0.9) == pytest.approx(1 - 4 / 18 ** (2 / 3))
    assert averaging_weight(10_000, 0.9) == 0.9
    assert averaging_weight(10_000, 0.0) == 0.0


def test_principal_basis_is_pca_and_complete_for_few_rows() -> None:
    X = torch.randn(3, 7, dtype=torch.float64)
    B = principal_basis(X, 7)
    assert orthonormal_rows_error(B.numpy()) < 1e-12
    _, _, Vh = torch.linalg.svd(X, full_matrices=False)
    assert torch.allclose((B[:3] @ Vh.mT).abs(), torch.eye(3, dtype=torch.float64), atol=1e-8)


# --- estimator -----------------------------------------------------------------------------------


@parametrize_with_checks([Est(), Est(objective="k_sparse", transform_algorithm="soft")])
def test_sklearn_estimator_checks(estimator, check) -> None:
    """scikit-learn's whole estimator/transformer suite passes, with no opt-outs."""
    check(estimator)


def test_recovers_planted_orthogonal_dictionary() -> None:
    Y, D0 = planted()
    est = Est(random_state=0).fit(Y)
    match = np.abs(est.components_ @ D0)
    # A signed permutation: every learned atom matches one true atom, and vice versa.
    assert match.max(axis=1).min() > 0.99
    assert match.max(axis=0).min() > 0.99
    assert orthonormal_rows_error(est.components_) < 1e-12


def test_partial_fit_streams_and_stays_orthogonal() -> None:
    Y, D0 = planted(m=4000)
    est = Est(n_components=10, random_state=0)
    for batch in np.array_split(Y, 40):
        est.partial_fit(batch)
        assert orthonormal_rows_error(est.components_) < 1e-12
    assert est.n_steps_ == 40 and est.components_.shape == (10, 16)
    full = Est(random_state=0)
    for _ in range(3):
        for batch in np.array_split(Y, 20):
            full.partial_fit(batch)
    assert np.abs(full.components_ @ D0).max(axis=1).min() > 0.98
    with pytest.raises(ValueError, match=r"X has 5 features, but .* expecting 16"):
        est.partial_fit(Y[:, :5])
    with pytest.raises(ValueError, match=r"X has 5 features, but .* expecting 16"):
        est.partial_fit(torch.from_numpy(Y[:, :5]))


def test_k_sparse_fit_beats_pca_on_digits() -> None:
    Y = load_digits().data
    Y = Y - Y.mean(axis=0)
    pca = principal_basis(torch.from_numpy(Y), 64).numpy()
    est = Est(objective="k_sparse", transform_n_nonzero_coefs=8, random_state=0).fit(Y)

    def err(W: np.ndarray) -> float:
        codes = sparse_codes(torch.from_numpy(W), torch.from_numpy(Y), "topk", 8).numpy()
        return float(np.linalg.norm(Y - codes @ W) / np.linalg.norm(Y))

    assert err(est.components_) < err(pca) - 0.01
    relative = np.linalg.norm(Y - est.inverse_transform(est.transform(Y))) / np.linalg.norm(Y)
    assert relative == pytest.approx(err(est.components_), rel=1e-12)


@pytest.mark.parametrize("algorithm", ["hard", "topk"])
def test_round_trip_with_full_codes_is_exact(algorithm: str) -> None:
    Y = np.random.default_rng(0).standard_normal((30, 9))
    est = Est(transform_algorithm=algorithm, transform_alpha=0.0, transform_n_nonzero_coefs=9)
    est.fit(Y)
    assert np.allclose(est.inverse_transform(est.transform(Y)), Y, atol=1e-12)


def test_undercomplete_dictionary_projects() -> None:
    Y = np.random.default_rng(1).standard_normal((60, 9))
    est = Est(n_components=4, transform_n_nonzero_coefs=4).fit(Y)
    assert est.components_.shape == (4, 9) and est.n_components_ == 4
    assert orthonormal_rows_error(est.components_) < 1e-12
    P = est.components_.T @ est.components_
    assert np.allclose(est.inverse_transform(est.transform(Y)), Y @ P, atol=1e-12)
    assert list(est.get_feature_names_out()) == [
        f"onlineorthogonaldictionarylearning{i}" for i in range(4)
    ]


def test_numpy_and_torch_inputs_agree_and_keep_their_kind() -> None:
    Y, _ = planted(m=600)
    a = Est(random_state=0).fit(Y)
    b = Est(random_state=0).fit(torch.from_numpy(Y))
    assert np.allclose(a.components_, b.components_, atol=1e-12)
    out = b.transform(torch.from_numpy(Y))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    assert np.allclose(out.numpy(), a.transform(Y))
    assert isinstance(b.inverse_transform(out), torch.Tensor)
    Y32 = torch.from_numpy(Y).float()
    c = Est(random_state=0).fit(Y32)
    assert c.components_.dtype == np.float32
    assert c.transform(Y32).dtype == torch.float32
    assert c.transform(Y.astype(np.float32)).dtype == np.float32
    ints = Est().fit(torch.arange(12).reshape(4, 3))
    assert ints.components_.dtype == np.float32


def test_newton_schulz_oracle_and_dict_init() -> None:
    Y, D0 = planted(m=2000)
    est = Est(polar_method="polar_express", random_state=0).fit(Y)
    assert orthonormal_rows_error(est.components_) < 1e-12
    assert np.abs(est.components_ @ D0).max(axis=1).min() > 0.98
    init = D0.T + 0.01
    keep = init.copy()
    warm = Est(dict_init=init, max_iter=1, random_state=0).fit(Y)
    assert np.array_equal(init, keep)
    assert np.abs(warm.components_ @ D0).max(axis=1).min() > 0.98
    with pytest.raises(ValueError, match=r"dict_init must have shape .*\(16, 16\)"):
        Est(dict_init=np.eye(3)).fit(Y)


def test_bad_input_raises_and_modifies_nothing() -> None:
    Y = np.random.default_rng(0).standard_normal((20, 6))
    bad = Y.copy()
    bad[3, 2] = np.nan
    snapshot = bad.copy()
    with pytest.raises(ValueError, match="NaN"):
        Est().fit(bad)
    assert np.array_equal(bad, snapshot, equal_nan=True)
    tbad = torch.from_numpy(bad.copy())
    with pytest.raises(ValueError, match="NaN"):
        Est().fit(tbad)
    with pytest.raises(ValueError, match="NaN"):
        Est().fit(Y).transform(bad)
    with pytest.raises(ValueError, match=r"n_components=7 must be <= n_features=6"):
        Est(n_components=7).fit(Y)
    with pytest.raises(ValueError, match=r"'transform_algorithm' parameter .* 'omp'"):
        Est(transform_algorithm="omp").fit(Y)
    with pytest.raises(ValueError, match="'objective' parameter"):
        Est(objective="l1").fit(Y)
    with pytest.raises(ValueError, match="transform_n_nonzero_coefs=9 must be <= n_components_=6"):
        Est(transform_n_nonzero_coefs=9).fit(Y).transform(Y)
    with pytest.raises(ValueError, match="fit_n_nonzero_coefs=9 must be <= n_components=6"):
        Est(objective="k_sparse", fit_n_nonzero_coefs=9).fit(Y)
    with pytest.raises(ValueError, match="Expected 2D"):
        Est().fit(torch.randn(5))
    with pytest.raises(ValueError, match="codes have 2 columns"):
        Est().fit(Y).inverse_transform(np.ones((3, 2)))
    with pytest.raises(NotFittedError):
        Est().transform(Y)
    with pytest.raises(NotFittedError):
        Est().inverse_transform(Y)
    est = Est(random_state=0).fit(Y)
    before = est.components_.copy()
    with pytest.raises(ValueError):
        est.partial_fit(bad)
    assert np.array_equal(est.components_, before)
    assert np.array_equal(Y, np.random.default_rng(0).standard_normal((20, 6)))


def test_gradient_overflow_is_a_clear_error_not_nan() -> None:
    """Finite float32 data whose cubed codes overflow must not become a NaN dictionary."""
    Y = torch.full((4, 3), 1e13, dtype=torch.float32)
    est = Est()
    with pytest.raises(ValueError, match=r"gradient overflowed in torch\.float32; scale X"):
        est.fit(Y)
    assert not hasattr(est, "components_")


def test_negative_stride_numpy_input_is_accepted() -> None:
    """Reversed views (negative strides) are valid numpy input for any scikit-learn estimator,
    but ``torch.from_numpy`` refuses them: fit, transform, inverse_transform and ``dict_init``
    crashed with a torch error instead of using the data."""
    X = np.random.default_rng(0).standard_normal((40, 6))
    D = haar(6, 3)[:4]
    ref = Est(4, dict_init=D.copy(), max_iter=2, shuffle=False).fit(X[::-1].copy())
    est = Est(4, dict_init=D[::-1][::-1], max_iter=2, shuffle=False).fit(X[::-1])
    np.testing.assert_allclose(est.components_, ref.components_, atol=1e-12)
    est = Est(4, dict_init=D[:, ::-1], max_iter=1).fit(X[:, ::-1])
    codes = est.transform(X[::-1])
    np.testing.assert_allclose(codes, est.transform(X[::-1].copy()))
    back = est.inverse_transform(codes)
    np.testing.assert_allclose(est.inverse_transform(codes[::-1]), back[::-1])


def test_rank_deficient_dict_init_is_rejected() -> None:
    """A ``dict_init`` with linearly dependent rows has no orthonormal polar factor: the partial
    isometry has rows of norm < 1, duplicated atoms get identical gradients forever, and
    ``components_`` silently never had orthonormal rows. It must be a clear ValueError."""
    X = np.random.default_rng(0).standard_normal((50, 8))
    D = np.eye(8)[:4].copy()
    D[1] = D[0]
    with pytest.raises(ValueError, match="dict_init must have full row rank"):
        Est(4, dict_init=D, max_iter=1).fit(X)
    with pytest.raises(ValueError, match="dict_init must have full row rank"):
        Est(4, dict_init=torch.zeros(4, 8)).partial_fit(torch.from_numpy(X))


def test_sparse_codes_validates_its_arguments() -> None:
    """The public coding function checked nothing but ``None``: a negative soft threshold
    silently *inflated* every code by ``|alpha|``, ``n_nonzero_coefs <= 0`` gave all-zero codes
    or a torch RuntimeError, and an unknown mode was reported as a missing threshold."""
    W, X = torch.eye(3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"mode must be one of \('hard', 'soft', 'topk'\)"):
        sparse_codes(W, X, "omp")
    with pytest.raises(ValueError, match=r"threshold must be a non-negative number, got -1\.0"):
        sparse_codes(W, X, "soft", threshold=-1.0)
    with pytest.raises(ValueError, match="threshold must be a non-negative number"):
        sparse_codes(W, X, "hard", threshold=float("nan"))
    for s in (0, -1):
        with pytest.raises(ValueError, match=f"n_nonzero_coefs must be a positive int, got {s}"):
            sparse_codes(W, X, "topk", n_nonzero_coefs=s)


def test_fit_on_a_tensor_that_requires_grad_builds_no_graph() -> None:
    """Embeddings straight from a model require grad: fit and partial_fit recorded an autograd
    graph through every Frank–Wolfe step (SVDs included) and kept it, with ``X``, alive in the
    stored state, so memory grew with the number of steps."""
    X = torch.randn(120, 8, requires_grad=True)
    D = torch.from_numpy(haar(8, 0)[:4]).float().requires_grad_()
    est = Est(4, batch_size=10, max_iter=2, dict_init=D).fit(X)
    assert not est._W.requires_grad and not est._G.requires_grad
    est = Est(4, dict_init=D).partial_fit(X[:10]).partial_fit(X[10:20])
    assert not est._W.requires_grad and not est._G.requires_grad


def test_functional_core_imports_and_runs_without_scikit_learn() -> None:
    """Issue 18: the scikit-learn guard of decomposition/dictionary.py made the pure-torch
    Frank–Wolfe functions unimportable without scikit-learn. With scikit-learn blocked, the
    functions import and run; only the estimator raises, naming the extra."""
    import subprocess
    import sys

    code = """
import sys
sys.modules["sklearn"] = None  # any "import sklearn..." now raises ImportError
import torch
from orthotorch.decomposition import frank_wolfe_step, l4_objective_gradient, principal_basis
X = torch.randn(50, 8, dtype=torch.float64)
W = principal_basis(X, 8)
W = frank_wolfe_step(W, l4_objective_gradient(W, X)[1])
assert torch.allclose(W @ W.T, torch.eye(8, dtype=torch.float64), atol=1e-10)
try:
    from orthotorch.decomposition import OnlineOrthogonalDictionaryLearning
except ImportError as err:
    assert "pip install orthotorch[sklearn]" in str(err), err
else:
    raise AssertionError("the estimator imported without scikit-learn")
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
