"""``kernels/`` is a leaf: its op modules import nothing from ``fastnode`` (the backends import the kernels, never
the other way round)."""

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
# Transitional: the Triton StepOps backend still lives here until it moves to fastnode/backends/triton_ops.py.
NOT_OPS = {"step_ops.py"}


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append(node.module or "")
    return out


def test_op_modules_import_nothing_from_fastnode():
    files = sorted(p for p in KERNELS.glob("*.py") if p.name not in NOT_OPS)
    assert {"_launch.py", "rk_combine.py", "finish_control.py", "interpolate.py", "step_begin.py",
            "step_end.py"} <= {p.name for p in files}
    bad = {p.name: m for p in files for m in _imports(p) if m == "fastnode" or m.startswith("fastnode.")}
    assert not bad, f"kernels/ imports fastnode: {bad}"


def test_no_reference_shims():
    import fastnode.kernels as k

    assert not [n for n in dir(k) if n.startswith("reference_")]
