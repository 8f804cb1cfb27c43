"""Study ``limits``: what a plain neural ODE cannot represent (Dupont et al.), and what fixes it.

1-D: ``g(-1) = 1, g(1) = -1``. The time-``T`` map ``phi`` of a 1-D ODE is an increasing homeomorphism of R
(trajectories cannot cross), so ``a = phi(-1) <= b = phi(1)``. The loss ``((a - 1)^2 + (b + 1)^2) / 2`` under
``a <= b`` is smallest on the boundary ``a = b = c``: ``((c - 1)^2 + (c + 1)^2) / 2 = 1 + c^2 >= 1``. So a plain
neural ODE whose output is its flow cannot get its mean squared error below 1 (both points are sent towards 0).
ANODE (one extra zero dimension, output = first coordinate) can rotate ``(x, 0)`` to ``(-x, 0)`` around the
origin, and a ResNet (discrete steps ``z + f(z)``) can jump over; both drive the loss to about 0.

2-D: a disc (label -1) inside an annulus (+1), read out by a linear layer. A flow of the plane keeps the disc
inside the annulus, so no linear readout separates them exactly; ANODE (one extra dimension) lifts the disc out.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._odeint import odeint
from ..models import ANODE, ResNetMLP
from .common import DistInfo
from .data import make_annulus
from .report import new_figure, save_figure, write_results

NAME = "limits"
DEFAULTS = {"iters_1d": 300, "iters_2d": 300, "hidden": 32, "n_blocks": 4, "n_train": 256, "n_test": 1024,
            "lr": 0.02, "rtol": 1e-3, "parts": ("1d", "2d")}
QUICK = {"iters_1d": 60, "iters_2d": 20, "hidden": 16, "n_blocks": 4, "n_train": 64, "n_test": 128,
         "lr": 0.05, "rtol": 1e-3, "parts": ("1d", "2d")}

RING_POINTS = 3600
BOUND_1D = 1.0  # the smallest mean squared error an increasing map can reach on g(-1)=1, g(1)=-1 (see above)


def _models(dim: int, cfg: dict, head: bool) -> dict[str, nn.Module]:
    kw = {"rtol": cfg["rtol"], "atol": cfg["rtol"]}
    h = cfg["hidden"]
    return {
        "ODE": ANODE(dim, 0, h, head=nn.Linear(dim, 1) if head else None, **kw),
        "ANODE (+1 dim)": ANODE(dim, 1, h, head=nn.Linear(dim + 1, 1) if head else None, **kw),
        f"ResNet ({cfg['n_blocks']} blocks)": ResNetMLP(dim, h, cfg["n_blocks"], head=nn.Linear(dim, 1) if head
                                                        else None),
    }


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, iters: int, lr: float) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(iters):
        opt.zero_grad(set_to_none=True)
        loss = torch.mean((model(x) - y) ** 2)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def fit_1d(cfg: dict, seed: int = 0) -> dict:
    """Train the three models on the two points of ``g``; returns per model the final loss, outputs and NFE.

    Example:
        >>> r = fit_1d({**QUICK, "iters_1d": 5})
        >>> sorted(r)
        ['ANODE (+1 dim)', 'ODE', 'ResNet (4 blocks)']
    """
    x = torch.tensor([[-1.0], [1.0]])
    y = torch.tensor([[1.0], [-1.0]])
    out = {}
    for name, model in _models(1, cfg, head=False).items():
        torch.manual_seed(seed)
        for p in model.parameters():  # re-initialise from the seed so every model starts alike
            if p.ndim > 1:
                nn.init.xavier_uniform_(p)
            else:
                nn.init.zeros_(p)
        losses = _fit(model, x, y, cfg["iters_1d"], cfg["lr"])
        with torch.no_grad():
            pred = model(x)
            final = float(torch.mean((pred - y) ** 2))
        nfe = model.block.nfe_forward if hasattr(model, "block") else None
        out[name] = {"loss": final, "g(-1)": float(pred[0]), "g(1)": float(pred[1]), "nfe_forward": nfe,
                     "losses": losses[:: max(1, len(losses) // 100)], "model": model}
    return out


def fit_2d(cfg: dict, seed: int = 0) -> dict:
    """Train the three classifiers on the disc-inside-annulus points; returns loss, test accuracy and NFE.

    Example:
        >>> r = fit_2d({**QUICK, "iters_2d": 2, "n_train": 16, "n_test": 16})
        >>> 0.0 <= r["ODE"]["test_accuracy"] <= 1.0
        True
    """
    x, y = make_annulus(cfg["n_train"], seed=seed)
    xt, yt = make_annulus(cfg["n_test"], seed=seed + 1)
    out = {}
    for name, model in _models(2, cfg, head=True).items():
        torch.manual_seed(seed)
        losses = _fit(model, x, y, cfg["iters_2d"], cfg["lr"])
        with torch.no_grad():
            loss = float(torch.mean((model(x) - y) ** 2))
            acc = float(((model(xt) > 0).float() * 2 - 1 == yt).float().mean())
            nfe = model.block.nfe_forward if hasattr(model, "block") else None
            # A flow of the plane keeps the image of the circle r = 1.25 winding around the image of the centre,
            # so if the centre is classified -1, some point of that circle must be too: circle accuracy < 1.
            ang = torch.arange(RING_POINTS) * (2 * math.pi / RING_POINTS)
            circle = 1.25 * torch.stack([ang.cos(), ang.sin()], dim=1)
            ring_acc = float((model(circle) > 0).float().mean())
            centre_ok = bool(model(torch.zeros(1, 2)) < 0)
        out[name] = {"loss": loss, "test_accuracy": acc, "nfe_forward": nfe, "circle_accuracy": ring_acc,
                     "centre_correct": centre_ok,
                     "losses": losses[:: max(1, len(losses) // 100)], "model": model, "data": (x, y)}
    return out


def _traj(model: nn.Module, x0: torch.Tensor, n: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Trajectories ``[T, B, D]`` of the hidden state and their 'times' (ODE time, or block index)."""
    with torch.no_grad():
        if isinstance(model, ANODE):
            z0 = torch.cat([x0, x0.new_zeros(len(x0), model.augment_dim)], dim=1)
            ts = torch.linspace(0.0, 1.0, n)
            return ts, odeint(model.block.func, z0, ts, rtol=1e-6, atol=1e-6)
        zs = model.trajectory(x0)
        return torch.linspace(0.0, 1.0, len(zs)), zs


