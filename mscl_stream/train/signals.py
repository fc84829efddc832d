"""Stop signals for the training loop: SIGINT/SIGTERM ask it to checkpoint and stop at a step boundary.

:class:`StopSignals` records the request; :func:`should_stop` tells the loop when to act on it, agreed
by every rank under DDP so that all of them write the same checkpoint and stop together.
"""

from __future__ import annotations

import signal
import threading

import torch


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary (checkpoint, then exit 130/143).

    The first signal only sets a flag; the previous handler is put back, so a second one acts at once
    (KeyboardInterrupt for SIGINT, termination for SIGTERM). Installed only in the main thread.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @property
    def name(self) -> str:
        """The signal's name for messages (SIGTERM where a peer rank received it)."""
        return signal.Signals(self.signum or signal.SIGTERM).name

    @property
    def number(self) -> int:
        return self.signum or signal.SIGTERM


def should_stop(signals: StopSignals, world_size: int, logged: bool, device: torch.device) -> bool:
    """Whether a SIGINT/SIGTERM asked to stop: at every step in one process; at logged steps in DDP,
    agreed by all ranks (a tiny all-reduce), so every rank writes the same checkpoint and stops."""
    if world_size == 1:
        return signals.signum is not None
    if not logged:
        return False
    flag = torch.tensor([1 if signals.signum is not None else 0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() and signals.signum is None:
        signals.signum = signal.SIGTERM
    return bool(flag.item())
