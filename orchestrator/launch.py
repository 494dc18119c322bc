"""Start the verifier (`python -m verifier_worker.serve`) as a child process and wait until it listens.

One launcher for the benchmark's verifier actor, scripts/measure_engine.py and the tests: it runs the
same command a user runs, binds port 0, and parses the `listening on HOST:PORT` line.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

# loaded here, in the parent: dlopen() between fork and exec in a threaded parent (a Ray worker) can deadlock
_LIBC = ctypes.CDLL("libc.so.6", use_errno=True) if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


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


def _child_setup(cpus: list[int] | None) -> None:
    """In the child before exec. Linux: SIGTERM the verifier when its parent (e.g. a Ray actor) dies, so no
    server is orphaned; and run it on `cpus` only, when given."""
    if _LIBC:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if cpus:
        os.sched_setaffinity(0, cpus)


def start_verifier(model: str, dtype: str = "bf16", device: str = "auto", host: str = "127.0.0.1",
                   extra_args: tuple[str, ...] = (), env: dict | None = None, timeout_s: float = 1800.0,
                   cpus: list[int] | None = None) -> VerifierProcess:
    """Blocks until the model is loaded and the server listens (at most timeout_s: Hub downloads included).

    Raises RuntimeError whose first line is the verifier's own last error line.
    """
    cmd = [sys.executable, "-m", "verifier_worker.serve", "--model", model, "--dtype", dtype,
           "--device", device, "--host", host, "--port", "0", *extra_args]
    with tempfile.NamedTemporaryFile("w+", prefix="specdec-verifier-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env or os.environ.copy(),
                                preexec_fn=(lambda: _child_setup(cpus)) if _LIBC or cpus else None)
        lines: list[str] = []
        def read_until_listening():  # serve prints its dtype line first (H10: that broke this reader)
            for raw in proc.stdout:
                lines.append(raw.strip())
                if lines[-1].startswith("listening on "):
                    return

        reader = threading.Thread(target=read_until_listening, daemon=True)
        reader.start()
        reader.join(timeout_s)  # "listening on" comes once the model is loaded
        line = lines[-1] if lines else ""
        if line.startswith("listening on "):
            return VerifierProcess(proc, line.removeprefix("listening on "), log.name)
        proc.kill()
        proc.wait()
        log.seek(0)
        stderr = log.read()
    last = next((x for x in reversed(stderr.splitlines()) if x.strip()), "no output")
    why = last if lines else f"not listening after {timeout_s:g} s; last output: {last}"
    raise RuntimeError(f"the verifier did not start: {why}\ncommand: {' '.join(cmd)}\n{stderr[-2000:]}")
