"""The claims table: what the papers behind orthotorch claim, measured here with compare v2.

Runs (each part resumable / repeatable, results in ``--out``):

1. ``lm``: one ``orthotorch compare`` of every optimizer a claim is about, on the byte-level
   language-model task (``--model``, ``--text``; default gpt-tiny on the Python stdlib sources),
   ``--seeds`` final seeds, **every** optimizer's lr swept (``--sweep-factors`` around its
   registry default, on tuning seed 1000), warmup + cosine schedule. Rerunning the same command
   skips finished runs and resumes an interrupted one.
2. ``robust``: ROOT's outlier robustness with ``benchmarks/robustness.py``'s protocol (digits
   MLP, 0.1% of gradient entries x1000 every step), one row per seed.
3. ``merge`` and ``dictionary``: ``examples/merge_digits.py`` and
   ``benchmarks/dictionary_learning.py`` as they are (their printed tables are stored).

Verdicts (``claims.json``) come from the seeds, never from a tuned pick: a claim "A beats B" is
*reproduced* when every seed of A beats every seed of B, *not reproduced* when every seed of B
beats every seed of A, *inconclusive (seed spread)* when the ranges overlap.

    nice -n 10 python benchmarks/claims.py --out runs/claims            # everything
    python benchmarks/claims.py --out runs/claims --parts lm --steps 60  # quick look
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from orthotorch import bench
from orthotorch.bench.report import finite_json

ROOT_DIR = Path(__file__).resolve().parent.parent
# In run order: the rows with tuned defaults first, so a stopped run has the baseline.
LM_OPTIMIZERS = (
    "adamw",
    "muon",
    "spectra-adamw",
    "aro",
    "root",
    "dct-adamw",
    "galore-adamw",
    "auon",
    "muon-symmetry",
    "muon-symmetry-embed",
)


def verdict(a: list[float], b: list[float]) -> str:
    """Claim "a is lower (better) than b", judged on the seed ranges."""
    if not a or not b:
        return "not measured (a run diverged or is missing)"
    if max(a) < min(b):
        return "reproduced"
    if min(a) > max(b):
        return "not reproduced"
    return "inconclusive (seed spread)"


def _row(result: bench.CompareResult, name: str) -> dict:
    summaries = {s.optimizer: s for s in result.summary()}
    if name not in summaries:
        return {"finals": [], "mean": None, "ms_per_step": None, "state_bytes": None}
    summary = summaries[name]
    return {
        "finals": result.finals(name),
        "mean": summary.final,
        "lr": summary.lr,
        "lr_source": summary.lr_source,
        "ms_per_step": summary.ms_per_step,
        "state_bytes": summary.state_bytes,
        "steps_to_adamw_final": summary.steps_to_target,
        "diverged": summary.diverged,
    }


def lm_claims(args: argparse.Namespace) -> dict:
    task = bench.bytelm_task(args.model, args.text)
    names = [n for n in LM_OPTIMIZERS if n in args.optimizers]
    result = bench.compare(
        task,
        optimizers=names,
        steps=args.steps,
        seeds=args.seeds,
        sweep=True if args.sweep == "all" else None,
        sweep_factors=args.sweep_factors,
        tuning_seeds=[1000],
        schedule="cosine",
        out=Path(args.out) / "lm",
        eval_every=max(1, args.steps // 20),
        progress=not args.no_progress,
    )
    rows = {name: _row(result, name) for name in LM_OPTIMIZERS}

    def faster(a: str, b: str) -> bool | None:
        ms_a, ms_b = rows[a]["ms_per_step"], rows[b]["ms_per_step"]
        return None if ms_a is None or ms_b is None else ms_a < ms_b

    def smaller(a: str, b: str) -> bool | None:
        s_a, s_b = rows[a]["state_bytes"], rows[b]["state_bytes"]
        return None if s_a is None or s_b is None else s_a <= s_b

    f = {name: rows[name]["finals"] for name in LM_OPTIMIZERS}
    adamw_steps = args.steps
    claims = [
        {
            "claim": "ROOT reaches a lower loss than Muon",
            "ours": f"root {rows['root']['mean']} vs muon {rows['muon']['mean']}",
            "verdict": verdict(f["root"], f["muon"]),
        },
        {
            "claim": "AuON trains like Muon at linear cost",
            "ours": f"auon {rows['auon']['mean']} vs muon {rows['muon']['mean']}; ms/step "
            f"{rows['auon']['ms_per_step']} vs {rows['muon']['ms_per_step']}",
            # Quality "like Muon": not worse beyond the seed spread.
            "verdict": _matches(verdict(f["muon"], f["auon"]), faster("auon", "muon")),
        },
        {
            "claim": "DCT low-rank Adam matches GaLore (SVD) at lower memory",
            "ours": f"dct {rows['dct-adamw']['mean']} vs galore {rows['galore-adamw']['mean']}; "
            f"state {rows['dct-adamw']['state_bytes']} vs {rows['galore-adamw']['state_bytes']} B",
            "verdict": _matches(
                verdict(f["galore-adamw"], f["dct-adamw"]), smaller("dct-adamw", "galore-adamw")
            ),
        },
        {
            "claim": "SPECTRA(AdamW) reaches a lower loss than AdamW",
            "ours": f"spectra {rows['spectra-adamw']['mean']} vs adamw {rows['adamw']['mean']}",
            "verdict": verdict(f["spectra-adamw"], f["adamw"]),
        },
        {
            "claim": "ARO beats AdamW",
            "ours": f"aro {rows['aro']['mean']} vs adamw {rows['adamw']['mean']}; steps to "
            f"AdamW's final {rows['aro']['steps_to_adamw_final']} of {adamw_steps}",
            "verdict": verdict(f["aro"], f["adamw"]),
        },
        {
            "claim": "ARO beats Muon",
            "ours": f"aro {rows['aro']['mean']} vs muon {rows['muon']['mean']}",
            "verdict": verdict(f["aro"], f["muon"]),
        },
        {
            "claim": "symmetry-compatible rules beat plain Muon",
            "ours": f"muon-symmetry {rows['muon-symmetry']['mean']}, muon-symmetry-embed "
            f"{rows['muon-symmetry-embed']['mean']} vs muon {rows['muon']['mean']}",
            "verdict": f"all rules: {verdict(f['muon-symmetry'], f['muon'])}; embedding/head "
            f"rules only: {verdict(f['muon-symmetry-embed'], f['muon'])}",
        },
    ]
    return {
        "task": result.task,
        "task_description": result.config["task_description"],
        "steps": args.steps,
        "seeds": result.config["seeds"],
        "sweeps": {
            k: {"grid": v["grid"], "chosen_lr": v["chosen_lr"], "at_edge": v["at_edge"]}
            for k, v in result.sweeps.items()
        },
        "rows": rows,
        "claims": claims,
    }


def _matches(other_better: str, cheaper: bool | None) -> str:
    """Claim "matches the other's quality at a lower cost": not worse beyond the seed spread
    (``other_better`` is the verdict of "the other is lower") and cheaper."""
    if other_better.startswith("not measured") or cheaper is None:
        return "not measured (a run diverged or is missing)"
    if other_better == "reproduced":
        return "not reproduced (worse beyond the seed spread)"
    if not cheaper:
        return "not reproduced (not cheaper)"
    return "reproduced" if other_better == "not reproduced" else "reproduced (within seed spread)"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def robust_claims(args: argparse.Namespace) -> dict:
    robustness = _load(ROOT_DIR / "benchmarks" / "robustness.py", "robustness")
    split = robustness.data()
    names = ("AdamW", "Muon", "ROOT", "ROOT (no clip)")
    ratios: dict[str, list[float]] = {}
    for name in names:
        for seed in args.seeds:
            clean = robustness.run(name, False, 200, seed, split)[1]
            bad = robustness.run(name, True, 200, seed, split)[1]
            ratios.setdefault(name, []).append(bad / clean)
    return {
        "protocol": "benchmarks/robustness.py: digits MLP, 200 full-batch steps, 0.1% of "
        "gradient entries x1000 every step; test-loss ratio corrupted / clean per seed; "
        "learning rates as in that script (not swept)",
        "ratios": ratios,
        "claims": [
            {
                "claim": f"ROOT is more robust to outlier gradients than {other}",
                "ours": f"ratio root {statistics.fmean(ratios['ROOT']):.3f} vs {other} "
                f"{statistics.fmean(ratios[other]):.3f}",
                "verdict": verdict(ratios["ROOT"], ratios[other]),
            }
            for other in ("AdamW", "Muon", "ROOT (no clip)")
        ],
    }


def _script(argv: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *argv], cwd=ROOT_DIR, capture_output=True, text=True, check=True
    )
    return {
        "command": "python " + " ".join(argv),
        "stdout": proc.stdout,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/claims")
    parser.add_argument("--model", default="gpt-tiny", choices=list(bench.MODEL_PRESETS))
    parser.add_argument("--text", help="a text file or folder (default: the Python stdlib)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sweep-factors", default="0.25,0.5,1,2,4")
    parser.add_argument("--parts", default="lm,robust,merge,dictionary")
    parser.add_argument(
        "--optimizers",
        default=",".join(LM_OPTIMIZERS),
        help="the lm part's optimizers (a subset: claims about the others are 'not measured')",
    )
    parser.add_argument(
        "--sweep",
        choices=["all", "untuned"],
        default="all",
        help="sweep every optimizer's lr, or only those without a tuned bytelm default",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="seconds: 3 steps of every optimizer, one seed"
    )
    args = parser.parse_args()
    if args.quick:  # a smoke run of the code paths; its numbers mean nothing
        args.steps, args.seeds, args.sweep_factors = 3, "0", "1"
        args.parts, args.no_progress = "lm", True
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.optimizers = args.optimizers.split(",")
    args.sweep_factors = [float(f) for f in args.sweep_factors.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "claims.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report["command"] = "python " + " ".join(sys.argv)
    report["environment"] = bench.report.environment()
    parts = args.parts.split(",")
    runners = {
        "lm": lambda: lm_claims(args),
        "robust": lambda: robust_claims(args),
        "merge": lambda: _script(["examples/merge_digits.py", "--seeds", "5"]),
        "dictionary": lambda: _script(["benchmarks/dictionary_learning.py", "--repeats", "3"]),
    }
    for part in parts:
        start = time.perf_counter()
        report[part] = runners[part]()
        report[part]["wall_s"] = time.perf_counter() - start
        path.write_text(json.dumps(finite_json(report), indent=1) + "\n")
        print(f"{part}: done in {report[part]['wall_s']:.0f} s", flush=True)
        for claim in report[part].get("claims", []):
            print(f"  {claim['claim']}: {claim['verdict']}  ({claim['ours']})", flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
