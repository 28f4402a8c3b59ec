"""Long fuzzing run: damaged real exports through the CLI, with the outcome breakdown.

Runs the mutations of ``tests/test_fuzz_models.py`` (the same cases as the fixed-seed set in the
test suite, with fresh seeds and more examples) on tiny GPT-2 and BERT exports from both torch
exporters, runs ``passes.compile``'s ``main`` in process on each damaged model, and prints, per
mutation, how many cases compiled (exit 0, verified), ended outside tolerance (exit 1, nothing
written) or were refused (exit 2, one line) — and any case that ended otherwise (a traceback, exit
3, a half-written file), with its description and stderr.

Usage::

    python benchmarks/fuzz_models.py                    # 40 examples per mutation, random seed
    python benchmarks/fuzz_models.py --examples 200 --seed 1 --kinds cycle,garbage
    python benchmarks/fuzz_models.py --ci               # exactly the test suite's fixed-seed set

Exit code 1 when any case ended badly.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import random
import sys
import tempfile
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import test_fuzz_models as fz  # noqa: E402
from conftest import export_cached  # noqa: E402

OUTCOMES = ["compiled", "outside tolerance", "refused", "BAD"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=40, help="examples per mutation (default 40)")
    p.add_argument("--seed", type=int, help="hypothesis seed (default: random)")
    p.add_argument("--kinds", default="", help="comma-separated mutations (default: all)")
    p.add_argument("--ci", action="store_true", help="run the test suite's fixed-seed set")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "tfcompile-fuzz-exports"),
                   help="folder for the exports (reused between runs)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    kinds = [k for k in args.kinds.split(",") if k] or sorted(fz.MUTATIONS)
    seed = None if args.ci else (args.seed if args.seed is not None else random.randrange(2**32))
    examples = fz.CI_EXAMPLES if args.ci else args.examples

    cache = pathlib.Path(args.cache)
    bases = {fz.base_name(a, d): export_cached(cache, a, dynamo=d).read_bytes() for a, d in fz.BASES}
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    bad: list[str] = []

    def record(kind: str, case: fz.Case, outcome: fz.Outcome) -> None:
        try:
            fz.check_outcome(outcome, case.what)
        except AssertionError as e:
            counts[kind]["BAD"] += 1
            bad.append(str(e))
            return
        counts[kind][outcome.kind] += 1

    start = time.perf_counter()
    for kind in kinds:
        fz.fuzz(bases, kind, examples, derandomize=args.ci, seed=seed, record=record)
    seconds = time.perf_counter() - start

    print(f"fuzzing {len(bases)} exports ({', '.join(bases)}), {examples} examples per mutation, "
          f"{'fixed-seed CI set' if args.ci else f'seed {seed}'}: {seconds:.1f} s")
    print(f"\n{'mutation':<24}" + "".join(f"{o:>19}" for o in OUTCOMES) + f"{'total':>8}")
    total: collections.Counter[str] = collections.Counter()
    for kind in kinds:
        c = counts[kind]
        total.update(c)
        print(f"{kind:<24}" + "".join(f"{c[o]:>19}" for o in OUTCOMES) + f"{sum(c.values()):>8}")
    print(f"{'all':<24}" + "".join(f"{total[o]:>19}" for o in OUTCOMES) + f"{sum(total.values()):>8}")
    for b in bad:
        print("\n" + "=" * 100 + "\n" + b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
