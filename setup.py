"""Build the kernels as two extensions that fail independently:

- mas_fast._C: the op schemas and the C++ (CPU, OpenMP) kernels — always attempted;
- mas_fast._C_cuda: the CUDA kernels — where a CUDA toolkit and a CUDA build of torch exist.

A part that fails prints one line and leaves the install working (a failed CUDA build never
costs the CPU kernels; with no C++ compiler the package runs on the reference backend). Each
part's outcome goes to mas_fast/_build_status.json, which `python -m mas_fast info` reports.

Environment: MAS_FAST_NO_EXT=1 builds nothing; MAS_FAST_NO_CUDA=1 skips the CUDA part;
MAS_FAST_REQUIRE_EXT=1 (CI) turns a failed part into a build error — the CPU part always, the
CUDA part when a toolkit was found or named (a machine without one still builds);
MAS_FAST_FORCE_CUDA_FAILURE=1 makes the CUDA part fail to compile (tests of the above).
The CUDA toolkit is the first of CUDA_HOME, CUDA_PATH, the real path behind `nvcc` on PATH and
/usr/local/cuda that holds include/cuda_runtime_api.h (a wrapper script is not a toolkit).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Optional

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
STATUS_FILE = "_build_status.json"
CPU, CUDA = "mas_fast._C", "mas_fast._C_cuda"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _sources(*patterns: str) -> list[str]:
    found = (os.path.relpath(p, ROOT) for pattern in patterns for p in glob.glob(os.path.join(ROOT, pattern)))
    return sorted(set(found))


def _is_toolkit(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "include", "cuda_runtime_api.h"))


def find_cuda_home() -> tuple[Optional[str], Optional[str]]:
    """(toolkit root, None), or (None, why there is none); a named but broken root is reported."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            if _is_toolkit(root):
                return root, None
            return None, f"{var}={root} is not a CUDA toolkit (no include/cuda_runtime_api.h)"
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for root in candidates + ["/usr/local/cuda"]:
        if _is_toolkit(root):
            return root, None
    return None, "no CUDA toolkit found (CUDA_HOME, CUDA_PATH, nvcc on PATH, /usr/local/cuda)"


def _first_error_line(log: str, exc: BaseException) -> str:
    """The compiler's (or linker's) first error line in `log`, else the exception's message."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if re.search(r"\berror\b", line, re.IGNORECASE) and "Error compiling objects" not in line:
            linker = [x for x in lines[:i] if re.search(r"\bld: ", x)] if "collect2" in line else []
            return (linker[0] if linker else line).strip()
    return f"{type(exc).__name__}: {exc}"


class _CapturedOutput:
    """Copies of everything written to fds 1 and 2 (compiler subprocesses included), replayed
    to the real stderr on exit, so that a failure can quote the compiler's error line."""

    def __enter__(self) -> "_CapturedOutput":
        sys.stdout.flush()
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile()
        self.saved = [os.dup(1), os.dup(2)]
        for fd in (1, 2):
            os.dup2(self.file.fileno(), fd)
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)
        self.file.seek(0)
        self.text = self.file.read().decode(errors="replace")
        self.file.close()
        sys.stderr.write(self.text)


