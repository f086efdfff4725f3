"""Tests of xbn_queue.training.progress."""

from __future__ import annotations

import io
import sys

import pytest

from xbn_queue.training import progress as progress_module
from xbn_queue.training.progress import progress


def test_bar_on_main_rank_writes_and_yields_items() -> None:
    buf = io.StringIO()
    bar = progress(range(5), desc="epoch 1", file=buf, mininterval=0)
    items = []
    for i in bar:
        items.append(i)
        bar.set_postfix(loss=f"{i:.2f}")
    bar.close()
    assert items == [0, 1, 2, 3, 4]
    text = buf.getvalue()
    assert "epoch 1" in text and "5/5" in text and "loss=4.00" in text


def test_disabled_and_non_main_rank_are_silent(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    bar = progress([1, 2, 3], desc="x", enabled=False)
    assert list(bar) == [1, 2, 3] and len(bar) == 3
    bar.set_postfix(a=1)
    bar.update()
    bar.close()
    monkeypatch.setattr(progress_module, "is_main_process", lambda: False)
    assert list(progress(iter([4, 5]), total=2, desc="y")) == [4, 5]
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_falls_back_without_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    bar = progress(range(3), desc="z")
    assert list(bar) == [0, 1, 2]
    bar.set_description("w")
    assert type(bar).__name__ == "_Silent"
