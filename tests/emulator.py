"""Google's Cloud Firestore emulator, started and stopped from Python (tests and benchmarks; not installed).

The emulator ships with the Google Cloud CLI (Debian package
`google-cloud-cli-firestore-emulator`, Java 17). `FirestoreEmulator` starts
it on a free loopback port in its own process group, waits for it to say it
is running, and stops the whole group (the launcher script and its JVM).

Example:

    with FirestoreEmulator() as emulator:
        os.environ["FIRESTORE_EMULATOR_HOST"] = emulator.host
        with open_store("firestore://demo-project/reviews") as store:
            ...
        emulator.clear("demo-project")
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

from pitchkeras.errors import FailedPrecondition, Unavailable

#: Where the Debian/RPM package and the gcloud component install the launcher.
DEFAULT_EMULATOR_PATHS = (
    "/usr/lib/google-cloud-sdk/platform/cloud-firestore-emulator/cloud_firestore_emulator",
    "/usr/share/google-cloud-sdk/platform/cloud-firestore-emulator/cloud_firestore_emulator",
    os.path.expanduser("~/google-cloud-sdk/platform/cloud-firestore-emulator/cloud_firestore_emulator"),
)
PACKAGE = "google-cloud-cli-firestore-emulator"
_READY_LINE = "Dev App Server is now running"
DEFAULT_STARTUP_TIMEOUT_S = 90.0


def find_emulator() -> Optional[str]:
    """The emulator launcher: $FIRESTORE_EMULATOR_BIN, a known install path, or None."""
    explicit = os.environ.get("FIRESTORE_EMULATOR_BIN")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for path in DEFAULT_EMULATOR_PATHS:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("cloud_firestore_emulator")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clear_emulator(host: str, project: str, database: str = "(default)") -> None:
    """Delete every document of `project` on the emulator at `host` (`DELETE /emulator/v1/...`)."""
    request = urllib.request.Request(
        f"http://{host}/emulator/v1/projects/{project}/databases/{database}/documents", method="DELETE")
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


class FirestoreEmulator:
    """One running Cloud Firestore emulator on 127.0.0.1.

    Args:
        port: int or None. The port; None picks a free one.
        binary: str or None. The launcher; None looks it up (`find_emulator`).
        startup_timeout: float. Seconds to wait for it to be ready.
    """

    def __init__(self, port: Optional[int] = None, *, binary: Optional[str] = None,
                 startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_S):
        self.binary = binary or find_emulator()
        if not self.binary:
            raise FailedPrecondition(
                f"the Cloud Firestore emulator is not installed: apt-get install {PACKAGE} (Java 17), "
                "or set FIRESTORE_EMULATOR_BIN to its cloud_firestore_emulator launcher"
            )
        self.port = port or _free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self._proc: Optional[subprocess.Popen] = None
        self._pump: Optional[threading.Thread] = None
        self._log = tempfile.TemporaryFile(mode="w+")

    def start(self) -> "FirestoreEmulator":
        """Start it and wait until it serves; raises Unavailable with its output if it does not."""
        self._proc = subprocess.Popen(
            [self.binary, "start", "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # its own process group: stop() ends the JVM with the launcher
        )
        ready = threading.Event()
        stdout = self._proc.stdout

        def pump():  # keep reading, so a chatty emulator never blocks on a full pipe
            for line in stdout:  # ends at EOF, when the emulator's group has exited
                self._log.write(line)
                if _READY_LINE in line:
                    ready.set()

        self._pump = threading.Thread(target=pump, name="firestore-emulator-log", daemon=True)
        self._pump.start()
        deadline = time.monotonic() + self.startup_timeout
        while not ready.wait(0.1):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                output = self.output()
                self.stop()
                raise Unavailable(f"the Firestore emulator did not start on {self.host} "
                                  f"within {self.startup_timeout:g} s:\n{output[-2000:]}")
        return self

    def output(self) -> str:
        """What the emulator printed so far."""
        self._log.flush()
        self._log.seek(0)
        text = self._log.read()
        self._log.seek(0, os.SEEK_END)
        return text

    def clear(self, project: str, database: str = "(default)") -> None:
        """Delete every document of `project` (the emulator's REST reset endpoint)."""
        clear_emulator(self.host, project, database)

    def freeze(self, timeout: float = 5.0) -> None:
        """SIGSTOP the whole process group (the launcher and its JVM) and return once every process in it is
        stopped (state T in /proc): a SIGSTOP is delivered asynchronously. Its port stays open; calls hang."""
        os.killpg(self._proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = []
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat.read_text().rsplit(")", 1)[1].split()  # after the name: state, ppid, pgrp, ...
                except OSError:  # the process ended meanwhile
                    continue
                if int(fields[2]) == self._proc.pid:
                    states.append(fields[0])
            if states and all(state in "Tt" for state in states):
                return
            time.sleep(0.005)
        self.resume()
        raise AssertionError(f"the emulator's process group {self._proc.pid} did not stop within {timeout} s")

    def resume(self) -> None:
        """SIGCONT the whole process group after `freeze`."""
        os.killpg(self._proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop the emulator's whole process group. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # The JVM may outlive the launcher by a moment; make sure nothing of the group is left.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.join(10)  # the pipe reaches EOF once the whole group is gone
        if proc.stdout and not (pump and pump.is_alive()):  # never close a pipe the pump still reads
            proc.stdout.close()

    def __enter__(self) -> "FirestoreEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._log.close()
