"""Shared test fixtures."""
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tests run many small ops: on a busy 2-core CPU a second intra-op thread mostly waits for a core, which made
    some test files 10-80x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fx():
    """fixtures/transformer_a.pt: the released transformer's tiny config, weights, inputs and outputs."""
    return torch.load(FIXTURES / "transformer_a.pt", weights_only=True)


@pytest.fixture(scope="module")
def model(fx):
    """The released tiny transformer of transformer_a.pt, loaded strictly into ours."""
    from transformer import Resonate, ResonateConfig, load_released_state_dict
    m = Resonate(ResonateConfig(**fx["config"])).eval()
    load_released_state_dict(m, fx["state_dict"])
    return m
