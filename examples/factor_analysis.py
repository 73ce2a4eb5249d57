"""Bayesian factor analysis with global loadings, fitted with an amortized and a mean-field guide for
the local factors: does each recover the true loadings' subspace, and how far are its q from the
posterior?

Synthetic data from a known model: P observed features driven by D < P factors,

.. math::
    W \\sim \\prod_{p, d} \\mathcal N(W_{pd};\\ 0, 1) \\quad (P \\times D,\\ \\text{global}), \\qquad
    z_n \\sim \\mathcal N(0, I_D), \\qquad
    x_n \\mid z_n, W \\sim \\mathcal N\\big(W z_n + \\mu,\\ \\mathrm{diag}\\,\\sigma^2\\big), \\qquad n = 1, \\dots, N,

with :math:`\\mu` and :math:`\\sigma` point-estimated (``pyro.param``) and :math:`W` given a posterior.
The loadings sit outside the ``"data"`` plate, so pvae treats them as global: each guide gets a
mean-field Normal :math:`q(W)` built from the model's trace, beside its q of the local :math:`z_n`
(an encoder network, or free parameters per row). Minibatches of rows estimate the data set's ELBO
:math:`\\mathbb E_q[\\sum_n \\log p(x_n, z_n \\mid W) - \\log q(z_n)] - \\mathrm{KL}(q(W) \\| p(W))`
without bias (pvae scales the data plate by N / B).

:math:`W` is identified up to a rotation of the factors only (:math:`W R` with :math:`R R^\\top = I`
gives the same :math:`p(x)`), so the script measures the *subspace* of the guide's mean
:math:`\\hat W`: the principal angles :math:`\\theta_1 \\ge \\dots \\ge \\theta_D` between the column
spaces of :math:`\\hat W` and of the true :math:`W` (:math:`\\cos\\theta_i` are the singular values
of :math:`Q_{\\hat W}^\\top Q_W`, with :math:`Q` orthonormal bases), and the share of the true
loadings outside :math:`\\hat W`'s span, :math:`\\|(I - \\Pi_{\\hat W}) W\\|_F / \\|W\\|_F`, beside
the same figures for PCA's top-D subspace of the training data.

The gap study of Cremer et al. (2018) then holds :math:`W` at the amortized guide's mean
:math:`\\hat W` (and :math:`\\mu, \\sigma` at their fitted values), and measures on held-out rows
:math:`\\mathcal L[q]`, :math:`\\mathcal L[q_K]`, :math:`\\mathcal L[q^*]`, :math:`\\log \\hat p(x)` and
the gaps. Given :math:`\\hat W` the model is linear-Gaussian, so the study can be set beside closed
forms: :math:`\\log p(x) = \\log \\mathcal N(x;\\ \\mu,\\ \\hat W \\hat W^\\top + \\mathrm{diag}\\,\\sigma^2)`,
and the diagonal-Gaussian family's approximation gap is
:math:`\\frac12 (\\sum_d \\log \\Lambda_{dd} - \\log\\det\\Lambda)` with
:math:`\\Lambda = I + \\hat W^\\top \\mathrm{diag}(\\sigma^{-2}) \\hat W` the posterior precision of
:math:`z_n`, the same for every row. The data are continuous, so their densities and bounds may have
either sign: the script prints "train bound", not "ELBO".

::

    python examples/factor_analysis.py                                  # under a minute on a CPU
    python examples/factor_analysis.py --epochs 30 --quick --out /tmp/factor_analysis

References:

1. Ghahramani & Hinton, *The EM Algorithm for Mixtures of Factor Analyzers*, Technical Report
   CRG-TR-96-1, University of Toronto, 1996.
2. Tipping & Bishop, *Probabilistic Principal Component Analysis*, JRSS B 61 (1999).
3. Hoffman, Blei, Wang & Paisley, *Stochastic Variational Inference*, arXiv 1206.7051.
4. Cremer, Li & Duvenaud, *Inference Suboptimality in Variational Autoencoders*, arXiv 1801.03558.
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints

import pvae
from pvae.compare import compare_inference
from pvae.guides import AmortizedGuide, MeanFieldGuide
from pvae.reports import comparison_table
from pvae.utils import write_json

from _study import add_study_arguments, study_config, write_study  # examples/_study.py

QUICK = dict(batch_size=50, particles=10, max_steps=30, elbo_particles=100, iwae_samples=200, chunk_size=100)
STUDY = dict(elbo_particles=1000, iwae_samples=2000)
GUIDES = ("amortized", "mean-field")


def factor_analysis(num_features: int, num_factors: int):
    """The model ``model(x)`` for ``(B, P)`` rows x, P = ``num_features``, D = ``num_factors``.

    The loadings W may come with a leading particle dimension, ``(S, 1, P, D)``, while z is
    ``(S, B, D)``: ``W @ z[..., None]`` broadcasts over both.
    """
    P, D = num_features, num_factors

    def model(x):
        mu = pyro.param("mu", lambda: x.new_zeros(P))
        sigma = pyro.param("sigma", lambda: x.new_ones(P), constraint=constraints.positive)
        W = pyro.sample("W", dist.Normal(x.new_zeros(P, D), 1.0).to_event(2))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], D), 1.0).to_event(1))
            loc = mu + (W @ z.unsqueeze(-1)).squeeze(-1)
            pyro.sample("x", dist.Normal(loc, sigma).to_event(1), obs=x)

    return model


def synthetic_data(num_features: int, num_factors: int, num_train: int, num_test: int, noise: float, seed: int):
    """Rows from a known factor model: W with standard normal entries, mu standard normal, and
    noise scales spread over [noise / 2, 3 noise / 2]. Returns ``(dataset, truth)``."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(num_features, num_factors, generator=g)
    mu = torch.randn(num_features, generator=g)
    sigma = noise * (0.5 + torch.rand(num_features, generator=g))
    n = num_train + num_test
    z = torch.randn(n, num_factors, generator=g)
    x = mu + z @ W.T + sigma * torch.randn(n, num_features, generator=g)
    data = pvae.Dataset.from_tensors(x[:num_train], test=x[num_train:], name="factor analysis")
    return data, {"W": W, "mu": mu, "sigma": sigma}


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The principal angles between the column spaces of A and B, in degrees, largest first."""
    qa, qb = torch.linalg.qr(A.double())[0], torch.linalg.qr(B.double())[0]
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return torch.rad2deg(torch.arccos(cosines)).flip(0)


def outside_share(W_hat: torch.Tensor, W: torch.Tensor) -> float:
    """``||(I - P) W||_F / ||W||_F`` with P the projection onto W_hat's column space."""
    q = torch.linalg.qr(W_hat.double())[0]
    W = W.double()
    return float(torch.linalg.norm(W - q @ (q.T @ W)) / torch.linalg.norm(W))


