"""A verifier started by a launcher (orchestrator/launch.py) sets itself up from its environment, first thing.

The launcher cannot do it between fork and exec: running Python in the child of a parent with gRPC threads (a
test, a Ray actor) revives gRPC's poller there, and closing the inherited fds before exec can kill the child
(`epoll_wait error: Bad file descriptor`, no verifier). So the child, after exec: dies with its launcher (Linux
PR_SET_PDEATHSIG, SIGTERM: it drains and exits, no orphaned server) and runs on the launcher's cores only.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_PID_ENV = "SPECDEC_LAUNCHER_PID"  # the launcher's pid: SIGTERM this process when it dies
CPUS_ENV = "SPECDEC_VERIFIER_CPUS"  # comma-separated cores to run on
_PR_SET_PDEATHSIG = 1


def apply_launcher_env(environ=os.environ) -> None:
    """Before anything starts a thread: pin to the launcher's cores, and follow the launcher in death."""
    if cpus := environ.get(CPUS_ENV):
        os.sched_setaffinity(0, [int(c) for c in cpus.split(",")])
    parent = environ.get(PARENT_PID_ENV)
    if parent and sys.platform == "linux":
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != int(parent):  # the launcher died before the line above: follow it now
            os.kill(os.getpid(), signal.SIGTERM)
