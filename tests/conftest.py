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
