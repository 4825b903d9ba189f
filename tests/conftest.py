"""Shared test setup.

TRITON_INTERPRET must be set before triton is first imported anywhere, so it lives here, at the top of the
conftest that pytest imports before any test module. The shared real data lives outside the repo
(`../shared/data` next to the checkout); JASPER_DATA_DIR overrides it.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # run the Triton kernels on the CPU (no GPU in CI)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub in tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # root files (model.py, losses.py, ...) import as top-level modules

import pytest  # noqa: E402

DATA_DIR = Path(os.environ.get("JASPER_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.fail(f"shared data not found at {DATA_DIR} (set JASPER_DATA_DIR)")
    return DATA_DIR
