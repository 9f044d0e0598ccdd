from __future__ import annotations

import pytest
import torch
from torch import nn

from audit.models import build_model


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

    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, logging_level="WARNING")
    yield
    ray.shutdown()
