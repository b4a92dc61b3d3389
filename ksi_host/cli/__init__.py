"""The ``ksi-host`` command line: argument parsing (:mod:`.main`), the batch runner
(:mod:`.runner`), the progress bar (:mod:`.progress`) and plain-text tables (:mod:`.tables`)."""

from .main import main

__all__ = ["main"]
