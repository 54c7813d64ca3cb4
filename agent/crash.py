"""Crash points for the crash tests: FUND_AGENT_CRASH_AT=<name> kills the process there, as a power cut would.

Unset in production: the check is one environment lookup at the few points where a transfer changes phase.
"""

from __future__ import annotations

import os
import signal

POINTS = ("after_intent", "after_sent", "after_send", "after_reply")


def crash_point(name: str) -> None:
    if os.environ.get("FUND_AGENT_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
