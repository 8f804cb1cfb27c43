#!/usr/bin/env bash
# Compile (no link, nothing runs) every csrc/cuda/*.cu with nvcc against the headers of a CUDA build of torch,
# so CUDA code cannot rot on machines without a GPU. The CPU torch has no CUDA headers: the headers are taken
# from the CUDA torch wheel (only torch/include is unpacked, about a second), with the CUDA runtime headers of
# the local toolkit. Usage: csrc/cuda_compile_check.sh PYTHON
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
TORCH_CUDA_VERSION=${TORCH_CUDA_VERSION:-2.14.1}
OUT=build/cuda-check
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then echo "cuda-check: nvcc not found (set NVCC)"; exit 1; fi
mkdir -p "$OUT/wheel"
whl=$(ls /opt/pypi-more/files/torch-"$TORCH_CUDA_VERSION"-cp311-*.whl 2>/dev/null | head -1 || true)
if [ -z "$whl" ]; then
  whl=$(ls "$OUT"/wheel/torch-"$TORCH_CUDA_VERSION"-*.whl 2>/dev/null | head -1 || true)
fi
if [ -z "$whl" ]; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: "torch==$TORCH_CUDA_VERSION" -d "$OUT/wheel"
  whl=$(ls "$OUT"/wheel/torch-"$TORCH_CUDA_VERSION"-*.whl | head -1)
fi
inc="$OUT/headers-$TORCH_CUDA_VERSION"
if [ ! -d "$inc/torch/include" ]; then
  rm -rf "$inc" && mkdir -p "$inc"
  unzip -q "$whl" 'torch/include/*' -d "$inc"
fi
pyinc=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
cuda_home=$(dirname "$(dirname "$NVCC")")
for cu in csrc/cuda/*.cu; do
  obj="$OUT/$(basename "${cu%.cu}").o"
  echo "cuda-check: $NVCC -c $cu (torch $TORCH_CUDA_VERSION headers, sm_90)"
  "$NVCC" -std=c++20 -O2 --expt-relaxed-constexpr -Xcompiler -fPIC -gencode arch=compute_90,code=sm_90 \
    -D_GLIBCXX_USE_CXX11_ABI=1 -DWITH_CUDA -DTORCH_EXTENSION_NAME=_C \
    -I "$inc/torch/include" -I "$inc/torch/include/torch/csrc/api/include" -I "$cuda_home/include" -I "$pyinc" \
    -c "$cu" -o "$obj"
done
echo "cuda-check: ok ($(ls csrc/cuda/*.cu | wc -l) file(s) compiled)"
