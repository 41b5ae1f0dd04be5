"""Shared fixtures: the real images in ../shared/data (skipped when absent) and device helpers."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CRFRNN_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data (VOCdevkit/VOC2012 and densecrf-demo); skips the test when absent."""
    if not (SHARED_DATA / "VOCdevkit" / "VOC2012").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped, with a reason, on a machine without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
