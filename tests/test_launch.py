"""A verifier started by orchestrator/launch.py sets itself up after exec (verifier_worker/launched.py): it runs
on the launcher's cores and ends when its launcher dies. Checked on plain Python children, no model."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from verifier_worker.launched import CPUS_ENV, PARENT_PID_ENV

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="sched_setaffinity and PR_SET_PDEATHSIG are Linux's")
CHILD = "from verifier_worker.launched import apply_launcher_env as a; a(); import os, sys; {}"


def test_the_child_pins_itself_to_the_launchers_cores():
    core = sorted(os.sched_getaffinity(0))[-1]
    env = {**os.environ, CPUS_ENV: str(core), PARENT_PID_ENV: str(os.getpid())}
    out = subprocess.run([sys.executable, "-c", CHILD.format("print(sorted(os.sched_getaffinity(0)))")], env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == f"[{core}]"


def test_the_child_ends_when_its_launcher_dies():
    """A launcher starts a child that waits for a signal, prints its pid and exits: the child gets SIGTERM."""
    child = CHILD.format("import signal; print(os.getpid(), flush=True); signal.pause()")
    launcher = ("import os, subprocess, sys; "
                f"p = subprocess.Popen([sys.executable, '-c', {child!r}], stdin=subprocess.DEVNULL, "
                "stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, "
                f"env={{**os.environ, {PARENT_PID_ENV!r}: str(os.getpid())}}, text=True); "
                "print(p.stdout.readline().strip(), flush=True)")  # the child has set itself up; the launcher exits
    out = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=60, check=True)
    pid = int(out.stdout.strip())
    for _ in range(600):  # bounded: 60 s at most
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return  # gone (reaped by init)
        if _zombie(pid):
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    pytest.fail("the child outlived its launcher")


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
