from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch
from torch import nn

from audit.models import build_model

pytest_plugins = ["tests.storage_fixtures"]  # the object-storage tests' dataset

# The mask cache of a test session is its own (an empty one): tests never read a developer's cache.
os.environ["CAM_AUDIT_CACHE"] = tempfile.mkdtemp(prefix="cam-audit-test-cache-")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Object storage: an S3 server (moto) on 127.0.0.1, started by the `s3` fixture. Its address and
# test credentials are in the environment from the start, so the session's Ray workers have them
# too; no request ever leaves 127.0.0.1 (no instance metadata, no default endpoint).
S3_PORT = _free_port()
os.environ.update(
    AWS_ACCESS_KEY_ID="cam-audit-test",
    AWS_SECRET_ACCESS_KEY="cam-audit-test",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}",
    AWS_EC2_METADATA_DISABLED="true",
)


@pytest.fixture(scope="session")
def s3():
    """The S3 server's filesystem (pyarrow), with buckets created as they are written to."""
    import pyarrow.fs as pafs

    server = start_s3_server(S3_PORT)
    yield pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{S3_PORT}", scheme="http", allow_bucket_creation=True)
    server.terminate()
    server.wait(timeout=10)


def start_s3_server(port: int, **env: str) -> subprocess.Popen:
    """moto's S3 server on 127.0.0.1:``port`` (``env``: its settings), once it answers."""
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.2)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def random_model(arch: str, num_classes: int = 5, seed: int = 0) -> nn.Module:
    """A random-init torchvision classifier, the same for the same seed."""
    torch.manual_seed(seed)
    return build_model(arch, num_classes).eval()


def random_images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class TinyGapNet(nn.Module):
    """conv -> ReLU -> global-average-pool -> linear: the smallest network CAM applies to."""

    def __init__(self, num_classes: int = 3, channels: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray instance for the whole test session (ray.init costs seconds).

    Its files stay in a temporary folder, and a token in the environment keeps Ray from
    writing ~/.ray/auth_token.
    """
    import os
    import secrets
    import tempfile

    import ray

    from audit.pipeline.cluster import start_local_ray

    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    # No GPUs: the suite's runs are CPU runs on every machine, so their expectations (fp32, the
    # CPU's batch size) hold where a GPU is present too; the GPU paths have tests of their own.
    start_local_ray(num_cpus=2, num_gpus=0, include_dashboard=False, _temp_dir=temp_dir, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head with its job server on 127.0.0.1, started by `ray start` as an operator would."""
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    dashboard, gcs = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    head = subprocess.Popen(
        [
            str(bin_dir / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--include-dashboard=true",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2).close()
            break
        except urllib.error.HTTPError:  # it answers (asking for the token): it is up
            break
        except OSError:
            assert head.poll() is None, "ray start --head exited"
            time.sleep(1)
    else:
        pytest.fail("the Ray head did not come up in 120 s")
    # RAY_ADDRESS: the job server (ray job submit); RAY_HEAD_GCS: the cluster itself (audit run --address)
    yield {**env, "RAY_ADDRESS": address, "RAY_HEAD_GCS": f"127.0.0.1:{gcs}", "TEST_RAY_TEMP_DIR": temp_dir}
    _stop_head(head, temp_dir)


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM (`ray start --block` stops what it started); a head still draining after 10 s is
    killed, with every process that names its temporary folder."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in process.info["cmdline"] or []):
            process.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)
