"""Quiet, predictable output: whelp's own progress and one-line errors; third-party chatter only with ``--verbose``.

transformers prints a weight-loading bar for every model it loads and lm-eval logs warnings about model kwargs and
task metadata; interleaved with whelp's progress bars they bury what matters. ``configure(verbose)`` is called
once by the CLI (library users may call it too); ``quiet_loading()`` wraps each model load.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings

_STATE = {"verbose": False}
NOISY_LOGGERS = ("lm_eval", "lm-eval", "transformers", "datasets", "huggingface_hub", "accelerate", "torch.distributed")


def configure(verbose: bool = False) -> None:
    """Show (``verbose``) or silence third-party warnings, info logs and progress bars for this process."""
    _STATE["verbose"] = verbose
    level = logging.INFO if verbose else logging.ERROR
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if not verbose:
        warnings.filterwarnings("ignore", module=r"(transformers|lm_eval|datasets|torch|accelerate)(\.|$)")


def verbose() -> bool:
    return _STATE["verbose"]


@contextlib.contextmanager
def quiet_loading():
    """transformers' loading bars and advisory logs off for the block (kept when verbose)."""
    if _STATE["verbose"]:
        yield
        return
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_streams():
    """Third-party progress bars and the stderr of the subprocesses they start (lm-eval's ``git describe``) off for
    the block, unless verbose. Errors still arrive: as exceptions, which this does not touch."""
    if _STATE["verbose"]:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        with contextlib.redirect_stderr(io.StringIO()), quiet_loading():
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
