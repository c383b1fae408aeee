"""The install never loses the C++ kernels to the CUDA part, and says why a part is missing.

- setup.py finds the CUDA toolkit where users have it, and never takes a wrapper `nvcc`
  outside a toolkit tree for one;
- the reason setup.py recorded (mas_fast/_build_status.json) is what `unavailable_reason()`
  and `python -m mas_fast info` report;
- end to end (slow): a build in a temporary copy whose CUDA part fails still has `cpp`
  available, and `info` names the CUDA error.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mas_fast import ops
from mas_fast.ops import cpp, cuda

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module (its setup() call runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("mas_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_toolkit(root: Path) -> Path:
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime_api.h").write_text("")
    (root / "bin").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    return root


@pytest.fixture
def no_cuda_env(monkeypatch, tmp_path):
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(os.path, "isfile", lambda p, real=os.path.isfile: real(p) and "/usr/local/cuda" not in p)


def test_a_wrapper_nvcc_outside_the_toolkit_is_not_taken_for_one(setup_py, no_cuda_env, monkeypatch, tmp_path):
    wrapper_dir = tmp_path / "wrapper" / "bin"  # like /usr/local/bin/nvcc: `exec /usr/local/cuda-X/bin/nvcc`
    wrapper_dir.mkdir(parents=True)
    (wrapper_dir / "nvcc").write_text("#!/bin/sh\nexec /somewhere/else/nvcc \"$@\"\n")
    (wrapper_dir / "nvcc").chmod(0o755)
    monkeypatch.setenv("PATH", str(wrapper_dir))
    home, why = setup_py.find_cuda_home()
    assert home is None and "no CUDA toolkit found" in why


def test_nvcc_symlinked_into_path_leads_to_its_toolkit(setup_py, no_cuda_env, monkeypatch, tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda-12.9")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert setup_py.find_cuda_home() == (str(toolkit), None)


def test_cuda_home_wins_and_a_broken_one_is_reported(setup_py, no_cuda_env, monkeypatch, tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_PATH", str(toolkit))
    assert setup_py.find_cuda_home() == (str(toolkit), None)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "missing"))
    home, why = setup_py.find_cuda_home()
    assert home is None and why == f"CUDA_HOME={tmp_path / 'missing'} is not a CUDA toolkit " \
                                   "(no include/cuda_runtime_api.h)"


def test_first_error_line_quotes_the_compiler(setup_py):
    log = "[1/3] c++ ...\nregister.cpp:21:2: error: #error \"forced\"\nninja: build stopped\n"
    assert setup_py._first_error_line(log, RuntimeError("x")) == 'register.cpp:21:2: error: #error "forced"'
    assert setup_py._first_error_line("", RuntimeError("no nvcc")) == "RuntimeError: no nvcc"


def test_recorded_build_failures_are_the_reported_reasons(monkeypatch, tmp_path, capsys):
    status = tmp_path / "_build_status.json"
    status.write_text(json.dumps({"mas_fast._C": "C++ (CPU) part failed to build: ops.cpp:1: error: boom",
                                  "mas_fast._C_cuda": "CUDA part failed to build: register.cpp:2: error: bang"}))
    monkeypatch.setattr(cpp, "BUILD_STATUS", status)
    assert cpp.build_failure("mas_fast._C_cuda") == "CUDA part failed to build: register.cpp:2: error: bang"
    monkeypatch.setattr(cpp, "_IMPORT_ERROR", "No module named 'mas_fast._C'")
    assert cpp.unavailable_reason() == ("the C++ extension mas_fast._C is not built: C++ (CPU) part failed to "
                                        "build: ops.cpp:1: error: boom")
    monkeypatch.setattr(cpp, "_IMPORT_ERROR", None)
    monkeypatch.setattr(cuda, "_IMPORT_ERROR", "No module named 'mas_fast._C_cuda'")
    assert cuda.unavailable_reason() == ("mas_fast._C_cuda (the CUDA kernels): CUDA part failed to build: "
                                         "register.cpp:2: error: bang")
    from mas_fast.__main__ import info

    monkeypatch.setattr(ops, "_LOADED", {})  # backend_status() asks the backends again
    info()
    out = capsys.readouterr().out
    assert "register.cpp:2: error: bang" in out


def test_no_status_file_keeps_the_generic_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(cpp, "BUILD_STATUS", tmp_path / "absent.json")
    monkeypatch.setattr(cpp, "_IMPORT_ERROR", "No module named 'mas_fast._C'")
    assert "pip install --no-build-isolation -e ." in cpp.unavailable_reason()


# --------------------------------------------------------------------------- end to end


def _copy_project(dst: Path) -> None:
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dst / name)
    shutil.copytree(ROOT / "csrc", dst / "csrc")
    shutil.copytree(ROOT / "mas_fast", dst / "mas_fast",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "_build_status.json"))


# The probes import the copy's mas_fast only: an editable install of this checkout would
# otherwise supply the extension module the copy failed to build.
_ONLY_THE_COPY = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
                  "if '__editable__' not in getattr(f, '__module__', '')]; ")


@pytest.mark.slow
def test_a_failed_cuda_build_keeps_the_cpu_kernels_and_says_why(tmp_path):
    _copy_project(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("MAS_FAST_REQUIRE_EXT", "MAS_FAST_NO_CUDA")}
    if (importlib.util.find_spec("torch") and __import__("torch").version.cuda
            and Path(env.get("CUDA_HOME", "/usr/local/cuda"), "include", "cuda_runtime_api.h").exists()):
        env["MAS_FAST_FORCE_CUDA_FAILURE"] = "1"  # a real compile error in the CUDA part
        expected = "CUDA part failed to build: "
    else:
        env["CUDA_HOME"] = str(tmp_path / "no-such-toolkit")
        expected = "is not a CUDA toolkit"
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stderr[-3000:]
    assert expected in build.stderr
    forced = env.pop("MAS_FAST_FORCE_CUDA_FAILURE", None) is not None
    probe = ("from mas_fast.ops import cpp, cuda; print(cpp.unavailable_reason()); "
             "print(cuda.unavailable_reason())")
    run = subprocess.run([sys.executable, "-c", _ONLY_THE_COPY + probe], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    cpp_reason, cuda_reason = run.stdout.splitlines()[-2:]
    assert cpp_reason == "None", run.stdout + run.stderr
    assert expected in cuda_reason
    if forced:
        assert "MAS_FAST_FORCE_CUDA_FAILURE is set" in cuda_reason  # the compiler's own error line
    info = subprocess.run([sys.executable, "-c", _ONLY_THE_COPY + "import sys, runpy; sys.argv = ['mas_fast', 'info']; "
                           "runpy.run_module('mas_fast', run_name='__main__', alter_sys=True)"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert expected in info.stdout, info.stdout + info.stderr
