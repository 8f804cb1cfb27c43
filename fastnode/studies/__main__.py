"""``python -m fastnode.studies <name> [--quick] [--out DIR] [--data-dir PATH] ...`` (see ``--help``)."""

from __future__ import annotations

import argparse
import os
import sys

from . import STUDIES, get_study, run_study


def _number(s: str):
    try:
        return int(s)
    except ValueError:
        return float(s)


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
            ap.error(f"--set needs KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k.replace("-", "_")] = _number(v) if v[:1].isdigit() or v[:1] in "-." else v
    out = args.out or f"results/{args.name}"
    run_study(args.name, out=out, quick=args.quick, progress=not args.no_progress, device=args.device, **overrides)
    if os.environ.get("RANK", "0") == "0":
        print(f"results written to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
