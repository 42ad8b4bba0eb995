import pytest

from instret.progress import Progress, clock, plural


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0 s"), (42.4, "42 s"), (59.6, "1 min 00 s"), (185, "3 min 05 s"), (3720, "1 h 02 min"), (-3, "0 s")],
)
def test_clock_reads_like_a_person_says_it(seconds, text):
    assert clock(seconds) == text


def test_plural():
    assert (plural(1, "epoch"), plural(2, "epoch"), plural(0, "epoch")) == ("1 epoch", "2 epochs", "0 epochs")


def test_the_bar_says_how_long_is_left(capsys, monkeypatch):
    now = iter([100.0, 110.0])  # started at 100 s; 1 of 4 steps done at 110 s: 30 s left
    monkeypatch.setattr("instret.progress.time.perf_counter", lambda: next(now))
    bar = Progress(4, "epoch 1/1", enabled=True)
    bar.update(1, "loss 1.0")
    assert capsys.readouterr().err.endswith("1/4 loss 1.0  30 s left\x1b[K")


def test_staged_progress_shows_each_stage_and_clears_the_line(capsys):
    from instret.progress import StagedProgress

    progress = StagedProgress({"search": "searching", "verify": "aligning"}, "pairs", enabled=True)
    progress("search", 0, 0)
    assert capsys.readouterr().err == "\rsearching…\x1b[K"
    progress("verify", 0, 4)
    progress("verify", 3, 4)
    err = capsys.readouterr().err
    assert err.startswith("\r\x1b[K") and "\raligning [" in err and " 3/4 pairs " in err  # the stage line cleared first
    progress.close()
    assert capsys.readouterr().err == "\r\x1b[K"
    quiet = StagedProgress({"search": "searching"}, enabled=False)
    quiet("search", 0, 0)
    quiet.close()
    assert capsys.readouterr().err == ""
