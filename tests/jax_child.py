"""Run a script on the JAX backend (CPU) in a long-lived child process and read the JSON it prints after `RESULT `.

A Keras backend is chosen once per process, so the JAX side of a test runs in
a child. Importing JAX, Keras and keras-hub costs a fresh interpreter 20-30 s
of CPU, so the suite keeps one worker per device count for the whole session
and sends it scripts: each runs in a fresh `__main__` namespace with
`sys.argv` set to its arguments, its `print`s captured, then the worker
clears Keras's session and its dtype policy and distribution so the next
script starts from Keras's defaults.

    out = run_on_jax(SCRIPT, str(model_dir))            # one CPU device
    out = run_on_jax(SCRIPT, str(data), devices=2)      # two (XLA's forced host device count)

`WORKERS_STARTED` counts the workers started in this process; the session's
finish hook (tests/conftest.py) logs it and fails the run past `MAX_WORKERS`.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_WORKERS = 2  # one per device count the suite needs: 1 (most tests) and 2 (data-parallel training)
WORKERS_STARTED: list[int] = []  # the device count of each worker started, in order

# The suite's collector thresholds: Python's default 700 and 10 for the young generations, full collections a
# tenth as often (100 in place of 10). A worker keeps several models and their traced graphs alive, about a
# million tracked objects, so each full collection takes 0.2-0.7 s (BUILD_NOTES.md, "Seventh pass").
GC_THRESHOLDS = (700, 10, 100)

_workers: dict[int, "JaxWorker"] = {}
_lock = threading.Lock()


class JaxWorker:
    """One `KERAS_BACKEND=jax` child that runs scripts sent to it, one at a time."""

    def __init__(self, devices: int = 1):
        self.devices = devices
        env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
                   PYTHONUNBUFFERED="1")
        if devices > 1:
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"jax-worker-{devices}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.jax_child"], cwd=ROOT, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        WORKERS_STARTED.append(devices)

    def run(self, script: str, args: tuple, timeout: float) -> dict:
        """The worker's answer: {"stdout": ..., "error": traceback or None}."""
        self.proc.stdin.write(json.dumps({"script": script, "args": list(args)}) + "\n")
        self.proc.stdin.flush()
        answer: list = []
        reader = threading.Thread(target=lambda: answer.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not answer or not answer[0]:
            self.stop()
            raise AssertionError(f"the JAX worker ({self.devices} device(s)) "
                                 f"{'timed out after %g s' % timeout if not answer else 'died'}:\n{self.stderr()}")
        return json.loads(answer[0])

    def stderr(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-3000:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)


def run_on_jax(script: str, *args: str, devices: int = 1, timeout: float = 600) -> dict:
    """The last `RESULT {...}` line `script` prints on the JAX backend; fails the test with its error otherwise.

    Args:
        script: str. Python source, run as `__main__` with `sys.argv[1:] == args`, from the repository root.
        devices: int. How many CPU devices JAX sees (a worker per count).
        timeout: float. Seconds for this script; past it the worker is stopped and the test fails.
    """
    with _lock:
        worker = _workers.get(devices)
        if worker is None or not worker.alive():
            worker = _workers[devices] = JaxWorker(devices)
        answer = worker.run(script, args, timeout)
    stdout = answer["stdout"]
    assert answer["error"] is None, f"{answer['error']}\n--- stdout ---\n{stdout[-2000:]}"
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, stdout[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@atexit.register
def stop_workers() -> None:
    """Stop every worker (the session's end; also at interpreter exit)."""
    with _lock:
        for worker in _workers.values():
            worker.stop()
        _workers.clear()


def gc_after_imports() -> None:
    """What this process has imported (the collector was off meanwhile) frozen out of every later collection,
    then the collector on with `GC_THRESHOLDS`. The suite's processes call it once their imports are done."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    gc.enable()


def _reset_keras() -> None:
    """Keras's defaults again for the next script: no session state, float32, no distribution."""
    import keras

    keras.backend.clear_session()
    keras.config.set_dtype_policy("float32")
    keras.distribution.set_distribution(None)


def _serve() -> None:
    """The worker's loop: one JSON request a line on stdin, one JSON answer a line on the original stdout."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray writes to fd 1 (C libraries) go to the log, never into the answers
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
    gc.disable()  # until the imports below are done and frozen
    from pitchkeras import compile_cache

    compile_cache.enable("default")  # the session's cache directory (PITCHKERAS_COMPILE_CACHE), as the CLI does
    import keras  # noqa: F401 - import the backend once, before the first script
    import keras_hub  # noqa: F401 - and keras-hub, which nearly every script imports

    gc_after_imports()

    # Every program a script compiles (training steps and memory plans too, not only decode loops) goes through
    # JAX's persistent cache: a later script compiling the same program loads it.
    compile_cache.apply_to_jax()

    for line in sys.stdin:
        request = json.loads(line)
        captured, error = io.StringIO(), None
        sys.argv = ["-c", *request["args"]]
        try:
            with contextlib.redirect_stdout(captured):
                exec(compile(request["script"], "<jax script>", "exec"), {"__name__": "__main__"})
        except BaseException:  # noqa: BLE001 - reported to the test, the worker goes on
            error = traceback.format_exc()
        finally:
            try:
                _reset_keras()
            except Exception:  # noqa: BLE001
                error = (error or "") + "\nresetting Keras failed:\n" + traceback.format_exc()
        answers.write(json.dumps({"stdout": captured.getvalue(), "error": error}) + "\n")
        answers.flush()


if __name__ == "__main__":
    _serve()
