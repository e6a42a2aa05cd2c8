"""The hub tier says so when it cannot reach the hub: red, unless the user is offline on purpose.

A hub run that skips everything when the network is down would report green having
tested nothing; the hub tier fails instead, and skips only under HF_HUB_OFFLINE=1
(huggingface_hub's own switch), naming it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket closes


def _hub_run(tmp_path: Path, offline: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": offline,
        "HF_HUB_DOWNLOAD_TIMEOUT": "5",
        "HF_HUB_ETAG_TIMEOUT": "5",
    }
    env.pop("HF_HUB_CACHE", None)
    test = "compat_tests/test_correctness.py"
    cmd = [sys.executable, "-m", "pytest", test, "-k", "greedy and 8", "-m", "hub", "--tier", "hub"]
    cmd += ["--models", "llama-3.2", "-p", "no:cacheprovider", "-p", "no:xdist", "-rfs"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("offline", ["0", "1"], ids=["online", "HF_HUB_OFFLINE"])
def test_hub_tier_without_the_hub_fails_unless_offline_on_purpose(tmp_path, offline):
    done = _hub_run(tmp_path, offline)
    out = done.stdout + done.stderr
    assert "cannot download mlx-community/Llama-3.2-1B-Instruct-4bit" in out, out[-3000:]
    if offline == "1":
        assert done.returncode == 0 and "1 skipped" in out and "HF_HUB_OFFLINE=1" in out, out[-3000:]
    else:
        assert done.returncode == 1 and "1 error" in out, out[-3000:]
