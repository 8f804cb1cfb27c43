"""Backend selection and packaging: what ``auto`` picks, what a forced backend refuses, the package without its
compiled extension, and that the op libraries are leaves."""

from __future__ import annotations

import ast
import math
import os
from pathlib import Path

import pytest
import torch

from fastnode import kernels, last_stats, odeint
from fastnode.backends import ext_ops, get_backend

from .conftest import COMPILED, field as _field, kernel_devices, y0 as _y0

F64 = torch.float64
needs_ext = pytest.mark.skipif(not ext_ops.available(), reason="fastnode._C is not built (FASTNODE_SKIP_EXT=1)")


def test_extension_is_built():
    # A build that silently failed would skip every test below: make that a failure unless skipping was asked for.
    if os.environ.get("FASTNODE_SKIP_EXT", "0") == "1":
        pytest.skip("FASTNODE_SKIP_EXT=1")
    assert ext_ops.available()
    assert get_backend("auto", torch.device("cpu")).name == "ext"


@needs_ext
def test_backprop_through_the_solver_runs_on_ext_under_auto():
    y0 = torch.ones(2, 3, dtype=F64, requires_grad=True)
    ys = odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=F64), options={"backend": "auto"})
    assert last_stats().backend == "ext"
    ys.sum().backward()
    torch.testing.assert_close(y0.grad, torch.full_like(y0, 1 + math.exp(-1)), rtol=1e-6, atol=0)
    with torch.no_grad():
        odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=F64), options={"backend": "auto"})
    assert last_stats().backend == "ext"


