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
    from ptune_rt.ops import lora_dispatch

    monkeypatch.setattr(lora_dispatch, "SMALL_BATCH_ROWS", 0)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")


# Property-based fuzzing (tests/test_fuzz.py): "ci" runs by default, a fixed budget drawn from a
# fixed seed (the interpreter is slow, so no deadline, and no example database in the checkout);
# `pytest --hypothesis-profile=long` draws ten times as many examples from a fresh seed.
# Without hypothesis (the "test" extra) only test_fuzz.py fails, at its import.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover
    settings = None
if settings is not None:
    _FUZZ = dict(deadline=None, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("ci", max_examples=100, derandomize=True, **_FUZZ)
    settings.register_profile("long", max_examples=1000, **_FUZZ)
    settings.load_profile("ci")
