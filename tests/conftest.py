"""Suite-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """The tests run tiny models: intra-op threads only add OpenMP synchronisation (10-20x slower per op on a busy
    2-core machine), so the suite runs with one. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
