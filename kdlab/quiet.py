"""Other libraries' chatter off: transformers' and datasets' progress bars and warnings, which in a
notebook are widgets and in a terminal hide kdlab's own lines."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def quiet_hf_progress():
    """transformers' own progress bars (weight loading, every checkpoint's save) off for a while:
    in a notebook each is a widget, and a run saves many times."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def quiet_libraries() -> None:
    """transformers' and datasets' warnings and progress bars off for good (the CLI and the course):
    their chatter (weight-loading bars, hub notices) hides kdlab's own lines."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


__all__ = ["quiet_hf_progress", "quiet_libraries"]
