"""The README snippets and integrations are runnable examples (examples/*.py); run them as a user
would, each under a hard timeout, and check that they train (the loss falls) and, where the example
reports it, that the hook really ran (its sparse steps)."""

import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TIMEOUT_S = 240


def _needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed (it comes with the test extra: pip install '.[test]')")


@pytest.mark.slow
@pytest.mark.parametrize("launcher,script", [
    pytest.param([sys.executable], "ddp_hook.py", id="ddp_hook"),
    pytest.param([sys.executable], "plain_loop.py", id="plain_loop"),
    pytest.param(TORCHRUN, "ddp_hook.py", id="torchrun-ddp_hook"),
    pytest.param([sys.executable], "lightning_ddp.py", id="lightning", marks=_needs("lightning")),
    pytest.param(TORCHRUN, "accelerate_ddp.py", id="torchrun-accelerate", marks=_needs("accelerate")),
])
def test_example_trains(launcher, script):
    # A session of its own, so that a timeout kills the spawned ranks too, not only the launcher.
    proc = subprocess.Popen([*launcher, str(EXAMPLES / script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"examples/{script} still running after {TIMEOUT_S} s: killed")
    assert proc.returncode == 0, out + err
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", out)]
    assert len(losses) == 2 and losses[1] < 0.8 * losses[0], out
    sparse = re.search(r"sparse steps (\d+)", out)
    if sparse:  # 60 steps, 10 of them the warm-up
        assert int(sparse.group(1)) == 50, out
