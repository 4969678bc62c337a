"""What the live plot costs: the time spent in LivePlot's callbacks against the training loop.

    python scripts/live_plot_cost.py                      # the default run (what `make run` trains)
    python scripts/live_plot_cost.py --log-every 1        # a record, and a redraw chance, every step

The plot renders into its widgets exactly as in JupyterLab (PNG frames into the Output widget),
without a browser to show them: the cost is the same, and it is measured in-process as the
callback's own wall time (`LivePlot.busy_s`), so a noisy machine cannot blur a 1% difference
between two separate runs. Prints the final table too.
"""

from __future__ import annotations

import argparse
import logging
import time

import kdlab
from kdlab.course.widgets import LivePlot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log-every", type=int, default=None)
    ap.add_argument("--out-dir", default="runs/live-plot-cost")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    over = {"out_dir": args.out_dir}
    if args.log_every:
        over["log_every"] = args.log_every
    cfg = kdlab.load_config(overrides=over)
    lp = LivePlot(widgets=True)  # the default throttle: at most 3% of the time redrawing
    t0 = time.perf_counter()
    state = kdlab.train(cfg, callbacks=[lp])
    total = time.perf_counter() - t0
    loop = sum(r["interval_s"] for r in state.history if r["kind"] == "train")
    print(kdlab.format_summary(state.history))
    print(
        f"log_every {cfg.log_every}: {sum(r['kind'] == 'train' for r in state.history)} train records, "
        f"{sum(r['kind'] == 'eval' for r in state.history)} evaluations, {lp.renders} redraws"
    )
    print(
        f"live plot: {lp.busy_s:.2f} s in its callbacks = {100 * lp.busy_s / total:.2f}% of the run's "
        f"{total:.1f} s ({100 * lp.busy_s / loop:.2f}% of the {loop:.1f} s training loop)"
    )


if __name__ == "__main__":
    main()
