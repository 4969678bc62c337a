"""Run a course notebook top to bottom in a real JupyterLab, as a new user would, and keep screenshots.

    python scripts/browser_notebook.py                          # notebook 00, KDLAB_PROFILE as set (else auto)
    python scripts/browser_notebook.py --profile ci --out docs/images
    python scripts/browser_notebook.py --notebook 01_concepts.ipynb --profile ci   # and move its T slider

Starts `jupyter lab` the way `make lab` does (the server's root is a copy of notebooks/ under
runs/browser-course/, so JupyterLab's autosave cannot overwrite the committed notebook), opens the
notebook in headless Chromium (Debian's `chromium`, driven by Playwright), runs *Run All Cells*, and
watches the live plot while the training cell runs. Screenshots: the live plot mid-run and at the
end (by then the widget has been replaced by its final figure, a plain image), and the whole page at
the end. A notebook with a temperature explorer (01_concepts) then gets its slider moved with the
arrow keys: screenshots before and after (`<stem>-slider-T1.png`, `<stem>-slider-moved.png`).
Exits non-zero if a notebook that trains shows no live plot or one that never changed, if the
slider's figure did not change, or if a cell raised. Needs `make setup` (it installs chromium and
playwright).
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
# outputs worth a screenshot of their own: {notebook: {name: text the cell's rendered output shows}}
SHOTS = {"00_quickstart.ipynb": {"payoff-table": "retention (bpb)", "decoding": "teacher NLL (nats/token)"}}


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
            [
                sys.executable,
                "-m",
                "jupyter",
                "lab",
                "--no-browser",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={port}",
                "--ServerApp.token=",
                "--ServerApp.password=",
                "--ServerApp.disable_check_xsrf=True",
                "--LabApp.expose_app_in_browser=True",
                f"--ServerApp.root_dir={root_dir}",
                *(["--allow-root"] if os.geteuid() == 0 else []),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


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
    # ... and if it (or any other toast) shows up later, keep it out of the screenshots
    page.add_style_tag(content=".Toastify { display: none !important; }")
    page.wait_for_function(
        "() => { const k = window.jupyterapp.shell.currentWidget?.sessionContext?.session"
        "?.kernel; return k && k.status === 'idle'; }",
        timeout=90_000,
    )
    page.evaluate(_TRACK_LIVE_PLOT)
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); return true; }")
    return browser, page


# Every status line the live plot shows, recorded as it changes (window.kdlabStatuses), and its cell
# marked: when training ends the widget is replaced by its final figure, so polling alone could miss
# the last status, and the figure is then found through the cell.
_TRACK_LIVE_PLOT = """() => {
  if (window.kdlabStatuses) return true;
  window.kdlabStatuses = [];
  const seen = () => {
    const w = document.querySelector('.kdlab-liveplot');
    if (!w) return;
    w.closest('.jp-Cell')?.classList.add('kdlab-liveplot-cell');
    const h = w.querySelector('.kdlab-status'), s = window.kdlabStatuses, t = h ? h.textContent : '';
    if (t && t !== s[s.length - 1]) s.push(t);
  };
  new MutationObserver(seen).observe(document.body, {childList: true, subtree: true, characterData: true});
  return true;
}"""

# the final figure that replaced the live plot: a plain image output in the live plot's cell
FINAL_FIGURE = ".kdlab-liveplot-cell .jp-OutputArea-output[data-mime-type='image/png'] img"


def live_plot_frame(page) -> tuple[str, str]:
    """(src of the live plot's current image, its status line), empty strings before it exists; after
    training, (src of the final figure that replaced it, "")."""
    src = page.evaluate(
        "(final) => { const i = document.querySelector('.kdlab-plot img') || "
        "[...document.querySelectorAll(final)].pop(); return i ? i.src : ''; }",
        FINAL_FIGURE,
    )
    status = page.evaluate("() => { const h = document.querySelector('.kdlab-status'); return h ? h.innerText : ''; }")
    return src, status


def live_plot_statuses(page) -> list[str]:
    """Every status line the live plot showed, in order (recorded in the page as they changed)."""
    return page.evaluate("() => window.kdlabStatuses || []")


def run_state(page) -> dict:
    """{idle, done, errors}: kernel idle, every code cell executed, cells showing an error."""
    return page.evaluate(
        "() => { const nb = window.jupyterapp.shell.currentWidget; const k = nb?.sessionContext?.session?.kernel;"
        " const cells = nb.content.widgets.filter(c => c.model.type === 'code');"
        " return {idle: k && k.status === 'idle', done: cells.every(c => c.model.executionCount !== null),"
        " errors: cells.filter(c => c.model.outputs.toJSON().some(o => o.output_type === 'error')).length}; }"
    )


def wait_run_done(page, timeout: float, settle_s: float = 5.0) -> dict:
    """Poll `run_state` until the kernel is idle and every cell has run (or `timeout` seconds pass)."""
    t0 = time.time()
    while True:
        state = run_state(page)
        if (state["idle"] and state["done"] and time.time() - t0 > settle_s) or time.time() - t0 > timeout:
            return state
        time.sleep(0.5)


_SLIDER_IMG = "() => { const i = document.querySelector('.kdlab-temperature-plot img'); return i ? i.src : ''; }"
# textContent, not innerText: JupyterLab does not render cells off screen, and their innerText is ''
_SLIDER_STATS = "() => document.querySelector('.kdlab-temperature-stats')?.textContent || ''"


def move_temperature_slider(page, out: Path, stem: str, presses: int = 10, timeout_ms: int = 60_000) -> dict:
    """In a notebook that has run, the temperature explorer (kdlab.course.widgets.TemperatureExplorer):
    screenshot it at its start (T = 1), focus the slider's handle, press the right arrow `presses`
    times (0.1 each), wait until the figure shows the new T, screenshot again.

    Returns {before, after}: each {src, stats} (the widget image's data URI, its statistics line),
    and the two screenshot paths. Also used by tests/test_browser.py."""
    explorer = page.locator(".kdlab-temperature").first
    explorer.scroll_into_view_if_needed()
    page.wait_for_function(_SLIDER_IMG, timeout=timeout_ms)
    before = {"src": page.evaluate(_SLIDER_IMG), "stats": page.evaluate(_SLIDER_STATS)}
    shots = (out / f"{stem}-slider-T1.png", out / f"{stem}-slider-moved.png")
    explorer.screenshot(path=str(shots[0]))
    handle = page.locator(".kdlab-temperature-slider .noUi-handle").first
    handle.focus()
    start = float(before["stats"].split(":")[0].removeprefix("T = "))
    target = f"T = {start + 0.1 * presses:.1f}:"
    for _ in range(presses):
        page.keyboard.press("ArrowRight")
        time.sleep(0.05)
    page.wait_for_function(f"() => ({_SLIDER_STATS})().startsWith({target!r})", timeout=timeout_ms)
    page.wait_for_function(
        f"(src) => {{ const s = ({_SLIDER_IMG})(); return s && s !== src; }}", arg=before["src"], timeout=timeout_ms
    )
    time.sleep(1.0)  # the last redraw (the stats line and the image are set together, by one update)
    after = {"src": page.evaluate(_SLIDER_IMG), "stats": page.evaluate(_SLIDER_STATS)}
    explorer.screenshot(path=str(shots[1]))
    return {"before": before, "after": after, "shots": shots, "target": target}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--notebook", default="00_quickstart.ipynb")
    ap.add_argument("--profile", default=None, help="KDLAB_PROFILE for the kernel (default: as set, else auto)")
    ap.add_argument("--out", default="docs/images")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument(
        "--shoot",
        nargs="*",
        default=None,
        metavar="NAME=TEXT",
        help="screenshot the output of the first cell whose output shows TEXT, as <stem>-NAME.png "
        "(default for 00: its payoff table and its decoding lesson)",
    )
    args = ap.parse_args()
    shots = dict(kv.split("=", 1) for kv in args.shoot) if args.shoot is not None else SHOTS.get(args.notebook, {})
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("browser_notebook: Debian's chromium is missing; run `make setup`")
    work = ROOT / "runs" / "browser-course"
    shutil.rmtree(work, ignore_errors=True)
    (work / "notebooks").mkdir(parents=True)
    shutil.copy(ROOT / "notebooks" / args.notebook, work / "notebooks" / args.notebook)
    replays = (args.profile or os.environ.get("KDLAB_PROFILE")) == "reference"  # runs replayed, none trained
    trains = "LivePlot" in (ROOT / "notebooks" / args.notebook).read_text() and not replays  # a live plot to watch
    written = {p: p.stat().st_mtime for p in (ROOT / "runs" / "course").rglob("metrics.jsonl")}
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
                state = run_state(page)
                if state["idle"] and state["done"] and time.time() - t_run > 5:
                    break
                time.sleep(0.2)
            wall = time.time() - t_run
            statuses = live_plot_statuses(page)
            status = statuses[-1] if statuses else status
            if trains and srcs:  # the final figure that replaced the widget (the first one, if several)
                final = page.locator(FINAL_FIGURE).first
                final.scroll_into_view_if_needed()
                final.screenshot(path=str(out / f"{stem}-live-plot-final.png"))
            slider = None
            if page.locator(".kdlab-temperature").count():
                slider = move_temperature_slider(page, out, stem)
            missing = []
            for name, text in shots.items():  # a cell's rendered output, as a reader sees it
                area = page.locator(".jp-Cell-outputArea", has_text=text).first
                if not area.count():
                    missing.append(name)
                    continue
                area.scroll_into_view_if_needed()
                area.screenshot(path=str(out / f"{stem}-{name}.png"))
            page.screenshot(path=str(out / f"{stem}-page.png"))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(
        f"{args.notebook}: run all cells in {wall:.0f} s (server start included: {time.time() - t_start:.0f} s); "
        f"{len(srcs)} distinct live-plot frames; errors shown: {state['errors']}; last status: {status!r}"
    )
    trained = [p for p in (ROOT / "runs" / "course").rglob("metrics.jsonl") if written.get(p) != p.stat().st_mtime]
    if replays:
        print(f"reference profile: {len(trained)} training logs written during the run (0 = nothing trained)")
    if slider:
        print(
            f"temperature slider: {slider['before']['stats']!r} -> {slider['after']['stats']!r}; figure changed: "
            f"{slider['before']['src'] != slider['after']['src']}"
        )
    print("screenshots:", ", ".join(str(p.relative_to(ROOT)) for p in sorted(out.glob(f"{stem}-*.png"))))
    if not state["done"]:
        sys.exit("browser_notebook: not every cell ran (timeout?)")
    if replays and trained:
        sys.exit(f"browser_notebook: the reference profile trained (it wrote {trained[0].relative_to(ROOT)})")
    if trains and len(srcs) < 2:
        sys.exit("browser_notebook: the live plot never appeared or never changed")
    if slider and (
        slider["before"]["src"] == slider["after"]["src"] or not slider["after"]["stats"].startswith(slider["target"])
    ):
        sys.exit("browser_notebook: moving the temperature slider did not redraw its figure")
    if state["errors"]:
        sys.exit("browser_notebook: a cell raised an error (see the page screenshot)")
    if missing:
        sys.exit(f"browser_notebook: no cell output shows the text for {', '.join(missing)}")


if __name__ == "__main__":
    main()
