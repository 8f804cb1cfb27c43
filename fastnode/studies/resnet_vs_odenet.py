"""Study ``resnet-vs-odenet``: the thesis's image ODENet (adjoint) against its 6-block ResNet.

For every seed of ``seeds`` both models are trained from that seed's initialisation and batch order (the data
split is the same for all seeds): test accuracy on the whole test set after every epoch, the ODE block's NFE-F and
NFE-B of every training batch (raw, in the JSON) and per epoch. Accuracy and NFE are reported as mean and spread
over the seeds.

Throughput has one definition per column, measured after training on the first seed's trained models, for every
batch size of ``sweep_batch_sizes``: a *training step* is ``zero_grad``, forward, cross-entropy loss, backward and
the optimiser's step (on a copy of the model and optimiser, so the trained models stay as they are); *inference*
is a forward pass under ``no_grad``. Rounds interleave the models (round ``r`` times ResNet then ODENet, both at
the same batch size), so a busy spell of a shared machine hits both alike; round 0 is a warm-up. Each round is
timed by this thread's CPU time (``time.thread_time``, with ``torch.set_num_threads(threads)``) and by wall time;
the tables give the median and interquartile range of samples per second over the rounds, the JSON every round.
Memory: peak bytes of the tensors autograd holds for backward in one training step, per batch size.
"""

from __future__ import annotations

import copy
import csv
import functools
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ..models import ImageODENet, ImageResNet, count_parameters
from .common import DistInfo, SavedTensorMeter, check_feature_map, evaluate, spread, time_call, train_epoch
from .data import load_images
from .report import _json_default, environment, new_figure, save_figure, write_results

NAME = "resnet-vs-odenet"
MODEL_NAMES = ("ResNet-6", "ODENet (adjoint)")
DEFAULTS = {"dataset": "mnist-subset", "image_size": 28, "train_size": 4000, "test_size": 1000, "epochs": 4,
            "batch_size": 64, "width": 64, "rtol": 1e-3, "lr": 0.05, "seeds": (0, 1, 2), "timing_rounds": 7,
            "sweep_batch_sizes": (8, 32, 128, 512), "threads": 1}
# Small but not degenerate: digits resized to 16x16 leave a 3x3 map for the ODE block (8x8 would leave 1x1,
# where the GroupNorm sees one value per group and every input gets the same logits).
QUICK = {"dataset": "digits", "image_size": 16, "train_size": 1024, "test_size": 359, "epochs": 3, "batch_size": 16,
         "width": 16, "rtol": 1e-2, "lr": 0.1, "seeds": (0, 1, 2), "timing_rounds": 3, "sweep_batch_sizes": (8, 32),
         "threads": 1}


def check_config(cfg: dict, native_size: int) -> None:
    """Refuse configurations that train a degenerate network (feature map below 3x3) or cannot run.

    Args:
        cfg: the study's configuration.
        native_size: the data set's image side when ``image_size`` is ``None``.

    Raises:
        ValueError: naming the setting.

    Example:
        >>> check_config({"image_size": None, "seeds": (0,), "sweep_batch_sizes": (8,), "timing_rounds": 1,
        ...               "threads": 1}, 8)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: image_size None (8x8 images) leaves a 1x1 feature map for the ODE block...
    """
    check_feature_map(cfg["image_size"], native_size)
    for key in ("seeds", "sweep_batch_sizes"):
        vals = cfg[key]
        if not isinstance(vals, (tuple, list)) or not all(isinstance(v, int) for v in vals):
            raise ValueError(f"{key} must be a list of ints, got {vals!r}")
    if not cfg["seeds"]:
        raise ValueError("seeds must not be empty")
    if any(b < 1 for b in cfg["sweep_batch_sizes"]):
        raise ValueError(f"sweep_batch_sizes must be positive, got {cfg['sweep_batch_sizes']!r}")
    for key in ("timing_rounds", "threads"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"{key} must be an int >= 1, got {cfg[key]!r}")


def _builders(cfg: dict, data: dict) -> dict:
    c, k, w = data["in_channels"], data["num_classes"], cfg["width"]
    return {
        MODEL_NAMES[0]: lambda: ImageResNet(c, k, n_blocks=6, width=w),
        MODEL_NAMES[1]: lambda: ImageODENet(c, k, width=w, adjoint=True, rtol=cfg["rtol"], atol=cfg["rtol"]),
    }


def _training_backends(model) -> dict | None:
    """The step backends of the ODE block's latest training solves (forward and, with the adjoint, backward)."""
    st = getattr(getattr(model, "block", None), "_stats", None)
    if st is None:
        return None
    back = st.backward.backend if st.backward is not None else None
    return {"forward": st.backend or None, "backward": back or None}


