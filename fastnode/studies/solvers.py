"""Study ``solvers``: the same image ODE block solved by fastnode and torchdiffeq, adjoint and backprop.

The network is the thesis's ODENet (``fastnode.models.ImageODENet``); its conv stem maps one batch of real images
to the block's initial state ``z0`` once, and every solver integrates the same vector field from the same ``z0``
on ``[0, 1]`` with dopri5 at ``rtol = atol = rtol``; the loss is the cross-entropy of the network's head on
``z(1)``. For each solver: NFE-F (calls of the vector field in the forward solve), NFE-B (adjoint: its calls in
the backward solve; backprop: the vector-Jacobian products through its evaluations, counted by autograd hooks),
the relative error of the gradient with respect to the vector field's parameters against a tight reference
(float64, ``ref_rtol``, backprop through torchdiffeq when installed, else through fastnode's ``dopri8``), the
thread CPU time of forward + backward (median and IQR over interleaved rounds) and the memory autograd holds.
With ``compiled`` the vector field is also run through ``torch.compile`` (fastnode rows only).
"""

from __future__ import annotations

import copy
import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from .. import last_stats, odeint, odeint_adjoint
from ..models import ImageODENet
from .common import DistInfo, SavedTensorMeter, check_feature_map, spread, time_call
from .data import load_images
from .report import new_figure, save_figure, write_results

NAME = "solvers"
DEFAULTS = {"dataset": "mnist-subset", "image_size": 28, "batch_size": 32, "width": 64, "rtol": 1e-3,
            "ref_rtol": 1e-9, "timing_rounds": 5, "threads": 1, "compiled": False, "train_size": None,
            "test_size": None}
QUICK = {"dataset": "digits", "image_size": 16, "batch_size": 8, "width": 16, "rtol": 1e-3, "ref_rtol": 1e-8,
         "timing_rounds": 2, "threads": 1, "compiled": False, "train_size": 64, "test_size": 16}


class CountingField(nn.Module):
    """Wraps a vector field ``f(t, z)``; counts calls, and (when ``hooks``) the gradients its outputs receive.

    Example:
        >>> import torch
        >>> f = CountingField(lambda t, z: -z)
        >>> z = torch.ones(3, requires_grad=True)
        >>> f(torch.tensor(0.0), z).sum().backward()
        >>> f.calls, f.vjps
        (1, 1)
    """

    def __init__(self, func, hooks: bool = True):
        super().__init__()
        self.func = func
        self.hooks = hooks
        self.calls = 0
        self.vjps = 0

    def forward(self, t, z):
        self.calls += 1
        out = self.func(t, z)
        if self.hooks and torch.is_grad_enabled() and out.requires_grad:
            out.register_hook(self._hook)
        return out

    def _hook(self, grad):
        self.vjps += 1


def _solvers(cfg: dict) -> dict:
    have_tdq = importlib.util.find_spec("torchdiffeq") is not None
    out = {"fastnode adjoint": ("fastnode", True, False), "fastnode backprop": ("fastnode", False, False)}
    if cfg["compiled"]:
        out["fastnode adjoint, compiled field"] = ("fastnode", True, True)
        out["fastnode backprop, compiled field"] = ("fastnode", False, True)
    if have_tdq:
        out["torchdiffeq adjoint"] = ("torchdiffeq", True, False)
        out["torchdiffeq backprop"] = ("torchdiffeq", False, False)
    return out


def _solve(lib: str, adjoint: bool, field: CountingField, z0, t, rtol: float, method: str = "dopri5"):
    if lib == "fastnode":
        fn = odeint_adjoint if adjoint else odeint
        return fn(field, z0, t, rtol=rtol, atol=rtol, method=method)[-1]
    import torchdiffeq

    fn = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint
    kw = {"adjoint_params": tuple(field.parameters())} if adjoint else {}
    return fn(field, z0, t, rtol=rtol, atol=rtol, method=method, **kw)[-1]


def _grad(lib, adjoint, field, head, z0, y, t, rtol, method="dopri5") -> dict:
    """One forward + backward; returns the loss, the field's parameter gradient (flat), NFE-F, NFE-B."""
    field.zero_grad(set_to_none=True)
    field.calls = field.vjps = 0
    field.hooks = not adjoint
    zt = _solve(lib, adjoint, field, z0, t, rtol, method)
    nfe_f = field.calls
    backend = last_stats().backend if lib == "fastnode" and last_stats() is not None else None
    loss = F.cross_entropy(head(zt), y)
    loss.backward()
    nfe_b = (field.calls - nfe_f) if adjoint else field.vjps
    g = torch.cat([p.grad.reshape(-1) for p in field.func.parameters()])
    return {"loss": float(loss.detach()), "grad": g.detach(), "nfe_forward": nfe_f, "nfe_backward": nfe_b,
            "backend": backend}


def _grad_into(box: dict, *args) -> None:
    box.update(_grad(*args))


def _reference(net: ImageODENet, z0, y, t, cfg: dict) -> tuple[dict, str]:
    have_tdq = importlib.util.find_spec("torchdiffeq") is not None
    lib, method = ("torchdiffeq", "dopri5") if have_tdq else ("fastnode", "dopri8")
    field = CountingField(copy.deepcopy(net.block.func.func).double())
    head = copy.deepcopy(net.head).double()
    ref = _grad(lib, False, field, head, z0.double(), y, t.double(), cfg["ref_rtol"], method)
    return ref, f"{lib} {method} backprop, float64, rtol = atol = {cfg['ref_rtol']:g}"


