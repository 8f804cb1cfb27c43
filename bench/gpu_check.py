"""``make gpu-check``: one command that builds fastnode with its CUDA extension against the machine's torch, runs every
CUDA test twin and the two GPU benchmarks, each stage under its own time limit, and writes the results.

Stages (each a subprocess with a deadline; one that fails or runs out of time is recorded and the next one runs):

1. ``build``: a virtual environment under ``build/gpu-venv`` (no pip of its own) that sees the invoking
   interpreter's packages (torch, triton, pip, setuptools, ...) through a ``.pth`` file (``--system-site-packages``
   alone would not: on the GPU image ``python3`` is itself a venv), then ``pip install --no-build-isolation
   --no-deps --no-index -e .`` (no network), with ``TORCH_CUDA_ARCH_LIST`` set to the device's compute capability.
   If the extension does not build, the package is installed without it (``FASTNODE_SKIP_EXT=1``) so the Triton
   stages still run, and the summary says so.
2. ``tests``: ``pytest -m gpu`` over the CUDA twins (``tests/ops``, ``tests/backends``, ``tests/test_ext_cuda.py``,
   ``tests/test_validation.py``) with ``FASTNODE_TEST_CUDA=1`` (compiled kernels; the interpreter is never used).
3. ``kernels``: ``bench/bench_ops.py`` (every op's time and bandwidth against a device-to-device copy).
4. ``solvers``: ``bench/gpu_solvers.py`` (fastnode vs torchdiffeq, torchode, diffrax; forward, backprop, adjoint).

Output (``--out``, default ``bench/results/<device>/``; at most 8 files, so the device tool brings all of them
back): ``summary.md`` (device, driver, torch/triton/CUDA versions, each stage's status and time, the test counts,
the kernel and solver targets), ``build.log``, ``tests.log``, ``bench.log``, ``kernels.md``/``.json``,
``solvers.md``/``.json``.

Without a CUDA device it prints ``gpu-check: no CUDA device ...`` and exits 0 (CI runs on machines without one).

Usage::

    make gpu-check                                   # python3 must hold a CUDA torch
    make gpu-check GPU_OUT=$OUT/h200 GPU_BUDGET=460
    python3 bench/gpu_check.py --dry-run             # print the plan and the commands, run nothing
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_PATHS = ["tests/ops", "tests/backends", "tests/test_ext_cuda.py", "tests/test_validation.py"]


@dataclass
class Stage:
    """One stage: its command(s), the most seconds it may take, and the seconds kept back for the stages after it."""

    name: str
    cap_s: float
    reserve_s: float  # what this stage needs at least (kept back while the earlier stages run)
    result: dict = field(default_factory=dict)


# Time limits (a stage that ends early hands what it did not use to the next one) and reserves, in seconds: about
# 460 s in all on one H100/H200 (16 cores: the build ~1.5 min, the ~770 CUDA tests ~2-3 min with 8 workers).
STAGES = [Stage("build", 180, 60), Stage("tests", 190, 60), Stage("kernels", 40, 20), Stage("solvers", 60, 25)]


def slug(name: str) -> str:
    """A device name as a folder name: ``"NVIDIA H200"`` -> ``"nvidia-h200"``."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "device"


def probe(python: str) -> dict:
    """What ``python`` sees: torch and its CUDA device (run apart, so this script needs no torch itself)."""
    code = r"""
import json, platform, sys
out = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
except Exception as exc:
    out["error"] = f"torch is not importable ({exc})"
    print(json.dumps(out)); sys.exit(0)
out.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda=torch.cuda.is_available())
for mod in ("triton", "numpy", "torchdiffeq", "torchode", "jax", "diffrax"):
    try:
        import importlib.metadata as md
        out[mod] = md.version(mod)
    except Exception:
        out[mod] = None
if out["cuda"]:
    p = torch.cuda.get_device_properties(0)
    out.update(device=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
               memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
               n_devices=torch.cuda.device_count())
    try:
        out["driver"] = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
    except Exception:
        out["driver"] = None
out["paths"] = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
print(json.dumps(out))
"""
    try:
        res = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"{python} did not run ({exc})"}
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": f"{python} failed: {res.stderr[-1000:]}"}


def _tool_version(cmd: list[str], pattern: str) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(pattern, out)
    return m.group(1).strip() if m else None


