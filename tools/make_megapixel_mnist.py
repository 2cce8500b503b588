#!/usr/bin/env python
"""Create the Megapixel MNIST data set (the IPS/ATS task) as lazily readable zarr arrays.

    python tools/make_megapixel_mnist.py --width 1500 --height 1500 data/megapixel_mnist_1500

MNIST IDX files come from --mnist-dir, $HRSEL_MNIST_DIR, ~/.cache/hrsel/mnist, ./data/mnist,
then a download; the t10k pair alone is split into disjoint train/test pools.
`--digits rendered` draws digits from a font instead (offline fallback, not MNIST).
"""
from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output_directory", help="folder to write the data set into")
    p.add_argument("--width", type=int, default=1500, help="canvas width in pixels (default 1500)")
    p.add_argument("--height", type=int, default=1500, help="canvas height in pixels (default 1500)")
    p.add_argument("--n-train", "--n_train", dest="n_train", type=int, default=5000, help="training images")
    p.add_argument("--n-test", "--n_test", dest="n_test", type=int, default=1000, help="test images")
    p.add_argument("--n-noise", "--n_noise", dest="n_noise", type=int, default=50,
                   help="noise placements per image, drawn from IPS's 50 line patterns per split (default 50)")
    p.add_argument("--no-noise", "--no_noise", dest="noise", action="store_false", help="no line-scribble noise")
    p.add_argument("--dataset-seed", "--dataset_seed", dest="seed", type=int, default=0,
                   help="random seed; split s uses seed + int(s == 'train')")
    p.add_argument("--mnist-dir", default=None, help="folder with the MNIST IDX files (.gz or plain)")
    p.add_argument("--digits", choices=("mnist", "rendered"), default="mnist",
                   help="'rendered' draws digits from a font: an offline fallback, NOT MNIST")
    p.add_argument("--no-download", dest="download", action="store_false", help="never try to download MNIST")
    p.add_argument("--workers", type=int, default=1, help="processes writing images (default 1)")
    p.add_argument("--chunk", type=int, default=512, help="zarr chunk side in pixels (default 512)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the Megapixel MNIST data set already in the folder (once the new one is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from hrsel.data.digits import load_digit_pools
    from hrsel.data.megapixel_mnist_gen import MegapixelParameters, check_parameters, generate_megapixel_mnist
    from hrsel.errors import HrselError

    params = MegapixelParameters(width=args.width, height=args.height, n_train=args.n_train, n_test=args.n_test,
                                 noise=args.noise, n_noise=args.n_noise, seed=args.seed, chunk=args.chunk)
    try:
        check_parameters(params)
        pools = load_digit_pools(digits=args.digits, mnist_dir=args.mnist_dir, download=args.download,
                                 progress=not args.quiet)
    except HrselError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if pools.source != "mnist":
        bar = "!" * 78
        print(f"{bar}\n!! NOTE: {pools.note}\n{bar}", file=sys.stderr)
    print(f"digits: {pools.source} ({len(pools.train_labels)} train / {len(pools.test_labels)} test in the pools)")
    start = time.perf_counter()
    try:
        out = generate_megapixel_mnist(args.output_directory, pools, params=params, workers=args.workers,
                                       progress=not args.quiet, overwrite=args.overwrite)
    except HrselError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    total = args.n_train + args.n_test
    print(f"wrote {total} images of {args.height}x{args.width} to {out} in {seconds:.1f} s "
          f"({total / max(seconds, 1e-9):.1f} images/s, {args.workers} worker(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
