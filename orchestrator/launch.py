"""Start the verifier (`python -m verifier_worker.serve`) as a child process and wait until it listens.

One launcher for the benchmark's verifier actor, scripts/measure_engine.py and the tests: it runs the
same command a user runs, binds port 0, and parses the `listening on HOST:PORT` line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

from verifier_worker.launched import CPUS_ENV, PARENT_PID_ENV


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


def start_verifier(model: str, dtype: str = "auto", device: str = "auto", host: str = "127.0.0.1",
                   extra_args: tuple[str, ...] = (), env: dict | None = None, timeout_s: float = 1800.0,
                   cpus: list[int] | None = None) -> VerifierProcess:
    """Blocks until the model is loaded and the server listens (at most timeout_s: Hub downloads included).

    Raises RuntimeError whose first line is the verifier's own last error line.
    """
    cmd = [sys.executable, "-m", "verifier_worker.serve", "--model", model, "--dtype", dtype,
           "--device", device, "--host", host, "--port", "0", *extra_args]
    with tempfile.NamedTemporaryFile("w+", prefix="specdec-verifier-", suffix=".log", delete=False) as log:
        # no preexec_fn: a fork running Python in the child of a parent with gRPC threads (a test, a Ray actor)
        # revives gRPC's poller there, which can die as the fds close before exec. The child sets itself up.
        child_env = {**(env or os.environ), PARENT_PID_ENV: str(os.getpid())}
        if cpus:
            child_env[CPUS_ENV] = ",".join(map(str, cpus))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=child_env)
        lines: list[str] = []

        def read_until_listening():  # "listening on" comes once the model is loaded (after e.g. its dtype line)
            for out in proc.stdout:
                lines.append(out.strip())
                if out.startswith("listening on "):
                    return

        reader = threading.Thread(target=read_until_listening, daemon=True)
        reader.start()
        reader.join(timeout_s)
        line = lines[-1] if lines else ""
        if line.startswith("listening on "):
            return VerifierProcess(proc, line.removeprefix("listening on "), log.name)
        try:  # its stdout ended: it exited (or is exiting); else it was still loading at the deadline
            exited = None if reader.is_alive() else proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            exited = None
        proc.kill()
        proc.wait()
        log.seek(0)
        stderr = log.read()
    last = next((x for x in reversed(stderr.splitlines()) if x.strip()), "no output")
    if lines:
        why = last
    elif exited is not None:
        why = f"it exited with status {exited} before listening; last output: {last}"
    else:
        why = f"not listening after {timeout_s:g} s; last output: {last}"
    raise RuntimeError(f"the verifier did not start: {why}\ncommand: {' '.join(cmd)}\n{stderr[-2000:]}")