def _train_seed(builders: dict, seed: int, cfg: dict, data: dict, info: DistInfo, on_epoch=None):
    """Train every model of ``builders`` from ``seed``, epoch by epoch in turn (model A's epoch 1, model B's
    epoch 1, model A's epoch 2, ...), so that a long run stopped early has the same number of epochs of each.

    Each model is built right after ``torch.manual_seed(seed)`` and its batch order comes from its own generator
    (``batches``), so the order of the turns changes nothing in the results.

    Returns:
        ``({name: trained model}, {name: {"seed": seed, "epochs": [...]}})``.
    """
    models, opts, runs = {}, {}, {}
    for name, build in builders.items():
        torch.manual_seed(seed)
        models[name] = build().to(info.device)
        net = DDP(models[name]) if info.world > 1 else models[name]
        opts[name] = (net, torch.optim.SGD(net.parameters(), lr=cfg["lr"], momentum=0.9))
        runs[name] = {"seed": seed, "epochs": []}
    for ep in range(cfg["epochs"]):
        for name, model in models.items():
            runs[name]["epochs"].append(_epoch(name, model, *opts[name], ep, seed, cfg, data, info))
            if on_epoch is not None and info.is_main:
                on_epoch(runs)
    return models, runs


def _epoch(name: str, model, net, opt, ep: int, seed: int, cfg: dict, data: dict, info: DistInfo) -> dict:
    r = train_epoch(net, data["x_train"], data["y_train"], opt, F.cross_entropy, batch_size=cfg["batch_size"],
                    epoch=ep, seed=seed, info=info, show_progress=cfg["progress"] and info.is_main,
                    desc=f"{name} seed {seed} epoch {ep + 1}")
    backends = _training_backends(model)  # before evaluate() replaces the block's statistics
    ev = evaluate(model, data["x_test"], data["y_test"], batch_size=256) if info.is_main else {}
    nf, nb = r["nfe_forward"], r["nfe_backward"]
    if info.is_main:
        print(f"[{NAME}] {name} seed {seed} epoch {ep + 1}: loss {r['loss']:.4f} test acc {ev['accuracy']:.4f} "
              f"NFE-F {nf} NFE-B {nb} ({sum(r['batch_cpu_times']):.0f} CPU s)", flush=True)
    return {"epoch": ep + 1, "train_loss": r["loss"], "test_accuracy": ev.get("accuracy"),
            "test_nfe_forward": ev.get("nfe"), "nfe_forward": nf, "nfe_backward": nb,
            "nfe_ratio": nb / nf if nf and nb else None, "epoch_time_s": sum(r["batch_times"]),
            "epoch_cpu_s": sum(r["batch_cpu_times"]), "nfe_forward_batches": r["nfe_forward_batches"],
            "nfe_backward_batches": r["nfe_backward_batches"], "batch_losses": r["batch_losses"],
            "backend": backends}


def _seed_summary(runs: list[dict]) -> dict:
    last = [r["epochs"][-1] for r in runs]
    out = {"test_accuracy": spread([e["test_accuracy"] for e in last]),
           "test_error_pct": spread([100 * (1 - e["test_accuracy"]) for e in last])}
    if last[0]["nfe_forward"] is not None:
        out["nfe_forward"] = spread([e["nfe_forward"] for e in last])
        if all(e["nfe_backward"] is not None for e in last):
            out["nfe_backward"] = spread([e["nfe_backward"] for e in last])
    return out


def _sweep(cfg: dict, data: dict, trained: dict, dev) -> list[dict]:
    """Throughput and memory per batch size, the models interleaved round by round (see the module docstring)."""
    rows = []
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    try:
        for bs in cfg["sweep_batch_sizes"]:
            idx = torch.arange(bs) % len(data["y_train"])
            xb, yb = data["x_train"][idx].to(dev), data["y_train"][idx].to(dev)
            copies = {}
            for name, model in trained.items():
                m = copy.deepcopy(model).train()
                copies[name] = (m, torch.optim.SGD(m.parameters(), lr=cfg["lr"], momentum=0.9))
            raw = {n: {"train_cpu": [], "train_wall": [], "infer_cpu": [], "infer_wall": [], "nfe_f": [],
                       "nfe_b": []} for n in copies}
            for rnd in range(cfg["timing_rounds"] + 1):  # round 0: warm-up
                for name, (m, opt) in copies.items():
                    tc, tw = time_call(functools.partial(_train_step, m, opt, xb, yb), dev)
                    blk = getattr(m, "block", None)
                    nfe = (blk.nfe_forward, blk.nfe_backward) if blk is not None else (None, None)
                    ic, iw = time_call(functools.partial(_infer, m, xb), dev)
                    if rnd:
                        r = raw[name]
                        for k, v in (("train_cpu", tc), ("train_wall", tw), ("infer_cpu", ic), ("infer_wall", iw),
                                     ("nfe_f", nfe[0]), ("nfe_b", nfe[1])):
                            r[k].append(v)
            for name, (m, _) in copies.items():
                rows.append(_sweep_row(name, bs, raw[name], m, xb, yb))
    finally:
        torch.set_num_threads(threads_before)
    return rows


