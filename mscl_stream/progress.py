"""Progress of long commands: a tqdm bar with rate and ETA on a terminal, plain lines anywhere else.

``index``, ``transcode``, ``pretrain`` and eval's feature extraction report progress through
:class:`Progress`, so they look and behave alike:

* on a terminal (the bar's stream, stderr by default, is a TTY): a tqdm bar with count, rate and ETA;
  log records of the root logger are routed around the bar (``tqdm.contrib.logging``) so they do not
  break it;
* anywhere else (CI logs, files, pytest's capture): no bar and no carriage returns, but a plain line
  ``"<desc>: <done>/<total> <unit>s, <rate>/s, ETA <s> s"`` at most every ``interval`` seconds and once
  at the end, handed to ``plain`` (print to stderr by default; a logger's ``info`` works too). A caller
  with its own line (the trainer's step line) passes it to ``update(..., line=...)`` instead.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TextIO


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):     # no isatty, or a closed stream
        return False


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Progress:
    """Progress of ``total`` items: a bar on a terminal, else plain lines (see the module docstring).

    Args:
        total: items to do (files, videos, steps).
        desc: what is counted, first word of every line and the bar's label (``"index"``).
        unit: one item's name; plain lines use its plural (``"file"`` -> ``"files"``).
        initial: items already done before this process started (a resumed run); the rate and ETA
            count only the items done here.
        interval: least seconds between automatic plain lines; None: only lines passed to ``update``.
        plain: where plain lines go (default: a line on stderr).
        file: the bar's stream (default stderr); a bar is drawn only when it is a terminal.
        enabled: False: no output at all (non-main ranks).
        bar: force (True) or forbid (False) the bar; None: decide by ``file.isatty()``.
    """

    def __init__(self, total: int, desc: str, unit: str = "file", *, initial: int = 0,
                 interval: float | None = 5.0, plain: Callable[[str], None] | None = None,
                 file: TextIO | None = None, enabled: bool = True, bar: bool | None = None) -> None:
        self.total, self.desc, self.unit, self.initial = total, desc, unit, initial
        self.interval = interval
        self.plain = plain or _stderr_line
        self.enabled = enabled
        self.done = initial
        self._t0 = time.monotonic()
        self._last = -math.inf
        self._bar = None
        self._redirect = None
        stream = file if file is not None else sys.stderr
        if enabled and (bar if bar is not None else _isatty(stream)):
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream,
                             dynamic_ncols=True)
            self._redirect = logging_redirect_tqdm(tqdm_class=tqdm)
            self._redirect.__enter__()

    @property
    def is_bar(self) -> bool:
        """Whether a tqdm bar is drawn (else plain lines)."""
        return self._bar is not None

    def rate(self, now: float | None = None) -> float:
        """Items per second done by this process so far."""
        now = time.monotonic() if now is None else now
        return (self.done - self.initial) / max(now - self._t0, 1e-9)

    def line(self, now: float | None = None) -> str:
        """The plain line for the current count: ``index: 3/12 files, 0.3/s, ETA 35 s``."""
        rate = self.rate(now)
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        eta_s = f"{eta:.0f} s" if math.isfinite(eta) else "?"
        return f"{self.desc}: {self.done}/{self.total} {self.unit}s, {rate:.1f}/s, ETA {eta_s}"

    def update(self, done: int, postfix: str | None = None, line: str | None = None) -> None:
        """``done`` items are finished (a count, not an increment).

        On a terminal the bar moves to ``done`` and shows ``postfix`` after the rate; otherwise ``line``
        (when given) is emitted as is, or else the standard line when ``interval`` seconds have passed
        since the last one or everything is done.
        """
        if not self.enabled:
            return
        self.done = done
        if self._bar is not None:
            if postfix is not None:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(done - self._bar.n)
            return
        if line is not None:
            self.plain(line)
            return
        now = time.monotonic()
        if self.interval is None or (done < self.total and now - self._last < self.interval):
            return
        self._last = now
        self.plain(self.line(now))

    def close(self) -> None:
        """Finish the bar and give logging back its handlers (idempotent; plain mode: nothing to do)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:     # a run that ended by an exception never reached close()
        try:
            self.close()
        except Exception:
            pass