def exact_log_px(x: torch.Tensor, W: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log p(x_n) per row with z integrated out: N(x; mu, W W^T + diag sigma^2)."""
    W, mu, sigma = W.double(), mu.double(), sigma.double()
    cov = W @ W.T + torch.diag(sigma ** 2)
    return dist.MultivariateNormal(mu, covariance_matrix=cov).log_prob(x.double())


def diagonal_gap(W: torch.Tensor, sigma: torch.Tensor) -> float:
    """KL(q* || p(z | x)) for the best diagonal Gaussian q*: 1/2 (sum log diag(L) - log det L)."""
    W, sigma = W.double(), sigma.double()
    precision = torch.eye(W.shape[1], dtype=W.dtype) + W.T @ (W / sigma[:, None] ** 2)
    return float(0.5 * (precision.diagonal().log().sum() - torch.logdet(precision)))


def conditioned(model, values: dict):
    """``model`` with W, mu and sigma fixed at ``values`` and hidden from the trace: a model of the local
    z alone, the one the gap study measures."""
    fixed = poutine.block(
        poutine.substitute(poutine.condition(model, {"W": values["W"]}), {k: values[k] for k in ("mu", "sigma")}),
        hide=["W", "mu", "sigma"],
    )

    def study_model(x):
        return fixed(x)

    return study_model


def local_encoder(guide: AmortizedGuide, num_features: int) -> AmortizedGuide:
    """The trained encoder of ``guide`` without its q(W): the guide of :func:`conditioned`'s model."""
    encoder = AmortizedGuide(sites=guide.family.sites, body=guide.body, in_features=num_features, inputs=())
    encoder.head.load_state_dict(guide.head.state_dict())
    return encoder.to(guide.head.weight.device)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Bayesian factor analysis on synthetic data: amortized against "
                                            "mean-field q(z), the loadings' subspace and the inference gaps.")
    p.add_argument("--features", type=int, default=10, help="P, observed features (default: 10)")
    p.add_argument("--factors", type=int, default=3, help="D, latent factors (default: 3)")
    p.add_argument("--train-size", type=int, default=600, help="N, training rows (default: 600)")
    p.add_argument("--test-size", type=int, default=200, help="held-out rows (default: 200)")
    p.add_argument("--noise", type=float, default=0.5,
                   help="the noise scales are spread over [noise/2, 3 noise/2] (default: 0.5)")
    p.add_argument("--data-seed", type=int, default=0, help="seeds the true model and its rows (default: 0)")
    p.add_argument("--hidden", type=int, nargs="*", default=[32], help="hidden widths of the encoder (default: 32)")
    p.add_argument("--epochs", type=int, default=300, help="passes over the training rows (default: 300)")
    p.add_argument("--batch-size", type=int, default=100, help="rows per SVI step (default: 100)")
    p.add_argument("--lr", type=float, default=0.02,
                   help="Adam's learning rate for the encoder, q(W), mu and sigma (default: 0.02)")
    p.add_argument("--local-lr", type=float, default=0.1,
                   help="mean-field: SparseAdam's learning rate for the per-row parameters (default: 0.1)")
    add_study_arguments(p, 200, "rows", "curves.png, compare.json/.md/.png and loadings.json", study=STUDY)
    args = p.parse_args(argv)
    if not 1 <= args.factors < args.features:
        p.error("--factors must be at least 1 and below --features")
    if min(args.epochs, args.train_size, args.test_size, args.datapoints) < 1 or not args.noise > 0:
        p.error("--epochs, --train-size, --test-size and --datapoints must be at least 1, --noise positive")
    return args


