"""Build of the compiled ops.

Every ``lightning_compress/csrc/*.cpp`` file is compiled into ``lightning_compress._C``; CUDA
sources (``csrc/cuda/*.cu``) join them only where both a CUDA toolkit and a CUDA build of torch
exist. Adding an op is its schema in ``lightning_compress/ops/_library.py``, its reference and
fake kernel beside it in ``lightning_compress/ops``, and its kernels in a source file here.

Set ``LIGHTNING_COMPRESS_BUILD_EXT=0`` to install without compiling anything: the library then
runs its pure-PyTorch references (with one warning).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from setuptools import find_namespace_packages, setup

ROOT = Path(__file__).parent
CSRC = Path("lightning_compress") / "csrc"


def _extensions() -> tuple[list, dict]:
    if os.environ.get("LIGHTNING_COMPRESS_BUILD_EXT", "1") == "0":
        print("lightning-compress: LIGHTNING_COMPRESS_BUILD_EXT=0, skipping the compiled ops")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(str(p) for p in (CSRC).glob("*.cpp"))
    cuda_sources = sorted(str(p) for p in (CSRC / "cuda").glob("*.cu"))
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and CUDA_HOME is not None
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        # Kernels pick their SIMD path at run time; the baseline build must run on any x86-64.
        cxx.append("-mno-avx512f")
    extra = {"cxx": cxx}
    if use_cuda:
        extra["nvcc"] = ["-O3", "-std=c++17"]
    ext = (CUDAExtension if use_cuda else CppExtension)(
        "lightning_compress._C",
        sources + cuda_sources if use_cuda else sources,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        define_macros=[("Py_LIMITED_API", "0x030A0000")],
        py_limited_api=True,
    )
    return [ext], {"build_ext": BuildExtension}


# The Hydra app's configs/ and recipes/ (linked in as configs/recipe) stay at the top of the
# repository; the wheel ships them as this data package, where the app looks first
# (lightning_compress.app.main.config_dir), so a non-editable install runs every recipe.
CONFIGS_PACKAGE = "lightning_compress._configs"

ext_modules, cmdclass = _extensions()
setup(
    packages=[*find_namespace_packages(include=["lightning_compress*"]), CONFIGS_PACKAGE],
    package_dir={CONFIGS_PACKAGE: "configs"},
    package_data={CONFIGS_PACKAGE: ["**/*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
