"""Study ``memory-vs-depth``: training memory of a ResNet with L residual blocks against the ODENet with L solver
steps, gradients by backpropagation through the solver or by the adjoint.

The ODENet uses the fixed-grid Euler method with step ``1/L`` on ``[0, 1]``: L evaluations of the ODE function,
the continuous counterpart of L residual blocks (a residual block is one Euler step). Memory is measured for one
training step (forward + backward) on a batch of random images (memory does not depend on pixel values).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..models import ImageODENet, ImageResNet, count_parameters
from .common import DistInfo, SavedTensorMeter
from .report import new_figure, save_figure, write_results

NAME = "memory-vs-depth"
DEFAULTS = {"depths": (1, 2, 4, 8, 16, 32, 64), "batch_size": 32, "image_size": 28, "width": 64, "in_channels": 1}
QUICK = {"depths": (1, 2, 4), "batch_size": 4, "image_size": 14, "width": 8, "in_channels": 1}

MODELS = ("ResNet (L blocks)", "ODENet backprop (L Euler steps)", "ODENet adjoint (L Euler steps)")


def _build(kind: str, depth: int, cfg: dict):
    c, w = cfg["in_channels"], cfg["width"]
    if kind == MODELS[0]:
        return ImageResNet(c, 10, n_blocks=depth, width=w)
    opts = {"step_size": 1.0 / depth}
    return ImageODENet(c, 10, width=w, method="euler", options=opts, adjoint=kind == MODELS[2])


def measure(kind: str, depth: int, cfg: dict, device: torch.device) -> dict:
    """Peak autograd-saved bytes (and CUDA peak) of one training step of model ``kind`` at ``depth``.

    Example:
        >>> r = measure(MODELS[2], 2, QUICK, torch.device("cpu"))
        >>> r["saved_peak_mb"] > 0
        True
    """
    torch.manual_seed(0)
    model = _build(kind, depth, cfg).to(device)
    s = cfg["image_size"]
    x = torch.randn(cfg["batch_size"], cfg["in_channels"], s, s, device=device)
    y = torch.randint(0, 10, (cfg["batch_size"],), device=device)
    F.cross_entropy(model(x), y).backward()  # warm-up
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    with SavedTensorMeter() as meter:
        loss = F.cross_entropy(model(x), y)
        after_forward = meter.live_bytes
        loss.backward()
    elapsed = time.perf_counter() - t0
    res = {"model": kind, "depth": depth, "parameters": count_parameters(model),
           "saved_after_forward_mb": after_forward / 2**20, "saved_peak_mb": meter.peak_bytes / 2**20,
           "step_time_s": elapsed, "cuda_peak_mb": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        res["cuda_peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if kind != MODELS[0]:
        res["nfe_forward"] = model.block.nfe_forward
        res["nfe_backward"] = model.block.nfe_backward
    return res


def run(cfg: dict, info: DistInfo) -> dict:
    rows_raw = [measure(kind, d, cfg, info.device) for d in cfg["depths"] for kind in MODELS]
    results = {"config": {k: v for k, v in cfg.items() if k != "out"}, "rows": rows_raw,
               "data": "random images (memory does not depend on pixel values)"}
    if info.is_main:
        rows = [[r["model"], r["depth"], r["parameters"], r["saved_after_forward_mb"], r["saved_peak_mb"],
                 r["cuda_peak_mb"], r["step_time_s"]] for r in rows_raw]
        c = cfg
        notes = [
            (f"Batch {c['batch_size']} of {c['in_channels']}x{c['image_size']}x{c['image_size']} random images, width "
            f"{c['width']}, one training step (forward + backward) after a warm-up step."),
            ("Memory: bytes of tensors autograd holds for backward, counted by saved-tensor hooks (each storage once, "
            "released when autograd frees it): 'after forward' is what the graph keeps between forward and "
            "backward, 'peak' the most alive at once over forward and backward (the adjoint's backward builds one "
            "small graph per step and frees it). Parameters saved by layers count too, so even the adjoint's "
            "figure includes the stem's and head's activations and weights. On CUDA also "
            "`torch.cuda.max_memory_allocated`."),
        ]
        write_results(cfg["out"], NAME, results, [
            ("Memory of one training step", ["model", "L", "parameters", "saved after forward MB", "saved peak MB",
                                             "CUDA peak MB", "step s"], rows)], notes)
        fig, (ax,) = new_figure(1, size=(5.0, 3.6))
        for kind in MODELS:
            sel = [r for r in rows_raw if r["model"] == kind]
            ax.plot([r["depth"] for r in sel], [r["saved_peak_mb"] for r in sel], marker="o", label=kind)
        ax.set(xscale="log", yscale="log", xlabel="L (blocks or steps)", ylabel="peak saved MB",
               title="training memory vs depth")
        ax.legend(fontsize=7)
        save_figure(fig, f"{cfg['out']}/memory-vs-depth.png")
    return results
