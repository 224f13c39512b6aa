"""``conveyor serve`` whose engine wedges: every model step blocks forever, as an engine stuck
inside a step would. Run as a script with ``serve``'s flags (tests/test_watchdog.py)."""

from __future__ import annotations

import sys
import threading

from conveyor.cli import main
from conveyor.engine.llm_engine import LLMEngine

_from_kwargs = LLMEngine.from_kwargs.__func__


def _wedged(cls, *args, **kwargs):
    engine = _from_kwargs(cls, *args, **kwargs)
    never = threading.Event()
    engine.runner.execute = lambda sched: never.wait()
    return engine


if __name__ == "__main__":
    LLMEngine.from_kwargs = classmethod(_wedged)
    sys.exit(main(["serve", *sys.argv[1:]]))
