"""The one comparison helper the tests route their numbers through."""

import torch


def assert_close(actual, expected, atol=0.0, rtol=0.0, msg=""):
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise, with a message that shows both."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(
        actual, expected.expand_as(actual) if expected.dim() == 0 else expected, atol=atol, rtol=rtol,
        msg=lambda default: f"{msg}: {default}" if msg else default,
    )
