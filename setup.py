"""Build script: Python packages plus the optional C++/CUDA extension ``fastnode._C``.

The extension is compiled only when ``csrc/`` holds sources. ``FASTNODE_SKIP_EXT=1`` skips it;
``FASTNODE_FORCE_CUDA=1`` adds the CUDA sources even when no CUDA device is visible at build time.
"""

import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("FASTNODE_SKIP_EXT", "0") == "1":
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not cpp:
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    want_cuda = bool(cu) and (
        os.environ.get("FASTNODE_FORCE_CUDA", "0") == "1" or (CUDA_HOME is not None and torch.version.cuda is not None)
    )
    # The C++ standard is left to torch.utils.cpp_extension (C++17 or C++20, as the installed torch needs).
    args = {"cxx": ["-O3", "-g0"]}
    if want_cuda:
        args["nvcc"] = ["-O2", "--expt-relaxed-constexpr"]
        ext = CUDAExtension("fastnode._C", cpp + cu, extra_compile_args=args, define_macros=[("WITH_CUDA", None)])
    else:
        ext = CppExtension("fastnode._C", cpp, extra_compile_args=args)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["fastnode", "fastnode.*"]) + ["fastnode.kernels"],
    package_dir={"fastnode.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
