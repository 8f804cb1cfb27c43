"""``python -m fastnode.studies <name> [--quick] [--out DIR] [--data-dir PATH] ...`` (see ``--help``)."""

from __future__ import annotations

import argparse
import os
import sys

from . import STUDIES, get_study, run_study


def _scalar(s: str):
    """``"3"`` -> 3, ``"1e-3"`` -> 0.001, ``"true"``/``"false"`` -> bool, ``"none"`` -> None, else the text."""
    low = s.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s.strip()


def parse_setting(key: str, text: str, default):
    """The value of ``--set key=text``, typed after the study's default for ``key``.

    A default that is a tuple or list makes the value a tuple (comma separated, ``depths=1,2`` or ``parts=1d``;
    ``key=`` is the empty tuple);
    a bool default takes ``true``/``false``/``1``/``0``; otherwise numbers become int or float.

    Raises:
        ValueError: when the text does not fit the default's type (the message names the key).

    Example:
        >>> parse_setting("depths", "1,2", (1, 2, 4)), parse_setting("parts", "1d", ("1d", "2d"))
        ((1, 2), ('1d',))
        >>> parse_setting("rtol", "1e-3", 1e-2), parse_setting("adjoint", "0", True)
        (0.001, False)
    """
    if isinstance(default, (tuple, list)):
        return tuple(_scalar(t) for t in text.split(",") if t.strip())  # "key=" gives an empty list
    if isinstance(default, bool):
        low = text.strip().lower()
        if low not in ("true", "false", "1", "0"):
            raise ValueError(f"{key} needs true or false, got {text!r}")
        return low in ("true", "1")
    value = _scalar(text)
    if isinstance(default, (int, float)) and not isinstance(value, (int, float)) and value is not None:
        raise ValueError(f"{key} needs a number, got {text!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastnode.studies", description=__doc__)
    ap.add_argument("name", choices=STUDIES)
    ap.add_argument("--out", default=None, help="results folder (default: results/<name>)")
    ap.add_argument("--quick", action="store_true", help="tiny configuration (seconds on a CPU)")
    ap.add_argument("--data-dir", default=None, help="folder of local data files (MNIST idx, CIFAR-10, housing.csv)")
    ap.add_argument("--dataset", default=None, help="image study: digits, mnist-subset, mnist, cifar10; "
                    "tabular regression: diabetes, california")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--test-size", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--rtol", type=float, default=None, help="training tolerance (rtol = atol)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other configuration entry of the study (repeatable)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    mod = get_study(args.name)
    overrides = {k: getattr(args, k) for k in ("dataset", "epochs", "batch_size", "train_size", "test_size",
                                               "image_size", "width", "rtol", "seed", "data_dir")}
    known = set(mod.DEFAULTS) | {"seed", "data_dir"}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = [k for k in overrides if k not in known]
    if unknown:
        ap.error(f"study {args.name!r} has no setting {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for item in args.set:
        if "=" not in item:
            ap.error(f"argument --set: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        if k not in known:
            ap.error(f"argument --set: study {args.name!r} has no setting {k!r}; known: {', '.join(sorted(known))}")
        try:
            overrides[k] = parse_setting(k, v, mod.DEFAULTS.get(k))
        except ValueError as exc:
            ap.error(f"argument --set: {exc}")
    out = args.out or f"results/{args.name}"
    run_study(args.name, out=out, quick=args.quick, progress=not args.no_progress, device=args.device, **overrides)
    if os.environ.get("RANK", "0") == "0":
        print(f"results written to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
