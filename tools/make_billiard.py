#!/usr/bin/env python
"""Generate the billiard task procedurally (DPS inter-patch reasoning) without the download.

    python tools/make_billiard.py data/billiard --n-train 8000 --n-valid 2000 --n-test 10000

Writes {train,valid,test}/<id>.png + <id>.json in the DPS release's format; the label
`max-left-right` (max of the leftmost and rightmost numbers, minus 1) is computed by the loader.
A folder that already holds a data set is refused unless --overwrite (which replaces it once
the new one is complete); a folder with other files is always refused.
"""
from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output_directory", help="folder to write the data set into")
    p.add_argument("--size", type=int, default=1000, help="image side in pixels (default 1000, as DPS)")
    p.add_argument("--n-train", type=int, default=8000, help="training images (DPS: 8000)")
    p.add_argument("--n-valid", type=int, default=2000, help="validation images (DPS: 2000)")
    p.add_argument("--n-test", type=int, default=10000, help="test images (DPS: 10000)")
    p.add_argument("--min-balls", type=int, default=4, help="fewest balls per image (default 4)")
    p.add_argument("--max-balls", type=int, default=8, help="most balls per image (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--workers", type=int, default=1, help="processes writing images (default 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the billiard data set already in the folder (only once the new one is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from hrsel.data.billiard_gen import BilliardParameters, generate_billiard
    from hrsel.errors import HrselError

    params = BilliardParameters(size=args.size, n_train=args.n_train, n_valid=args.n_valid, n_test=args.n_test,
                                min_balls=args.min_balls, max_balls=args.max_balls, seed=args.seed)
    start = time.perf_counter()
    try:
        out = generate_billiard(args.output_directory, params=params, workers=args.workers, progress=not args.quiet,
                                overwrite=args.overwrite)
    except HrselError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total, seconds = args.n_train + args.n_valid + args.n_test, time.perf_counter() - start
    print(f"wrote {total} billiard images of {args.size}x{args.size} to {out} in {seconds:.1f} s "
          f"({total / max(seconds, 1e-9):.1f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
