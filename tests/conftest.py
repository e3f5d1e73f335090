import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see dance/__init__.py

import pytest  # noqa: E402

# Tests never touch the network or a GPU and stay small enough for 2 cores.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core: one thread each
    import torch
    torch.set_num_threads(1)


@pytest.fixture
def rng():
    import numpy as np
    return np.random.default_rng(0)
