"""Training, measuring and distributed helpers shared by the studies."""

from __future__ import annotations

import os
import statistics
import time
import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..models import ODEBlock

__all__ = [
    "DistInfo",
    "SavedTensorMeter",
    "batches",
    "check_feature_map",
    "cleanup_distributed",
    "evaluate",
    "median_throughput",
    "ode_blocks",
    "progress",
    "setup_distributed",
    "spread",
    "time_call",
    "train_epoch",
]


class DistInfo:
    """Rank, world size and device of this process (``world == 1`` when not launched by ``torchrun``)."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None):
        self.rank, self.world = rank, world
        self.device = device or torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``): nccl on CUDA, gloo on CPU.

    Args:
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.

    Returns:
        ``DistInfo`` with this process's rank, world size and device (``cuda:LOCAL_RANK`` on GPU).

    Example:
        >>> setup_distributed("cpu").world  # not under torchrun
        1
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, dev)


def cleanup_distributed() -> None:
    """Leave the process group if one was joined.

    Example:
        >>> cleanup_distributed()  # no-op outside torchrun
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class SavedTensorMeter:
    """Peak bytes of tensors autograd keeps for backward, alive at the same time, forward and backward included.

    Counts each storage once (a tensor saved by several nodes is one allocation) and drops it when autograd
    releases it (after its node ran in backward). This is an exact count of what the graph holds, not of the
    allocator: temporaries that are not saved for backward are not in it.

    Example:
        >>> import torch
        >>> w = torch.randn(10, 10, requires_grad=True)
        >>> with SavedTensorMeter() as m:
        ...     (w @ w).sum().backward()
        >>> m.peak_bytes >= 400
        True
    """

    def __init__(self):
        self.live_bytes = 0
        self.peak_bytes = 0
        self._refs: dict[int, list] = {}
        self._ctx = None

    class _Packed:
        __slots__ = ("__weakref__", "tensor")

        def __init__(self, tensor):
            self.tensor = tensor

    def _pack(self, x: torch.Tensor):
        st = x.untyped_storage()
        key = st.data_ptr()
        entry = self._refs.get(key)
        if entry is None:
            entry = self._refs[key] = [0, st.nbytes()]
            self.live_bytes += entry[1]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        entry[0] += 1
        p = SavedTensorMeter._Packed(x)
        weakref.finalize(p, self._release, key)
        return p

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live_bytes -= entry[1]
            del self._refs[key]

    @staticmethod
    def _unpack(p):
        return p.tensor

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        return False


def ode_blocks(model: nn.Module) -> list[ODEBlock]:
    """The ``ODEBlock`` submodules of ``model`` (through a DDP wrapper too).

    Example:
        >>> from fastnode.models import TabularODENet
        >>> len(ode_blocks(TabularODENet(3, 1, width=4, hidden=4)))
        1
    """
    return [m for m in model.modules() if isinstance(m, ODEBlock)]


def progress(iterable, enabled: bool, **kw):
    """``tqdm`` progress bar when enabled and installed, else the iterable itself.

    Example:
        >>> list(progress(range(3), enabled=False))
        [0, 1, 2]
    """
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, leave=False, **kw)


