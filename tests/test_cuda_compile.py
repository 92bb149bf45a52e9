"""Compile checks of the CUDA sources, so a syntax or template error fails CI on machines without a
GPU (the CUDA kernels are only built into the extension with a CUDA torch).

- every ``.cu`` file under ``csrc`` compiles with ``nvcc -std=c++20 -arch=sm_90 -c`` (skipped when
  nvcc is not on PATH);
- every ``.cpp`` file under ``csrc/cuda`` (the torch glue) passes a syntax check against the
  installed torch's headers plus the CUDA runtime headers. A CPU torch wheel ships c10/cuda headers but not the
  generated ``c10/cuda/impl/cuda_cmake_macros.h``, so a two-line stand-in is supplied; nothing is
  linked, so this catches compile errors only;
- the host planning of the CUDA top-k (``csrc/cuda/topk_plan.h``) is built and run as a host unit
  test, ``tests/cpp/test_topk_plan.cpp``;
- the CUDA kernels themselves (``csrc/cuda/*_kernels.cuh``, with their launch sequences) are built
  with the host compiler against a CPU emulation of the CUDA subset they use
  (``tests/cpp/cuda_emulator.h``) and run against plain reference loops
  (``tests/cpp/test_*_emulated.cpp``): their logic is tested here, their speed and anything the
  emulation cannot show only on a GPU (the ``cuda`` cases of ``tests/test_op_<op>.py``).
"""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++") or shutil.which("c++")
CU_FILES = sorted(CSRC.rglob("*.cu"))
GLUE_FILES = sorted((CSRC / "cuda").glob("*.cpp"))


def run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stdout}\n{result.stderr}"
    return result


def test_there_are_cuda_sources():
    assert CU_FILES, "no .cu files under csrc"


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("source", CU_FILES, ids=[str(p.relative_to(ROOT)) for p in CU_FILES])
def test_cu_file_compiles_with_nvcc(source, tmp_path):
    run([NVCC, "-std=c++20", "-arch=sm_90", "-I", str(CSRC), "-c", str(source), "-o", str(tmp_path / "out.o")])


def cuda_include_dir():
    if NVCC is None:
        return None
    for candidate in (Path(NVCC).resolve().parents[1] / "include", Path("/usr/local/cuda/include")):
        if (candidate / "cuda_runtime.h").exists():
            return candidate
    return None


@pytest.mark.skipif(CXX is None or cuda_include_dir() is None, reason="no host C++ compiler or no CUDA headers")
@pytest.mark.parametrize("glue", GLUE_FILES, ids=[str(p.relative_to(ROOT)) for p in GLUE_FILES])
def test_torch_glue_passes_syntax_check(glue, tmp_path):
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_MAIN_LIB\n")
    includes = [f"-I{p}" for p in [CSRC, tmp_path, *include_paths(), cuda_include_dir()]]
    run([CXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror", *includes, str(glue)])


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_topk_plan_host_unit_test(tmp_path):
    exe = tmp_path / "test_topk_plan"
    run([CXX, "-std=c++20", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}", f"-I{ROOT / 'tests' / 'cpp'}",
         str(ROOT / "tests" / "cpp" / "test_topk_plan.cpp"),
         "-o", str(exe)])
    assert "topk_plan: ok" in run([str(exe)]).stdout


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
@pytest.mark.parametrize("name", sorted(p.name.removeprefix("test_").removesuffix("_emulated.cpp")
                                         for p in (ROOT / "tests" / "cpp").glob("test_*_emulated.cpp")))
def test_cuda_kernels_on_the_cpu_emulation(name, tmp_path):
    exe = tmp_path / f"test_{name}_emulated"
    run([CXX, "-std=c++20", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", f"-I{CSRC}",
         f"-I{ROOT / 'tests' / 'cpp'}", str(ROOT / "tests" / "cpp" / f"test_{name}_emulated.cpp"), "-o", str(exe)])
    assert f"{name}_emulated: ok" in run([str(exe)]).stdout