@needs_ext
def test_forced_ext_records_a_graph():
    """Forced ext backpropagates (adaptive and fixed grids) with the reference's gradients."""
    lin = torch.nn.Linear(3, 3).double()
    for kw in ({}, {"method": "rk4", "options": {"step_size": 0.25}}):
        grads = []
        for backend in ("ext", "torch"):
            opts = dict(kw.get("options", {}), backend=backend)
            ys = odeint(lambda t, y: lin(y), torch.ones(2, 3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                        method=kw.get("method"), options=opts)
            assert last_stats().backend == backend
            grads.append(torch.autograd.grad(ys.sum(), list(lin.parameters())))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_package_runs_without_the_extension_and_says_so_once():
    # A missing or broken build: the package imports, auto falls back to torch, and one warning says why.
    import subprocess
    import sys

    code = (
        "import sys, warnings\n"
        "sys.modules['fastnode._C'] = None  # makes 'from .. import _C' raise ImportError\n"
        "import torch, fastnode\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3):\n"
        "        fastnode.odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]))\n"
        "        assert fastnode.last_stats().backend == 'torch'\n"
        "msgs = [str(x.message) for x in w if 'fastnode._C' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "try:\n"
        "    fastnode.odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), options={'backend': 'ext'})\n"
        "except ValueError as e:\n"
        "    assert \"options['backend']='ext' is not available\" in str(e), e\n"
        "else:\n"
        "    raise SystemExit('forced ext did not raise')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTNODE_SKIP_EXT"}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# --- triton ----------------------------------------------------------------------------------------------------------

def test_selection_on_cpu(monkeypatch):
    """auto never picks triton for CPU tensors; a forced triton errs clearly where it cannot run."""
    assert get_backend("auto", torch.device("cpu")).name in ("ext", "torch")
    assert kernels.unavailable_reason(torch.device("meta")) == "there are no Triton kernels for meta tensors"
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    assert "TRITON_INTERPRET=1" in kernels.unavailable_reason(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"options\['backend'\]='triton' is not available for cpu tensors"):
        odeint(_field, _y0(F64, "cpu"), torch.tensor([0.0, 1.0], dtype=F64), options={"backend": "triton"})


@pytest.mark.parametrize("device", kernel_devices())
def test_forced_triton_records_a_graph(device):
    """Forced triton backpropagates through the solver, with the torch reference's gradients."""
    grads = []
    for backend in ("triton", "torch"):
        y0 = _y0(F64, device).requires_grad_(True)
        ys = odeint(_field, y0, torch.tensor([0.0, 0.1], dtype=F64, device=device), options={"backend": backend})
        assert last_stats().backend == backend
        grads.append(torch.autograd.grad((ys * ys).sum(), y0)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@COMPILED
def test_auto_picks_triton_on_cuda():
    y0 = _y0(F64, "cuda")
    with torch.no_grad():
        odeint(_field, y0, torch.tensor([0.0, 0.1], dtype=F64, device="cuda"))
    assert last_stats().backend == "triton"


# --- the op libraries are leaves -------------------------------------------------------------------------------------

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append(node.module or "")
    return out


def test_kernels_import_nothing_from_fastnode():
    files = sorted(KERNELS.glob("*.py"))
    assert {"_launch.py", "_autograd.py", "rk_combine.py", "rk_combine_backward.py", "finish_control.py",
            "interpolate.py", "interpolate_backward.py", "step_begin.py", "step_end.py"} <= {p.name for p in files}
    bad = {p.name: m for p in files for m in _imports(p) if m == "fastnode" or m.startswith("fastnode.")}
    assert not bad, f"kernels/ imports fastnode: {bad}"


def test_no_reference_shims():
    assert not [n for n in dir(kernels) if n.startswith("reference_")]


def test_csrc_one_file_per_op_and_device():
    """Every schema in csrc/ops.cpp has a CPU implementation in its own file, registered there and only there."""
    csrc = KERNELS.parent / "csrc"
    ops = sorted(set(__import__("re").findall(r'm\.def\(\s*"(\w+)\(', (csrc / "ops.cpp").read_text())))
    assert ops == ["adjoint_weights", "finish_control", "initial_step_finish", "initial_step_probe", "interpolate",
                   "interpolate_backward", "rk_combine", "rk_combine_backward", "step_begin", "step_end"]
    for op in ops:
        text = (csrc / "cpu" / f"{op}_cpu.cpp").read_text()
        assert f'm.impl("{op}"' in text and "TORCH_LIBRARY_IMPL(fastnode, CPU, m)" in text
    for cu in sorted((csrc / "cuda").glob("*_cuda.cu")):
        op = cu.name[: -len("_cuda.cu")]
        assert op in ops and f'm.impl("{op}"' in cu.read_text()


# --- the adjoint's backward solve on CUDA: the C++/CUDA step ops ----------------------------------------------------

def _mock_availability(monkeypatch, ext: bool, triton: bool):
    """CUDA availability of each library as given (on a machine without a GPU: the ops are only constructed)."""
    from fastnode import backends

    monkeypatch.setattr(ext_ops, "unavailable_reason", lambda dev: None if ext else "no CUDA build (mocked)")
    real = backends._triton_ops

    def triton_ops(device, forced):
        if not triton:
            return backends._chosen("triton", device, "no triton (mocked)", None, forced)
        from fastnode.backends.triton_ops import TritonStepOps

        return TritonStepOps(forced=forced) if device.type == "cuda" else real(device, forced)

    monkeypatch.setattr(backends, "_triton_ops", triton_ops)


@pytest.mark.parametrize("ext, triton, solve, adjoint", [
    (True, True, "triton", "ext+triton"), (True, False, "torch", "ext"), (False, True, "triton", "triton"),
    (False, False, "torch", "torch")])
def test_auto_on_cuda_by_role(monkeypatch, ext, triton, solve, adjoint):
    """auto on CUDA: Triton for solves; for the adjoint's backward the C++/CUDA step ops wherever they are built."""
    _mock_availability(monkeypatch, ext, triton)
    cuda = torch.device("cuda")
    assert get_backend("auto", cuda).name == solve
    assert get_backend("auto", cuda, role="adjoint").name == adjoint
    # A forced backend is what was asked for, whatever the role.
    if triton:
        assert get_backend("triton", cuda, role="adjoint").name == "triton"
    assert get_backend("torch", cuda, role="adjoint").name == "torch"
    # CPU tensors: the role changes nothing.
    cpu = torch.device("cpu")
    assert get_backend("auto", cpu, role="adjoint").name == get_backend("auto", cpu).name
    with pytest.raises(ValueError, match="role must be"):
        get_backend("auto", cuda, role="backward")


@needs_ext
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_adjoint_backward_on_ext_triton_matches_torch(device, per_sample, monkeypatch):
    """The split backend runs a whole adjoint backward (on CPU: the C++ CPU ops and Triton's interpreter; on CUDA
    what auto picks when both libraries are there): same steps and gradients as the torch backend."""
    from fastnode import _adjoint, odeint_adjoint
    from fastnode.backends.ext_triton_ops import ExtTritonStepOps

    if device == "cuda" and ext_ops.unavailable_reason(torch.device("cuda")) is not None:
        pytest.skip("fastnode._C has no CUDA ops in this build")
    if device == "cpu":  # on CPU auto never picks it: hand it to the backward solve
        real = _adjoint.get_backend
        monkeypatch.setattr(_adjoint, "get_backend", lambda name, dev, role="solve": (
            ExtTritonStepOps() if name == "auto" and role == "adjoint" else real(name, dev, role)))
    lin = torch.nn.Linear(3, 3).double()
    torch.nn.init.normal_(lin.weight, std=0.6, generator=torch.Generator().manual_seed(0))
    lin = lin.to(device)
    f = lambda t, y: torch.tanh(lin(y)) - 0.3 * y
    t = torch.tensor([0.0, 0.3, 0.7], dtype=F64, device=device)
    res = {}
    for backend in ("auto", "torch"):
        y0 = _y0(F64, device, B=5).requires_grad_(True)
        opts = {"backend": backend, "per_sample": per_sample}
        ys = odeint_adjoint(f, y0, t, rtol=1e-6, atol=1e-8, options=opts, adjoint_options=opts,
                            adjoint_params=tuple(lin.parameters()))
        (ys * torch.arange(1, 4, dtype=F64, device=device)).sum().backward()
        res[backend] = (ys.detach(), [y0.grad] + [p.grad.clone() for p in lin.parameters()], last_stats())
        lin.zero_grad()
    (a, ga, sa), (b, gb, sb) = res["auto"], res["torch"]
    assert sa.backward.backend == "ext+triton" and sb.backward.backend == "torch"
    assert sa.backward.nfe == sb.backward.nfe
    for name in ("n_accepted", "n_rejected"):
        assert torch.equal(torch.as_tensor(getattr(sa.backward, name)), torch.as_tensor(getattr(sb.backward, name)))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    for x, z in zip(ga, gb):
        torch.testing.assert_close(x, z, rtol=1e-10, atol=1e-12)


def test_interpreter_broken_names_the_versions(monkeypatch):
    """The GPU image's triton 3.6 + numpy 2.5 turns the interpreter off (its CPU cases skip with this reason)."""
    from tests import conftest

    versions = {"triton": (3, 6), "numpy": (2, 5), "torch": (2, 13)}
    monkeypatch.setattr(conftest, "_version", lambda dist: versions[dist])
    monkeypatch.setattr(conftest, "_torch_wraps_interpreted_kernels", lambda: True)
    why = conftest.interpreter_broken()
    assert why is not None and "3.6" in why and "2.5" in why
    versions.update(numpy=(2, 3))
    assert conftest.interpreter_broken() is None
    versions.update(triton=(3, 7), numpy=(2, 5))
    assert conftest.interpreter_broken() is None
    # torch 2.11's wrap_triton (the GPU image's) has no branch for interpreted kernels.
    monkeypatch.setattr(conftest, "_torch_wraps_interpreted_kernels", lambda: False)
    assert "wrap_triton" in conftest.interpreter_broken()
