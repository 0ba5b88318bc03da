import os

# The kernels are checked on CPU through Triton's interpreter; this must be set before triton
# decorates any kernel (at import of ptune_rt.kernels).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
