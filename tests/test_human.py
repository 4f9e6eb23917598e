"""The human-readable table on the console and in ``train.log``, read back as text."""

from __future__ import annotations

import io
import math
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import tracklog
from tracklog.convert.text import format_number
from tracklog.outputs.human import render_table, shorten

Number = bool | int | float | np.floating


def human_logger(run_dir: Path, max_length: int | None = None) -> tracklog.Logger:
    width = {} if max_length is None else {"max_length": max_length}
    return tracklog.build_logger(
        {
            "run_dir": str(run_dir),
            "outputs": [{"type": "console", **width}, {"type": "file", **width}],
        }
    )


def dump_once(run_dir: Path, values: Mapping[str, tracklog.Recordable], **kwargs: int) -> str:
    with human_logger(run_dir, **kwargs) as logger:
        for key, value in values.items():
            logger.record(key, value)
        logger.dump(0)
    return (run_dir / "train.log").read_text(encoding="utf-8")


def parse_table(text: str) -> list[tuple[str, str]]:
    """The (key, value) cells of the one table in ``text``, trailing padding removed.

    The separator column is the rightmost `` | `` that every row has at the same place
    (a key may itself contain `` | ``; the values parsed here never do).
    """
    lines = text.split("\n")
    assert lines[-1] == ""
    lines = lines[:-1]
    assert text.splitlines() == lines, "a row contains a line break other than \\n"
    border, rows, closing = lines[0], lines[1:-1], lines[-1]
    assert border == closing
    assert set(border) == {"-"}
    assert rows
    for row in rows:
        assert len(row) == len(border), "rows of different widths"
        assert row.startswith("| ")
        assert row.endswith(" |")
    columns = set.intersection(
        *({i for i in range(len(row)) if row.startswith(" | ", i)} for row in rows)
    )
    assert columns
    column = max(columns)
    return [(row[2:column].rstrip(), row[column + 3 : -2].rstrip()) for row in rows]


def tag_of(key: str) -> str | None:
    """The ``tag/`` a key is grouped under: up to its first ``/``, if text follows it."""
    cut = key.find("/")
    return key[: cut + 1] if 0 < cut < len(key) - 1 else None


def expected_layout(keys: Sequence[str]) -> list[str | None]:
    """Sorted keys with a header row (None) before each new tag's group."""
    layout: list[str | None] = []
    current: str | None = None
    for key in sorted(keys):
        tag = tag_of(key)
        if tag is not None and tag != current:
            layout.append(None)
        current = tag
        layout.append(key)
    return layout


def assert_shows(cell: str, value: Number) -> None:
    """``cell`` shows ``value`` to 4 significant digits (ints up to 12 characters in full)."""
    if isinstance(value, bool | np.bool_):
        assert cell == str(bool(value))
        return
    if isinstance(value, int) and len(str(value)) <= 12:
        assert cell == str(value)
        return
    number = float(value)
    if math.isnan(number):
        assert cell == "nan"
    elif math.isinf(number):
        assert cell == ("inf" if number > 0 else "-inf")
    else:
        # Decimal, not float: "1.798e+308" is what 4 digits of the largest float look like,
        # and float() would overflow it to inf.
        shown, exact = Decimal(cell), Decimal(number)
        assert abs(shown - exact) <= abs(exact) * Decimal("0.0005"), (cell, value)
        assert len(cell.lstrip("-").replace(".", "").split("e")[0].lstrip("0")) <= 4, cell


# A literal table ---------------------------------------------------------------------


def test_scalars_grouped_by_tag_and_sorted(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = dump_once(
        run_dir,
        {
            "train/loss": 0.123456789,
            "train/n_updates": 123456789012,
            "time/fps": np.float32(1234.5678),
            "eval/success": True,
            "eval/failed": False,
            "alpha": float("nan"),
            "beta": -math.inf,
            "train/big": 2**53,
            "train/entropy": np.float64(-1.0e-7),
        },
    )
    rows = parse_table(log)
    assert rows == [
        ("alpha", "nan"),
        ("beta", "-inf"),
        ("eval/", ""),
        ("   failed", "False"),
        ("   success", "True"),
        ("time/", ""),
        ("   fps", "1235"),
        ("train/", ""),
        ("   big", "9.007e+15"),
        ("   entropy", "-1e-07"),
        ("   loss", "0.1235"),
        ("   n_updates", "123456789012"),
    ]
    assert capsys.readouterr().out == log


def test_exact_table_text(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dump_once(run_dir, {"train/loss": 0.25, "train/n": 3, "fps": 120})
    assert capsys.readouterr().out == (
        "------------------\n"
        "| fps     | 120  |\n"
        "| train/  |      |\n"
        "|    loss | 0.25 |\n"
        "|    n    | 3    |\n"
        "------------------\n"
    )


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0.123456789, "0.1235"),
        (np.float64(0.123456789), "0.1235"),
        (np.float32(0.123456789), "0.1235"),
        (np.float16(3.14159), "3.141"),
        (123456.789, "1.235e+05"),
        (1e-300, "1e-300"),
        (5e-324, "4.941e-324"),
        (-0.0, "-0"),
        (42, "42"),
        (-(2**40), "-1.1e+12"),  # 14 characters: too long to show in full
        (np.int64(987654321), "987654321"),
        (-99999999999, "-99999999999"),
        (999999999999, "999999999999"),
        (2**63 - 1, "9.223e+18"),
        (-(2**63), "-9.223e+18"),
        (np.uint8(7), "7"),
        (True, "True"),
        (np.bool_(False), "False"),
        (float("inf"), "inf"),
        (float("nan"), "nan"),
    ],
)
def test_number_formatting(run_dir: Path, value: tracklog.Recordable, shown: str) -> None:
    assert parse_table(dump_once(run_dir, {"x": value})) == [("x", shown)]


