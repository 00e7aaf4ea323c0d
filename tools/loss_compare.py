"""Compare the per-step scalars of two runs, or of a run and a golden file, and print a table.

    # a run against its golden file: exit 1 on any difference beyond the tolerance
    python tools/loss_compare.py runs/golden/pretrain tests/golden/pretrain_tiny.txt --rtol 1e-5
    # two runs (e.g. before / after a refactor), bit for bit, on the keys given
    python tools/loss_compare.py runs/a runs/b --assert-equal --keys train/lm_loss train/grad_norm
    # just the table (exit 0 whatever the differences)
    python tools/loss_compare.py runs/a runs/b

A and B are golden files (tests/golden/*.txt) or run directories (their TensorBoard scalars).
Compared: --keys, else the columns of the golden file (of A when both are files), else the scalars
both runs logged. Exit codes: 0 equal within the tolerance (or no tolerance asked), 1 a mismatch,
2 bad input.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_step.testing import golden


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="golden file or run directory")
    ap.add_argument("b", help="golden file or run directory")
    tol = ap.add_mutually_exclusive_group()
    tol.add_argument("--assert-equal", action="store_true", help="fail unless bit-identical")
    tol.add_argument("--rtol", type=float, help="fail beyond this relative difference")
    ap.add_argument("--keys", nargs="+", help="scalars to compare (default: all of A's)")
    ap.add_argument("--only-mismatches", action="store_true", help="print only the differing values")
    args = ap.parse_args(argv)
    try:
        keys = args.keys
        if keys is None:
            files = [p for p in (args.a, args.b) if not os.path.isdir(p)]
            if files:
                keys = list(golden.load(files[0]))
            else:
                keys = sorted(set(golden.load(args.a)) & set(golden.load(args.b)))
        a, b = golden.load(args.a, keys), golden.load(args.b, keys)
    except (OSError, KeyError, ValueError) as e:
        print(f"loss_compare: {e}", file=sys.stderr)
        return 2
    rtol = 0.0 if args.assert_equal else args.rtol
    rows = golden.compare(a, b, rtol=rtol or 0.0, keys=keys)
    names = tuple(os.path.basename(os.path.normpath(p)) for p in (args.a, args.b))
    print(golden.format_rows(rows, names, only_bad=args.only_mismatches))
    if rtol is None:
        return 0
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