def _train_step(model, opt, xb, yb) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(xb), yb).backward()
    opt.step()


@torch.no_grad()
def _infer(model, xb) -> None:
    model.eval()
    model(xb)
    model.train()


def _sweep_row(name: str, bs: int, raw: dict, model, xb, yb) -> dict:
    rate = lambda ts: spread([bs / t for t in ts if t > 0])
    model.zero_grad(set_to_none=True)
    with SavedTensorMeter() as meter:
        F.cross_entropy(model(xb), yb).backward()
    model.zero_grad(set_to_none=True)
    nf = [v for v in raw["nfe_f"] if v is not None]
    nb = [v for v in raw["nfe_b"] if v is not None]
    return {"model": name, "batch_size": bs, "train_cpu": rate(raw["train_cpu"]),
            "train_wall": rate(raw["train_wall"]), "infer_cpu": rate(raw["infer_cpu"]),
            "infer_wall": rate(raw["infer_wall"]), "saved_peak_mb": meter.peak_bytes / 2**20,
            "nfe_forward": sum(nf) / len(nf) if nf else None, "nfe_backward": sum(nb) / len(nb) if nb else None,
            "rounds_s": raw}


def _commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10,
                             check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return (out.stdout.strip() + ("+dirty" if dirty else "")) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _backend(model, x) -> str | None:
    """The step backend that ran the ODE block's latest solve (``fastnode.last_stats().backend``)."""
    from .. import last_stats

    with torch.no_grad():
        model.eval()
        model(x)
        model.train()
    return last_stats().backend or None


def run(cfg: dict, info: DistInfo) -> dict:
    threads_before = torch.get_num_threads()
    # The whole study runs on cfg["threads"] threads: training is then the same computation on every machine (the
    # reductions' order depends on the thread count), and the timings' thread CPU time covers all of the work.
    torch.set_num_threads(cfg["threads"])
    try:
        return _run(cfg, info)
    finally:
        torch.set_num_threads(threads_before)


def _run(cfg: dict, info: DistInfo) -> dict:
    data = load_images(cfg["dataset"], data_dir=cfg.get("data_dir"), image_size=cfg["image_size"],
                       train_size=cfg["train_size"], test_size=cfg["test_size"], seed=cfg["seed"])
    check_config(cfg, data["x_train"].shape[-1])
    results = {"config": {k: v for k, v in cfg.items() if k != "out"}, "data": data["source"],
               "n_train": len(data["y_train"]), "n_test": len(data["y_test"]), "world_size": info.world,
               "commit": _commit(), "backend": None, "models": {}, "sweep": []}
    builders = _builders(cfg, data)
    runs = {n: [] for n in builders}
    for i, seed in enumerate(cfg["seeds"]):
        trained, seed_runs = _train_seed(builders, seed, cfg, data, info,
                                         on_epoch=functools.partial(_save_partial, cfg, results))
        for name, r in seed_runs.items():
            runs[name].append(r)
        for name, model in trained.items():
            entry = results["models"].setdefault(name, {"parameters": count_parameters(model)})
            entry["runs"] = runs[name]
            if info.is_main:
                entry["seeds"] = _seed_summary(runs[name])
        if info.is_main and i == 0 and cfg["sweep_batch_sizes"]:  # an empty sweep: seeds run in other processes
            # The sweep runs on the first seed's models right after they are trained, so a long study that is
            # stopped early still has its throughput; the report is rewritten after every seed.
            results["backend"] = _backend(trained[MODEL_NAMES[1]], data["x_test"][:2].to(info.device))
            results["sweep"] = _sweep(cfg, data, trained, info.device)
        if info.is_main:
            results["seeds_done"] = i + 1
            _write(cfg, results)
    return results


def _save_partial(cfg: dict, results: dict, runs: dict) -> None:
    """After every epoch: ``partial.json`` holds the finished seeds' results plus the seed in progress.

    The report is written only after a seed's models are both trained; this file keeps a long run's finished
    epochs (a run stopped early loses at most the epoch in progress). ``in_progress``: ``{model: run}``.
    """
    import json

    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    payload = {"commit": results["commit"], "config": results["config"], "seeds_done": results.get("seeds_done", 0),
               "world_size": results["world_size"], "environment": environment(), "models": results["models"],
               "in_progress": runs}
    tmp = out / "partial.json.tmp"
    tmp.write_text(json.dumps(payload, default=_json_default))
    tmp.replace(out / "partial.json")


