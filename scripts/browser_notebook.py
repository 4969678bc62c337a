"""Run a course notebook top to bottom in a real JupyterLab, as a new user would, and keep screenshots.

    python scripts/browser_notebook.py                          # notebook 00, KDLAB_PROFILE as set (else auto)
    python scripts/browser_notebook.py --profile ci --out docs/images

Starts `jupyter lab` the way `make lab` does (the server's root is a copy of notebooks/ under
runs/browser-course/, so JupyterLab's autosave cannot overwrite the committed notebook), opens the
notebook in headless Chromium (Debian's `chromium`, driven by Playwright), runs *Run All Cells*, and
watches the live plot while the training cell runs. Screenshots: the live plot mid-run and at the
end, and the whole page at the end. Exits non-zero if the plot never appeared or never changed, or
if a cell raised. Needs `make setup` (it installs chromium and playwright).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float, server: subprocess.Popen | None = None) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with code {server.returncode} (see its log)")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {seconds} s")


def start_lab(root_dir: Path, port: int, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """`jupyter lab` on loopback, no token, the app exposed to scripts (window.jupyterapp); also used by
    tests/test_browser.py."""
    with open(log_path, "w") as log:  # the child keeps its own handle
        return subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={port}", "--ServerApp.token=", "--ServerApp.password=",
             "--ServerApp.disable_check_xsrf=True", "--LabApp.expose_app_in_browser=True",
             f"--ServerApp.root_dir={root_dir}", *(["--allow-root"] if os.geteuid() == 0 else [])],
            env=env, stdout=subprocess.DEVNULL, stderr=log)


def open_and_run_all(playwright, chromium: str, port: int, notebook: str, width: int, dialog_timeout_ms: int = 10_000):
    """Open `notebook` (relative to the server's root) in headless Chromium, accept the kernel dialog if
    JupyterLab shows one, wait for an idle kernel and start *Run All Cells* without awaiting it (its
    promise resolves only when every cell has run; callers watch the frames in between).
    Returns (browser, page); also used by tests/test_browser.py."""
    browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": width, "height": 1000})
    page.goto(f"http://127.0.0.1:{port}/lab/tree/{notebook}")
    page.wait_for_function("() => window.jupyterapp && document.querySelector('.jp-Notebook')", timeout=90_000)
    try:  # JupyterLab may ask which kernel to start: accept its choice (the kernelspec's python3)
        page.locator(".jp-Dialog .jp-mod-accept").click(timeout=dialog_timeout_ms)
    except Exception:  # no dialog: the kernel started on its own
        pass
    try:  # JupyterLab's "receive news?" notification: answer no, so it does not cover the page
        page.get_by_role("button", name="No").click(timeout=3_000)
    except Exception:
        pass
    page.wait_for_function("() => { const k = window.jupyterapp.shell.currentWidget?.sessionContext?.session"
                           "?.kernel; return k && k.status === 'idle'; }", timeout=90_000)
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); return true; }")
    return browser, page


def live_plot_frame(page) -> tuple[str, str]:
    """(src of the live plot's current image, its status line), empty strings before it exists."""
    src = page.evaluate("() => { const i = document.querySelector('.kdlab-plot img'); return i ? i.src : ''; }")
    status = page.evaluate("() => { const h = document.querySelector('.kdlab-status'); return h ? h.innerText : ''; }")
    return src, status


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--notebook", default="00_quickstart.ipynb")
    ap.add_argument("--profile", default=None, help="KDLAB_PROFILE for the kernel (default: as set, else auto)")
    ap.add_argument("--out", default="docs/images")
    ap.add_argument("--timeout", type=float, default=1200)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("browser_notebook: Debian's chromium is missing; run `make setup`")
    work = ROOT / "runs" / "browser-course"
    shutil.rmtree(work, ignore_errors=True)
    (work / "notebooks").mkdir(parents=True)
    shutil.copy(ROOT / "notebooks" / args.notebook, work / "notebooks" / args.notebook)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.notebook).stem
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(work / "jcfg"), "JUPYTER_RUNTIME_DIR": str(work / "jrt")}
    if args.profile:
        env["KDLAB_PROFILE"] = args.profile
    port = free_port()
    server = start_lab(work / "notebooks", port, env, work / "jupyter.log")
    t_start = time.time()
    try:
        wait_http(f"http://127.0.0.1:{port}/api/status", 90, server)
        with sync_playwright() as p:
            browser, page = open_and_run_all(p, chromium, port, args.notebook, 1500, dialog_timeout_ms=5_000)
            t_run = time.time()
            srcs, status, mid_shot = [], "", None
            while time.time() - t_run < args.timeout:
                src, status = live_plot_frame(page)
                if src and (not srcs or src != srcs[-1]):
                    srcs.append(src)
                    if len(srcs) == 4 and mid_shot is None:  # a few frames in: training under way
                        live = page.locator(".kdlab-liveplot")
                        live.scroll_into_view_if_needed()
                        mid_shot = out / f"{stem}-live-plot-during.png"
                        live.screenshot(path=str(mid_shot))
                state = page.evaluate(
                    "() => { const nb = window.jupyterapp.shell.currentWidget; const k = nb?.sessionContext?.session?.kernel;"
                    " const cells = nb.content.widgets.filter(c => c.model.type === 'code');"
                    " return {idle: k && k.status === 'idle', done: cells.every(c => c.model.executionCount !== null),"
                    " errors: cells.filter(c => c.model.outputs.toJSON().some(o => o.output_type === 'error')).length}; }")
                if state["idle"] and state["done"] and time.time() - t_run > 5:
                    break
                time.sleep(0.2)
            wall = time.time() - t_run
            live = page.locator(".kdlab-liveplot")
            live.scroll_into_view_if_needed()
            live.screenshot(path=str(out / f"{stem}-live-plot-final.png"))
            page.screenshot(path=str(out / f"{stem}-page.png"))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"{args.notebook}: run all cells in {wall:.0f} s (server start included: {time.time() - t_start:.0f} s); "
          f"{len(srcs)} distinct live-plot frames; errors shown: {state['errors']}; last status: {status!r}")
    print("screenshots:", ", ".join(str(p.relative_to(ROOT)) for p in sorted(out.glob(f"{stem}-*.png"))))
    if not state["done"]:
        sys.exit("browser_notebook: not every cell ran (timeout?)")
    if len(srcs) < 2:
        sys.exit("browser_notebook: the live plot never appeared or never changed")
    if state["errors"]:
        sys.exit("browser_notebook: a cell raised an error (see the page screenshot)")


if __name__ == "__main__":
    main()
