"""Routes to the Q factor of ARO's rotation update on the current device, timed side by side.

ARO's step on the H200 spends ~42 of its ~50 ms in ``geqrf`` + ``householder_product`` on 24
``512 x 512`` float32 matrices (``benchmarks/gpu_results/profile_cuda.log``). This times the
candidates a device-side fix could use, on the same stack, with their orthogonality error and
their distance to the Householder ``Q`` (signs fixed so that ``diag(T) > 0``):

- ``householder``: ``geqrf`` + ``householder_product`` (ARO's CPU route);
- ``linalg.qr``: ``torch.linalg.qr`` (reduced);
- ``cholqr2-f64``: CholeskyQR2 in float64 (``G = AᵀA``, ``L = chol(G)``, ``Q = A L⁻ᵀ``, twice);
  exact only for full-rank ``A`` (a rank-deficient momentum makes ``G`` singular);
- ``shifted-cholqr3-f64``: ARO's route off the CPU (``functional.aro._shifted_cholesky_qr``);
- ``cpu-roundtrip``: the Householder route on the CPU, with the copies.

    python benchmarks/qr_routes.py [--device cuda] [--count 24] [--size 512] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from orthotorch.functional.aro import _householder_q as householder
from orthotorch.functional.aro import _shifted_cholesky_qr


def linalg_qr(A):
    Q, T = torch.linalg.qr(A)
    return Q * torch.where(T.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).unsqueeze(-2)


def cholqr2_f64(A):
    Q = A.double()
    for _ in range(2):
        L = torch.linalg.cholesky(Q.mT @ Q)
        Q = torch.linalg.solve_triangular(L.mT, Q, upper=True, left=False)
    return Q.to(A.dtype)


def shifted_cholqr3_f64(A):
    return _shifted_cholesky_qr(A)[0]


def cpu_roundtrip(A):
    return householder(A.cpu()).to(A.device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="4 x 64x64, 2 rounds (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.count, args.size, args.repeats = 4, 64, 2
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(args.count, args.size, args.size, generator=gen).to(args.device)
    routes = {
        "householder": householder,
        "linalg.qr": linalg_qr,
        "cholqr2-f64": cholqr2_f64,
        "shifted-cholqr3-f64": shifted_cholqr3_f64,
        "cpu-roundtrip": cpu_roundtrip,
    }
    reference = householder(A)
    eye = torch.eye(args.size, device=args.device)
    times = {name: [] for name in routes}
    for r in range(2 + args.repeats):
        for name, fn in routes.items():
            sync()
            t0 = time.perf_counter()
            fn(A)
            sync()
            if r >= 2:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["householder"])
    print(
        f"{args.count} x {args.size}x{args.size} float32 on {args.device}, "
        f"torch {torch.__version__}"
    )
    print(
        "| route | ms (median) | vs householder | orthogonality error | distance to householder Q |"
    )
    print("|---|---|---|---|---|")
    for name, fn in routes.items():
        Q = fn(A)
        ortho = (Q.mT @ Q - eye).abs().max().item()
        dist = (Q - reference).abs().max().item()
        med = statistics.median(times[name])
        print(f"| {name} | {med * 1e3:.2f} | {med / base:.2f}x | {ortho:.1e} | {dist:.1e} |")


if __name__ == "__main__":
    main()
