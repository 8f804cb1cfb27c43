"""DistributedDataParallel training of an ODENet with the adjoint: 2 gloo processes on CPU give the same parameters
as one process on the same global batches (the studies' sharding, ``fastnode.studies.common.batches``)."""

import os
import socket
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from fastnode.models import ImageODENet
from fastnode.studies.common import batches

STEPS, LR, GLOBAL_BATCH, N = 3, 0.1, 8, 16
# 14x14: the smallest input that leaves the ODE block a 3x3 map (GroupNorm groups of 9 values at width 4); a smaller
# one would train the degenerate network ImageODENet warns about, which the test then refuses (_no_degenerate_map).
SIZE = 14


def _no_degenerate_map():
    warnings.filterwarnings("error", message="ODENet: input of", category=UserWarning)


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 1, SIZE, SIZE, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    return x, y


def _model():
    torch.manual_seed(0)
    # Fixed-grid rk4: the steps do not depend on the batch, so a shard's samples follow exactly the same
    # arithmetic as in the full batch (an adaptive solve's shared error norm would differ between shards).
    return ImageODENet(1, 3, width=4, method="rk4", options={"step_size": 0.25}, adjoint=True).double()


def _train(model, rank, world):
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        for idx in batches(N, GLOBAL_BATCH, shuffle=True, seed=3, epoch=step, rank=rank, world=world):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def _worker(rank, world, port, out_path):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    _no_degenerate_map()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model()
        _train(DDP(model), rank, world)
        if rank == 0:
            torch.save([p.detach() for p in model.parameters()], out_path)
    finally:
        dist.destroy_process_group()
    # A gloo work object that outlives the interpreter is freed on a gloo thread during finalization; its saved
    # thread-local state then decrefs a Python object without a GIL to take, and the process aborts ("terminate
    # called without an active exception", about 1 run in 20, after training and the save; core dump: c10d
    # ProcessGroupGloo::AsyncWork::~AsyncWork -> ThreadLocalState -> SafePyObject decref -> PyThread_exit_thread).
    # Everything this worker does is done here, so it leaves without finalizing.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_two_processes_equal_single_process():
    assert ImageODENet.feature_map_size(SIZE) == 3
    single = _model()
    before = [p.detach().clone() for p in single.parameters()]
    with warnings.catch_warnings():
        _no_degenerate_map()
        _train(single, 0, 1)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "params.pt")
        mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        ddp_params = torch.load(out)
    assert len(ddp_params) == len(before)
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(single.parameters(), before))
    assert moved > 1e-3  # training changed the parameters, so the comparison means something
    for p, q in zip(single.parameters(), ddp_params):
        torch.testing.assert_close(q, p.detach(), rtol=1e-10, atol=1e-12)
