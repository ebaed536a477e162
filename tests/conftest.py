import pytest
import torch

# One intra-op thread: the tests use small tensors, where threads only add overhead (and on a
# loaded 2-core machine, oversubscription slows tiny kernels by orders of magnitude).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
