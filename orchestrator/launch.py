"""Start `specdec serve-verifier` as a child process and wait until it listens.

One launcher for the benchmark's verifier actor, scripts/measure_engine.py and the CLI tests: it runs
the same command a user runs, binds port 0, and parses the `listening on HOST:PORT` line.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass


@dataclass
class VerifierProcess:
    proc: subprocess.Popen
    address: str  # HOST:PORT it listens on
    log_path: str  # its stderr

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _die_with_parent() -> None:
    """Linux: SIGTERM the verifier when its parent (e.g. a Ray actor) dies, so no server is orphaned."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def start_verifier(model: str, dtype: str = "bf16", device: str = "auto", host: str = "127.0.0.1",
                   extra_args: tuple[str, ...] = (), env: dict | None = None) -> VerifierProcess:
    """Blocks until the model is loaded and the server listens; raises RuntimeError with its stderr if not."""
    cmd = [sys.executable, "-m", "orchestrator.cli", "serve-verifier", "--model", model, "--dtype", dtype,
           "--device", device, "--host", host, "--port", "0", *extra_args]
    log = tempfile.NamedTemporaryFile("w+", prefix="specdec-verifier-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env or os.environ.copy(),
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    line = proc.stdout.readline().strip()  # the first line comes once the model is loaded
    if not line.startswith("listening on "):
        proc.kill()
        proc.wait()
        log.seek(0)
        raise RuntimeError(f"the verifier did not start ({' '.join(cmd)}): {line!r}\n{log.read()[-2000:]}")
    return VerifierProcess(proc, line.removeprefix("listening on "), log.name)
