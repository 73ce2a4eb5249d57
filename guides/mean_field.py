"""Mean-field inference: free variational parameters for every datapoint, no encoder.

.. math:: q(z_n) = \\mathcal N\\big(z_n;\\ \\mu_n,\\ \\mathrm{diag}\\,\\sigma_n^2\\big), \\qquad
    \\sigma_n = \\mathrm{softplus}(\\rho_n), \\qquad n = 1, \\dots, N

The ``(N, D)`` tables of :math:`\\mu` and :math:`\\rho` are sparse embeddings looked up by the rows
of the batch, which the ``"data"`` plate carries as its subsample (:mod:`pvae.plate`). Their
gradients are sparse, so :func:`pvae.fit` gives them ``torch.optim.SparseAdam``: a step reads and
writes only the batch's rows and keeps Adam's moments per row, which do not decay while a row is not
seen (the "lazy Adam" of TensorFlow's ``LazyAdamOptimizer``; the bias correction counts the table's
steps, not the row's). A step costs the same whether the table has ten thousand or a million rows,
and memory is the tables plus two moments each, :math:`O(ND)`.

Fitting these local parameters together with the decoder is variational EM (Hoffman et al. 2013,
stochastic variational inference with the local step replaced by gradient steps); at test time, a
fresh table over held-out rows, optimized on a frozen decoder, gives the best Gaussian
:math:`q^*` of Cremer et al. (2018), see :mod:`pvae.compare`.

References:

1. Hoffman, Blei, Wang & Paisley, *Stochastic Variational Inference*, JMLR 14 (2013), arXiv 1206.7051.
2. Cremer, Li & Duvenaud, *Inference Suboptimality in Variational Autoencoders*, arXiv 1801.03558.
"""

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from pvae.plate import data_plate

from .amortized import SCALE_FLOOR


class MeanFieldGuide(nn.Module):
    """A diagonal Gaussian q(z_n) per datapoint, for a data set of ``num_data`` rows.

    :param num_data: rows of the data set; the guide must be called with the same data set, rows
        ``idx`` (the plate's subsample) or, with ``idx=None``, all of them in order.
    :param latent_dim: size of z.
    :param init_scale: every scale starts here and every mean at 0; 1 is the prior. Fitting with the
        decoder, small scales let the decoder see the means from the first epochs; from the prior,
        variational EM tends to leave z unused (the decoder learns the mean image first).
    :param sparse: sparse gradients (``torch.optim.SparseAdam``, a step touches only the batch's
        rows); ``False`` gives dense gradients, for a table optimized whole by a dense optimizer (as
        :func:`pvae.compare.optimize_mean_field` does with a batch of held-out rows).
    """

    amortized = False  # q has no encoder: it is defined on its own training rows only

    def __init__(self, num_data: int, latent_dim: int, init_scale: float = 0.1, sparse: bool = True):
        super().__init__()
        if num_data < 1 or latent_dim < 1:
            raise ValueError(f"num_data and latent_dim must be at least 1, got {num_data}, {latent_dim}")
        if not init_scale > SCALE_FLOOR:
            raise ValueError(f"init_scale must exceed {SCALE_FLOOR}, got {init_scale}")
        self.num_data = num_data
        self.latent_dim = latent_dim
        self.loc = nn.Embedding(num_data, latent_dim, sparse=sparse)
        self.raw_scale = nn.Embedding(num_data, latent_dim, sparse=sparse)
        with torch.no_grad():
            self.loc.weight.zero_()
            self.raw_scale.weight.fill_(inverse_softplus(init_scale - SCALE_FLOOR))

    def local_params(self, idx: torch.Tensor) -> tuple:
        """``(loc, scale)`` of the rows ``idx``, each ``(len(idx), latent_dim)``."""
        return self.loc(idx), F.softplus(self.raw_scale(idx)) + SCALE_FLOOR

    @torch.no_grad()
    def set_local_params(self, loc: torch.Tensor, scale: torch.Tensor, idx=None) -> None:
        """Overwrite the rows ``idx`` (all rows when None) with ``loc`` and ``scale``."""
        if idx is None:
            idx = torch.arange(self.num_data, device=self.loc.weight.device)
        self.loc.weight[idx] = loc.to(self.loc.weight)
        raw = inverse_softplus((scale - SCALE_FLOOR).clamp(min=SCALE_FLOOR))
        self.raw_scale.weight[idx] = raw.to(self.raw_scale.weight)

    def forward(self, x: torch.Tensor, idx=None, num_data=None) -> None:
        if idx is None and x.shape[0] != self.num_data:
            raise ValueError(
                f"this mean-field guide holds {self.num_data} datapoints but got a batch of {x.shape[0]} "
                "without idx: pass the rows' positions in the training set (the data plate's subsample); "
                "it has no q(z|x) for data it was not fitted to"
            )
        with data_plate(x, idx, num_data) as rows:  # rows: the subsample, (B,)
            loc, scale = self.local_params(rows)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def inverse_softplus(y):
    """:math:`\\log(e^y - 1)`, the inverse of softplus, for ``y > 0`` (a float or a tensor)."""
    if torch.is_tensor(y):
        return y + torch.log(-torch.expm1(-y))
    return y + math.log(-math.expm1(-y))


def gaussian_guide(loc: torch.Tensor, scale: torch.Tensor):
    """A guide program ``guide(x, idx=None, num_data=None)`` whose q(z_b) is N(loc_b, scale_b^2) for
    the ``b``-th row of the batch: the given tensors ``(B, D)``, with whatever gradient they carry.
    It is how refined or optimized local parameters (:mod:`pvae.guides.semi_amortized`,
    :mod:`pvae.compare`) are evaluated by :mod:`pvae.inference`."""

    def guide(x: torch.Tensor, idx=None, num_data=None) -> None:
        if x.shape[0] != loc.shape[0]:
            raise ValueError(f"these local parameters are for {loc.shape[0]} datapoints, not {x.shape[0]}")
        with data_plate(x, idx, num_data):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return guide