def host_info() -> dict:
    """Driver (nvidia-smi), nvcc and the commit, for the header."""
    return {
        "driver_smi": _tool_version(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    r"(\S+)"),
        "nvcc": _tool_version([os.environ.get("NVCC", "nvcc"), "--version"], r"release ([^\n]+)"),
        "commit": _tool_version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], r"(\S+)"),
        "dirty": bool(_tool_version(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                    r"(\S+)")),
    }


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc): ninja starts each compiler in a process group of its own, so killing
    the stage's process group alone would leave them running."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s process group and every process below it."""
    below = _descendants(pid)
    for target in [pid, *below]:
        try:
            if target == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict | None = None, append: bool = False) -> dict:
    """Runs ``cmd`` in the repository root with its output in ``log``; kills its whole process group at ``timeout``.

    Returns ``{"rc", "seconds", "timed_out"}`` (rc None when it was killed)."""
    start = time.monotonic()
    with open(log, "a" if append else "w") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
            timed_out = False
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            rc, timed_out = None, True
            fh.write(f"\n[gpu-check] killed after {timeout:.0f} s (stage time limit)\n")
    return {"rc": rc, "seconds": round(time.monotonic() - start, 1), "timed_out": timed_out}


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def build_commands(python: str, venv: Path) -> list[list[str]]:
    """The build stage's commands (between the two, the ``.pth`` that shows the venv the parent's packages)."""
    # --without-pip: the venv's own pip/setuptools (ensurepip's) would shadow the interpreter's through the .pth; an
    # old bundled setuptools has no bdist_wheel. pip and setuptools come from the interpreter's packages instead.
    return [
        [python, "-m", "venv", "--clear", "--without-pip", str(venv)],
        [str(venv_python(venv)), "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
         "--disable-pip-version-check", "-e", "."],
    ]


def write_parent_pth(venv: Path, paths: list[str]) -> Path:
    """``_gpu_check_parent.pth`` in the venv's site-packages: the invoking interpreter's package folders."""
    site = sorted((venv / "lib").glob("python*/site-packages"))
    if not site:
        raise FileNotFoundError(f"no site-packages under {venv}/lib")
    pth = site[0] / "_gpu_check_parent.pth"
    pth.write_text("".join(p + "\n" for p in paths if Path(p).is_dir()))
    return pth


def _build(python: str, paths: list[str], venv: Path, log: Path, deadline: float, capability: str | None) -> dict:
    env = dict(os.environ, PIP_NO_INDEX="1", MAX_JOBS=str(os.cpu_count() or 4))
    if capability:
        env["TORCH_CUDA_ARCH_LIST"] = capability
    log.write_text("")
    make_venv, install = build_commands(python, venv)
    res = run_logged(make_venv, log, deadline - time.monotonic(), env=env, append=True)
    if res["rc"] == 0:
        pth = write_parent_pth(venv, paths)
        with open(log, "a") as fh:
            fh.write(f"[gpu-check] {pth}: {paths}\n")
        res = run_logged(install, log, deadline - time.monotonic(), env=env, append=True)
    vpy = str(venv_python(venv))
    ext = _ext_status(vpy, log) if res["rc"] == 0 else None
    if (res["rc"] != 0 or (ext is not None and not ext.get("loaded"))) and venv_python(venv).exists():
        # The Triton stages still run without the extension: install the pure-Python package. (An extension that
        # loads without CUDA kernels stays: the summary says so, and the ext-cuda tests skip with the reason.)
        with open(log, "a") as fh:
            fh.write("\n[gpu-check] the extension did not build or load: installing without it\n")
        # At least a minute: the pure-Python install is quick, and without it no later stage can run.
        res2 = run_logged(install, log, max(60.0, deadline - time.monotonic()), env=dict(env, FASTNODE_SKIP_EXT="1"),
                          append=True)
        res["fallback_rc"] = res2["rc"]
    res["ext"] = ext
    return res


