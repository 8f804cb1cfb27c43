"""Study ``resnet-vs-odenet``: the thesis's image ODENet (adjoint) against its 6-block ResNet.

Measures parameters, test accuracy per epoch, train and inference throughput (median over batches / repeated runs
after warm-up), peak autograd-saved memory of one training step, and the ODE block's NFE-F and NFE-B per epoch.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ..models import ImageODENet, ImageResNet, count_parameters
from .common import DistInfo, SavedTensorMeter, evaluate, train_epoch
from .data import load_images
from .report import new_figure, save_figure, write_results

NAME = "resnet-vs-odenet"
DEFAULTS = {"dataset": "mnist-subset", "image_size": 14, "train_size": 4000, "test_size": 1000, "epochs": 8,
            "batch_size": 64, "width": 64, "rtol": 1e-3, "lr": 0.05, "timing_rounds": 9}
QUICK = {"dataset": "digits", "image_size": None, "train_size": 128, "test_size": 64, "epochs": 2, "batch_size": 32,
         "width": 8, "rtol": 1e-2, "lr": 0.05, "timing_rounds": 3}


def _peak_step_memory(model, xb, yb, dev) -> dict:
    model.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    with SavedTensorMeter() as meter:
        F.cross_entropy(model(xb), yb).backward()
    res = {"saved_peak_mb": meter.peak_bytes / 2**20, "cuda_peak_mb": None}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        res["cuda_peak_mb"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    model.zero_grad(set_to_none=True)
    return res


def _throughput_and_memory(cfg: dict, data: dict, trained: dict, results: dict, dev) -> None:
    """Timed after training, the models interleaved round by round (a busy spell of the machine then hits both
    alike); median over rounds. Train: forward + backward of one batch; inference: forward under no_grad."""
    xb = data["x_test"][: cfg["batch_size"]].to(dev)
    yb = data["y_test"][: cfg["batch_size"]].to(dev)
    train_t = {n: [] for n in trained}
    infer_t = {n: [] for n in trained}
    for rnd in range(cfg["timing_rounds"] + 1):  # round 0 is the warm-up
        for name, model in trained.items():
            model.train()
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            F.cross_entropy(model(xb), yb).backward()
            _sync(dev)
            t1 = time.perf_counter()
            model.eval()
            with torch.no_grad():
                model(xb)
            _sync(dev)
            t2 = time.perf_counter()
            if rnd:
                train_t[name].append(t1 - t0)
                infer_t[name].append(t2 - t1)
    for name, model in trained.items():
        model.train()
        entry = results["models"][name]
        entry["train_samples_per_s"] = len(xb) / statistics.median(train_t[name])
        entry["inference_samples_per_s"] = len(xb) / statistics.median(infer_t[name])
        entry.update(_peak_step_memory(model, xb, yb, dev))


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run(cfg: dict, info: DistInfo) -> dict:
    data = load_images(cfg["dataset"], data_dir=cfg.get("data_dir"), image_size=cfg["image_size"],
                       train_size=cfg["train_size"], test_size=cfg["test_size"], seed=cfg["seed"])
    dev = info.device
    builders = {
        "ResNet-6": lambda: ImageResNet(data["in_channels"], data["num_classes"], n_blocks=6, width=cfg["width"]),
        "ODENet (adjoint)": lambda: ImageODENet(data["in_channels"], data["num_classes"], width=cfg["width"],
                                                adjoint=True, rtol=cfg["rtol"], atol=cfg["rtol"]),
    }
    results = {"config": {k: v for k, v in cfg.items() if k != "out"}, "data": data["source"],
               "world_size": info.world, "models": {}}
    trained = {}
    for name, build in builders.items():
        torch.manual_seed(cfg["seed"])
        model = build().to(dev)
        net = DDP(model) if info.world > 1 else model
        opt = torch.optim.SGD(net.parameters(), lr=cfg["lr"], momentum=0.9)
        epochs = []
        step_rates = []
        for ep in range(cfg["epochs"]):
            r = train_epoch(net, data["x_train"], data["y_train"], opt, F.cross_entropy, batch_size=cfg["batch_size"],
                            epoch=ep, seed=cfg["seed"], info=info, show_progress=cfg["progress"] and info.is_main,
                            desc=f"{name} epoch {ep + 1}")
            # Throughput: per-batch rates, the very first batch (warm-up) left out; global samples per second.
            rates = [s * info.world / t for s, t in zip(r["samples"], r["batch_times"])]
            step_rates += rates[1:] if ep == 0 else rates
            ev = evaluate(model, data["x_test"], data["y_test"], batch_size=256) if info.is_main else {}
            ratio = (r["nfe_backward"] / r["nfe_forward"]) if r["nfe_backward"] and r["nfe_forward"] else None
            epochs.append({"epoch": ep + 1, "train_loss": r["loss"], "test_accuracy": ev.get("accuracy"),
                           "nfe_forward": r["nfe_forward"], "nfe_backward": r["nfe_backward"],
                           "nfe_ratio": ratio, "epoch_time_s": sum(r["batch_times"])})
        entry = {"parameters": count_parameters(model), "epochs": epochs}
        step_rates.sort()
        entry["train_samples_per_s_in_training"] = step_rates[len(step_rates) // 2] if step_rates else None
        results["models"][name] = entry
        trained[name] = model
    if info.is_main:
        _throughput_and_memory(cfg, data, trained, results, dev)
    if info.is_main:
        _write(cfg, results)
    return results


def _write(cfg: dict, results: dict) -> None:
    out = cfg["out"]
    summary, per_epoch = [], []
    for name, e in results["models"].items():
        last = e["epochs"][-1]
        summary.append([name, e["parameters"], last["test_accuracy"], e["train_samples_per_s"],
                        e["train_samples_per_s_in_training"], e["inference_samples_per_s"], e["saved_peak_mb"], e["cuda_peak_mb"], last["nfe_forward"],
                        last["nfe_backward"], last["nfe_ratio"]])
        for ep in e["epochs"]:
            per_epoch.append([name, ep["epoch"], ep["train_loss"], ep["test_accuracy"], ep["nfe_forward"],
                              ep["nfe_backward"], ep["nfe_ratio"], ep["epoch_time_s"]])
    c = results["config"]
    size = "" if c["image_size"] is None else f" resized to {c['image_size']}x{c['image_size']}"
    notes = [
        (f"Data: {results['data']}; {c['train_size']} training / {c['test_size']} test images{size}"
        f", {c['epochs']} epochs, batch {c['batch_size']}, SGD lr {c['lr']} momentum 0.9, width {c['width']}, "
        f"ODENet dopri5 rtol = atol = {c['rtol']}, gradients by the adjoint; {results['world_size']} process(es)."),
        ("Train throughput: median over batches of samples / (forward + backward + step time), first batch left out "
        "(warm-up). Inference: median of 5 timed forward passes of one batch after one warm-up pass."),
        ("Memory: peak bytes of tensors autograd holds for backward (distinct storages, forward and backward of one "
        "training step, measured with saved-tensor hooks; parameters saved by layers are included). On CUDA "
        "also `torch.cuda.max_memory_allocated` over the step."),
        ("NFE-F: function evaluations of the forward solve per batch (epoch mean); NFE-B: those of the adjoint's "
        "backward solve (`last_stats().nfe_backward`)."),
    ]
    write_results(out, NAME, results, [
        ("Summary (last epoch)", ["model", "parameters", "test acc", "train samples/s",
                                  "train samples/s in training", "infer samples/s",
                                  "saved MB", "CUDA peak MB", "NFE-F", "NFE-B", "NFE-B/NFE-F"], summary),
        ("Per epoch", ["model", "epoch", "train loss", "test acc", "NFE-F", "NFE-B", "NFE-B/NFE-F", "time s"],
         per_epoch),
    ], notes)
    fig, (a1, a2) = new_figure(2)
    for name, e in results["models"].items():
        xs = [ep["epoch"] for ep in e["epochs"]]
        a1.plot(xs, [ep["test_accuracy"] for ep in e["epochs"]], marker="o", label=name)
        if e["epochs"][0]["nfe_forward"] is not None:
            a2.plot(xs, [ep["nfe_forward"] for ep in e["epochs"]], marker="o", label="NFE-F")
            a2.plot(xs, [ep["nfe_backward"] for ep in e["epochs"]], marker="s", label="NFE-B")
    a1.set(xlabel="epoch", ylabel="test accuracy", title="accuracy")
    a2.set(xlabel="epoch", ylabel="function evaluations / batch", title="ODENet NFE")
    a1.legend()
    a2.legend()
    save_figure(fig, f"{out}/{NAME}.png")
