import pyro
import pytest
import torch

from pvae.utils import set_seed


@pytest.fixture(autouse=True)
def seeded_and_validated():
    """Every test starts seeded, with an empty param store and Pyro's validation on."""
    set_seed(0)
    torch.set_default_dtype(torch.float32)
    with pyro.validation_enabled(True):
        yield
