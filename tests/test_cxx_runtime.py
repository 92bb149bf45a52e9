"""The compiled module uses one C++ runtime: the process's libstdc++.so.6.

torch's wheels export copies of some libstdc++ functions from libc10/libtorch (the pieces their
gcc-toolset links in statically). When libstdc++.so.6 came after the torch libraries among the
module's DT_NEEDED entries, the loader bound the module's ``std::ostringstream`` constructor and
``basic_stringbuf::str()`` to those copies and the rest of the stream code to libstdc++.so.6: the
stream that formats every TORCH_CHECK message was served by two runtimes. The CMakeLists.txt names
libstdc++ first; these tests check the ELF entry and, with the loader's own binding trace
(``LD_DEBUG=bindings``), where each C++ runtime symbol of the module actually comes from.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

READELF = shutil.which("readelf")
NM = shutil.which("nm")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or READELF is None or NM is None,
                                reason="needs Linux (glibc's loader) and binutils' readelf and nm")

# Formats two int64 values into a TORCH_CHECK message, the path that crashed on the GPU machine.
FAILING_CHECK = """
import torch, deft_kernels
try:
    torch.ops.deft_kernels.segmented_topk(torch.randn(10), torch.tensor([0, 4, 11]), torch.tensor([1, 2]), None, 0)
except RuntimeError as e:
    print(e)
"""
BINDING = re.compile(r"binding file (\S+) \[\d+\] to (\S+) \[\d+\]: \w+ symbol `([^']+)'")


def module_path():
    import torch  # noqa: F401  (the module needs libc10 loaded first)

    from deft_kernels import _C

    return Path(_C.__file__)


def needed(path):
    out = subprocess.run([READELF, "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def test_libstdcxx_is_the_first_library_searched():
    libs = needed(module_path())
    assert "libstdc++.so.6" in libs, f"the module does not load the shared C++ runtime: {libs}"
    torch_libs = [i for i, name in enumerate(libs) if name.startswith(("libc10", "libtorch"))]
    assert libs.index("libstdc++.so.6") < min(torch_libs), f"libstdc++.so.6 comes after torch's libraries: {libs}"


def test_every_cxx_runtime_symbol_binds_to_libstdcxx(tmp_path):
    module = module_path()
    env = dict(os.environ, LD_DEBUG="bindings", LD_DEBUG_OUTPUT=str(tmp_path / "ld"))
    run = subprocess.run([sys.executable, "-c", FAILING_CHECK], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "offsets[-1] must equal the vector length 10, got 11" in run.stdout
    bindings = [m.groups() for f in tmp_path.glob("ld.*") for m in BINDING.finditer(f.read_text())]
    from_module = [(target, symbol) for source, target, symbol in bindings if Path(source) == module]
    libstdcxx = {target for target, _ in from_module if Path(target).name == "libstdc++.so.6"}
    assert len(libstdcxx) == 1, f"the module binds nothing, or several files, as libstdc++.so.6: {libstdcxx}"
    defined = subprocess.run([NM, "-D", "--defined-only", "--format=posix", *libstdcxx], capture_output=True,
                             text=True, check=True).stdout
    runtime = {line.split()[0].split("@")[0] for line in defined.splitlines()}
    # The module's own vague-linkage definitions (typeinfo of a template it instantiates) bind to
    # itself; anything else the C++ runtime defines must come from the C++ runtime.
    elsewhere = sorted({(symbol, target) for target, symbol in from_module
                        if symbol in runtime and target not in libstdcxx and Path(target) != module})
    assert not elsewhere, "C++ runtime symbols served by another library:\n" + "\n".join(
        f"{symbol} -> {target}" for symbol, target in elsewhere)
