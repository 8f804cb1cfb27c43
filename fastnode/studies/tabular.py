"""Study ``tabular``: the ODENets paper's tabular model (2-layer encoder, ODE block, linear head).

Classification on breast cancer (the paper: 94% accuracy) and a regression task (California housing from a local
``housing.csv`` when ``--data-dir`` holds one, the paper's MSE 0.009; otherwise scikit-learn's diabetes set),
each against a linear baseline (logistic / ridge regression, as the paper's comparison table).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ..models import TabularODENet, count_parameters
from .common import DistInfo, evaluate, train_epoch
from .data import load_breast_cancer, load_regression
from .report import new_figure, save_figure, write_results

NAME = "tabular"
DEFAULTS = {"epochs": 25, "batch_size": 32, "width": 32, "hidden": 64, "lr": 3e-3, "rtol": 1e-3, "adjoint": True,
            "dataset": None}
# dataset None: California when data_dir holds housing.csv, else diabetes (in the quick mode too).
QUICK = {"epochs": 3, "batch_size": 64, "width": 8, "hidden": 16, "lr": 1e-2, "rtol": 1e-2, "adjoint": True,
         "dataset": None}


def _bce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out.squeeze(-1), y)


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.squeeze(-1), y)


def _train(task: str, data: dict, cfg: dict, info: DistInfo) -> dict:
    torch.manual_seed(cfg["seed"])
    model = TabularODENet(data["x_train"].shape[1], 1, width=cfg["width"], hidden=cfg["hidden"], rtol=cfg["rtol"],
                          atol=cfg["rtol"], adjoint=cfg["adjoint"]).to(info.device)
    net = DDP(model) if info.world > 1 else model
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    loss_fn = _bce if task == "classification" else _mse
    metric = "accuracy" if task == "classification" else "mse"
    history = []
    t0 = time.perf_counter()
    for ep in range(cfg["epochs"]):
        r = train_epoch(net, data["x_train"], data["y_train"], opt, loss_fn, batch_size=cfg["batch_size"], epoch=ep,
                        seed=cfg["seed"], info=info, show_progress=False)
        ev = evaluate(model, data["x_test"], data["y_test"], metric=metric) if info.is_main else {}
        history.append({"epoch": ep + 1, "train_loss": r["loss"], metric: ev.get(metric),
                        "nfe_forward": r["nfe_forward"], "nfe_backward": r["nfe_backward"]})
    train_time = time.perf_counter() - t0
    return {"model": model, "history": history, "parameters": count_parameters(model), "train_time_s": train_time,
            "metric": metric}


def run(cfg: dict, info: DistInfo) -> dict:
    from sklearn.linear_model import LogisticRegression, Ridge

    results = {"config": {k: v for k, v in cfg.items() if k != "out"}}
    bc = load_breast_cancer(seed=cfg["seed"])
    reg_name = cfg["dataset"] or ("california" if cfg.get("data_dir") else "diabetes")
    reg = load_regression(reg_name, data_dir=cfg.get("data_dir"), seed=cfg["seed"])
    rows, curves = [], {}
    for task, data, label in (("classification", bc, "breast cancer"), ("regression", reg, reg_name)):
        r = _train(task, data, cfg, info)
        if not info.is_main:
            continue
        last = r["history"][-1]
        xtr, ytr, xte, yte = (data[k].numpy() for k in ("x_train", "y_train", "x_test", "y_test"))
        if task == "classification":
            base = LogisticRegression(max_iter=2000).fit(xtr, ytr)
            base_val = float((base.predict(xte) == yte).mean())
            base_name = "logistic regression"
        else:
            base = Ridge(alpha=1.0).fit(xtr, ytr)
            base_val = float(((base.predict(xte) - yte) ** 2).mean())
            base_name = "ridge regression"
        scale2 = data.get("y_scale", (0.0, 1.0))[1] ** 2
        entry = {"data": data["source"], "n_train": len(ytr), "n_test": len(yte), "parameters": r["parameters"],
                 "metric": r["metric"], "odenet": last[r["metric"]], "baseline_name": base_name,
                 "baseline": base_val, "nfe_forward": last["nfe_forward"], "nfe_backward": last["nfe_backward"],
                 "train_time_s": r["train_time_s"], "history": r["history"]}
        if task == "regression":
            entry["y_std"] = data["y_scale"][1]
            entry["odenet_mse_raw_units"] = last["mse"] * scale2
            entry["baseline_mse_raw_units"] = base_val * scale2
        results[label] = entry
        curves[label] = r["history"]
        unit = " (standardised target)" if task == "regression" else ""
        rows.append([label, data["source"].split(" (")[0], r["metric"] + unit, last[r["metric"]], base_name, base_val,
                     r["parameters"], last["nfe_forward"], last["nfe_backward"], r["train_time_s"]])
    if info.is_main:
        c = cfg
        notes = [(f"ODENet: encoder Linear-ReLU-Linear to width {c['width']}, ODE block (MLP {c['hidden']} hidden, "
                 f"tanh, time as input; dopri5 rtol = atol = {c['rtol']}, "
                 f"{'adjoint' if c['adjoint'] else 'backprop'}), linear head; Adam lr {c['lr']}, {c['epochs']} "
                 f"epochs, batch {c['batch_size']}; 80/20 split (seed {c['seed']}), features standardised with "
                 "training statistics; regression target standardised (MSE in units of its variance).")]
        for label, e in results.items():
            if isinstance(e, dict) and "odenet_mse_raw_units" in e:
                notes.append(f"{label}: test MSE in the target's own units: ODENet {e['odenet_mse_raw_units']:.4g}, "
                             f"ridge {e['baseline_mse_raw_units']:.4g} (target std {e['y_std']:.4g}).")
        write_results(cfg["out"], NAME, results, [
            ("Test results", ["task", "data", "metric", "ODENet", "baseline", "baseline value", "parameters",
                              "NFE-F", "NFE-B", "train s"], rows)], notes)
        fig, axes = new_figure(len(curves))
        for ax, (label, hist) in zip(axes, curves.items()):
            key = "accuracy" if "accuracy" in hist[0] else "mse"
            ax.plot([h["epoch"] for h in hist], [h[key] for h in hist], marker=".")
            ax.set(title=label, xlabel="epoch", ylabel=f"test {key}")
        save_figure(fig, f"{cfg['out']}/tabular.png")
    return results
