"""Runnable studies of the source papers' claims: ``python -m fastnode.studies <name> [--quick] [--out DIR]``.

Studies: ``resnet-vs-odenet``, ``memory-vs-depth``, ``tolerance``, ``limits``, ``tabular``, ``solvers``. Each writes
``<name>.json``, ``<name>.md`` and PNG plots into ``--out``. Training studies run under
``torchrun --nproc_per_node=N`` with DistributedDataParallel (gloo on CPU, nccl on GPU).

Example:
    >>> from fastnode.studies import STUDIES
    >>> sorted(STUDIES)
    ['limits', 'memory-vs-depth', 'resnet-vs-odenet', 'solvers', 'tabular', 'tolerance']
"""

import importlib

_MODULES = {
    "resnet-vs-odenet": "resnet_vs_odenet",
    "memory-vs-depth": "memory_vs_depth",
    "tolerance": "tolerance",
    "limits": "limits",
    "tabular": "tabular",
    "solvers": "solvers",
}
STUDIES = tuple(_MODULES)


def get_study(name: str):
    """The module of study ``name`` (it has ``NAME``, ``DEFAULTS``, ``QUICK`` and ``run(cfg, info)``).

    Example:
        >>> get_study("limits").NAME
        'limits'
    """
    if name not in _MODULES:
        raise ValueError(f"name must be one of {STUDIES}, got {name!r}")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}")


def run_study(name: str, *, out, quick: bool = False, progress: bool = False, device: str = "auto", **overrides):
    """Run study ``name`` in this process (joins the torchrun process group if launched by torchrun).

    Args:
        name: one of ``STUDIES``.
        out: results folder.
        quick: the study's tiny configuration (seconds on a CPU).
        progress: tqdm progress bars.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        **overrides: configuration entries (``epochs``, ``dataset``, ``data_dir``, ``seed``, ...).

    Returns:
        The study's results dict (also written to ``out``).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     r = run_study("limits", out=d, quick=True, parts=("1d",), iters_1d=3)
        >>> sorted(r["1d"])
        ['ANODE (+1 dim)', 'ODE', 'ResNet (4 blocks)']
    """
    from .common import cleanup_distributed, setup_distributed

    mod = get_study(name)
    cfg = dict(mod.QUICK if quick else mod.DEFAULTS)
    cfg.setdefault("seed", 0)
    cfg.setdefault("data_dir", None)
    for k, v in overrides.items():
        if k not in cfg and k not in ("seed", "data_dir"):
            raise ValueError(f"unknown setting {k!r} for study {name!r}; known: {sorted(cfg)}")
        cfg[k] = v  # an explicit None is a value too (train_size=None: the whole set)
    cfg["out"] = str(out)
    cfg["progress"] = bool(progress)
    cfg["quick"] = bool(quick)
    info = setup_distributed(device)
    try:
        return mod.run(cfg, info)
    finally:
        cleanup_distributed()


__all__ = ["STUDIES", "get_study", "run_study"]