def run(cfg: dict, info: DistInfo) -> dict:
    data = load_images(cfg["dataset"], data_dir=cfg.get("data_dir"), image_size=cfg["image_size"],
                       train_size=cfg["train_size"], test_size=cfg["test_size"], seed=cfg["seed"])
    check_feature_map(cfg["image_size"], data["x_train"].shape[-1])
    torch.manual_seed(cfg["seed"])
    net = ImageODENet(data["in_channels"], data["num_classes"], width=cfg["width"]).to(info.device)
    x = data["x_train"][: cfg["batch_size"]].to(info.device)
    y = data["y_train"][: cfg["batch_size"]].to(info.device)
    with torch.no_grad():
        z0 = net.stem(x)
    t = torch.tensor([0.0, 1.0], device=info.device)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    try:
        ref, ref_desc = _reference(net, z0, y, t, cfg)
        rows = _measure(cfg, net, z0, y, t, ref)
    finally:
        torch.set_num_threads(threads_before)
    results = {"config": {k: v for k, v in cfg.items() if k != "out"}, "data": data["source"],
               "image_side": int(data["x_train"].shape[-1]),
               "reference": ref_desc, "reference_nfe_forward": ref["nfe_forward"],
               "reference_nfe_backward": ref["nfe_backward"], "rows": rows,
               "torchdiffeq": importlib.util.find_spec("torchdiffeq") is not None}
    if info.is_main:
        _write(cfg, results)
    return results


def _measure(cfg: dict, net: ImageODENet, z0, y, t, ref: dict) -> list[dict]:
    fields = {}
    for name, (lib, adjoint, compiled) in _solvers(cfg).items():
        func = copy.deepcopy(net.block.func.func)
        fields[name] = (lib, adjoint, CountingField(torch.compile(func) if compiled else func))
    first, times, mems = {}, {n: [] for n in fields}, {}
    for rnd in range(cfg["timing_rounds"] + 1):  # round 0: warm-up, also the measured NFE and gradient
        for name, (lib, adjoint, field) in fields.items():
            box = {}
            run_once = functools.partial(_grad_into, box, lib, adjoint, field, net.head, z0, y, t, cfg["rtol"])
            cpu, _ = time_call(run_once)
            if rnd == 0:
                first[name] = box
                with SavedTensorMeter() as meter:
                    _grad(lib, adjoint, field, net.head, z0, y, t, cfg["rtol"])
                mems[name] = meter.peak_bytes / 2**20
            else:
                times[name].append(cpu)
    rows = []
    ref_g = ref["grad"].to(torch.float64)
    for name, (lib, adjoint, _) in fields.items():
        r = first[name]
        err = float((r["grad"].double() - ref_g).norm() / ref_g.norm())
        rows.append({"solver": name, "library": lib, "adjoint": adjoint, "backend": r["backend"],
                     "nfe_forward": r["nfe_forward"], "nfe_backward": r["nfe_backward"],
                     "nfe_ratio": r["nfe_backward"] / r["nfe_forward"], "grad_rel_error": err, "loss": r["loss"],
                     "cpu_s": spread(times[name]), "cpu_rounds_s": times[name], "saved_peak_mb": mems[name]})
    return rows


def _write(cfg: dict, results: dict) -> None:
    rows = [[r["solver"], r["backend"] or "", r["nfe_forward"], r["nfe_backward"], r["nfe_ratio"],
             r["grad_rel_error"], f"{r['cpu_s']['median']:.4g} ({r['cpu_s']['q1']:.4g}-{r['cpu_s']['q3']:.4g})",
             r["saved_peak_mb"]] for r in results["rows"]]
    c = cfg
    notes = [
        (f"Data: {results['data']}, one batch of {c['batch_size']} images at {results['image_side']}x"
         f"{results['image_side']}; "
         f"ODENet width {c['width']} at initialisation (seed {c['seed']}); every solver integrates the same field "
         f"from the same z0 with dopri5, rtol = atol = {c['rtol']} (the adjoint's backward solve too)."),
        (f"Gradient error: ||g - g_ref|| / ||g_ref|| over the vector field's parameters; reference: "
         f"{results['reference']} (NFE-F {results['reference_nfe_forward']}). Time: thread CPU seconds of forward "
         f"+ loss + backward, median (IQR) of {c['timing_rounds']} rounds after a warm-up round, solvers interleaved "
         f"in each round, torch.set_num_threads({c['threads']}). Memory: peak bytes of the tensors autograd holds, "
         "over forward and backward (an adjoint's backward builds and frees a small graph per evaluation)."),
    ]
    if not results["torchdiffeq"]:
        notes.append("torchdiffeq is not installed here (`make deps-bench` installs it): its rows are missing.")
    write_results(cfg["out"], NAME, results, [
        ("Same network, same batch", ["solver", "backend", "NFE-F", "NFE-B", "NFE-B/NFE-F", "gradient rel. error",
                                      "CPU s median (IQR)", "saved MB"], rows)], notes)
    fig, (a1, a2) = new_figure(2)
    for r in results["rows"]:
        a1.scatter(r["nfe_forward"] + r["nfe_backward"], r["grad_rel_error"], label=r["solver"])
        a2.bar(r["solver"].replace(" ", "\n", 1), r["cpu_s"]["median"])
    a1.set(yscale="log", xlabel="NFE-F + NFE-B", ylabel="gradient relative error", title="cost vs gradient error")
    a2.set(ylabel="CPU s (forward + backward)", title="time")
    a2.tick_params(axis="x", labelsize=6)
    a1.legend(fontsize=6)
    save_figure(fig, f"{cfg['out']}/{NAME}.png")
