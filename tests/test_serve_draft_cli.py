"""`specdec serve-draft` and `specdec generate` as a user runs them (subprocesses, tiny pair): the endpoint prints
`listening on http://HOST:PORT` for --port 0, the sync `openai` client gets the text `generate --json` prints, and
`generate` without --json streams that same text to the terminal."""

from __future__ import annotations

import json
import subprocess
import time

import openai
import pytest

from orchestrator.launch import start_verifier
from tests.stubs import CLI, ENV

pytestmark = pytest.mark.slow  # the specdec CLI in subprocesses

PROMPT = "The heart pumps blood through the pulmonary"


def test_serve_draft_cli_matches_generate(tiny_dirs):
    draft, verifier_dir = tiny_dirs
    verifier = start_verifier(str(verifier_dir), "fp32", "cpu", env=ENV)
    endpoint = subprocess.Popen([*CLI, "serve-draft", "--verifier", verifier.address, "--draft", str(draft),
                                 "--draft-dtype", "fp32", "--port", "0", "--gamma", "adaptive"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline, line = time.monotonic() + 120, ""
        while time.monotonic() < deadline and not line.startswith("listening on http://127.0.0.1:"):
            line = endpoint.stdout.readline().strip()
            if not line and endpoint.poll() is not None:
                break
        assert line.startswith("listening on http://127.0.0.1:"), endpoint.stderr.read() if endpoint.poll() is not None else line
        api = openai.OpenAI(base_url=line.removeprefix("listening on ") + "/v1", api_key="unused", max_retries=0, timeout=60)
        text = api.completions.create(model="m", prompt=PROMPT, max_tokens=24, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
        base = [*CLI, "generate", "--verifier", verifier.address, "--draft", str(draft), "--prompt", PROMPT,
                "--max-new-tokens", "24", "--ignore-eos"]
        as_json = subprocess.run([*base, "--json"], capture_output=True, text=True, env=ENV, timeout=300)
        streamed = subprocess.run(base, capture_output=True, text=True, env=ENV, timeout=300)
    finally:
        endpoint.terminate()
        endpoint.wait(timeout=30)
        verifier.stop()
    assert as_json.returncode == 0 and streamed.returncode == 0, as_json.stderr + streamed.stderr
    assert json.loads(as_json.stdout.strip().splitlines()[-1])["text"] == text and text
    assert streamed.stdout == text + "\n"  # the text alone, as it was committed; the summary goes to stderr
    assert "Traceback" not in endpoint.stderr.read()
