"""The live plot in a real browser: JupyterLab on localhost, a small notebook that trains with
kdlab.widgets.LivePlot, run in headless Chromium (Debian's `chromium`, driven by Playwright).

Asserts on the page that the plot image appears and changes while the cell runs, and that the
status line reaches the last step. Screenshots of two moments are kept in runs/browser/ (the
test's artifacts). `make setup` installs chromium and playwright; set KDLAB_SKIP_BROWSER=1 to
skip this test on a machine that cannot have them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from browser_notebook import free_port, live_plot_frame, open_and_run_all, start_lab, wait_http  # noqa: E402

ARTIFACTS = ROOT / "runs" / "browser"

pytestmark = pytest.mark.skipif(os.environ.get("KDLAB_SKIP_BROWSER") == "1", reason="KDLAB_SKIP_BROWSER=1")

STEPS = 30


def _notebook(overrides: dict) -> dict:
    cells = [
        "import kdlab, kdlab.widgets\n"
        f"cfg = kdlab.load_config(overrides={overrides!r})",
        # a 5-second run: redraw often (the default throttle keeps redraws under 3% of a long run)
        "lp = kdlab.widgets.LivePlot(min_interval_s=0.3, max_overhead=0.5)\n"
        "state = kdlab.train(cfg, callbacks=[lp])\n"
        "print('renders', lp.renders, 'step', state.step)",
    ]
    return {"nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [],
                       "source": src} for i, src in enumerate(cells)]}


def test_live_plot_updates_in_jupyterlab(tmp_path, tiny_teacher, austen_ready):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is missing: run `make setup` (or set KDLAB_SKIP_BROWSER=1)"
    overrides = {"teacher": str(tiny_teacher), "student": "tiny", "student_init": "random", "data": "austen",
                 "data_dir": str(austen_ready), "seq_len": 32, "batch_size": 2, "max_steps": STEPS, "log_every": 1,
                 "eval_every": 5, "eval_batches": 1, "save_every": 0, "out_dir": str(tmp_path / "run"),
                 "device": "cpu"}
    (tmp_path / "live.ipynb").write_text(json.dumps(_notebook(overrides)))
    port = free_port()
    env = {**os.environ, "TQDM_DISABLE": "1", "JUPYTER_CONFIG_DIR": str(tmp_path / "jcfg"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "jrt")}
    server = start_lab(tmp_path, port, env, tmp_path / "jupyter.log")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/status", 90, server)
        with sync_playwright() as p:
            browser, page = open_and_run_all(p, chromium, port, "live.ipynb", 1400)
            seen: list[tuple[float, str, str]] = []  # (time, image src, status text)
            shots = []
            deadline = time.time() + 180
            while time.time() < deadline:
                src, status = live_plot_frame(page)
                if src and (not seen or src != seen[-1][1]):
                    seen.append((time.time(), src, status))
                    if len(shots) < 2:
                        path = ARTIFACTS / f"live-plot-{len(shots) + 1}.png"
                        page.screenshot(path=str(path))
                        shots.append(path)
                done = page.evaluate("() => [...document.querySelectorAll('.jp-OutputArea-output pre')]"
                                     ".some(p => p.innerText.includes('renders'))")
                if done:  # the cell printed its last line: the final frame is in
                    break
                time.sleep(0.1)
            page.screenshot(path=str(ARTIFACTS / "live-plot-final.png"))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert seen, "the live plot's image never appeared (see runs/browser/live-plot-final.png)"
    assert len({src for _, src, _ in seen}) >= 2, "the image did not change while the cell ran"
    first_status, last_status = seen[0][2], seen[-1][2]
    assert first_status.startswith("val KL")  # the first frame: the evaluation before training
    assert f"step {STEPS}/{STEPS}" in last_status and "early stopping: best" in last_status, last_status
    assert len(shots) == 2 and all(s.stat().st_size > 10_000 for s in shots)
