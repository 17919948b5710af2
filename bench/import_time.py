"""What ``import gmm_quant`` costs: wall time and the modules it loads, for one or more checkouts.

    python bench/import_time.py [--repo DIR ...] [--repeats 7]

Each statement runs in a fresh interpreter with the checkout first on ``sys.path``; the time is the
interpreter's own ``-X importtime`` total for ``gmm_quant`` (minimum of the repeats, runs of the
checkouts interleaved). ``--repo`` defaults to this checkout; give an older one beside it to compare.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

STATEMENTS = (
    "import gmm_quant",
    "import gmm_quant as gq; gq.pretrain",  # + the training layer
    "import gmm_quant as gq; gq.pretrain; gq.save_compressed",  # + the .gqz format
)
HEAVY = ("orbax", "optuna", "onnx", "onnxruntime", "matplotlib")
PROBE = (
    "import sys, time; t = time.perf_counter(); {stmt}; t = time.perf_counter() - t; "
    "mods = set(sys.modules); print(t, sum(m.split('.')[0] == 'gmm_quant' for m in mods), len(mods), "
    "','.join(h for h in {heavy} if h in mods) or '-')"
)


def measure(repo: pathlib.Path, stmt: str) -> tuple[float, int, int, str]:
    code = PROBE.format(stmt=stmt, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    seconds, ours, total, heavy = out.stdout.split()
    return float(seconds), int(ours), int(total), heavy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", action="append", type=pathlib.Path, help="a checkout (repeatable)")
    ap.add_argument("--repeats", type=int, default=7, help="fresh interpreters per statement and checkout")
    args = ap.parse_args()
    repos = args.repo or [pathlib.Path(__file__).resolve().parents[1]]
    print("| checkout | statement | time (min of repeats) | gmm_quant modules | all modules | heavy loaded |")
    print("| --- | --- | --- | --- | --- | --- |")
    for stmt in STATEMENTS:
        best: dict = {}
        for _ in range(args.repeats):
            for repo in repos:  # interleaved: the machine's noise hits every checkout alike
                r = measure(repo, stmt)
                if repo not in best or r[0] < best[repo][0]:
                    best[repo] = r
        for repo in repos:
            t, ours, total, heavy = best[repo]
            print(f"| {repo} | `{stmt}` | {t * 1000:.1f} ms | {ours} | {total} | {heavy} |")


if __name__ == "__main__":
    main()
