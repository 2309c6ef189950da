"""Build of fastreg-kernels: the Python package and one extension, fastreg._C.

The C++ CPU kernels are always built; the CUDA kernels whenever a CUDA toolkit and a CUDA
build of torch are present -- a GPU is not needed to compile them.
    FASTREG_BUILD_CUDA=0          CPU kernels only
    FASTREG_CUDA_ARCHS="8.0;9.0"  target architectures (TORCH_CUDA_ARCH_LIST format); unset:
                                  TORCH_CUDA_ARCH_LIST if set, else the visible GPUs' own, else 8.0;9.0
    MAX_JOBS                      parallel compile jobs (default: every core this process may use)
Build against the torch already installed, with no network:
    pip install --no-build-isolation --no-deps --no-index -e .
(`make build SYSTEM_TORCH=1 PYTHON=python3` runs exactly this; the README has the details.)

fastreg.triton_kernels is the folder fastreg/triton_kernels, a symbolic link to the
top-level triton_kernels/: every install mode of every setuptools from 61 on (a regular
wheel, a PEP 660 editable install, a legacy `setup.py develop`) then finds it where the
package's own folder says, with no package_dir mapping that older editable modes ignore.
"""

import glob
import os
import sys

# Before torch.utils.cpp_extension reads it: with nvcc on PATH as /usr/local/bin/nvcc, torch
# would infer CUDA_HOME=/usr/local and miss the toolkit's libraries.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _build_cuda() -> bool:
    if os.environ.get("FASTREG_BUILD_CUDA", "auto") == "0":
        return False
    return CUDA_HOME is not None and torch.version.cuda is not None


def cuda_archs() -> str:
    """The architectures nvcc compiles for: an explicit choice, else the GPUs present (one
    architecture's kernels instead of two halves the CUDA build), else sm_80 and sm_90."""
    for variable in ("FASTREG_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST"):
        if os.environ.get(variable):
            return os.environ[variable]
    if torch.cuda.is_available():
        capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(capabilities))
    return DEFAULT_CUDA_ARCHS


class _BuildExtension(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension compiling into build/temp-<python>-torch<version>-<kernels>.

    pip builds (editable installs too) in a new temporary folder each time, so every build
    recompiled every file; in a fixed folder per configuration ninja recompiles only the
    sources whose command line or dependencies changed."""

    def finalize_options(self):
        if self.build_temp is None:  # not chosen on the command line
            kernels = "cuda" if _build_cuda() else "cpu"
            tag = f"{sys.implementation.cache_tag}-torch{torch.__version__}-{kernels}"
            self.build_temp = os.path.join(ROOT, "build", f"temp-{tag}")
        super().finalize_options()


def _extension():
    sources = _sources("csrc/**/*.cpp")
    # the C++ standard is the one torch asks for (C++17 with torch 2.11, C++20 later: the
    # code is C++17); -Wno-psabi: csrc/cpu/vectorize.h passes 32-byte vectors between
    # inlined functions, which GCC warns about for the SSE build;
    # -fno-math-errno: sqrt becomes one (vectorizable) instruction instead of a call that
    # sets errno -- the results are the same IEEE square roots; -fno-trapping-math lets GCC
    # vectorize clamps and selects (the SiLU exp of group_norm.cpp)
    cxx_flags = ["-O3", "-fopenmp", "-Wno-psabi", "-fno-math-errno", "-fno-trapping-math"]
    # TORCH_ASSERT_ONLY_METHOD_OPERATORS: a source that includes ATen/ATen.h (every operator's
    # declaration) fails to compile; sources include ATen/core/Tensor.h and the ATen/ops/*.h
    # they call, which takes about 30% off each CUDA file's nvcc time
    macros = [("TORCH_ASSERT_ONLY_METHOD_OPERATORS", None)]
    common = dict(
        name="fastreg._C",
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_link_args=["-fopenmp"],
    )
    if not _build_cuda():
        return CppExtension(sources=sources, define_macros=macros, extra_compile_args={"cxx": cxx_flags}, **common)
    # Without a GPU torch would target every architecture it knows: name them.
    os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_archs()
    print(f"fastreg: CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}, {os.environ['MAX_JOBS']} jobs")
    return CUDAExtension(
        sources=sources + _sources("csrc/**/*.cu"),
        define_macros=macros + [("FASTREG_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        **common,
    )


if __name__ == "__main__":  # pip and `python setup.py` run it so; tests import cuda_archs
    # torch's own default is ninja's (cores + 2); a job per core that this process may use
    # (a container's CPU set, not the host's count).
    os.environ.setdefault("MAX_JOBS", str(len(os.sched_getaffinity(0))))
    setup(
        name="fastreg-kernels",
        version="0.1.0",
        description="Fused, exact kernels for regularization and normalization layers (Triton, CUDA, C++)",
        # the tested range (README, "Supported versions"); the extension is built against the
        # torch installed at build time and must run with that same torch
        python_requires=">=3.10",
        install_requires=["torch>=2.11,<2.16"],
        packages=find_packages(include=["fastreg", "fastreg.*"]),  # fastreg/triton_kernels included (a link)
        ext_modules=[_extension()],
        cmdclass={"build_ext": _BuildExtension},
    )