def _extensions_and_cmdclass():
    if _flag("MAS_FAST_NO_EXT"):
        return [], {}
    try:
        import torch
    except ImportError:  # torch missing from the build environment: pure-Python install
        print("mas_fast: torch not importable at build time; skipping the C++ and CUDA kernels", file=sys.stderr)
        return [], {}

    # What the CUDA part needs, decided before cpp_extension is imported (it reads CUDA_HOME
    # once, and guesses wrong from a wrapper `nvcc` outside the toolkit).
    cuda_sources = _sources("csrc/cuda/*.cu")
    cuda_home, no_cuda = find_cuda_home()
    cuda_named = cuda_home is not None or bool(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"))
    if _flag("MAS_FAST_NO_CUDA"):
        no_cuda, cuda_named = "MAS_FAST_NO_CUDA is set", False
    elif not torch.version.cuda:
        no_cuda, cuda_named = "torch is a CPU-only build", False
    elif not cuda_sources:
        no_cuda, cuda_named = "no CUDA sources", False
    if cuda_home is not None and no_cuda is None:
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    # Recent torch headers require C++20. No -ffast-math: results stay IEEE (Kahan sums intact);
    # -fno-trapping-math / -fno-math-errno only let GCC vectorise loops with selects and sqrt,
    # and -fno-wrapv undoes Python's -fwrapv, which halves the speed of the kernels' loops.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-fno-wrapv"]
    include = [os.path.join(ROOT, "csrc")]
    extensions = [cpp_extension.CppExtension(
        CPU, _sources("csrc/ops.cpp", "csrc/validation.cpp", "csrc/cpu/*.cpp"), include_dirs=include,
        extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]
    if no_cuda is None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        force = [("MAS_FAST_FORCE_CUDA_FAILURE", "1")] if _flag("MAS_FAST_FORCE_CUDA_FAILURE") else []
        host = _sources("csrc/cuda/register.cpp", "csrc/cuda/host.cpp", "csrc/validation.cpp")
        extensions.append(cpp_extension.CUDAExtension(
            CUDA, host + cuda_sources, include_dirs=include, define_macros=force,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20"]}))

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Builds each part on its own; records in _build_status.json why a part is missing."""

        def run(self) -> None:
            self.status = {CPU: None, CUDA: None if no_cuda is None else f"not built: {no_cuda}"}
            if no_cuda is not None and cuda_named and _flag("MAS_FAST_REQUIRE_EXT"):
                raise RuntimeError(f"mas_fast: the CUDA part cannot be built: {no_cuda}")
            if no_cuda is not None:
                print(f"mas_fast: CUDA kernels not built: {no_cuda}", file=sys.stderr)
            in_source = self.inplace or getattr(self, "editable_mode", False)  # run() resets inplace
            try:
                super().run()
            finally:
                self._write_status(in_source)

        def build_extension(self, ext) -> None:
            out = _CapturedOutput()
            try:
                with out:
                    super().build_extension(ext)
            except Exception as exc:  # compiler missing or failing: keep the other part
                line = _first_error_line(getattr(out, "text", ""), exc)
                part = "CUDA part" if ext.name == CUDA else "C++ (CPU) part"
                self.status[ext.name] = f"{part} failed to build: {line}"
                print(f"mas_fast: {self.status[ext.name]}", file=sys.stderr)
                if _flag("MAS_FAST_REQUIRE_EXT"):
                    raise
                stale = self.get_ext_fullpath(ext.name)  # an earlier build's library must not ship
                if os.path.exists(stale):
                    os.remove(stale)

        def _built(self) -> list:
            status = getattr(self, "status", {})
            return [e for e in self.extensions if status.get(e.name) is None]

        def copy_extensions_to_source(self) -> None:
            """In-place/editable builds: copy the parts that built, remove stale copies of the others."""
            for name, reason in self.status.items():
                stale = os.path.join(ROOT, self.get_ext_filename(name))
                if reason is not None and os.path.exists(stale):
                    os.remove(stale)
            every, self.extensions = self.extensions, self._built()
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = every

        def get_outputs(self) -> list[str]:
            every, self.extensions = self.extensions, self._built()
            try:
                return super().get_outputs()
            finally:
                self.extensions = every

        def _write_status(self, in_source: bool) -> None:
            """Next to the built extensions, and in the source tree for in-place/editable builds."""
            dirs = {os.path.join(self.build_lib, "mas_fast")}
            if in_source:
                dirs.add(os.path.join(ROOT, "mas_fast"))
            for d in dirs:
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, STATUS_FILE), "w") as f:
                    json.dump(self.status, f, indent=1)

    use_ninja = shutil.which("ninja") is not None
    return extensions, {"build_ext": OptionalBuildExt.with_options(use_ninja=use_ninja)}


if __name__ == "__main__":  # setuptools runs setup.py as __main__; tests import find_cuda_home
    ext_modules, cmdclass = _extensions_and_cmdclass()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
