"""``make gpu-check`` (bench/gpu_check.py) on a machine without a GPU: it says so and exits 0; its helpers (the
results' parsing, the stage time limits' process kill) work without one."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: gpu-check would run")
def test_without_cuda_it_says_so_and_exits_0(capsys):
    assert gpu_check.main([]) == 0
    assert "gpu-check: no CUDA device" in capsys.readouterr().out


def test_dry_run_prints_every_stage_command(capsys):
    assert gpu_check.main(["--dry-run", "--allow-cpu"]) == 0
    out = capsys.readouterr().out
    assert "--no-build-isolation --no-deps --no-index" in out and "-m gpu" in out
    assert "bench/bench_ops.py" in out and "bench/gpu_solvers.py" in out


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        gpu_check.main(["--budget", "0"])


def test_results_are_read_back(tmp_path):
    (tmp_path / "tests.log").write_text("....\n===== 770 passed, 4 skipped, 1034 deselected in 151.20s =====\n")
    assert gpu_check.pytest_counts(tmp_path / "tests.log") == "770 passed, 4 skipped, 1034 deselected in 151.20s"
    rows = [{"backend": "triton", "op": "rk_combine i=1", "layout": "shared", "dtype": "float32", "S": 7, "B": 16384,
             "N": 8192, "hbm": True, "of copy": 0.8, "GB/s": 3400.0},
            {"backend": "triton", "op": "step_end", "layout": "shared", "dtype": "float32", "S": 7, "B": 64, "N": 1,
             "hbm": False, "of copy": None}]
    (tmp_path / "kernels.json").write_text(json.dumps({"rows": rows}))
    assert gpu_check.kernel_targets(tmp_path / "kernels.json") == [
        "triton rk_combine i=1 shared float32 [7, 16384, 8192]: 80% of copy (3400 GB/s) BELOW 85%"]
    solvers = [{"problem": "mlp", "batch": 1024, "mode": "forward", "provider": p, "t_ms": t}
               for p, t in (("fastnode-triton", 2.0), ("torchdiffeq", 3.0), ("torchode", 1.5))]
    (tmp_path / "solvers.json").write_text(json.dumps({"rows": solvers}))
    got = gpu_check.solver_targets(tmp_path / "solvers.json")
    assert got[0].endswith("torchdiffeq 3.00 ms: faster") and got[1].endswith("torchode 1.50 ms: NOT faster")
    assert gpu_check.slug("NVIDIA H200") == "nvidia-h200"


def test_a_stage_past_its_time_limit_is_killed_with_everything_below_it(tmp_path):
    """Compilers that ninja starts in process groups of their own must not outlive the build stage."""
    start = time.monotonic()
    res = gpu_check.run_logged(["bash", "-c", "setsid sleep 311 & sleep 312"], tmp_path / "log", 1.0)
    assert res["timed_out"] and res["rc"] is None and time.monotonic() - start < 60
    time.sleep(0.2)
    left = subprocess.run(["pgrep", "-f", "sleep 31[12]"], capture_output=True, text=True).stdout.split()
    assert not left, left
