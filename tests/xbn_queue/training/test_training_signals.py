"""Tests of xbn_queue.training.signals.GracefulExit with real signals sent to this process."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from xbn_queue.training.signals import GracefulExit


def _wait_until(cond, timeout: float = 2.0) -> bool:
    """Python runs signal handlers between bytecodes of the main thread; give it a moment."""
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.005)
    return cond()


def test_sigterm_sets_requested_and_handlers_are_restored(capsys: pytest.CaptureFixture[str]) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with GracefulExit() as stop:
        assert stop.requested is False
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_until(lambda: stop.requested)
        assert stop.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM is still only a request
        time.sleep(0.02)
    assert stop.requested and stop.signum == signal.SIGTERM
    assert {s: signal.getsignal(s) for s in before} == before
    assert "received SIGTERM: will checkpoint and stop" in capsys.readouterr().err


def test_second_sigint_raises_keyboard_interrupt() -> None:
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with GracefulExit(verbose=False) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert _wait_until(lambda: stop.requested)  # the first one is only a request
            assert stop.signum == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
            _wait_until(lambda: False, timeout=1.0)  # KeyboardInterrupt arrives here
    assert signal.getsignal(signal.SIGINT) == before  # restored although the block raised


def test_restores_custom_previous_handler() -> None:
    seen: list[int] = []

    def custom(signum: int, frame: object) -> None:
        seen.append(signum)

    old = signal.signal(signal.SIGTERM, custom)
    try:
        with GracefulExit(verbose=False):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.02)
        assert seen == []  # ours handled it inside the block
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_until(lambda: seen == [signal.SIGTERM])  # the user's handler is back
    finally:
        signal.signal(signal.SIGTERM, old)


def test_disabled_and_manual_request() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with GracefulExit(enabled=False) as stop:
        assert signal.getsignal(signal.SIGTERM) == before
        stop.request()
    assert stop.requested and stop.signum is None


def test_not_main_thread_warns_and_installs_nothing() -> None:
    before = signal.getsignal(signal.SIGTERM)
    caught: list[str] = []

    def body() -> None:
        with pytest.warns(UserWarning, match="not in the main thread"):
            with GracefulExit():
                caught.append(str(signal.getsignal(signal.SIGTERM) == before))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert caught == ["True"]
