"""The verifier-only install: `specdec serve-verifier` imports and serves with every package of the `bench` and
`serve` extras made unimportable (an import hook raises ModuleNotFoundError, as an absent package would), so the
base install (`pip install .[verifier]`, what deploy/Dockerfile installs) is enough on a GPU box."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from draft_worker.client import generate_baseline
from draft_worker.transport import fetch_info
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec.config import SamplingParams
from tests.stubs import ENV

pytestmark = pytest.mark.slow  # a verifier in a subprocess
# (pyyaml and tqdm are in the extras too, but transformers requires them, so every install has them)
EXTRAS_ONLY = ["ray", "pandas", "matplotlib", "datasets", "pydantic", "rouge_score", "fastapi", "uvicorn", "starlette",
               "openai", "httpx"]
BLOCKED_RUN = """
import sys
blocked = set(sys.argv[1].split(","))
class Hide:  # wraps every finder: a blocked package is not found, exactly as if it were not installed
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.finder, attr)
sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
sys.argv = ["specdec", *sys.argv[2:]]
from orchestrator.cli import main
sys.exit(main())
"""


async def test_serve_verifier_needs_no_bench_or_serve_packages(tiny_dirs):
    command = [sys.executable, "-c", BLOCKED_RUN, ",".join(EXTRAS_ONLY), "serve-verifier", "--model", str(tiny_dirs[1]),
               "--dtype", "fp32", "--device", "cpu", "--port", "0", "--metrics-port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (lines and lines[-1].startswith("listening on")):
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
        assert lines and lines[-1].startswith("listening on"), process.stderr.read() if process.poll() is not None else lines
        address = lines[-1].removeprefix("listening on ")
        metrics_url = next(line for line in lines if line.startswith("metrics on ")).removeprefix("metrics on ")
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.VerifierStub(channel)
            assert (await fetch_info(stub)).vocab_size > 0
            result = await generate_baseline(stub, [5, 6, 7], SamplingParams(max_new_tokens=6))
        assert result.new_tokens == 6
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
        assert samples["specdec_verifier_tokens_committed_total"] == 6
    finally:
        process.terminate()
        process.wait(timeout=30)
    stderr = process.stderr.read()
    assert "Traceback" not in stderr, stderr[-3000:]


def test_the_block_is_real():
    """The same hook does stop a bench import, so the test above cannot pass by accident."""
    done = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "pydantic", "bench", "--config", "/nonexistent.yaml"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode != 0 and "No module named 'pydantic'" in done.stderr, json.dumps(done.stderr[-2000:])
