"""What the pictures cost a run: the figures ``pvae train`` draws at its end, the latent-space snapshots
it records during training, and the GIF made of them, timed on a trained run folder.

    python benchmarks/figure_cost.py runs/digits-<time>

Prints CPU seconds (this process) and wall seconds for each part, beside the run's own training
seconds (its metrics), so that the share the figures add to ``pvae train`` can be read off.
"""

import argparse
import time

from pvae import figures
from pvae.metrics import read_metrics
from pvae.run import load_run, read_config


def timed(label: str, fn, repeats: int) -> None:
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    print(f"{label:<44} wall {min(walls):6.2f} s   cpu {min(cpus):6.2f} s   (best of {repeats})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder written by pvae train (2-D code, with latent-epochs.npz)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    run = load_run(args.run)
    history = read_metrics(run.path)
    ctx = figures.FigureContext(run.model, run.guide, run.data, run.path, history, read_config(run.path).get("run"))
    names = [n for n, f in figures.FIGURES.items() if f.on_train]
    frames = len(figures.load_snapshots(run.path)["frames"])
    codec, batch = ctx.codec, run.data.batch(ctx.split)
    print(f"{run.path}: {len(history)} epochs, {history[-1]['elapsed']:.1f} s of training steps")
    timed(f"the {len(names)} figures pvae train draws", lambda: figures.draw_figures(ctx, names), args.repeats)
    timed(f"{frames} snapshots of {len(batch)} codes", lambda: [codec.encode(batch) for _ in range(frames)],
          args.repeats)
    timed(f"the GIF of {frames} frames", lambda: figures.latent_animation(run.path, "/tmp/figure_cost.gif"),
          args.repeats)


if __name__ == "__main__":
    main()
