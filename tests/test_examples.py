"""The README snippets are runnable examples (examples/*.py); run them as a user would, each under a
hard timeout, and check that they train (the loss falls)."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow
@pytest.mark.parametrize("script", ["ddp_hook.py", "plain_loop.py"])
def test_example_trains(script):
    # A session of its own, so that a timeout kills the spawned ranks too, not only the launcher.
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"examples/{script} still running after 180 s: killed")
    assert proc.returncode == 0, out + err
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", out)]
    assert len(losses) == 2 and losses[1] < 0.8 * losses[0], out