def batches(n: int, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0,
            world: int = 1) -> list[torch.Tensor]:
    """Index batches of one epoch; with ``world > 1`` each rank gets its share of every global batch.

    The global batch (``batch_size`` samples) is split into ``world`` contiguous shards of equal size (the same
    partition as ``DistributedSampler`` with ``shuffle=False`` applied to the global batch), so a DDP run and a
    single-process run over the same global batches average the same per-sample gradients.

    Args:
        n: dataset size.
        batch_size: global batch size (divisible by ``world``).
        shuffle: shuffle with ``seed + epoch``.
        seed, epoch: shuffling seed parts.
        rank, world: this process's share.

    Returns:
        List of ``[batch_size // world]`` index tensors (the last global batch is dropped if incomplete and
        ``world > 1``).

    Example:
        >>> [b.tolist() for b in batches(8, 4, shuffle=False, rank=1, world=2)]
        [[2, 3], [6, 7]]
    """
    if batch_size < 1 or batch_size % world:
        raise ValueError(f"batch_size must be a positive multiple of the world size {world}, got {batch_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)) if shuffle else torch.arange(n)
    out = []
    local = batch_size // world
    for start in range(0, n, batch_size):
        g = order[start: start + batch_size]
        if world > 1 and len(g) < batch_size:
            break
        out.append(g[rank * local: (rank + 1) * local] if world > 1 else g)
    return out


def train_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
                loss_fn: Callable, *, batch_size: int, epoch: int = 0, seed: int = 0, info: DistInfo | None = None,
                show_progress: bool = False, desc: str = "") -> dict:
    """One epoch of minibatch training; records loss, per-batch time and the ODE blocks' NFE.

    Args:
        model: the model (possibly DDP-wrapped).
        x, y: training data ``[N, ...]``, ``[N, ...]`` (moved to the model's device batch by batch).
        opt: optimiser.
        loss_fn: ``loss_fn(output, target)``.
        batch_size: global batch size.
        epoch, seed: shuffling.
        info: distributed info (``None``: single process).
        show_progress: tqdm bar.
        desc: bar label.

    Returns:
        dict with ``loss`` (mean over batches), ``batch_times`` (wall s), ``batch_cpu_times`` (thread CPU s),
        ``samples`` (per batch, this rank), ``nfe_forward`` and ``nfe_backward`` (mean per batch over the ODE
        blocks, ``None`` without blocks or counts), and the per-batch ``nfe_forward_batches``,
        ``nfe_backward_batches`` and ``batch_losses``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> m = nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(m.parameters(), lr=0.1)
        >>> r = train_epoch(m, torch.randn(8, 2), torch.randn(8, 1), opt, nn.functional.mse_loss, batch_size=4)
        >>> len(r["batch_times"])
        2
    """
    info = info or DistInfo()
    dev = info.device
    model.train()
    blocks = ode_blocks(model)
    losses, times, cpu_times, samples, nfe_f, nfe_b = [], [], [], [], [], []
    idx_list = batches(len(y), batch_size, shuffle=True, seed=seed, epoch=epoch, rank=info.rank, world=info.world)
    for idx in progress(idx_list, show_progress, desc=desc):
        xb, yb = x[idx].to(dev), y[idx].to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0, c0 = time.perf_counter(), time.thread_time()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.thread_time() - c0)
        samples.append(len(idx))
        losses.append(float(loss.detach()))
        if blocks:
            nfe_f.append(sum(b.nfe_forward or 0 for b in blocks))
            nb = [b.nfe_backward for b in blocks]
            nfe_b.append(None if any(v is None for v in nb) else sum(nb))
    mean = lambda v: (sum(v) / len(v)) if v and all(a is not None for a in v) else None
    return {"loss": mean(losses), "batch_times": times, "batch_cpu_times": cpu_times, "samples": samples,
            "nfe_forward": mean(nfe_f), "nfe_backward": mean(nfe_b), "nfe_forward_batches": nfe_f,
            "nfe_backward_batches": nfe_b, "batch_losses": losses}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256,
             metric: str = "accuracy", device: torch.device | None = None) -> dict:
    """Test metric, time and mean forward NFE of the ODE blocks.

    Args:
        model: the model.
        x, y: test data.
        batch_size: evaluation batch.
        metric: ``"accuracy"`` (argmax of logits, or sign of a single logit against 0/1 targets) or ``"mse"``.
        device: where to run (default: the model's).

    Returns:
        dict with the metric, ``time_s`` and ``nfe`` (mean forward NFE per batch, ``None`` without ODE blocks).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> evaluate(nn.Identity(), torch.eye(3), torch.arange(3))["accuracy"]
        1.0
    """
    if metric not in ("accuracy", "mse"):
        raise ValueError(f"metric must be 'accuracy' or 'mse', got {metric!r}")
    model.eval()
    dev = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    blocks = ode_blocks(model)
    total, correct, se, nfes = 0, 0, 0.0, []
    t0 = time.perf_counter()
    for start in range(0, len(y), batch_size):
        xb, yb = x[start: start + batch_size].to(dev), y[start: start + batch_size].to(dev)
        out = model(xb)
        if metric == "accuracy":
            pred = out.argmax(dim=-1) if out.shape[-1] > 1 else (out.squeeze(-1) > 0).to(yb.dtype)
            correct += int((pred == yb.reshape(pred.shape)).sum())
        else:
            se += float(((out.reshape(yb.shape) - yb) ** 2).sum())
        total += len(yb)
        if blocks:
            nfes.append(sum(b.nfe_forward or 0 for b in blocks))
    elapsed = time.perf_counter() - t0
    res = {"time_s": elapsed, "nfe": (sum(nfes) / len(nfes)) if nfes else None}
    res[metric] = correct / total if metric == "accuracy" else se / total
    return res