@pytest.mark.parametrize(("value", "shown"), [(10**400, "1.000e+400"), (-(2**1024), "-1.798e+308")])
def test_format_number_beyond_float_range(value: int, shown: str) -> None:
    # record() refuses ints beyond 64 bits, but the formatter must still never raise.
    assert format_number(value) == shown


# Media summaries ---------------------------------------------------------------------


def test_media_show_one_line_summaries(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    figure, _ = plt.subplots(figsize=(4, 3), dpi=50)
    values: dict[str, tracklog.Recordable] = {
        "eval/video": tracklog.Video(np.zeros((100, 3, 64, 64), dtype=np.uint8), fps=30),
        "eval/clips": tracklog.Video(np.zeros((2, 5, 1, 6, 8), dtype=np.uint8), fps=12.5),
        "img/hwc": tracklog.Image(np.zeros((32, 48, 3), dtype=np.uint8), "HWC"),
        "img/batch": tracklog.Image(np.zeros((2, 3, 8, 9), dtype=np.uint8), "NCHW"),
        "plot": tracklog.Figure(figure),
        "weights": np.arange(10),
        "hparams": tracklog.HParam(
            {"lr": 1e-3, "net": {"pi": [64, 64], "vf": [64]}}, {"reward": 0.0, "len": 1}
        ),
    }
    rows = dict(parse_table(dump_once(run_dir, values, max_length=40)))
    assert rows == {
        "eval/": "",
        "   clips": "<video 2x5x1x6x8 @12.5fps>",
        "   video": "<video 1x100x3x64x64 @30fps>",
        "hparams": "<hparam 3 params, 2 metrics>",
        "img/": "",
        "   batch": "<image 2x8x9x3>",
        "   hwc": "<image 1x32x48x3>",
        "plot": "<figure 200x150>",
        "weights": "<histogram n=10 mean=4.5>",
    }
    assert "<video 1x100x3x64x64 @30fps>" in capsys.readouterr().out


def test_sb3_media_show_summaries_too(run_dir: Path) -> None:
    import torch
    from stable_baselines3.common.logger import HParam as SB3HParam
    from stable_baselines3.common.logger import Video as SB3Video

    rows = dict(
        parse_table(
            dump_once(
                run_dir,
                {
                    "video": SB3Video(torch.zeros((4, 3, 2, 2), dtype=torch.uint8), fps=15),
                    "hp": SB3HParam({"gamma": 0.99}, {"reward": 1.0}),
                    "hist": np.array([1.0, 2.0, 4.0]),
                },
            )
        )
    )
    assert rows == {
        "hist": "<histogram n=3 mean=2.333>",
        "hp": "<hparam 1 params, 1 metrics>",
        "video": "<video 1x4x3x2x2 @15fps>",
    }


# Text --------------------------------------------------------------------------------


def test_line_breaks_in_text_are_escaped(run_dir: Path) -> None:
    rows = parse_table(
        dump_once(
            run_dir,
            {
                "note": "line 1\nline 2\r\n\ttab",
                "key\nwith break": 1,
                "odd": "vt\x0b ff\x0c sep\u2028 nel\x85 esc\x1b[31m",
            },
            max_length=60,
        )
    )
    assert rows == [
        ("key\\nwith break", "1"),
        ("note", "line 1\\nline 2\\r\\n\\ttab"),
        ("odd", "vt\\x0b ff\\x0c sep\\u2028 nel\\x85 esc\\x1b[31m"),
    ]


def test_long_text_is_shortened_in_the_middle(run_dir: Path) -> None:
    rows = parse_table(dump_once(run_dir, {"t": "begin-" + "x" * 100 + "-end"}, max_length=20))
    assert rows == [("t", "begin-xxx...xxxx-end")]


# Keys --------------------------------------------------------------------------------


def test_long_keys_sharing_prefixes_stay_distinct(run_dir: Path) -> None:
    prefix = "rollout/" + "very_long_metric_name_" * 3
    keys = [prefix + suffix + "_mean" * 4 for suffix in ("a", "b", "c")]
    keys += [prefix + "a" + "_mean" * 4 + "x", "x" * 80, "x" * 81]
    rows = parse_table(dump_once(run_dir, dict.fromkeys(keys, 1.5)))
    shown = [key for key, _ in rows]
    assert len(set(shown)) == len(shown) == len(keys) + 1  # one rollout/ header
    assert all(len(key) <= 36 for key in shown)


def test_keys_differing_only_in_invisible_trailing_space(run_dir: Path) -> None:
    rows = parse_table(dump_once(run_dir, {"a": 1, "a ": 2, "a  ": 3, "t/b": 4, "t/b ": 5}))
    shown = [key for key, _ in rows]
    assert len(set(shown)) == len(shown) == 6


def test_tag_header_never_merges_with_a_key(run_dir: Path) -> None:
    # "a/" has nothing after the slash, so it is a key of its own, not the header of "a/b".
    rows = parse_table(dump_once(run_dir, {"a/": 1, "a/b": 2, "/x": 3}))
    shown = [key for key, _ in rows]
    assert len(set(shown)) == len(shown) == 4
    assert [value for _, value in rows] == ["3", "1", "", "2"]


valid_keys = st.text(min_size=1).filter(lambda key: not key.isspace() and not key.startswith("_"))
long_keys = st.builds(
    lambda prefix, middle, suffix: prefix + middle + suffix,
    st.sampled_from(["train/" + "a" * 40, "b" * 50, "eval/" + "c/" * 20, "d" * 35 + "/"]),
    st.text(max_size=3),
    st.sampled_from(["", "_mean", "x" * 30, "/" + "e" * 30]),
)
shown_numbers: st.SearchStrategy[Number] = st.one_of(
    st.floats(),
    st.floats(width=32).map(np.float32),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.booleans(),
)


@settings(max_examples=300)
@given(
    values=st.dictionaries(
        st.one_of(valid_keys, long_keys), shown_numbers, min_size=1, max_size=15
    ),
    max_length=st.integers(min_value=8, max_value=60),
)
@example(values={"x": -1.7976931348623157e308, "y": -(2**53)}, max_length=8)
@example(values={"a": 1, "a ": 2, "a\n": 3, "a\\n": 4}, max_length=36)
def test_table_property(values: dict[str, Number], max_length: int) -> None:
    run_dir = Path(tempfile.mkdtemp()) / "run"  # one per example, not the shared fixture
    try:
        rows = parse_table(dump_once(run_dir, values, max_length=max_length))
    finally:
        shutil.rmtree(run_dir.parent)

    layout = expected_layout(list(values))
    assert len(rows) == len(layout)  # one row per key plus one per tag
    shown = [key for key, _ in rows]
    assert len(set(shown)) == len(shown), "two rows show the same key"
    assert all(len(key) <= max_length for key in shown)
    for (_, cell), key in zip(rows, layout, strict=True):
        if key is None:
            assert cell == ""
        else:
            assert_shows(cell, values[key])


# info() and warn() ---------------------------------------------------------------------


def test_info_and_warn_lines_interleave_with_tables(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with human_logger(run_dir) as logger:
        logger.info("starting", 1)
        logger.record("loss", 0.5)
        logger.dump(1)
        logger.warn("careful")
        logger.record("loss", 0.25)
        logger.dump(2)
        logger.info("done")

    for text in (capsys.readouterr().out, (run_dir / "train.log").read_text(encoding="utf-8")):
        lines = text.splitlines()
        assert lines[0] == "starting 1"
        assert lines[4] == "careful"
        assert lines[8] == "done"
        assert parse_table("\n".join(lines[1:4]) + "\n") == [("loss", "0.5")]
        assert parse_table("\n".join(lines[5:8]) + "\n") == [("loss", "0.25")]
        assert len(lines) == 9


def test_train_log_is_appended_when_a_run_resumes(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRACKLOG_RESUME", "auto")
    with human_logger(run_dir) as logger:
        logger.info("first")
    with human_logger(run_dir) as logger:
        logger.info("second")
    first, resumed, second = (run_dir / "train.log").read_text(encoding="utf-8").splitlines()
    assert (first, second) == ("first", "second")
    assert re.fullmatch(
        rf"tracklog: resuming run [0-9a-f]{{32}} in {re.escape(str(run_dir))}", resumed
    )


# render_table and shorten ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "max_length", "shortened"),
    [
        ("abcdefghij", 10, "abcdefghij"),
        ("abcdefghij", 9, "abc...hij"),
        ("abcdefghijk", 8, "abc...jk"),
        ("", 8, ""),
    ],
)
def test_shorten(text: str, max_length: int, shortened: str) -> None:
    assert shorten(text, max_length) == shortened


@given(text=st.text(), max_length=st.integers(min_value=3, max_value=50))
def test_shorten_keeps_both_ends_within_length(text: str, max_length: int) -> None:
    short = shorten(text, max_length)
    if len(text) <= max_length:
        assert short == text
    else:
        kept = max_length - 3  # what is left beside "..."
        # Cut in the middle: the two ends kept differ in length by at most one.
        assert short in {
            text[:head] + "..." + text[len(text) - (kept - head) :]
            for head in (kept // 2, kept - kept // 2)
        }


def test_render_table_directly() -> None:
    assert render_table({}, 36) == []
    assert render_table({"b/y": "2", "a": "1", "b/x": "3"}, 36) == [
        "------------",
        "| a    | 1 |",
        "| b/   |   |",
        "|    x | 3 |",
        "|    y | 2 |",
        "------------",
    ]


def test_render_table_tells_colliding_short_keys_apart() -> None:
    middle = "x" * 40
    lines = render_table({f"a{middle}1{middle}z": "1", f"a{middle}2{middle}z": "2"}, 20)
    rows = parse_table("\n".join(lines) + "\n")
    assert len({key for key, _ in rows}) == 2
    assert all(len(key) <= 20 for key, _ in rows)
    assert [value for _, value in rows] == ["1", "2"]


def test_format_works_inside_sb3s_own_logger() -> None:
    """Appended to a plain SB3 Logger, the format shows media instead of raising."""
    import torch
    from stable_baselines3.common.logger import Logger as SB3Logger
    from stable_baselines3.common.logger import Video as SB3Video

    stream = io.StringIO()
    logger = SB3Logger(folder=None, output_formats=[tracklog.FixedHumanOutputFormat(stream)])
    logger.record("eval/video", SB3Video(torch.zeros((2, 3, 4, 4), dtype=torch.uint8), fps=30))
    logger.record("loss", 0.123456)
    logger.dump(3)
    logger.info("after")
    assert stream.getvalue().endswith("\nafter\n")
    table = stream.getvalue().removesuffix("after\n")
    assert parse_table(table) == [
        ("eval/", ""),
        ("   video", "<video 1x2x3x4x4 @30fps>"),
        ("loss", "0.1235"),
    ]


def test_two_loggers_dumping_in_turn_show_their_own_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The console and train.log share one rendering per dump; two loggers at the same
    # dump number must still never see each other's table.
    first = human_logger(tmp_path / "first")
    second = human_logger(tmp_path / "second")
    for step in range(20):
        first.record("first/value", step)
        first.dump(step)
        second.record("second/value", -step)
        second.dump(step)
    first.close()
    second.close()
    for name, sign in (("first", 1), ("second", -1)):
        log = (tmp_path / name / "train.log").read_text()
        rows = [line.split("|") for line in log.splitlines() if line.startswith("|    value")]
        shown = [int(row[2]) for row in rows]
        assert shown == [sign * step for step in range(20)]
        assert ("second" in log) is (name == "second")
    assert capsys.readouterr().out.count("|    value ") == 40


def test_a_table_printed_under_a_progress_bar_starts_on_a_cleared_line(run_dir: Path) -> None:
    # SB3's learn(progress_bar=True) keeps a tqdm bar on the console: a table printed
    # while it shows goes through tqdm.write, which clears the bar's line first and
    # draws the bar again after; with no bar open, the table is written as it is.
    from contextlib import redirect_stdout

    from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs installed

    screen = io.StringIO()
    with redirect_stdout(screen), human_logger(run_dir) as logger:
        bar = tqdm(total=10, file=screen, ascii=True, mininterval=0)
        bar.update(3)
        logger.record("train/loss", 0.5)
        logger.dump(1)
        drawn = screen.getvalue()
        bar.close()
        after_bar = len(screen.getvalue())
        logger.record("train/loss", 0.25)
        logger.dump(2)
    table = "\n".join(render_table({"train/loss": "0.5"}, 36)) + "\n"
    cleared = drawn.index(table)
    assert drawn[cleared - 1] == "\r"  # the bar's line was cleared: the table starts at its left
    assert "3/10" in drawn[cleared + len(table) :]  # and the bar was drawn again below it
    assert (
        screen.getvalue()[after_bar:] == "\n".join(render_table({"train/loss": "0.25"}, 36)) + "\n"
    )
