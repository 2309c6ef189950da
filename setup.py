"""Build of fastreg-kernels: the Python package and one extension, fastreg._C.

The C++ CPU kernels are always built; the CUDA kernels whenever a CUDA toolkit and a CUDA
build of torch are present -- a GPU is not needed to compile them.
    FASTREG_BUILD_CUDA=0        CPU kernels only
    FASTREG_CUDA_ARCHS="8.0;9.0"  target architectures (TORCH_CUDA_ARCH_LIST format)
Build with `pip install -e . --no-build-isolation` (torch must already be installed).
"""

import glob
import os

# Before torch.utils.cpp_extension reads it: with nvcc on PATH as /usr/local/bin/nvcc, torch
# would infer CUDA_HOME=/usr/local and miss the toolkit's libraries.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _build_cuda() -> bool:
    if os.environ.get("FASTREG_BUILD_CUDA", "auto") == "0":
        return False
    return CUDA_HOME is not None and torch.version.cuda is not None


def _extension():
    sources = _sources("csrc/*.cpp") + _sources("csrc/autograd/*.cpp") + _sources("csrc/cpu/*.cpp")
    # the C++ standard is the one torch asks for; -Wno-psabi: csrc/cpu/vectorize.h passes
    # 32-byte vectors between inlined functions, which GCC warns about for the SSE build;
    # -fno-math-errno: sqrt becomes one (vectorizable) instruction instead of a call that
    # sets errno -- the results are the same IEEE square roots; -fno-trapping-math lets GCC
    # vectorize clamps and selects (the SiLU exp of group_norm.cpp)
    cxx_flags = ["-O3", "-fopenmp", "-Wno-psabi", "-fno-math-errno", "-fno-trapping-math"]
    common = dict(
        name="fastreg._C",
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_link_args=["-fopenmp"],
    )
    if not _build_cuda():
        return CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)
    # Without a GPU torch would target every architecture it knows: name them.
    os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("FASTREG_CUDA_ARCHS", "8.0;9.0")
    return CUDAExtension(
        sources=sources + _sources("csrc/cuda/*.cu"),
        define_macros=[("FASTREG_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        **common,
    )


setup(
    name="fastreg-kernels",
    version="0.1.0",
    description="Fused, exact kernels for regularization and normalization layers (Triton, CUDA, C++)",
    python_requires=">=3.10",
    install_requires=["torch"],
    packages=["fastreg", "fastreg.nn", "fastreg.optim", "fastreg.bench", "fastreg.triton_kernels"],
    package_dir={"fastreg.triton_kernels": "triton_kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
