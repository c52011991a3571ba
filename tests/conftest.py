import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# The tests use small tensors: one thread is as fast, deterministic, and immune to oversubscribed CI machines.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The shared real-text corpora beside the repository (../shared/data); skips when absent."""
    if not SHARED_DATA.is_dir() or not any(SHARED_DATA.glob("*.txt")):
        pytest.skip(f"shared corpora not found at {SHARED_DATA} (they live beside the repository, not in it)")
    return SHARED_DATA
