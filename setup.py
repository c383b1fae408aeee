"""Build mas_fast._C: C++ (CPU) kernels always, CUDA kernels when nvcc and a CUDA torch exist.

The extension is optional: with no compiler (or MAS_FAST_NO_EXT=1) the package installs
pure-Python and runs on the reference backend; `python -m mas_fast info` says so.
MAS_FAST_REQUIRE_EXT=1 turns a failed build into an error (CI uses it to catch breakage).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions_and_cmdclass():
    if _flag("MAS_FAST_NO_EXT"):
        return [], {}
    cpp = _sources("csrc/ops.cpp") + _sources("csrc/cpu/*.cpp")
    if not cpp:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # torch missing from the build environment: pure-Python install
        print("mas_fast: torch not importable at build time; skipping mas_fast._C", file=sys.stderr)
        return [], {}

    # Recent torch headers require C++20. No -ffast-math: results stay IEEE (Kahan sums intact);
    # -fno-trapping-math / -fno-math-errno only let GCC vectorise loops with selects and sqrt,
    # and -fno-wrapv undoes Python's -fwrapv, which halves the speed of the kernels' loops.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-fno-wrapv"]
    cu = _sources("csrc/cuda/*.cu")
    cuda_home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME
    nvcc = cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    with_cuda = bool(cu and nvcc and torch.version.cuda and not _flag("MAS_FAST_NO_CUDA"))
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = cpp_extension.CUDAExtension(
            "mas_fast._C",
            cpp + cu,
            define_macros=[("MAS_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "mas_fast._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )

    use_ninja = shutil.which("ninja") is not None

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Builds the extension; a failure leaves a working pure-Python install unless required."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # compiler missing or broken: keep the reference backend
                if _flag("MAS_FAST_REQUIRE_EXT"):
                    raise
                print(f"mas_fast: building mas_fast._C failed ({exc}); "
                      "installing without it (reference backend only)", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = _extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
