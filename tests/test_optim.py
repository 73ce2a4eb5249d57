"""Row-wise L-BFGS (pvae.optim.minimize_rows) on problems whose minima are known, in float64."""

import pytest
import torch
from helpers import assert_close

from pvae.optim import minimize_rows


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def quadratics(rows: int, dim: int, seed: int = 0):
    """Independent quadratics 1/2 x^T H_b x - b^T x with condition numbers up to about 400."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rows, dim, dim, generator=g)
    H = A @ A.transpose(1, 2) / dim + 0.01 * torch.eye(dim)
    b = torch.randn(rows, dim, generator=g)

    def fn(x, rows):
        return 0.5 * torch.einsum("bi,bij,bj->b", x, H[rows], x) - (b[rows] * x).sum(1)

    return fn, torch.linalg.solve(H, b)


def test_each_row_reaches_its_quadratic_minimum(float64):
    """40 dimensions, condition numbers in the hundreds: within 1e-8 of the minimum (1e-3 of the
    minimizer along its flattest direction), in far fewer evaluations than steepest descent would
    need (thousands)."""
    fn, x_star = quadratics(12, 40)
    result = minimize_rows(fn, torch.zeros(12, 40), max_iter=400, ftol=1e-12, gtol=1e-8)
    assert result.converged.all()
    assert result.iterations.max() < 250, result.iterations
    assert_close(result.x, x_star, atol=1e-3, msg="minimizers")
    assert_close(result.value, fn(x_star, torch.arange(12)), atol=1e-8, msg="minima")


def test_rows_do_not_interact(float64):
    """A row optimized alone follows the same path as in a batch with others."""
    fn, _ = quadratics(6, 10, seed=1)
    together = minimize_rows(fn, torch.ones(6, 10), max_iter=200, ftol=1e-12)
    for row in (0, 4):
        alone = minimize_rows(lambda x, rows: fn(x, rows + row), torch.ones(1, 10), max_iter=200, ftol=1e-12)
        assert_close(alone.x[0], together.x[row], atol=1e-10, msg=f"row {row}")
        assert alone.iterations[0] == together.iterations[row]


def test_rosenbrock_rows_and_steps_outside_the_domain(float64):
    """The banana valley from random starts, and f(x) = x - log x (minimum at 1) started at 0.05, whose
    first long steps land where log x is NaN: those are refused and retried shorter."""
    g = torch.Generator().manual_seed(2)
    x0 = 1.5 * torch.randn(20, 2, generator=g)

    def rosenbrock(x, rows):
        return 100 * (x[:, 1] - x[:, 0] ** 2) ** 2 + (1 - x[:, 0]) ** 2

    result = minimize_rows(rosenbrock, x0, max_iter=500, ftol=1e-15, gtol=1e-12)
    assert result.converged.all()
    assert_close(result.x, 1.0, atol=1e-5, msg="Rosenbrock minimizers")

    def barrier(x, rows):
        return (x - torch.log(x)).sum(1)

    start = torch.full((3, 4), 0.05)
    result = minimize_rows(barrier, start, max_iter=200, ftol=1e-15, gtol=1e-10)
    assert result.converged.all()
    assert_close(result.x, 1.0, atol=1e-5, msg="barrier minimizers")


def test_a_row_that_runs_out_of_iterations_is_not_converged(float64):
    fn, _ = quadratics(3, 30, seed=3)
    result = minimize_rows(fn, torch.zeros(3, 30), max_iter=5)
    assert not result.converged.any() and (result.iterations == 5).all()
    assert torch.isfinite(result.value).all()
    with pytest.raises(ValueError, match="at least 1"):
        minimize_rows(fn, torch.zeros(3, 30), max_iter=0)
