"""Build a missing data set before training (`data.generate_if_missing: true`).

Only generated data sets have a generator: Megapixel MNIST. Downloads of real data
sets are left to their tools; a missing folder of theirs is a config error.
"""
from __future__ import annotations

from typing import Any, Callable

from hrsel.errors import ConfigError, DataError


def generate_megapixel_mnist(root: str, *, width: int = 1500, height: int = 1500, n_train: int = 5000,
                             n_test: int = 1000, noise: bool = True, n_noise: int = 50, seed: int = 0,
                             digits: str = "mnist", mnist_dir: str | None = None, download: bool = False,
                             workers: int = 1) -> str:
    """Write Megapixel MNIST into `root`; returns where the digits came from (one sentence).

    Digits: MNIST from `mnist_dir` alone when given (an error when it lacks them), else from
    $HRSEL_MNIST_DIR or the usual folders (a download when `download`), else digits rendered
    from a font, which the returned note says aloud. Leftovers of an interrupted run in `root`
    are replaced; a finished data set or files of other origin are not.
    """
    from pathlib import Path

    from hrsel.data.digits import check_digits, generator_pools
    from hrsel.data.megapixel_mnist_gen import MegapixelParameters, check_parameters
    from hrsel.data.megapixel_mnist_gen import generate_megapixel_mnist as generate

    try:
        check_digits(digits)
        params = MegapixelParameters(width=width, height=height, n_train=n_train, n_test=n_test, noise=noise,
                                     n_noise=n_noise, seed=seed)
        check_parameters(params)
    except DataError as e:
        raise ConfigError(f"data.generate: {e}") from e
    try:
        pools = generator_pools(digits=digits, mnist_dir=mnist_dir, download=download)
    except DataError as e:
        raise ConfigError(f"data.generate.mnist_dir: {e}") from e
    finished = (Path(root) / "parameters.json").is_file()
    generate(root, pools, params=params, workers=workers, progress=False, overwrite=not finished)
    return pools.note


GENERATORS: dict[str, Callable[..., str]] = {"megapixel_mnist": generate_megapixel_mnist}


def needs_generation(name: str, root: str) -> bool:
    """True when `root` holds no finished copy of a generated data set (an interrupted run counts as none)."""
    from pathlib import Path

    if name == "megapixel_mnist":
        return not (Path(root) / "parameters.json").is_file()
    return not Path(root).exists()


def generate_dataset(name: str, *, root: str, **options: Any) -> str:
    """Run the generator of data set `name` into `root`; returns a note on the data's origin."""
    if name not in GENERATORS:
        raise ConfigError(f"data.generate_if_missing is set, but data set {name!r} has no generator (only "
                          f"{', '.join(GENERATORS)}); download it into data.root instead")
    from hrsel.config import check_builder_options

    options = check_builder_options("data.generate", name, options, GENERATORS[name], supplied=("root",))
    return GENERATORS[name](root, **options)
