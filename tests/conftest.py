import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
# At most 2 intra-op threads keeps big machines from oversubscribing; the suite passes with 1 or 2
# (OMP_NUM_THREADS=1 or 2): float results may differ in the last bits between thread counts, so
# tests compare floats from different computations with tolerances, never bit for bit.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
