import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see dance/__init__.py

import pytest  # noqa: E402

# Tests never touch the network or a GPU and stay small enough for 2 cores.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core: one thread each
    # the environment too, so a `python -m dance` a test starts computes with the same thread
    # count as the runs trained in this process (threads change float sums: resume tests
    # compare the two)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)


@pytest.fixture
def rng():
    import numpy as np
    return np.random.default_rng(0)