def run(cfg: dict, info: DistInfo) -> dict:
    results = {"config": {k: v for k, v in cfg.items() if k != "out"}, "bound_1d": BOUND_1D,
               "data": "generated: the two points of g (1-D); disc r <= 0.5 (-1) inside annulus 1 <= r <= 1.5 (+1)"}
    tables, notes = [], []
    r1 = r2 = None
    if "1d" in cfg["parts"]:
        r1 = fit_1d(cfg, cfg["seed"])
        results["1d"] = {k: {kk: vv for kk, vv in v.items() if kk != "model"} for k, v in r1.items()}
        tables.append(("1-D map g(-1) = 1, g(1) = -1", ["model", "final MSE", "g(-1)", "g(1)", "NFE-F",
                                                        "MSE >= bound 1?"],
                       [[k, v["loss"], v["g(-1)"], v["g(1)"], v["nfe_forward"], v["loss"] >= BOUND_1D - 1e-3]
                        for k, v in r1.items()]))
        notes.append("The plain ODE's mean squared error cannot go below 1: its flow is increasing, so the best it "
                     "can do is send both points to one value c, with error 1 + c^2.")
    if "2d" in cfg["parts"]:
        r2 = fit_2d(cfg, cfg["seed"])
        results["2d"] = {k: {kk: vv for kk, vv in v.items() if kk not in ("model", "data")} for k, v in r2.items()}
        tables.append(("Disc inside annulus (2-D), linear readout", ["model", "train MSE", "test accuracy",
                                                                      "centre correct", "circle r=1.25 accuracy",
                                                                      "NFE-F"],
                       [[k, v["loss"], v["test_accuracy"], v["centre_correct"], v["circle_accuracy"],
                         v["nfe_forward"]] for k, v in r2.items()]))
        notes.append(f"Circle accuracy: share of {RING_POINTS} evenly spaced points of the circle r = 1.25 (inside "
                     "the annulus) classified +1. For a plain ODE with the centre classified -1 it must be below 1 "
                     "(the flow keeps the circle winding around the centre, and a line cannot separate a point "
                     "from a closed curve around it); on random test points the plain ODE can still score high by "
                     "squeezing the annulus into a thin bridge across the decision line.")
    if info.is_main:
        write_results(cfg["out"], NAME, results, tables, notes)
        _plots(cfg["out"], r1, r2)
    return results


def _plots(out: str, r1: dict | None, r2: dict | None) -> None:
    if r1 is not None:
        fig, axes = new_figure(3)
        x0 = torch.linspace(-1.0, 1.0, 9).unsqueeze(1)
        for ax, (name, r) in zip(axes, r1.items()):
            ts, zs = _traj(r["model"], x0)
            for j in range(x0.shape[0]):
                color = "tab:red" if float(x0[j]) < 0 else ("tab:blue" if float(x0[j]) > 0 else "gray")
                ax.plot(ts.numpy(), zs[:, j, 0].numpy(), color=color, lw=2 if abs(float(x0[j])) == 1 else 0.7,
                        ls="-" if isinstance(r["model"], ANODE) else "--", marker=None if isinstance(
                            r["model"], ANODE) else "o", ms=3)
            ax.set(title=f"{name}: MSE {r['loss']:.3g}", xlabel="depth (time / block)", ylabel="h")
        save_figure(fig, f"{out}/limits_1d_trajectories.png")
    if r2 is not None:
        fig, axes = new_figure(3)
        g = torch.linspace(-2.0, 2.0, 81)
        gx, gy = torch.meshgrid(g, g, indexing="xy")
        grid = torch.stack([gx.flatten(), gy.flatten()], dim=1)
        for ax, (name, r) in zip(axes, r2.items()):
            with torch.no_grad():
                pred = r["model"](grid).reshape(gx.shape)
            ax.contourf(gx.numpy(), gy.numpy(), pred.numpy(), levels=[-10, 0, 10], colors=["#f4b6b6", "#b6cdf4"])
            ax.contour(gx.numpy(), gy.numpy(), pred.numpy(), levels=[0], colors="k", linewidths=0.8)
            x, y = r["data"]
            sel = torch.arange(0, len(y), max(1, len(y) // 200))
            ax.scatter(x[sel, 0], x[sel, 1], c=["tab:red" if v < 0 else "tab:blue" for v in y[sel, 0]], s=4)
            ax.set(title=f"{name}: acc {r['test_accuracy']:.3f}", aspect="equal")
        save_figure(fig, f"{out}/limits_2d_regions.png")