def median_throughput(fn: Callable[[], object], n_samples: int, *, repeats: int = 5, warmup: int = 1,
                      device: torch.device | None = None) -> float:
    """Samples per second: ``n_samples`` divided by the median time of ``repeats`` calls of ``fn`` after ``warmup``.

    Example:
        >>> median_throughput(lambda: sum(range(1000)), 1000, repeats=3) > 0
        True
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return n_samples / statistics.median(times)


def time_call(fn: Callable[[], object], device: torch.device | None = None) -> tuple[float, float]:
    """Thread CPU seconds and wall seconds of one call of ``fn``.

    Thread CPU time (``time.thread_time``) counts only this thread's work, so on a shared machine it does not
    include time the thread waited for a core; with ``torch.set_num_threads(1)`` all of torch's CPU work (forward
    and autograd's backward) runs on this thread, so it is the whole cost. On CUDA the device is synchronised and
    only the wall time is meaningful.

    Example:
        >>> cpu, wall = time_call(lambda: sum(range(10000)))
        >>> cpu >= 0 and wall > 0
        True
    """
    sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else (lambda: None)
    sync()
    c0, w0 = time.thread_time(), time.perf_counter()
    fn()
    sync()
    return time.thread_time() - c0, time.perf_counter() - w0


def spread(values) -> dict:
    """Median, quartiles (IQR), mean, sample standard deviation, min, max and count of ``values``.

    Args:
        values: non-empty sequence of numbers.

    Returns:
        dict with ``median``, ``q1``, ``q3``, ``iqr``, ``mean``, ``std`` (``None`` for one value), ``min``, ``max``,
        ``n``.

    Example:
        >>> s = spread([1.0, 2.0, 3.0, 4.0, 100.0])
        >>> s["median"], s["q1"], s["q3"], s["n"]
        (3.0, 2.0, 4.0, 5)
    """
    v = [float(a) for a in values]
    if not v:
        raise ValueError("values must not be empty")
    q1, q2, q3 = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else (v[0], v[0], v[0])
    return {"median": q2, "q1": q1, "q3": q3, "iqr": q3 - q1, "mean": statistics.fmean(v),
            "std": statistics.stdev(v) if len(v) > 1 else None, "min": min(v), "max": max(v), "n": len(v)}


def check_feature_map(image_size: int | None, native_size: int) -> None:
    """Refuse an image ODENet configuration whose ODE block would run on a feature map below 3x3.

    There its GroupNorm groups hold a handful of values (one at 1x1 with 32 channels or fewer, where the norm outputs
    its bias whatever the input), and the network gives nearly the same logits for every image: such a run
    measures nothing.

    Args:
        image_size: the configured size (``None``: the data set's own).
        native_size: the data set's image side.

    Raises:
        ValueError: naming ``image_size`` and the smallest size that works (14).

    Example:
        >>> check_feature_map(28, 28)
        >>> check_feature_map(None, 8)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: image_size None (8x8 images) leaves a 1x1 feature map for the ODE block...
    """
    from ..models import ImageODENet

    size = image_size or native_size
    side = ImageODENet.feature_map_size(size)
    if side < 3:
        raise ValueError(f"image_size {image_size} ({size}x{size} images) leaves a {side}x{side} feature map for the "
                         "ODE block, below 3x3: its GroupNorm groups then hold a handful of values (one at 1x1) and "
                         "the network gives nearly the same logits for every input; use image_size >= 14")
