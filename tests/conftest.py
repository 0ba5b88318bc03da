import os

# The kernels are checked on CPU through Triton's interpreter; this must be set before triton
# decorates any kernel (at import of ptune_rt.kernels).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


# The tests run tiny shapes: one thread avoids paying thread wake-ups on every small op (and keeps
# the suite fast on a busy 2-core CI machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def lora_functions(monkeypatch):
    """Training batches of any size through the LoRA op's ``autograd.Function``s (projection groups,
    SwiGLU recompute, the op itself), the path of batches above ``SMALL_BATCH_ROWS`` rows: the
    tests' tiny batches would otherwise take the small-batch path (plain ops under autograd)."""
    from ptune_rt.methods import lora

    monkeypatch.setattr(lora, "SMALL_BATCH_ROWS", 0)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
