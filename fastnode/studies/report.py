"""Writing a study's results: ``<name>.json``, ``<name>.md`` (Markdown tables) and PNG plots in one folder."""

from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path

import torch

__all__ = ["environment", "markdown_table", "new_figure", "save_figure", "write_results"]


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        a = abs(v)
        if a != 0 and (a < 1e-3 or a >= 1e6):
            return f"{v:.3g}"
        return f"{v:.4g}" if a < 100 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    return str(v)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub Markdown table; floats get 4 significant digits, ``None`` prints as ``n/a``.

    Args:
        headers: column titles.
        rows: one list per row, ``len(headers)`` entries each.

    Returns:
        The table as text (ends with a newline).

    Example:
        >>> print(markdown_table(["a", "b"], [[1, 0.5], [2, None]]), end="")
        | a | b |
        |---|---|
        | 1 | 0.5 |
        | 2 | n/a |
    """
    if not headers:
        raise ValueError("headers must not be empty")
    for i, r in enumerate(rows):
        if len(r) != len(headers):
            raise ValueError(f"rows[{i}] has {len(r)} entries, headers has {len(headers)}")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def environment() -> dict:
    """Versions and device, recorded with every result.

    Example:
        >>> "torch" in environment()
        True
    """
    import fastnode

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu_name()
    return {"python": sys.version.split()[0], "torch": torch.__version__, "fastnode": fastnode.__version__,
            "device": dev, "threads": torch.get_num_threads(), "platform": platform.platform()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_results(out_dir, name: str, results: dict, tables: list[tuple[str, list[str], list[list]]],
                  notes: list[str] | None = None, env: dict | None = None) -> dict[str, Path]:
    """Write ``<out_dir>/<name>.json`` (``results`` plus the environment) and ``<out_dir>/<name>.md``.

    Args:
        out_dir: folder (created).
        name: study name (file stem).
        results: JSON-serialisable dict.
        tables: ``(title, headers, rows)`` per Markdown table.
        notes: paragraphs printed under the tables (what was measured, how).
        env: the environment the results were measured in (``environment()``'s keys); ``None``: this process's.
            A report assembled from other processes' results (a merge) passes theirs, so that the header's
            device and thread count describe the runs, not the process that wrote the file.

    Returns:
        ``{"json": path, "md": path}``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     paths = write_results(d, "demo", {"x": 1}, [("T", ["a"], [[1]])])
        ...     sorted(p.name for p in Path(d).iterdir())
        ['demo.json', 'demo.md']
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"study": name, "environment": env if env is not None else environment(),
               **{k: v for k, v in results.items() if k != "environment"}}
    jpath = out / f"{name}.json"
    jpath.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    parts = [f"# {name}\n"]
    env = payload["environment"]
    parts.append(f"Device: {env['device']} ({env['threads']} threads), torch {env['torch']}, "
                 f"fastnode {env['fastnode']}.\n")
    for title, headers, rows in tables:
        parts.append(f"## {title}\n\n" + markdown_table(headers, rows))
    for n in notes or []:
        parts.append(n.rstrip() + "\n")
    mpath = out / f"{name}.md"
    mpath.write_text("\n".join(parts))
    return {"json": jpath, "md": mpath}


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (4.0, 3.2)):
    """A matplotlib figure on the non-interactive Agg backend (no display needed).

    Args:
        ncols, nrows: subplot grid.
        size: inches per subplot.

    Returns:
        ``(fig, axes)`` with ``axes`` always a flat list.

    Example:
        >>> fig, axes = new_figure(2)
        >>> len(axes)
        2
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    return fig, [a for row in axes for a in row]


def save_figure(fig, path) -> Path:
    """Save as a small PNG (90 dpi) and close the figure.

    Args:
        fig: matplotlib figure.
        path: output ``.png`` path.

    Returns:
        The path.

    Example:
        >>> import tempfile
        >>> fig, _ = new_figure()
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save_figure(fig, Path(d) / "a.png").name
        'a.png'
    """
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
