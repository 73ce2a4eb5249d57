"""Mean-field inference: free variational parameters for every datapoint and every local site, no encoder.

.. math:: q(z_n) = \\prod_{\\text{sites } s} T_s\\Big(\\mathcal N\\big(\\mu_{n,s},\\ \\mathrm{diag}\\,\\sigma_{n,s}^2\\big)\\Big),
    \\qquad \\sigma_{n,s} = \\mathrm{softplus}(\\rho_{n,s}), \\qquad n = 1, \\dots, N

The parameters of all local sites of datapoint n are row n of one ``(N, size)`` table (see
:class:`~pvae.guides.sites.LocalFamily`), a sparse embedding looked up by the batch's ``idx``. Its
gradients are sparse, so :func:`pvae.fit` gives it ``torch.optim.SparseAdam``: a step reads and
writes only the batch's rows and keeps Adam's moments per row, which do not decay while a row is not
seen (the "lazy Adam" of TensorFlow's ``LazyAdamOptimizer``; the bias correction counts the table's
steps, not the row's). A step costs the same whether the table has ten thousand or a million rows,
and memory is the table plus two moments, :math:`O(N \\cdot size)`. In a data-parallel fit each rank
holds only the rows of the datapoints it owns (:meth:`MeanFieldGuide.hold_rows`), N / R of them.

Fitting these local parameters together with the model is variational EM (Hoffman et al. 2013,
stochastic variational inference with the local step replaced by gradient steps); on held-out data
the same family, optimized per datapoint on a frozen model, is the best q* of Cremer et al. (2018),
see :mod:`pvae.compare`.

References:

1. Hoffman, Blei, Wang & Paisley, *Stochastic Variational Inference*, JMLR 14 (2013), arXiv 1206.7051.
2. Cremer, Li & Duvenaud, *Inference Suboptimality in Variational Autoencoders*, arXiv 1801.03558.
"""

from typing import Optional

import torch
from pyro.infer.util import is_validation_enabled
from torch import nn

from pvae.programs import Batch, ProgramError

from .sites import SCALE_FLOOR, LocalFamily, SiteGuide, gaussian_sites


class MeanFieldGuide(SiteGuide):
    """q(z_n) with free parameters per datapoint of the split ``split``, for every local site of ``model``.

    :param model: the Pyro model the guide is built from.
    :param num_data: rows of the table, the split's N; by default the size of the first batch's split.
    :param sites: the sites, instead of a model (see :func:`mean_field_guide`).
    :param init_scale: every scale starts here and every mean at 0; 1 is a standard normal prior.
        Fitting with the decoder, small scales let the decoder see the means from the first epochs; from
        the prior, variational EM tends to leave z unused (the decoder learns the mean image first).
    :param sparse: sparse gradients (``torch.optim.SparseAdam``, a step touches only the batch's rows).
    :param split: the split whose rows the table holds: a batch of another split is refused, since its
        ``idx`` would look up the wrong datapoints.
    :param family: builds the family of q from the sites (the diagonal one by default; see
        :class:`~pvae.guides.AmortizedGuide`).
    """

    static_structure = True  # a table look-up: the same operations on every batch (pvae.protocols.StaticProgram)

    def __init__(self, model=None, num_data: Optional[int] = None, *, sites=None, init_scale: float = 0.1,
                 sparse: bool = True, split: str = "train", family=LocalFamily):
        super().__init__(model, sites, family)
        if num_data is not None and num_data < 1:
            raise ValueError(f"num_data must be at least 1, got {num_data}")
        if not init_scale > SCALE_FLOOR:
            raise ValueError(f"init_scale must exceed {SCALE_FLOOR}, got {init_scale}")
        self.num_data, self.init_scale, self.sparse, self.split = num_data, init_scale, sparse, split
        self.table = None
        self.shard = None  # in a data-parallel fit: the rows this rank holds (pvae.distributed.Shard)
        if sites is not None and num_data is not None:
            self._build(None)
            self._ready = True

    def _setup_local(self, batch: Batch) -> None:
        if self.num_data is None:
            self.num_data = batch.num_data
        self._build(batch.x.device)

    def _build(self, device) -> None:
        rows = self.num_data if self.shard is None else self.shard.count(self.num_data)
        self.table = nn.Embedding(rows, self.family.size, sparse=self.sparse, device=device)
        with torch.no_grad():
            self.table.weight.copy_(self.family.init_raw(rows, self.init_scale, device))

    def hold_rows(self, shard) -> None:
        """Keep only the rows of the datapoints that ``shard``'s rank owns (row n on rank n mod R), as
        rank r of a data-parallel fit does: ``idx`` stay the rows' positions in the whole split."""
        if self.shard is not None:
            raise ValueError("this mean-field guide already holds the rows of one rank")
        self.shard = shard
        if self.table is not None:
            whole = self.table.weight.detach()
            self._build(whole.device)
            with torch.no_grad():
                self.table.weight.copy_(whole[shard.rank::shard.size])

    def row_tables(self) -> list:
        """The tensors whose rows are datapoints (a checkpoint gathers them from every rank)."""
        return [self.table.weight]

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Positions in the table of the datapoints ``idx``."""
        if self.shard is None:
            return idx
        if is_validation_enabled() and not bool(self.shard.owns(idx).all()):
            raise ProgramError(f"rank {self.shard.rank} of {self.shard.size} holds the mean-field parameters of rows "
                               f"n with n % {self.shard.size} == {self.shard.rank} only, but was asked for others")
        return self.shard.local(idx)

    def local_params(self, batch: Batch) -> dict:
        """The rows ``batch.idx`` of the table, as parameters of q."""
        if not self._ready:
            self.setup(batch)
        if batch.split not in (None, self.split):
            raise ProgramError(
                f"this mean-field guide holds q for the {self.split} rows only and has none for the "
                f"{batch.split} split: evaluate it on {self.split!r}, or fit q* there (pvae compare)"
            )
        if batch.num_data != self.num_data:
            raise ProgramError(
                f"this mean-field guide holds {self.num_data} datapoints but got rows of a split of "
                f"{batch.num_data}: call it with the rows' positions in the data it was fitted to (idx)"
            )
        return self.family.unpack(self.table(self._rows(batch.idx)))

    @torch.no_grad()
    def set_local_params(self, params: dict, idx: Optional[torch.Tensor] = None) -> None:
        """Overwrite the rows ``idx`` (all rows this guide holds when None) with ``params`` (natural
        parameters)."""
        rows = torch.arange(self.table.num_embeddings, device=self.table.weight.device) if idx is None else self._rows(idx)
        self.table.weight[rows] = self.family.pack(params).to(self.table.weight)


def mean_field_guide(num_data: int, latent_dim: int, init_scale: float = 0.1, sparse: bool = True,
                     name: str = "z") -> MeanFieldGuide:
    """The built-in VAE's mean-field guide: one Gaussian site ``name`` in R^latent_dim per datapoint."""
    return MeanFieldGuide(num_data=num_data, sites=gaussian_sites(latent_dim, name), init_scale=init_scale,
                          sparse=sparse)