def _ext_status(vpy: str, log: Path) -> dict | None:
    code = ("import json, torch, fastnode; from fastnode.backends import ext_ops; "
            "print(json.dumps({'loaded': ext_ops.available(), "
            "'cuda': ext_ops.available() and ext_ops.unavailable_reason(torch.device('cuda')) is None, "
            "'why': ext_ops.unavailable_reason(torch.device('cuda'))}))")
    try:
        res = subprocess.run([vpy, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        with open(log, "a") as fh:
            fh.write("\n[gpu-check] the extension check (import fastnode) timed out after 300 s\n")
        return None
    with open(log, "a") as fh:
        fh.write(f"\n[gpu-check] extension: {res.stdout.strip()} {res.stderr[-2000:]}\n")
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return None


def test_command(vpy: str, workers: int) -> list[str]:
    cmd = [vpy, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-o", "addopts=-ra", *TEST_PATHS]
    if workers > 1:
        cmd[4:4] = ["-n", str(workers)]
    return cmd


def _has_module(vpy: str, name: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({name!r}) else 1)"
    return subprocess.run([vpy, "-c", code], capture_output=True, check=False).returncode == 0


def pytest_counts(log: Path) -> str | None:
    """The closing ``N passed, M failed, ...`` line of a pytest log."""
    if not log.exists():
        return None
    lines = [ln for ln in log.read_text(errors="replace").splitlines()
             if re.search(r"\d+ (passed|failed|errors?|skipped|deselected)\b.* in [\d.]+s", ln)]
    return lines[-1].strip("= ") if lines else None


def kernel_targets(path: Path) -> list[str]:
    """Rows of the kernel bench at >= 1 GB moved, with their share of a copy (target >= 85%)."""
    if not path.exists():
        return ["no kernel results"]
    rows = json.loads(path.read_text()).get("rows", [])
    out = []
    for r in rows:
        if r.get("hbm") and r.get("of copy") is not None:
            mark = "ok" if r["of copy"] >= 0.85 else "BELOW 85%"
            out.append(f"{r['backend']} {r['op']} {r['layout']} {r['dtype']} [{r['S']}, {r['B']}, {r['N']}]: "
                       f"{100 * r['of copy']:.0f}% of copy ({r['GB/s']:.0f} GB/s) {mark}")
    return out or ["no row moved >= 1 GB"]


def solver_targets(path: Path) -> list[str]:
    """B=1024 MLP forward: fastnode (triton) against torchdiffeq and torchode; host syncs per step."""
    if not path.exists():
        return ["no solver results"]
    rows = json.loads(path.read_text()).get("rows", [])
    sel = {r["provider"]: r for r in rows if r.get("problem") == "mlp" and r.get("batch") == 1024
           and r.get("mode") == "forward"}
    out = []
    ours = sel.get("fastnode-triton")
    for other in ("torchdiffeq", "torchode", "diffrax"):
        if ours and other in sel:
            faster = ours["t_ms"] < sel[other]["t_ms"]
            out.append(f"MLP B=1024 forward: fastnode-triton {ours['t_ms']:.2f} ms vs {other} "
                       f"{sel[other]['t_ms']:.2f} ms: {'faster' if faster else 'NOT faster'}")
    for r in rows:
        if r.get("provider", "").startswith("fastnode") and r.get("syncs_per_step") is not None:
            out.append(f"{r['provider']} {r['problem']} B={r['batch']} {r['mode']}: "
                       f"{r['syncs_per_step']:.2f} host syncs per step")
    return out or ["no MLP B=1024 forward rows"]


def header(info: dict, host: dict) -> list[str]:
    return [
        f"# gpu-check on {info.get('device', '?')}",
        "",
        f"- device: {info.get('device')} (sm_{(info.get('capability') or '?').replace('.', '')}, "
        f"{info.get('memory_gib')} GiB, {info.get('sms')} SMs, {info.get('n_devices')} device(s))",
        f"- driver: {host.get('driver_smi') or info.get('driver')}; nvcc: {host.get('nvcc')}",
        f"- torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), triton {info.get('triton')}, "
        f"numpy {info.get('numpy')}, python {info.get('python')}",
        f"- torchdiffeq {info.get('torchdiffeq')}, torchode {info.get('torchode')}, jax {info.get('jax')}, "
        f"diffrax {info.get('diffrax')}",
        f"- commit {host.get('commit')}{' (with uncommitted changes)' if host.get('dirty') else ''}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    ]


def stage_commands(vpy: str, out: Path, workers: int) -> dict[str, list[str]]:
    return {
        "tests": test_command(vpy, workers),
        "kernels": [vpy, "bench/bench_ops.py", "--device", "cuda", "--reps", "10", "--out", str(out / "kernels.md")],
        "solvers": [vpy, "bench/gpu_solvers.py", "--out", str(out / "solvers.md")],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="results folder (default bench/results/<device>/)")
    ap.add_argument("--budget", type=float, default=460.0, help="seconds for all stages together")
    ap.add_argument("--python", default=sys.executable, help="the interpreter holding the machine's torch")
    ap.add_argument("--venv", type=Path, default=ROOT / "build" / "gpu-venv")
    ap.add_argument("--stages", nargs="*", default=[s.name for s in STAGES], choices=[s.name for s in STAGES])
    ap.add_argument("--workers", type=int, default=8, help="pytest-xdist workers for the tests (when installed)")
    ap.add_argument("--cap-scale", type=float, default=1.0,
                    help="multiply every stage's time limit (a slow machine, a dry run on a loaded CPU)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="run the stages without a CUDA device (to try the script itself; GPU tests then skip)")
    args = ap.parse_args(argv)
    if args.budget <= 0 or args.workers < 0 or args.cap_scale <= 0:
        ap.error("--budget and --cap-scale must be > 0, --workers >= 0")
    t0 = time.monotonic()
    info = probe(args.python)
    if "error" in info or not info.get("cuda"):
        why = info.get("error") or f"torch {info.get('torch')} (CUDA build {info.get('torch_cuda')}) sees no GPU"
        if not args.allow_cpu:
            print(f"gpu-check: no CUDA device ({why}); nothing to check here. Run it on a machine with a GPU.")
            return 0
        print(f"gpu-check: no CUDA device ({why}); --allow-cpu: running the stages anyway (GPU tests skip)")
    device = info.get("device") or "cpu"
    # A run without CUDA (--allow-cpu) stays out of the tracked bench/results/cpu/.
    out = args.out or (ROOT / "bench" / "results" / slug(device) if info.get("cuda") else ROOT / "build" / "gpu-check")
    vpy = str(venv_python(args.venv))
    cmds = stage_commands(vpy, out, args.workers)
    if args.dry_run:
        print(f"gpu-check plan: device {device!r}, results in {out}, budget {args.budget:.0f} s")
        for st in STAGES:
            if st.name not in args.stages:
                continue
            print(f"[{st.name}] at most {st.cap_s:.0f} s")
            if st.name == "build":
                make_venv, install = build_commands(args.python, args.venv)
                print("   ", " ".join(make_venv))
                print(f"    (_gpu_check_parent.pth in its site-packages: {info.get('paths')})")
                print("   ", " ".join(install), f"(TORCH_CUDA_ARCH_LIST={info.get('capability')})")
            else:
                print("   ", " ".join(cmds[st.name]))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    host = host_info()
    deadline = t0 + args.budget
    stages = [Stage(s.name, s.cap_s * args.cap_scale, s.reserve_s * args.cap_scale)
              for s in STAGES if s.name in args.stages]
    carry = 0.0
    for i, st in enumerate(stages):
        later = sum(s.reserve_s for s in stages[i + 1:])
        left = min(st.cap_s + carry, deadline - time.monotonic() - later)
        started = time.monotonic()
        if left < 10:
            st.result = {"rc": None, "seconds": 0, "timed_out": False, "skipped": "no time left"}
            continue
        print(f"gpu-check: [{st.name}] up to {left:.0f} s", flush=True)
        try:
            st.result = _run_stage(st, args, info, out, cmds, vpy, left)
        except Exception as exc:  # noqa: BLE001  (a broken stage is reported; the next one still runs)
            st.result = {"rc": None, "seconds": 0, "timed_out": False, "skipped": f"crashed: {exc!r}"[:300]}
        carry = max(0.0, left - (time.monotonic() - started))
    summary = write_summary(out, info, host, stages, time.monotonic() - t0)
    print(summary)
    return 0


def _run_stage(st: Stage, args, info: dict, out: Path, cmds: dict, vpy: str, left: float) -> dict:
    if st.name == "build":
        return _build(args.python, info.get("paths", []), args.venv, out / "build.log", time.monotonic() + left,
                      info.get("capability"))
    if not venv_python(args.venv).exists():
        return {"rc": None, "seconds": 0, "timed_out": False, "skipped": f"no environment at {args.venv}"}
    env = dict(os.environ, FASTNODE_TEST_CUDA="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = cmds[st.name]
    if st.name == "tests" and args.workers > 1 and not _has_module(vpy, "xdist"):
        cmd = test_command(vpy, 0)
    if st.name in ("kernels", "solvers"):
        cmd = cmd + ["--budget", f"{max(5.0, left - 15):.0f}"]  # the bench stops itself and writes its table
    # One log for both benches: the device tool brings back at most 8 files.
    log = out / ("tests.log" if st.name == "tests" else "bench.log")
    return run_logged(cmd, log, left, env=env, append=st.name == "solvers")


def write_summary(out: Path, info: dict, host: dict, stages: list[Stage], total_s: float) -> str:
    lines = header(info, host) + ["", f"Total {total_s:.0f} s.", "", "| stage | status | seconds |", "|---|---|---|"]
    for st in stages:
        r = st.result
        status = (r.get("skipped") or ("TIMED OUT" if r.get("timed_out") else ("ok" if r.get("rc") == 0
                                                                             else f"FAILED (rc {r.get('rc')})")))
        if st.name == "build" and r.get("ext") is not None:
            status += f"; extension: {'CUDA ops loaded' if r['ext'].get('cuda') else r['ext'].get('why')}"
        if st.name == "build" and "fallback_rc" in r:
            status += f"; installed without the extension (rc {r['fallback_rc']})"
        lines.append(f"| {st.name} | {status} | {r.get('seconds', 0)} |")
    lines += ["", f"Tests: {pytest_counts(out / 'tests.log') or 'no pytest summary'}", "", "Kernels (>= 1 GB moved):"]
    lines += [f"- {x}" for x in kernel_targets(out / "kernels.json")]
    lines += ["", "Solvers:"] + [f"- {x}" for x in solver_targets(out / "solvers.json")]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