def _ratio(sweep: list[dict], bs: int, key: str) -> float | None:
    rate = {r["model"]: r[key]["median"] for r in sweep if r["batch_size"] == bs}
    a, b = rate.get(MODEL_NAMES[0]), rate.get(MODEL_NAMES[1])
    return a / b if a and b else None


def _pm(s: dict | None, scale: float = 1.0, digits: int = 4) -> str:
    if s is None:
        return "n/a"
    sd = "" if s["std"] is None else f" ± {s['std'] * scale:.{digits}g}"
    return f"{s['mean'] * scale:.{digits}g}{sd} [{s['min'] * scale:.{digits}g}, {s['max'] * scale:.{digits}g}]"


def _iqr(s: dict) -> str:
    return f"{s['median']:,.1f} ({s['q1']:,.1f}-{s['q3']:,.1f})"


def _tables(results: dict) -> list:
    seeds_rows, epoch_rows = [], []
    for name, e in results["models"].items():
        s = e["seeds"]
        seeds_rows.append([name, e["parameters"], len(e["runs"]), _pm(s["test_accuracy"]),
                           _pm(s["test_error_pct"], digits=3), _pm(s.get("nfe_forward"), digits=3),
                           _pm(s.get("nfe_backward"), digits=3)])
        for r in e["runs"]:
            for ep in r["epochs"]:
                nfb = [v for v in ep["nfe_forward_batches"] if v is not None]
                q = max(1, len(nfb) // 10)
                first = sum(nfb[:q]) / q if nfb else None
                lastq = sum(nfb[-q:]) / q if nfb else None
                epoch_rows.append([name, r["seed"], ep["epoch"], ep["train_loss"], ep["test_accuracy"],
                                   ep["nfe_forward"], first, lastq, ep["nfe_backward"], ep["nfe_ratio"],
                                   ep["epoch_cpu_s"], ep["epoch_time_s"]])
    sweep_rows = []
    for r in results["sweep"]:
        bs = r["batch_size"]
        sweep_rows.append([r["model"], bs, _iqr(r["train_cpu"]), _iqr(r["train_wall"]), _iqr(r["infer_cpu"]),
                           _iqr(r["infer_wall"]), r["saved_peak_mb"], r["nfe_forward"], r["nfe_backward"]])
    ratio_rows = _ratio_rows(results)
    source = []
    if results["config"]["dataset"] == "mnist":
        source = [("The source documents' figures beside this run's (mean ± sample std [min, max] over seeds)",
                   ["figure", "sources", "this run"], _source_rows(results))]
    return source + [
        ("Accuracy and NFE over seeds (last epoch; mean ± sample std [min, max])",
         ["model", "parameters", "seeds", "test accuracy", "test error %", "NFE-F", "NFE-B"], seeds_rows),
        ("Throughput sweep (samples/s: median (IQR) over rounds; first seed's trained models)",
         ["model", "batch", "train step, CPU time", "train step, wall", "inference, CPU time", "inference, wall",
          "saved MB", "NFE-F", "NFE-B"], sweep_rows),
        ("ODENet time per sample / ResNet time per sample (ratio of median throughputs)",
         ["batch", "train, CPU time", "train, wall", "inference, CPU time", "inference, wall"], ratio_rows),
        ("Per epoch over seeds (mean ± sample std [min, max]; CPU s: thread CPU time of the epoch's training steps)",
         ["model", "epoch", "seeds", "test accuracy", "NFE-F", "NFE-B", "CPU s"], _epoch_spread_rows(results)),
        ("Per seed and epoch (NFE-F first/last 10%: mean over the epoch's first/last tenth of batches)",
         ["model", "seed", "epoch", "train loss", "test acc", "NFE-F", "NFE-F first 10%", "NFE-F last 10%",
          "NFE-B", "NFE-B/NFE-F", "CPU s", "wall s"], epoch_rows),
    ]


def _column(eps: list[dict], key: str) -> dict | None:
    vals = [ep[key] for ep in eps]
    return spread(vals) if all(v is not None for v in vals) else None


def _epoch_spread_rows(results: dict) -> list[list]:
    rows = []
    for name, e in results["models"].items():
        for i in range(min(len(r["epochs"]) for r in e["runs"])):
            eps = [r["epochs"][i] for r in e["runs"]]
            rows.append([name, i + 1, len(eps), _pm(_column(eps, "test_accuracy")),
                         _pm(_column(eps, "nfe_forward"), digits=3), _pm(_column(eps, "nfe_backward"), digits=3),
                         _pm(_column(eps, "epoch_cpu_s"), digits=3)])
    return rows


# The source documents' figures (DESIGN.md section 5; seeds/ in Portuguese). "paper": the ODENets course paper
# (000_...): MNIST accuracy of its ODENet. "thesis": Chen et al.'s MNIST table as the thesis quotes it (test
# error of ODE-Net and ResNet), and the thesis's own timing (Table 4.5: UFPR-AMR meter digits at 28x28, 3 channels;
# "Batch Time Avg" 21.96 s ODENet vs 4.89 s ResNet; its text names neither the hardware nor the batch size).
SOURCE_FIGURES = {"odenet_accuracy_pct": 99.17, "odenet_error_pct": 0.42, "resnet_error_pct": 0.41,
                  "train_time_ratio": 21.96 / 4.89}


def _source_rows(results: dict) -> list[list]:
    """This run's figures beside the source documents' (only meaningful for the full MNIST)."""
    m = results["models"]
    ode, res = m[MODEL_NAMES[1]]["seeds"], m[MODEL_NAMES[0]]["seeds"]
    ratios = ", ".join(f"{r[1]:.2f}x at batch {r[0]}" for r in _ratio_rows(results) if r[1] is not None)
    return [
        ["ODENet test accuracy %", "99.17 (ODENets paper, MNIST)", _pm(ode["test_accuracy"], 100)],
        ["ODENet test error %", "0.42 (Chen et al., quoted by the thesis)", _pm(ode["test_error_pct"], digits=3)],
        ["ResNet test error %", "0.41 (Chen et al., quoted by the thesis)", _pm(res["test_error_pct"], digits=3)],
        ["ODENet / ResNet training time per sample",
         "4.5x (thesis Table 4.5: 21.96 s / 4.89 s per batch, UFPR-AMR digits, hardware not stated)",
         (ratios + " (thread CPU time)") if ratios else "n/a (no sweep)"],
    ]


def _ratio_rows(results: dict) -> list[list]:
    return [[bs, _ratio(results["sweep"], bs, "train_cpu"), _ratio(results["sweep"], bs, "train_wall"),
             _ratio(results["sweep"], bs, "infer_cpu"), _ratio(results["sweep"], bs, "infer_wall")]
            for bs in results["config"]["sweep_batch_sizes"]]


def _source_notes(results: dict) -> list[str]:
    c = results["config"]
    return [
        (f"Why the figures differ from the sources'. Training budget: Chen et al.'s odenet_mnist.py trains 160 "
         f"epochs of all 60,000 images, batch 128, SGD lr 0.1 decayed tenfold at epochs 60, 100 and 140, with "
         f"random-crop augmentation (padding 4); this run trained {c['epochs']} epoch(s) of {results['n_train']} "
         f"images at a fixed lr {c['lr']} without augmentation (a 2-core machine shared by several jobs), "
         "so its error is that of an early point on the sources' learning curves, not of a converged model. "
         "The test set is the official 10,000-image one in both."),
        ("Timing: the thesis's 4.5x is a 'Batch Time Avg' (wall clock) on 3-channel UFPR-AMR digits (28x28), on "
         "hardware and at a batch size its text does not state; here it is the median thread CPU time per sample "
         "of a training step on MNIST (1 channel), per batch size (the sweep), on one thread. The ratio depends on "
         "the batch size and on the ODENet's NFE, which the thesis saw grow over its training epochs (Fig. 4.4)."),
    ]


def _notes(results: dict) -> list[str]:
    c = results["config"]
    size = "native size" if c["image_size"] is None else f"{c['image_size']}x{c['image_size']}"
    return [
        (f"Data: {results['data']}; {results['n_train']} training / {results['n_test']} test images at {size}, "
         f"{c['epochs']} epoch(s), batch {c['batch_size']}, SGD lr {c['lr']} momentum 0.9, width {c['width']}, "
         f"seeds {list(c['seeds'])} (initialisation and batch order; the data split is fixed by seed {c['seed']}). "
         f"ODENet: dopri5 rtol = atol = {c['rtol']}, gradients by the adjoint. {results['world_size']} process(es); "
         f"commit {results['commit']}. {_backend_text(results)}"),
        ("Training step = zero_grad + forward + cross-entropy + backward + SGD step; inference = forward under "
         f"no_grad. Each cell: {c['timing_rounds']} rounds after one warm-up round, the two models interleaved "
         f"within every round, torch.set_num_threads({c['threads']}); CPU time is time.thread_time of the calling "
         "thread (waiting for a core is not counted), wall is time.perf_counter. Raw rounds are in the JSON and "
         "CSV."),
        ("Memory: peak bytes of tensors autograd holds for backward (distinct storages) over one training step."),
        ("NFE-F: function evaluations of the forward solve per training batch; NFE-B: those of the adjoint's "
         "backward solve (`last_stats().nfe_backward`); every batch's values are in the JSON."),
    ]


def training_backends(results: dict) -> dict:
    """The step backends the ODENet's training solves used, over every epoch of every seed.

    Returns:
        ``{"forward": [...], "backward": [...]}``: the distinct backends of the forward solves and of the adjoint's
        backward solves (``"not recorded"`` for epochs of runs that predate the per-epoch record).
    """
    found = {"forward": [], "backward": []}
    for r in results["models"].get(MODEL_NAMES[1], {}).get("runs", []):
        for ep in r["epochs"]:
            b = ep.get("backend") or {}
            for k in found:
                v = b.get(k) or "not recorded"
                if v not in found[k]:
                    found[k].append(v)
    return found


def _backend_text(results: dict) -> str:
    tb = training_backends(results)
    if tb["forward"] + tb["backward"] == ["not recorded"] * 2:
        train = ("Solver backends: the training solves' backend was not recorded (runs made before the per-epoch "
                 "record of fastnode.last_stats().backend; the ODE block ran with backend='auto')")
    else:
        train = (f"Solver backends (fastnode.last_stats().backend): training solves forward "
                 f"{', '.join(tb['forward']) or 'n/a'}, adjoint backward {', '.join(tb['backward']) or 'n/a'} "
                 "(every epoch of every seed)")
    sweep = (f"throughput sweep {results['backend']}" if results["sweep"] else "no throughput sweep in this run")
    return f"{train}; {sweep}."


def _write(cfg: dict, results: dict) -> None:
    out = cfg["out"]
    results["training_backends"] = training_backends(results)
    notes = _notes(results) + (_source_notes(results) if results["config"]["dataset"] == "mnist" else [])
    if results.get("sweep_source"):
        w = results["sweep_source"]
        notes.append(f"The throughput sweep comes from another run ({w['path']}, commit {w['commit']}): its models "
                     f"(seed {w['seed']}) were trained there for {w['epochs']} epoch(s) of {w['n_train']} images at "
                     f"batch {w['batch_size']}, not taken from the runs above; its NFE columns show how far their "
                     "solves match the runs' last-epoch NFE.")
    if results.get("epochs_planned"):
        notes.append(f"Stopped early: {results['epochs_planned']} epochs were planned; every run is reported over "
                     f"the {results['config']['epochs']} epoch(s) all of them finished (runs stopped mid-seed "
                     "contribute the epochs their partial.json recorded).")
    if results.get("merged_from"):
        env = results["environment"]
        notes.append(f"Merged from {len(results['merged_from'])} runs (separate processes); the header's device, "
                     f"thread count ({env.get('threads')}) and versions are the runs' own, as recorded in their "
                     "JSON files, not those of the process that merged them.")
    write_results(out, NAME, results, _tables(results), notes, env=results.get("environment"))
    _write_csv(Path(out) / f"{NAME}.csv", results)
    _plot(results, f"{out}/{NAME}.png")


def _write_csv(path: Path, results: dict) -> None:
    """One row per timed round: model, batch size, round, the four times, NFE-F, NFE-B, saved MB."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "batch_size", "round", "train_cpu_s", "train_wall_s", "infer_cpu_s", "infer_wall_s",
                    "nfe_forward", "nfe_backward", "saved_peak_mb"])
        for r in results["sweep"]:
            raw = r["rounds_s"]
            for i in range(len(raw["train_cpu"])):
                w.writerow([r["model"], r["batch_size"], i + 1, raw["train_cpu"][i], raw["train_wall"][i],
                            raw["infer_cpu"][i], raw["infer_wall"][i], raw["nfe_f"][i], raw["nfe_b"][i],
                            r["saved_peak_mb"]])


def _plot(results: dict, path: str) -> None:
    fig, axes = new_figure(4, size=(3.8, 3.2))
    a_acc, a_nfe, a_thr, a_mem = axes
    for name, e in results["models"].items():
        for r in e["runs"]:
            xs = [ep["epoch"] for ep in r["epochs"]]
            a_acc.plot(xs, [ep["test_accuracy"] for ep in r["epochs"]], marker="o", alpha=0.7,
                       label=f"{name} s{r['seed']}")
            if r["epochs"][0]["nfe_forward"] is not None:
                nf = [v for ep in r["epochs"] for v in ep["nfe_forward_batches"]]
                nb = [v for ep in r["epochs"] for v in ep["nfe_backward_batches"]]
                a_nfe.plot(range(1, len(nf) + 1), nf, lw=0.8, label=f"NFE-F s{r['seed']}")
                if all(v is not None for v in nb):
                    a_nfe.plot(range(1, len(nb) + 1), nb, lw=0.8, ls="--", label=f"NFE-B s{r['seed']}")
    for name in results["models"]:
        rows = [r for r in results["sweep"] if r["model"] == name]
        bs = [r["batch_size"] for r in rows]
        a_thr.errorbar(bs, [r["train_cpu"]["median"] for r in rows],
                       yerr=[[r["train_cpu"]["median"] - r["train_cpu"]["q1"] for r in rows],
                             [r["train_cpu"]["q3"] - r["train_cpu"]["median"] for r in rows]], marker="o",
                       capsize=3, label=f"{name} train")
        a_thr.plot(bs, [r["infer_cpu"]["median"] for r in rows], marker="s", ls="--", label=f"{name} infer")
        a_mem.plot(bs, [r["saved_peak_mb"] for r in rows], marker="o", label=name)
    a_acc.set(xlabel="epoch", ylabel="test accuracy", title="accuracy (per seed)")
    a_nfe.set(xlabel="training batch", ylabel="function evaluations", title="ODENet NFE per batch")
    a_thr.set(xlabel="batch size", ylabel="samples / CPU s", title="throughput")
    a_mem.set(xlabel="batch size", ylabel="MB saved for backward", title="memory")
    if results["sweep"]:  # a run without its sweep (seeds in separate processes) leaves these two empty
        for a in (a_thr, a_mem):
            a.set(xscale="log", yscale="log")
    for a in axes:
        a.legend(fontsize=6)
    save_figure(fig, path)


def _runs_environment(loaded: list[dict]) -> dict:
    """The runs' recorded environments as one: a value the runs share as it is, differing values joined by " / "."""
    envs = [r.get("environment") or {} for r in loaded]
    out = {}
    for k in dict.fromkeys(k for e in envs for k in e):
        vals = list(dict.fromkeys(e.get(k, "unknown") for e in envs))
        out[k] = vals[0] if len(vals) == 1 else " / ".join(str(v) for v in vals)
    return out


def _results_file(p: Path) -> Path:
    if not p.is_dir():
        return p
    for name in (f"{NAME}.json", "partial.json"):
        if (p / name).is_file():
            return p / name
    raise FileNotFoundError(f"{str(p)!r} holds neither {NAME}.json nor partial.json")


def _load_run(path: Path, r: dict) -> dict:
    """A run's results; a ``partial.json`` becomes a finished run of the epochs both models completed.

    ``partial.json`` holds the configuration, not the data's description: that (source, counts, channels for the
    parameter counts) is rebuilt from the configuration by loading the data set again.
    """
    if "in_progress" not in r:
        return r
    runs, c = r["in_progress"], r["config"]
    done = min((len(v["epochs"]) for v in runs.values()), default=0)
    if len(runs) < len(MODEL_NAMES) or done == 0:
        raise ValueError(f"{str(path)!r}: no epoch finished by both models yet")
    data = load_images(c["dataset"], data_dir=c.get("data_dir"), image_size=c["image_size"],
                       train_size=c["train_size"], test_size=c["test_size"], seed=c["seed"])
    builders = _builders(c, data)
    out = {k: v for k, v in r.items() if k != "in_progress"}
    out["models"] = {}
    for name, run in runs.items():
        before = r["models"].get(name, {}).get("runs", [])
        out["models"][name] = {"parameters": count_parameters(builders[name]()),
                               "runs": before + [{**run, "epochs": run["epochs"][:done]}]}
    out.update(seeds_done=r.get("seeds_done", 0) + 1, data=data["source"], n_train=len(data["y_train"]),
               n_test=len(data["y_test"]), partial=str(path))
    # partial.json of commits fcfb110/611f8a5 has no environment: the merging process's (the same machine and
    # virtual environment is the use case) with the thread count the run's configuration set.
    out.setdefault("environment", {**environment(), "threads": c["threads"]})
    out.setdefault("world_size", 1)
    out.setdefault("sweep", [])
    out.setdefault("backend", None)
    return out


def _take_sweep(merged: dict, path: Path) -> None:
    import json

    r = json.loads(path.read_text())
    if not r.get("sweep"):
        raise ValueError(f"sweep_from {str(path)!r} has no throughput sweep")
    if merged["sweep"]:
        raise ValueError(f"sweep_from {str(path)!r} given, but one of the runs has its own sweep")
    c = r["config"]
    merged["sweep"], merged["backend"] = r["sweep"], r["backend"]
    merged["sweep_source"] = {"path": str(path), "commit": r.get("commit"), "seed": c["seeds"][0],
                              "n_train": r["n_train"], "epochs": c["epochs"], "batch_size": c["batch_size"]}
    merged["config"] = {**merged["config"], "sweep_batch_sizes": c["sweep_batch_sizes"],
                        "timing_rounds": c["timing_rounds"]}


def _common_epochs(merged: dict) -> None:
    """Cut every run to the epochs all runs have (runs stopped early), recording the planned number."""
    runs = [r for m in merged["models"].values() for r in m["runs"]]
    done = min(len(r["epochs"]) for r in runs)
    planned = merged["config"]["epochs"]
    if done < planned:
        for r in runs:
            r["epochs"] = r["epochs"][:done]
        merged["epochs_planned"] = planned
        merged["config"] = {**merged["config"], "epochs": done}


_MERGE_FREE = ("seeds", "sweep_batch_sizes", "timing_rounds", "progress", "quick")


def merge(out, inputs, sweep_from=None) -> dict:
    """Combine runs of this study that differ only in their seeds (and in which one ran the sweep) into one report.

    Seeds can run as separate processes (``--set seeds=1 --set sweep_batch_sizes=``); this joins their JSON
    files: every seed's runs, the seed summaries recomputed over all of them, the sweep of the run that has one.

    Args:
        out: folder for the merged ``resnet-vs-odenet.{json,md,csv,png}``.
        inputs: the runs' ``resnet-vs-odenet.json`` files, or their folders. A folder without that file (a run
            stopped before its seed finished) contributes its ``partial.json``: the epochs both models finished.
            When runs reached different epochs, every run is cut to the epochs all of them have, and the report
            says so (``epochs_planned``).
        sweep_from: a run (file or folder) whose throughput sweep the report takes, though its training differed
            (e.g. a short run made only for the sweep); the report names it and how its models were trained.

    Returns:
        The merged results.

    Raises:
        ValueError: when the runs differ in another setting or repeat a seed (the message names the files).
    """
    import json

    paths = [_results_file(Path(p)) for p in inputs]
    if not paths:
        raise ValueError("inputs must name at least one results file")
    loaded = [_load_run(p, json.loads(p.read_text())) for p in paths]
    base = loaded[0]
    same = lambda c: {k: v for k, v in c.items() if k not in _MERGE_FREE}
    for p, r in zip(paths, loaded):
        if same(r["config"]) != same(base["config"]):
            diff = sorted(k for k in same(r["config"]) if r["config"][k] != base["config"].get(k))
            raise ValueError(f"{str(p)!r} differs from {str(paths[0])!r} in {diff}; only seeds may differ")
    merged = {k: v for k, v in base.items() if k not in ("study", "environment")}
    merged["models"], merged["sweep"] = {}, []
    merged["commit"] = sorted({r.get("commit") or "unknown" for r in loaded})
    merged["merged_from"] = [str(p) for p in paths]
    merged["environment"] = _runs_environment(loaded)
    merged["merge_environment"] = environment()
    seen = []
    for r in loaded:
        seen += list(r["config"]["seeds"])[: r.get("seeds_done", len(r["config"]["seeds"]))]
        if r["sweep"]:
            merged["sweep"], merged["backend"] = r["sweep"], r["backend"]
            merged["config"] = {**merged["config"], "sweep_batch_sizes": r["config"]["sweep_batch_sizes"],
                                "timing_rounds": r["config"]["timing_rounds"]}
        for name, e in r["models"].items():
            m = merged["models"].setdefault(name, {"parameters": e["parameters"], "runs": []})
            m["runs"] += e["runs"]
    if len(set(seen)) != len(seen):
        raise ValueError(f"seeds repeat across {[str(p) for p in paths]}: {seen}")
    if sweep_from is not None:
        _take_sweep(merged, _results_file(Path(sweep_from)))
    _common_epochs(merged)
    for m in merged["models"].values():
        m["runs"].sort(key=lambda r: r["seed"])
        m["seeds"] = _seed_summary(m["runs"])
    merged["config"]["seeds"] = sorted(seen)
    merged["seeds_done"] = len(seen)
    _write({"out": str(out), **merged["config"]}, merged)
    return merged


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    sweep = None
    if "--sweep-from" in args:
        i = args.index("--sweep-from")
        if i + 1 >= len(args):
            sys.exit("--sweep-from needs a RUN")
        sweep = args[i + 1]
        del args[i:i + 2]
    if len(args) < 3 or args[0] != "merge":
        sys.exit("usage: python -m fastnode.studies.resnet_vs_odenet merge OUT RUN [RUN ...] [--sweep-from RUN]")
    merge(args[1], args[2:], sweep_from=sweep)
    print(f"merged into {args[1]}/")
