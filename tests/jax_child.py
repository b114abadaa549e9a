"""Run a script on the JAX backend (CPU) in a child process and read the JSON it prints after `RESULT `."""

import json
import os
import subprocess
import sys
from pathlib import Path


def run_on_jax(script: str, *args: str, timeout: float = 600) -> dict:
    """The `RESULT {...}` line of `script` run with KERAS_BACKEND=jax; fails the test with its stderr otherwise."""
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:]
    return json.loads(lines[-1][len("RESULT "):])