def main(argv=None) -> dict:
    """Return ``{"histories", "comparison", "truth", "fitted", "subspace", "pca", "closed_form", "x_study"}``:
    per guide its per-epoch records, fitted ``W`` (the guide's mean), ``mu`` and ``sigma`` and
    subspace figures; the closed forms given the amortized run's fit; the study's rows."""
    args = parse_args(argv)
    device = pvae.resolve_device(args.device)
    data, truth = synthetic_data(args.features, args.factors, args.train_size, args.test_size, args.noise,
                                 args.data_seed)
    data = data.to(device)
    model = factor_analysis(args.features, args.factors)
    config = pvae.FitConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, local_lr=args.local_lr,
                            seed=args.seed, progress=not args.quiet)
    histories, guides, fitted, subspace = {}, {}, {}, {}
    for name in GUIDES:
        guide = AmortizedGuide(model, hidden=tuple(args.hidden)) if name == "amortized" else MeanFieldGuide(model)
        histories[name] = pvae.fit(model, guide, data, config, device=device).history  # clears the param store first
        guides[name] = guide
        fitted[name] = {"W": guide.global_means()["W"].detach().cpu(), "mu": pyro.param("mu").detach().cpu(),
                        "sigma": pyro.param("sigma").detach().cpu()}
        angles = principal_angles(fitted[name]["W"], truth["W"])
        subspace[name] = {"angles": angles.tolist(), "outside": outside_share(fitted[name]["W"], truth["W"])}
    centred = data.train.cpu() - data.train.cpu().mean(0)
    pca = torch.linalg.svd(centred.double(), full_matrices=False)[2][: args.factors].T  # (P, D)
    pca_figures = {"angles": principal_angles(pca, truth["W"]).tolist(), "outside": outside_share(pca, truth["W"])}

    # the gap study on the amortized run: W at its guide's mean, mu and sigma at their fitted values
    x = data.batch("test", slice(0, args.datapoints))
    study = study_config(args, QUICK, STUDY)
    # compare_inference holds a model's global sites at its guide's mean by itself, but in this version of
    # pvae that conditioning trips its own program check ("observed site 'W' of the model is outside the
    # 'data' plate"), and its seeding clears Pyro's param store (mu, sigma): so the study gets the model
    # conditioned on the fitted W, mu and sigma here, and the encoder without its q(W)
    fit = fitted["amortized"]
    values = {"W": fit["W"].to(device), "mu": fit["mu"].to(device), "sigma": fit["sigma"].to(device)}
    comparison = compare_inference(conditioned(model, values), x, local_encoder(guides["amortized"], args.features),
                                   study, progress=not args.quiet,
                                   settings={"split": "test", "data": data.name,
                                             "global sites": "W held at the amortized guide's mean"})
    log_px = exact_log_px(x.x.cpu(), fit["W"], fit["mu"], fit["sigma"])
    closed = {"log_px": float(log_px.mean()), "approximation_gap": diagonal_gap(fit["W"], fit["sigma"])}
    closed["elbo_q_star"] = closed["log_px"] - closed["approximation_gap"]

    print(f"factor analysis: P = {args.features} features, D = {args.factors} factors, {args.train_size} training "
          f"rows, noise scales {truth['sigma'].min():.2f}..{truth['sigma'].max():.2f}, {args.epochs} epochs of "
          f"batches of {args.batch_size}; after training:")
    for name in GUIDES:
        record = histories[name][-1]
        test = f", test bound {record['test_elbo']:8.3f}" if "test_elbo" in record else ""
        print(f"  {name:<10} train bound {record['train_elbo']:8.3f} nats per row (KL(q(W) || p(W)) "
              f"{record['train_global_kl']:.1f}){test}  ({record['elapsed']:.1f} s of training)")
    print("\nSubspace of the loadings, against the true W (principal angles in degrees, largest first; "
          "share of ||W|| outside the estimate's span):")
    for name, figures in [*subspace.items(), ("PCA", pca_figures)]:
        angles = ", ".join(f"{a:5.2f}" for a in figures["angles"])
        print(f"  {name:<10} angles {angles}   outside {figures['outside']:.4f}")
    print(f"\nInference gaps on {len(x)} test rows, W held at the amortized guide's mean and mu, sigma at "
          "their fitted values:")
    print(comparison_table(comparison))
    print(f"closed forms given that fit: log p(x) {closed['log_px']:.3f}, L[q*] {closed['elbo_q_star']:.3f}, "
          f"approximation gap {closed['approximation_gap']:.3f} nats")
    results = {"histories": histories, "comparison": comparison, "truth": truth, "fitted": fitted,
               "subspace": subspace, "pca": pca_figures, "closed_form": closed, "x_study": x.x.cpu()}
    if args.out is not None:
        written = write_study(args.out, histories, comparison)
        loadings = {"true": truth["W"].tolist(), **{n: f["W"].tolist() for n, f in fitted.items()},
                    "subspace": {**subspace, "PCA": pca_figures}, "closed_form": closed}
        write_json(args.out / "loadings.json", loadings)
        written.append(args.out / "loadings.json")
        print(f"\nwrote {', '.join(str(p) for p in written)}")
    return results


if __name__ == "__main__":
    main()
