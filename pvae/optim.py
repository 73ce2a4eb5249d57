"""Many small deterministic minimizations at once: L-BFGS run row by row on a ``(B, P)`` tensor.

The gap study optimizes one q per datapoint: B independent problems of P parameters each, whose
objective (an ELBO over a fixed set of draws, see :mod:`pvae.compare`) is deterministic and smooth.
:func:`minimize_rows` runs limited-memory BFGS (Nocedal 1980; Liu & Nocedal 1989) on every row at
once, with each row's own curvature pairs, step size and convergence: the objective returns one
value per row, rows do not interact, and one evaluation of all rows is one vectorized pass.

Each iteration evaluates the objective once, at ``x + t d`` with ``d`` the row's L-BFGS direction
(two-loop recursion over its last ``history`` pairs, scaled by the newest pair's
:math:`s^\\top y / y^\\top y`). A row keeps the point if it satisfies Armijo's condition
:math:`f(x + t d) \\le f(x) + c_1 t\\, \\nabla f^\\top d`; otherwise it stays where it was and tries
a quarter of the step at the next iteration: backtracking spread over iterations, so that no row
makes the others wait and nothing is decided on the host. Rows that have converged keep their
point. Whether every row has converged is read on the host once every ``check_every`` iterations,
the only synchronization; rows converged by then leave the batch, which shrinks the later passes.

References:

1. Nocedal, *Updating Quasi-Newton Matrices with Limited Storage*, Math. Comp. 35 (1980).
2. Liu & Nocedal, *On the limited memory BFGS method for large scale optimization*, Math. Prog. 45 (1989).
"""

from dataclasses import dataclass
from typing import Callable

import torch

ARMIJO = 1e-4  # c_1: the share of the predicted decrease a step must achieve
SHRINK = 0.25  # a rejected step is retried this much shorter


@dataclass
class RowsResult:
    """What :func:`minimize_rows` returns.

    :param x: ``(B, P)`` the rows' minimizers.
    :param value: ``(B,)`` the objective there.
    :param iterations: ``(B,)`` objective evaluations each row took part in before it converged.
    :param converged: ``(B,)`` whether the row met a convergence test (else it ran out of iterations).
    """

    x: torch.Tensor
    value: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor


def minimize_rows(fn: Callable, x0: torch.Tensor, max_iter: int = 100, history: int = 10, ftol: float = 1e-6,
                  gtol: float = 1e-5, check_every: int = 5) -> RowsResult:
    """Minimize ``fn`` row by row from ``x0`` by L-BFGS (see the module docstring).

    :param fn: ``fn(x, rows) -> (len(rows),)``: the objective of the rows ``rows`` (an index tensor
        into ``x0``'s rows) at ``x`` (``(len(rows), P)``), differentiable in ``x``. Each value may
        depend on its own row of ``x`` only.
    :param x0: ``(B, P)`` where each row starts.
    :param max_iter: objective evaluations at most.
    :param history: curvature pairs kept per row.
    :param ftol: a row has converged when a full quasi-Newton step (``t = 1``, with curvature pairs)
        lowers its value by less than ``ftol * max(1, |f|)``,
    :param gtol: or its gradient's largest entry is below ``gtol * max(1, |f|)``,
    :param check_every: iterations between the host's looks at convergence.
    """
    if max_iter < 1 or history < 1 or check_every < 1:
        raise ValueError("max_iter, history and check_every must be at least 1")
    x0 = x0.detach()
    B, P = x0.shape
    device = x0.device
    out_x, out_f = x0.clone(), x0.new_full((B,), float("nan"))
    out_iter = torch.zeros(B, dtype=torch.long, device=device)
    out_conv = torch.zeros(B, dtype=torch.bool, device=device)

    rows = torch.arange(B, device=device)  # the rows still being optimized
    x = x0.clone()
    f, g = _value_and_grad(fn, x, rows)
    t = torch.clamp(1.0 / g.norm(dim=1).clamp_min(1e-12), max=1.0)  # first step: at most unit length
    S, Y = x.new_zeros(history, B, P), x.new_zeros(history, B, P)
    rho = x.new_zeros(history, B)  # 1 / (s^T y); 0 marks an empty or skipped pair
    gamma = x.new_ones(B)  # the initial inverse Hessian's scale
    has_pairs = torch.zeros(B, dtype=torch.bool, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    iterations = torch.ones(B, dtype=torch.long, device=device)
    slot = 0
    for it in range(1, max_iter):
        d = -_two_loop(g, S, Y, rho, gamma, slot, history)
        slope = (g * d).sum(1)
        uphill = slope >= 0  # a stale history: fall back to steepest descent and forget the pairs
        d = torch.where(uphill[:, None], -g, d)
        slope = torch.where(uphill, -(g * g).sum(1), slope)
        rho, has_pairs = rho * (~uphill), has_pairs & ~uphill
        step = torch.where(has_pairs, t, torch.minimum(t, 1.0 / g.norm(dim=1).clamp_min(1e-12)))
        x_new = x + step[:, None] * d
        f_new, g_new = _value_and_grad(fn, x_new, rows)
        accept = (f_new <= f + ARMIJO * step * slope) & torch.isfinite(f_new) & ~done
        s, y = x_new - x, g_new - g
        sy = (s * y).sum(1)
        good = accept & (sy > 1e-10 * s.norm(dim=1) * y.norm(dim=1))
        S[slot] = torch.where(good[:, None], s, S[slot])
        Y[slot] = torch.where(good[:, None], y, Y[slot])
        rho[slot] = torch.where(good, 1.0 / torch.where(good, sy, 1.0), 0.0)
        gamma = torch.where(good, sy / (y * y).sum(1).clamp_min(1e-30), gamma)
        slot = (slot + 1) % history
        scale = torch.maximum(f.abs(), torch.ones_like(f))
        # a full quasi-Newton step that barely lowers f: the model of f agrees that little is left
        full = has_pairs & (t >= 1)
        small_step = accept & full & ((f - f_new) <= ftol * scale)
        has_pairs = has_pairs | good
        x = torch.where(accept[:, None], x_new, x)
        f = torch.where(accept, f_new, f)
        g = torch.where(accept[:, None], g_new, g)
        t = torch.where(accept, torch.ones_like(t), t * SHRINK)
        flat = g.abs().amax(1) <= gtol * scale
        stuck = t < 1e-10
        converged_now = (small_step | flat | stuck) & ~done
        iterations = iterations + (~done).long()
        done = done | converged_now
        out_conv[rows] |= (small_step | flat) & ~stuck & done
        if it % check_every and it != max_iter - 1:
            continue
        finished = done.nonzero().squeeze(1)  # the one host synchronization, every check_every iterations
        if finished.numel():
            out_x[rows[finished]], out_f[rows[finished]] = x[finished].detach(), f[finished].detach()
            out_iter[rows[finished]] = iterations[finished]
        keep = (~done).nonzero().squeeze(1)
        if keep.numel() == 0:
            return RowsResult(out_x, out_f, out_iter, out_conv)
        if keep.numel() < rows.numel():
            rows, x, f, g, t = rows[keep], x[keep], f[keep], g[keep], t[keep]
            S, Y, rho = S[:, keep], Y[:, keep], rho[:, keep]
            gamma, has_pairs, done, iterations = gamma[keep], has_pairs[keep], done[keep], iterations[keep]
    out_x[rows], out_f[rows], out_iter[rows] = x.detach(), f.detach(), iterations
    return RowsResult(out_x, out_f, out_iter, out_conv)


def _value_and_grad(fn, x: torch.Tensor, rows: torch.Tensor) -> tuple:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        f = fn(x, rows)
        (g,) = torch.autograd.grad(f.sum(), x)
    return f.detach(), g


def _two_loop(g, S, Y, rho, gamma, slot, history) -> torch.Tensor:
    """The L-BFGS product H g per row, newest pair first (``slot`` is where the next pair goes)."""
    q = g.clone()
    order = [(slot - 1 - i) % history for i in range(history)]  # newest to oldest
    alphas = {}
    for i in order:
        alphas[i] = rho[i] * (S[i] * q).sum(1)
        q = q - alphas[i][:, None] * Y[i]
    r = gamma[:, None] * q
    for i in reversed(order):
        beta = rho[i] * (Y[i] * r).sum(1)
        r = r + (alphas[i] - beta)[:, None] * S[i]
    return r
