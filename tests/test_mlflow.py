"""The MLflow output against real stores: a sqlite file and a real ``mlflow server``.

Every test builds a logger from settings, records, dumps, closes, then reads the run
back with ``mlflow.MlflowClient`` (metric histories, params, tags, artifacts), the way a
user's notebook would; nothing is read from tracklog's memory. Tests taking the
``store`` fixture run twice: against the session's sqlite store and against the
session's ``mlflow server``, which proxies artifacts to its ``--artifacts-destination``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
import struct
import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from importlib.metadata import version
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from mlflow import MlflowClient
from mlflow.entities import Metric
from PIL import Image as PILImage
from pydantic import ValidationError

import tracklog
from tests.readback import decode_mp4
from tests.samples import NESTED_HPARAMS, grey_clip, one_of_every_kind, random_pixels
from tests.servers import MlflowServer
from tests.strategies import Number, dump_sequences
from tracklog._outbox import DeliveryError, RemoteOutput
from tracklog._queue import Queue, find_queues
from tracklog._row import Row
from tracklog._runs import read_run
from tracklog.readers import read_jsonl
from tracklog.settings import MlflowOutput

EXPERIMENT = "tracklog-tests"
PASSWORD = "hunter2-do-not-show"
# The names tracklog gives MLflow: the portable subset of what MLflow accepts.
PORTABLE_NAME = re.compile(r"[A-Za-z0-9_\-./ ]{1,250}")


# Stores ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Store:
    uri: str
    client: MlflowClient
    server: MlflowServer | None = None


@pytest.fixture
def sqlite(mlflow_sqlite_uri: str) -> Store:
    return Store(mlflow_sqlite_uri, MlflowClient(mlflow_sqlite_uri))


@pytest.fixture
def server(mlflow_server: MlflowServer) -> Store:
    return Store(mlflow_server.url, MlflowClient(mlflow_server.url), mlflow_server)


@pytest.fixture(params=["sqlite", "server"])
def store(request: pytest.FixtureRequest, mlflow_sqlite_uri: str) -> Store:
    if request.param == "sqlite":
        return Store(mlflow_sqlite_uri, MlflowClient(mlflow_sqlite_uri))
    started: MlflowServer = request.getfixturevalue("mlflow_server")
    return Store(started.url, MlflowClient(started.url), started)


@pytest.fixture(autouse=True)
def _no_mlflow_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    # The output exports credentials into os.environ; monkeypatch removes them again.
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)


@pytest.fixture(autouse=True)
def _no_output_failed(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    # A failing output is reported on the "tracklog" logger and training goes on, so a
    # test would otherwise see only what is missing from the run, not why.
    yield
    failures = [r for r in caplog.records if r.name == "tracklog" and r.levelno >= 40]
    assert not failures, [record.getMessage() for record in failures]


# Helpers -----------------------------------------------------------------------------


def mlflow_logger(
    run_dir: Path, store: Store, *others: dict[str, object], **options: object
) -> tracklog.Logger:
    output: dict[str, object] = {
        "type": "mlflow",
        "tracking_uri": store.uri,
        "experiment": EXPERIMENT,
        "artifact_upload_interval": 0,
        **options,
    }
    return tracklog.build_logger({"run_dir": str(run_dir), "outputs": [output, *others]})


def run_id_of(logger: tracklog.Logger) -> str:
    (output,) = [
        o for o in logger.output_formats if isinstance(o, RemoteOutput) and o.name == "mlflow"
    ]
    return output.run_id


def history(store: Store, run_id: str, name: str) -> list[Metric]:
    """A metric's points by timestamp, then step: the order they were logged in, when
    dumps are a millisecond apart or their steps increase."""
    points = store.client.get_metric_history(run_id, name)
    return sorted(points, key=lambda point: (point.timestamp, point.step))


def steps_and_values(store: Store, run_id: str, name: str) -> list[tuple[int, float]]:
    return [(point.step, point.value) for point in history(store, run_id, name)]


def artifact_files(store: Store, run_id: str, path: str | None = None) -> list[str]:
    """Every artifact file of the run under ``path``, recursively, sorted.

    Without ``path``, tracklog's own ``tracklog/settings.json`` is left out.
    """
    files: list[str] = []
    for entry in store.client.list_artifacts(run_id, path):
        if path is None and entry.path == "tracklog":
            continue
        files += artifact_files(store, run_id, entry.path) if entry.is_dir else [entry.path]
    return sorted(files)


def fetch(store: Store, run_id: str, path: str, tmp_path: Path) -> Path:
    destination = tmp_path / f"download-{uuid.uuid4().hex}"
    destination.mkdir()
    return Path(store.client.download_artifacts(run_id, path, str(destination)))


def fetch_text(store: Store, run_id: str, path: str, tmp_path: Path) -> str:
    return fetch(store, run_id, path, tmp_path).read_text(encoding="utf-8")


def stored(value: float) -> float:
    """What MLflow's SQL store (behind both the sqlite URI and the server) returns."""
    if math.isinf(value):
        # SQL has no ±inf: SqlAlchemyStore.sanitize_metric_value saves ±max float64.
        return math.copysign(sys.float_info.max, value)
    if value == 0:
        return 0.0  # SQLite keeps no sign on a REAL zero: -0.0 reads back as 0.0.
    return value


def same_float(read: float, expected: float) -> bool:
    """Bit-exact equality, any NaN equal to any NaN."""
    if math.isnan(expected):
        return math.isnan(read)
    return struct.pack("<d", read) == struct.pack("<d", expected)


def tracklog_warnings(caught: Sequence[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "MLflow" in str(w.message)]


# Settings ----------------------------------------------------------------------------


def test_tracking_uri_defaults_to_the_environment_then_sqlite(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert MlflowOutput().tracking_uri == "http://tracking.example:5000"
    settings = tracklog.load_settings({"outputs": [{"type": "mlflow"}]})
    assert settings.outputs[0] == MlflowOutput(tracking_uri="http://tracking.example:5000")

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert MlflowOutput().tracking_uri == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert MlflowOutput().tracking_uri == "sqlite:///mlflow.db"


@pytest.mark.parametrize("uri", ["file:///x/mlruns", "file:mlruns", "/x/mlruns", "mlruns"])
def test_file_store_needs_an_explicit_opt_in(uri: str) -> None:
    with pytest.raises(ValidationError, match=r"outputs\.0\.mlflow\.tracking_uri") as error:
        tracklog.load_settings({"outputs": [{"type": "mlflow", "tracking_uri": uri}]})
    assert "allow_file_store" in str(error.value)

    # The opt-in is honoured wherever it stands in the mapping.
    for output in (
        {"type": "mlflow", "tracking_uri": uri, "allow_file_store": True},
        {"type": "mlflow", "allow_file_store": True, "tracking_uri": uri},
    ):
        loaded = tracklog.load_settings({"outputs": [output]}).outputs[0]
        assert isinstance(loaded, MlflowOutput)
        assert loaded.tracking_uri == uri


@pytest.mark.parametrize("uri", ["ftp://host/x", "s3://bucket/mlruns", "mlflow-artifacts:/x"])
def test_unknown_scheme_is_refused(uri: str) -> None:
    with pytest.raises(ValidationError, match=r"tracking_uri[\s\S]*unsupported tracking_uri"):
        tracklog.load_settings({"outputs": [{"type": "mlflow", "tracking_uri": uri}]})


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:///mlflow.db",
        "postgresql+psycopg2://u@db/mlflow",
        "mysql://db/mlflow",
        "http://127.0.0.1:5000",
        "HTTPS://mlflow.example",
        "databricks://my-profile",
        "databricks",  # MLflow's own spelling of the default Databricks workspace
    ],
)
def test_known_schemes_are_accepted(uri: str) -> None:
    assert MlflowOutput(tracking_uri=uri).tracking_uri == uri


def test_password_needs_a_username() -> None:
    with pytest.raises(ValidationError, match="password is set but username is not"):
        tracklog.load_settings({"outputs": [{"type": "mlflow", "password": PASSWORD}]})


def test_password_never_reaches_the_run_or_a_repr(
    sqlite: Store, run_dir: Path, tmp_path: Path
) -> None:
    with mlflow_logger(run_dir, sqlite, username="me", password=PASSWORD) as logger:
        run_id = run_id_of(logger)
        assert logger.settings is not None
        assert PASSWORD not in repr(logger.settings)
        assert PASSWORD not in str(logger.settings)
        logger.record("hparams", tracklog.HParam({"lr": 0.1}))
        logger.info("started")
        logger.dump(0)

    data = sqlite.client.get_run(run_id).data
    for name, value in [*data.tags.items(), *data.params.items()]:
        assert PASSWORD not in name
        assert PASSWORD not in value
    settings = json.loads(data.tags["tracklog.settings"])
    assert settings["outputs"][0]["username"] == "me"
    assert settings["outputs"][0]["password"] == "**********"
    assert PASSWORD not in fetch_text(sqlite, run_id, "train.log", tmp_path)


# Scalars -----------------------------------------------------------------------------

numbers: st.SearchStrategy[Number] = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),  # subnormals and -0.0 included
    st.integers(min_value=-(2**53), max_value=2**53),
    st.booleans(),
)


def log_scalar_dumps(
    logger: tracklog.Logger, dumps: Sequence[tuple[int, dict[str, Number]]]
) -> list[tuple[int, int]]:
    """Dump each row; return the (earliest, latest) millisecond each dump can carry."""
    windows = []
    for step, values in dumps:
        for key, value in values.items():
            logger.record(key, value)
        # MLflow's SQL store keeps one point per identical (key, value, step,
        # timestamp): one millisecond or more between dumps keeps every point.
        time.sleep(0.002)
        before = time.time()
        logger.dump(step)
        windows.append((int(before * 1000), int(time.time() * 1000)))
    return windows


def assert_scalar_history(
    store: Store,
    run_id: str,
    dumps: Sequence[tuple[int, dict[str, Number]]],
    windows: Sequence[tuple[int, int]],
) -> None:
    keys = {key for _, values in dumps for key in values}
    metrics = store.client.get_run(run_id).data.metrics
    assert {key for key in metrics if not key.startswith("system/")} == keys  # and samples
    for key in keys:
        written = [
            (step, float(values[key]), window)
            for (step, values), window in zip(dumps, windows, strict=True)
            if key in values
        ]
        points = history(store, run_id, key)
        assert [point.step for point in points] == [step for step, _, _ in written]
        for point, (_, value, (earliest, latest)) in zip(points, written, strict=True):
            assert same_float(point.value, stored(value)), (key, point.value, value)
            assert earliest <= point.timestamp <= latest


@settings(max_examples=25)
@given(dumps=dump_sequences(numbers))
@example(dumps=[(0, {"a": 5e-324, "x-y": -(2**53)}), (0, {"a": -0.0}), (-1, {"a": True})])
@example(dumps=[(2**63 - 1, {"a": sys.float_info.max}), (-(2**63), {"a": False})])
def test_scalars_round_trip_exactly(
    sqlite: Store, run_dir: Path, dumps: list[tuple[int, dict[str, Number]]]
) -> None:
    with mlflow_logger(run_dir, sqlite) as logger:  # one run per example
        windows = log_scalar_dumps(logger, dumps)
        run_id = run_id_of(logger)
    assert_scalar_history(sqlite, run_id, dumps, windows)


def test_scalars_through_the_server_and_sqlite(store: Store, run_dir: Path) -> None:
    dumps: list[tuple[int, dict[str, Number]]] = [
        (10, {"a": 0.1, "train/loss": 5e-324, "x-y": 2**53}),
        (10, {"a": -1.5e300, "train/loss": True}),  # repeated step
        (3, {"a": 7, "x-y": False}),  # decreasing step
        (-5, {"a": -(2**53), "train/loss": 1 / 3}),
    ]
    with mlflow_logger(run_dir, store) as logger:
        windows = log_scalar_dumps(logger, dumps)
        run_id = run_id_of(logger)
    assert_scalar_history(store, run_id, dumps, windows)


def test_nan_and_infinities(store: Store, run_dir: Path) -> None:
    with mlflow_logger(run_dir, store) as logger:
        logger.record("nan", math.nan)
        logger.record("inf", math.inf)
        logger.record("neg_inf", -math.inf)
        logger.record("np_inf", np.float32(np.inf))
        logger.dump(4)
        run_id = run_id_of(logger)

    (nan,) = history(store, run_id, "nan")
    assert math.isnan(nan.value)
    assert nan.step == 4
    # MLflow's SQL store cannot hold ±inf and saves ±1.7976931348623157e308 (the
    # largest float64) instead; that is what every MLflow client reads back.
    assert steps_and_values(store, run_id, "inf") == [(4, 1.7976931348623157e308)]
    assert steps_and_values(store, run_id, "neg_inf") == [(4, -1.7976931348623157e308)]
    assert steps_and_values(store, run_id, "np_inf") == [(4, 1.7976931348623157e308)]


def test_exclude_mlflow_keeps_a_key_out_of_mlflow_only(sqlite: Store, run_dir: Path) -> None:
    with mlflow_logger(run_dir, sqlite, {"type": "jsonl"}) as logger:
        logger.record("everywhere", 1.0)
        logger.record("not_in_mlflow", 2.0, exclude="mlflow")
        logger.record("not_in_json", 3.0, exclude=("json", "stdout"))
        logger.dump(0)
        run_id = run_id_of(logger)

    assert sqlite.client.get_run(run_id).data.metrics == {"everywhere": 1.0, "not_in_json": 3.0}
    (row,) = read_jsonl(run_dir / "progress.jsonl")
    assert dict(row.values) == {"everywhere": 1.0, "not_in_mlflow": 2.0}


# Keys --------------------------------------------------------------------------------

log_keys = st.one_of(st.text(min_size=1), st.from_regex(r"[A-Za-z0-9_\-./ ]{1,12}", fullmatch=True))
log_keys = log_keys.filter(lambda key: not key.isspace() and not key.startswith("_"))


def mlflow_takes(key: str) -> bool:
    """Whether MLflow accepts ``key`` as a name, within tracklog's portable characters."""
    # MLflow refuses a name that resolves to another as a path
    # (mlflow.utils.validation.path_not_unique).
    normal = posixpath.normpath(key)
    unique = normal == key and normal != "." and not normal.startswith(("..", "/"))
    return PORTABLE_NAME.fullmatch(key) is not None and unique


def metric_names_by_index(store: Store, run_id: str, count: int) -> dict[int, str]:
    """The metric name each key got, found by its values (``index * 4 + dump``)."""
    found: dict[int, str] = {}
    for name in store.client.get_run(run_id).data.metrics:
        values = [value for _, value in steps_and_values(store, run_id, name)]
        index = int(values[0]) // 4
        assert values == [index * 4 + dump for dump in range(len(values))], name
        assert index not in found, (name, found)
        found[index] = name
    assert sorted(found) == list(range(count))
    return found


@settings(max_examples=25)
@given(keys=st.lists(log_keys, min_size=1, max_size=5, unique=True))
@example(keys=["a:b", "a_b", "x//y", "x/y"])
@example(keys=["../../x", "./a", "/abs", "..", "a/./b", "a/"])
@example(keys=["é", "ü", "k" * 300, "k" * 299 + "j", "k" * 250])
@example(keys=["..a", "...", "x" * 249 + "/y", "x" * 249, "a/" + "x" * 246 + "/.b"])
def test_any_key_gets_a_valid_distinct_name_with_one_warning(
    sqlite: Store, run_dir: Path, keys: list[str]
) -> None:
    with mlflow_logger(run_dir, sqlite) as logger:
        run_id = run_id_of(logger)
        caught_per_dump = []
        for dump in range(3):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")  # so the once-only is tracklog's doing
                for index, key in enumerate(keys):
                    logger.record(key, index * 4 + dump)
                logger.dump(dump)
            caught_per_dump.append(tracklog_warnings(caught))

    names = metric_names_by_index(sqlite, run_id, len(keys))
    renamed = [key for index, key in enumerate(keys) if names[index] != key]
    for name in names.values():
        assert PORTABLE_NAME.fullmatch(name), name
    for index in names:
        assert steps_and_values(sqlite, run_id, names[index]) == [
            (dump, float(index * 4 + dump)) for dump in range(3)
        ]
    # One warning per renamed key, in the first dump, naming the key; none later.
    first, *later = caught_per_dump
    assert len(first) == len(renamed)
    for key in renamed:
        assert any(repr(key) in message for message in first), (key, first)
    assert later == [[], []]
    if all(mlflow_takes(key) for key in keys):
        assert renamed == []


@pytest.mark.parametrize(
    "pair", [("a:b", "a_b"), ("a_b", "a:b"), ("x//y", "x/y"), ("x/y", "x//y"), ("é", "ü")]
)
def test_keys_that_map_to_one_name_stay_two_metrics(
    sqlite: Store, run_dir: Path, pair: tuple[str, str]
) -> None:
    first, second = pair
    with mlflow_logger(run_dir, sqlite) as logger:
        logger.record(first, 1.0)
        logger.record(second, 10.0)
        with pytest.warns(UserWarning, match="MLflow") as caught:
            logger.dump(0)
        logger.record(second, 20.0)
        logger.dump(3)
        logger.record(first, 2.0)
        logger.dump(1)
        run_id = run_id_of(logger)

    names = sorted(sqlite.client.get_run(run_id).data.metrics)
    assert len(names) == 2
    histories = sorted(steps_and_values(sqlite, run_id, name) for name in names)
    assert histories == [[(0, 1.0), (1, 2.0)], [(0, 10.0), (3, 20.0)]]
    for key in pair:  # a valid key keeps its own name, whichever came first
        assert (key in names) is mlflow_takes(key)
    assert len(tracklog_warnings(caught.list)) == sum(not mlflow_takes(key) for key in pair)


def test_a_resumed_run_keeps_each_keys_name(sqlite: Store, run_dir: Path) -> None:
    with mlflow_logger(run_dir, sqlite) as logger:
        logger.record("a:b", 1.0)
        logger.record("a_b", 10.0)
        with pytest.warns(UserWarning, match="MLflow"):
            logger.dump(0)
        run_id = run_id_of(logger)
    with mlflow_logger(run_dir, sqlite, run_id=run_id) as logger:
        logger.record("a_b", 20.0)
        logger.dump(1)

    names = sqlite.client.get_run(run_id).data.metrics
    histories = sorted(steps_and_values(sqlite, run_id, name) for name in names)
    assert histories == [[(0, 1.0)], [(0, 10.0), (1, 20.0)]]


def test_long_keys_are_shortened_and_stay_distinct(sqlite: Store, run_dir: Path) -> None:
    longest = "k" * 250  # MLflow's limit: kept as is, without a warning
    too_long = ["k" * 251, "k" * 300, "k" * 299 + "j", "train/" + "x" * 400]
    with mlflow_logger(run_dir, sqlite) as logger:
        logger.record(longest, 0.0)
        for index, key in enumerate(too_long, start=1):
            logger.record(key, float(index))
        with pytest.warns(UserWarning, match="MLflow") as caught:
            logger.dump(0)
        run_id = run_id_of(logger)

    metrics = sqlite.client.get_run(run_id).data.metrics
    assert len(metrics) == 5
    assert metrics[longest] == 0.0
    assert sorted(metrics.values()) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert all(len(name) <= 250 for name in metrics)
    assert len(tracklog_warnings(caught.list)) == len(too_long)
    (train,) = [name for name, value in metrics.items() if value == 4.0]
    assert train.startswith("train/xxx")


# Media -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [False, True], ids=["TCHW", "NTCHW"])
def test_video_is_an_mp4_artifact(store: Store, run_dir: Path, tmp_path: Path, batch: bool) -> None:
    levels = [0, 255, 60, 200, 120]
    clip = grey_clip(levels)
    frames_in = np.stack([clip, clip]) if batch else clip
    with mlflow_logger(run_dir, store) as logger:
        logger.record("eval/video", tracklog.Video(frames_in, fps=12.5))
        logger.dump(2048)
        run_id = run_id_of(logger)

    assert artifact_files(store, run_id, "videos") == ["videos/eval/video/step_2048.mp4"]
    path = fetch(store, run_id, "videos/eval/video/step_2048.mp4", tmp_path)
    frames, rate = decode_mp4(path)
    assert len(frames) == len(levels)
    assert rate == Fraction(25, 2)
    assert frames[0].shape == (8, 12 if batch else 6, 3)
    for frame, level in zip(frames, levels, strict=True):
        assert abs(float(frame.mean()) - level) < 12

    if store.server is not None:
        # The server wrote the bytes to its --artifacts-destination, not the client.
        on_disk = [
            found
            for found in store.server.artifacts.rglob("step_2048.mp4")
            if run_id in found.parts
        ]
        assert len(on_disk) == 1
        assert on_disk[0].read_bytes() == path.read_bytes()


@pytest.mark.parametrize("key", ["../../x", "/etc/passwd", "a/../../b", ".."])
def test_video_key_never_leaves_the_videos_folder(
    sqlite: Store, run_dir: Path, tmp_path: Path, key: str
) -> None:
    with mlflow_logger(run_dir, sqlite) as logger:
        logger.record(key, tracklog.Video(grey_clip([10, 20]), fps=5))
        with pytest.warns(UserWarning, match=f"MLflow artifact does not accept the key {key!r}"):
            logger.dump(1)
        run_id = run_id_of(logger)

    (path,) = artifact_files(sqlite, run_id, "videos")
    assert path.startswith("videos/")
    assert path.endswith("/step_1.mp4")
    assert ".." not in path.split("/")
    frames, _ = decode_mp4(fetch(sqlite, run_id, path, tmp_path))
    assert len(frames) == 2


def step_images(store: Store, run_id: str, key: str, step: int) -> list[str]:
    """MLflow's image logging files for ``key`` at ``step`` (full-size PNGs)."""
    prefix = f"images/{key.replace('/', '~')}+step+{step}+"
    return [
        path
        for path in artifact_files(store, run_id, "images")
        if path.startswith(prefix) and path.endswith(".png")
    ]


def test_image_is_logged_through_mlflow_image_logging(
    store: Store, run_dir: Path, tmp_path: Path
) -> None:
    first, second = random_pixels((5, 7, 3), 1), random_pixels((5, 7, 3), 2)
    with mlflow_logger(run_dir, store) as logger:
        logger.record("eval/frame", tracklog.Image(first, "HWC"))
        logger.dump(3)
        logger.record("eval/frame", tracklog.Image(second.transpose(2, 0, 1), "CHW"))
        logger.dump(4)
        run_id = run_id_of(logger)

    for step, pixels in ((3, first), (4, second)):
        (path,) = step_images(store, run_id, "eval/frame", step)
        with PILImage.open(fetch(store, run_id, path, tmp_path)) as picture:
            assert picture.format == "PNG"
            assert picture.size == (7, 5)
            assert np.array_equal(np.asarray(picture), pixels)
    assert store.client.get_run(run_id).data.tags["mlflow.loggedImages"] == "True"


def test_figure_is_a_png_of_its_size(sqlite: Store, run_dir: Path, tmp_path: Path) -> None:
    figure, axes = plt.subplots(figsize=(4, 3), dpi=50)
    axes.plot([0, 1, 2], [2, 0, 1])
    with mlflow_logger(run_dir, sqlite) as logger:
        logger.record("plots/curve", tracklog.Figure(figure, close=True))
        logger.dump(7)
        run_id = run_id_of(logger)

    (path,) = step_images(sqlite, run_id, "plots/curve", 7)
    with PILImage.open(fetch(sqlite, run_id, path, tmp_path)) as picture:
        assert picture.format == "PNG"
        assert picture.size == (200, 150)
    assert not plt.fignum_exists(figure.number)


@pytest.mark.parametrize("key", ["k" * 250, "a/" * 100 + "b", "ä" * 300])
def test_image_key_of_any_length_is_logged(
    sqlite: Store, run_dir: Path, tmp_path: Path, key: str
) -> None:
    # MLflow names the file after the key, plus about 100 characters of step,
    # timestamp and a UUID; a file name holds at most 255 bytes.
    pixels = random_pixels((4, 6, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the key may be renamed, with a warning
        with mlflow_logger(run_dir, sqlite) as logger:
            logger.record(key, tracklog.Image(pixels))
            logger.dump(-(2**63))
            run_id = run_id_of(logger)

    pngs = [path for path in artifact_files(sqlite, run_id, "images") if path.endswith(".png")]
    assert len(pngs) == 1
    assert f"+step+{-(2**63)}+" in pngs[0]
    with PILImage.open(fetch(sqlite, run_id, pngs[0], tmp_path)) as picture:
        assert np.array_equal(np.asarray(picture), pixels)


@pytest.mark.parametrize(
    "values",
    [
        np.array([0.5, -2.25, 1e-3, 7.0, 3.0], dtype=np.float64),
        np.arange(12, dtype=np.int64).reshape(3, 4),
        np.linspace(0, 1, 7, dtype=np.float32),
    ],
)
def test_histogram_is_summary_metrics_and_an_npy(
    sqlite: Store, run_dir: Path, tmp_path: Path, values: npt.NDArray[np.generic]
) -> None:
    with mlflow_logger(run_dir, sqlite) as logger:
        logger.record("weights/layer0", values)
        logger.dump(9)
        run_id = run_id_of(logger)

    data = values.astype(np.float64)
    expected = {"mean": data.mean(), "std": data.std(), "min": data.min(), "max": data.max()}
    for stat, value in expected.items():
        (point,) = history(sqlite, run_id, f"weights/layer0/{stat}")
        assert point.step == 9
        assert same_float(point.value, float(value)), (stat, point.value, value)
    assert artifact_files(sqlite, run_id) == ["histograms/weights/layer0/step_9.npy"]
    loaded = np.load(fetch(sqlite, run_id, "histograms/weights/layer0/step_9.npy", tmp_path))
    assert loaded.dtype == values.dtype
    assert np.array_equal(loaded, values.reshape(-1))


def test_media_of_two_dumps_at_one_step_are_both_kept(
    store: Store, run_dir: Path, tmp_path: Path
) -> None:
    with mlflow_logger(run_dir, store) as logger:
        logger.record("hist", np.arange(3))
        logger.record("video", tracklog.Video(grey_clip([0, 0]), fps=4))
        logger.dump(5)
        logger.record("hist", np.arange(4))
        logger.record("video", tracklog.Video(grey_clip([0, 0, 0]), fps=4))
        logger.dump(5)
        run_id = run_id_of(logger)

    npys = artifact_files(store, run_id, "histograms")
    assert len(npys) == 2
    loaded = sorted(len(np.load(fetch(store, run_id, path, tmp_path))) for path in npys)
    assert loaded == [3, 4]
    mp4s = artifact_files(store, run_id, "videos")
    assert len(mp4s) == 2
    lengths = sorted(len(decode_mp4(fetch(store, run_id, path, tmp_path))[0]) for path in mp4s)
    assert lengths == [2, 3]


def test_a_key_named_like_a_file_never_blocks_another_key(
    sqlite: Store, run_dir: Path, tmp_path: Path
) -> None:
    # videos/<key>/step_<step>.mp4 and text/<key>.txt: key "a/step_0.npy" asks for a
    # folder where key "a" put a file, which no artifact store allows.
    with mlflow_logger(run_dir, sqlite) as logger:
        logger.record("a", np.arange(2))
        logger.record("a/step_0.npy", np.arange(3))
        logger.record("t", "short")
        logger.record("t.txt/u", "nested")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logger.dump(0)
        messages = tracklog_warnings(caught)
        assert len(messages) == 2
        for key, name in (("a/step_0.npy", "a/step_0_npy"), ("t.txt/u", "t_txt/u")):
            pattern = f"MLflow artifact does not accept the key '{key}'; logging it as '{name}-"
            assert any(message.startswith(pattern) for message in messages), messages
        logger.record("v/step_1.mp4", tracklog.Video(grey_clip([1, 2, 3]), fps=4))
        with pytest.warns(UserWarning, match="'v/step_1.mp4'; logging it as 'v/step_1_mp4-"):
            logger.dump(1)
        logger.record("v", tracklog.Video(grey_clip([1, 2]), fps=4))
        logger.dump(1)
        run_id = run_id_of(logger)

    npys = artifact_files(sqlite, run_id, "histograms")
    assert sorted(len(np.load(fetch(sqlite, run_id, path, tmp_path))) for path in npys) == [2, 3]
    texts = artifact_files(sqlite, run_id, "text")
    assert sorted(fetch_text(sqlite, run_id, path, tmp_path) for path in texts) == [
        "[step 0] nested\n",
        "[step 0] short\n",
    ]
    mp4s = artifact_files(sqlite, run_id, "videos")
    lengths = sorted(len(decode_mp4(fetch(sqlite, run_id, path, tmp_path))[0]) for path in mp4s)
    assert lengths == [2, 3]


def test_hparam_becomes_params_and_metrics(store: Store, run_dir: Path) -> None:
    hparam = tracklog.HParam(
        {**NESTED_HPARAMS, "notes": "é" * 7000},
        {"eval/success": 1, "hparam/score": -0.5},
    )
    with mlflow_logger(run_dir, store) as logger:
        logger.record("hparams", hparam)
        with pytest.warns(UserWarning, match="'notes' is 7000 characters long; truncated"):
            logger.dump(12)
        run_id = run_id_of(logger)

    assert store.client.get_run(run_id).data.params == {
        "lr": "0.0003",
        "algo": "PPO",
        "sde": "False",
        "seed": "None",
        "n_steps": "2048",
        "net_arch": "[64, 64]",
        "policy.activation": "tanh",
        "policy.kwargs.ortho": "True",
        "notes": "é" * 6000,
    }
    assert steps_and_values(store, run_id, "eval/success") == [(12, 1.0)]
    assert steps_and_values(store, run_id, "hparam/score") == [(12, -0.5)]


def test_a_metric_recorded_beside_its_hparam_keeps_the_recorded_value(
    sqlite: Store, run_dir: Path
) -> None:
    # SB3's metric_dict values are often placeholders for a curve logged under the
    # same key: one point per step, the recorded one.
    with mlflow_logger(run_dir, sqlite) as logger:
        logger.record("hparams", tracklog.HParam({"lr": 0.1}, {"eval/reward": 0.0, "other": 2}))
        logger.record("eval/reward", 7.5)
        logger.dump(3)
        run_id = run_id_of(logger)
    assert steps_and_values(sqlite, run_id, "eval/reward") == [(3, 7.5)]
    assert steps_and_values(sqlite, run_id, "other") == [(3, 2.0)]


def test_hparam_twice_is_fine_and_a_changed_value_keeps_the_first(
    sqlite: Store, run_dir: Path
) -> None:
    with mlflow_logger(run_dir, sqlite) as logger:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in (0, 1):
                logger.record("hparams", tracklog.HParam({"lr": 0.1, "gamma": 0.99}, {"r": 1}))
                logger.dump(step)
            logger.flush()
        assert tracklog_warnings(caught) == []
        logger.record("hparams", tracklog.HParam({"lr": 0.5, "batch": 64}))
        logger.dump(2)
        with pytest.warns(UserWarning, match="MLflow params cannot change: 'lr' stays '0.1'"):
            logger.flush()  # MLflow's worker knows which params the run has
        run_id = run_id_of(logger)

    run = sqlite.client.get_run(run_id)
    assert run.data.params == {"lr": "0.1", "gamma": "0.99", "batch": "64"}
    assert steps_and_values(sqlite, run_id, "r") == [(0, 1.0), (1, 1.0)]


def test_text_is_appended_one_line_per_dump(sqlite: Store, run_dir: Path, tmp_path: Path) -> None:
    texts = ["first", "second, with a comma", "third"]
    with mlflow_logger(run_dir, sqlite) as logger:
        run_id = run_id_of(logger)
        for step, text in enumerate(texts):
            logger.record("notes/eval", text)
            logger.dump(step * 10)
            assert logger.flush()
            # Uploaded as the run goes (artifact_upload_interval is 0), not only at close.
            lines = fetch_text(sqlite, run_id, "text/notes/eval.txt", tmp_path).splitlines()
            assert len(lines) == step + 1

    assert artifact_files(sqlite, run_id) == ["text/notes/eval.txt"]
    lines = fetch_text(sqlite, run_id, "text/notes/eval.txt", tmp_path).splitlines()
    assert len(lines) == len(texts)
    for step, (line, text) in enumerate(zip(lines, texts, strict=True)):
        assert line.endswith(text)
        assert f"step {step * 10}" in line


def test_info_lines_are_a_train_log_artifact(sqlite: Store, run_dir: Path, tmp_path: Path) -> None:
    with mlflow_logger(run_dir, sqlite, artifact_upload_interval=3600) as logger:
        run_id = run_id_of(logger)
        logger.info("evaluation", "done")
        logger.warn("low reward")
        logger.debug("not at level info")
        assert artifact_files(sqlite, run_id) == []  # the interval has not passed yet

    log = fetch_text(sqlite, run_id, "train.log", tmp_path)
    assert log.splitlines() == ["evaluation done", "low reward"]


def test_every_kind_in_one_dump(store: Store, run_dir: Path) -> None:
    with mlflow_logger(run_dir, store) as logger:
        for key, value in one_of_every_kind().items():
            logger.record(key, value)
        logger.info("line")
        logger.dump(0)
        run_id = run_id_of(logger)

    run = store.client.get_run(run_id)
    assert run.data.metrics == {
        "scalar": 1.25,
        "hist/mean": 1.0,
        "hist/std": 0.0,
        "hist/min": 1.0,
        "hist/max": 1.0,
    }
    assert run.data.params == {"lr": "0.1"}
    files = artifact_files(store, run_id)
    assert [path for path in files if not path.startswith("images/")] == [
        "histograms/hist/step_0.npy",
        "text/text.txt",
        "train.log",
        "videos/video/step_0.mp4",
    ]
    assert len(step_images(store, run_id, "image", 0)) == 1
    assert len(step_images(store, run_id, "figure", 0)) == 1


def count_requests(server: MlflowServer, endpoint: str) -> int:
    log = (server.root / "server.log").read_text(encoding="utf-8", errors="replace")
    return log.count(f"POST /api/2.0/mlflow/{endpoint} ")


def test_one_dump_of_2500_scalars_and_250_params_is_batched(server: Store, run_dir: Path) -> None:
    assert server.server is not None
    scalars = {f"metric/{index:04d}": index + 0.5 for index in range(2500)}
    params = {f"p{index:03d}": index for index in range(250)}
    with mlflow_logger(run_dir, server) as logger:
        run_id = run_id_of(logger)
        batches = count_requests(server.server, "runs/log-batch")
        singles = count_requests(server.server, "runs/log-metric")
        for key, value in scalars.items():
            logger.record(key, value)
        logger.record("hparams", tracklog.HParam(params, {"score": 2.0}))
        logger.dump(77)

        # The server refuses a request of more than 1000 metrics or 100 params; three
        # is the fewest that can carry 2501 metrics and 250 params. (MlflowClient's
        # log_batch splits big batches by itself too, so what this test tells apart is
        # batching from sending metrics one request per key.)
        deadline = time.monotonic() + 10
        while count_requests(server.server, "runs/log-batch") < batches + 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert count_requests(server.server, "runs/log-batch") == batches + 3
        assert count_requests(server.server, "runs/log-metric") == singles

    run = server.client.get_run(run_id)
    assert run.data.metrics == {**scalars, "score": 2.0}
    assert run.data.params == {name: str(value) for name, value in params.items()}
    assert steps_and_values(server, run_id, "metric/2499") == [(77, 2499.5)]


# Run lifecycle -----------------------------------------------------------------------


def test_run_is_running_then_finished(store: Store, run_dir: Path) -> None:
    logger = mlflow_logger(run_dir, store)
    run_id = run_id_of(logger)
    assert store.client.get_run(run_id).info.status == "RUNNING"
    logger.record("a", 1)
    logger.dump(0)
    logger.close()
    run = store.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.end_time is not None
    logger.close()  # a second close changes nothing
    assert store.client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.parametrize(
    ("error", "status"), [(ValueError, "FAILED"), (KeyboardInterrupt, "KILLED")]
)
def test_run_fails_when_the_with_block_raises(
    sqlite: Store, run_dir: Path, error: type[BaseException], status: str
) -> None:
    logger = mlflow_logger(run_dir, sqlite)
    run_id = run_id_of(logger)
    logger.record("a", 1)
    logger.dump(0)
    with pytest.raises(error), logger:
        raise error("training blew up")
    assert sqlite.client.get_run(run_id).info.status == status
    assert sqlite.client.get_metric_history(run_id, "a")[0].value == 1.0


CRASHING_SCRIPT = """
import sys
import tracklog

logger = tracklog.build_logger({{
    "run_dir": {run_dir!r},
    "outputs": [{{"type": "mlflow", "tracking_uri": {uri!r}, "experiment": {experiment!r}}}],
}})
(output,) = logger.output_formats
print(output.run_id, flush=True)
logger.record("loss", 0.5)
logger.dump(1)
raise {error}("uncaught")
"""


def test_uncaught_exception_ends_the_process_run_as_failed_or_killed(
    sqlite: Store, tmp_path: Path
) -> None:
    expected = {"RuntimeError": "FAILED", "KeyboardInterrupt": "KILLED"}
    processes = {}
    for error in expected:
        script = CRASHING_SCRIPT.format(
            run_dir=str(tmp_path / error), uri=sqlite.uri, experiment=EXPERIMENT, error=error
        )
        processes[error] = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=tmp_path,
            text=True,
        )
    for error, process in processes.items():
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode != 0, stderr
        assert f"{error}: uncaught" in stderr
        run_id = stdout.split()[0]
        run = sqlite.client.get_run(run_id)
        assert run.info.status == expected[error], stderr
        assert steps_and_values(sqlite, run_id, "loss") == [(1, 0.5)]


def test_resume_by_run_id_continues_the_run(sqlite: Store, run_dir: Path, tmp_path: Path) -> None:
    with mlflow_logger(run_dir, sqlite) as logger:
        run_id = run_id_of(logger)
        logger.info("first session")
        logger.record("loss", 1.0)
        logger.record("notes", "one")
        logger.record("hparams", tracklog.HParam({"lr": 0.1}))
        logger.dump(0)
        logger.record("loss", 0.5)
        logger.dump(1)
    assert sqlite.client.get_run(run_id).info.status == "FINISHED"

    with mlflow_logger(run_dir, sqlite, run_id=run_id, experiment=None) as logger:
        assert run_id_of(logger) == run_id
        assert sqlite.client.get_run(run_id).info.status == "RUNNING"
        logger.info("second session")
        logger.record("loss", 0.25)
        logger.record("notes", "two")
        logger.record("hparams", tracklog.HParam({"lr": 0.1}))  # the same params again
        logger.dump(2)

    run = sqlite.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1"}
    assert steps_and_values(sqlite, run_id, "loss") == [(0, 1.0), (1, 0.5), (2, 0.25)]
    first, resumed, second = fetch_text(sqlite, run_id, "train.log", tmp_path).splitlines()
    assert (first, second) == ("first session", "second session")
    record = read_run(run_dir)
    assert record is not None
    assert resumed == f"tracklog: resuming run {record['run']} in {run_dir}"
    notes = fetch_text(sqlite, run_id, "text/notes.txt", tmp_path).splitlines()
    assert [line.split()[-1] for line in notes] == ["one", "two"]


def test_resume_of_an_unknown_run_is_reported_naming_the_output(
    sqlite: Store, run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Only the backend knows the run does not exist: build_logger returns at once, and
    # the error is reported (raised, when strict) at the next call after it answered.
    logger = tracklog.build_logger(
        {
            "run_dir": str(run_dir),
            "strict": True,
            "outputs": [
                {"type": "jsonl"},
                {
                    "type": "mlflow",
                    "tracking_uri": sqlite.uri,
                    "run_id": "0123456789abcdef0123456789abcdef",
                },
            ],
            "delivery": {"close_timeout": 5, "deadline": 0},
        }
    )
    logger.record("a", 1.0)
    logger.dump(0)
    with (
        caplog.at_level(logging.ERROR, logger="tracklog"),
        pytest.raises(DeliveryError, match=r"outputs\.1 \(mlflow\): cannot start"),
    ):
        logger.flush(timeout=60)
    assert "RESOURCE_DOES_NOT_EXIST" in caplog.text or "not found" in caplog.text.lower()
    logger.close()
    assert [row.values["a"] for row in tracklog.readers.read_jsonl(run_dir / "progress.jsonl")] == [
        1.0
    ]


def test_run_has_version_settings_user_tags_and_name(sqlite: Store, run_dir: Path) -> None:
    tags = {"team": "rl", "purpose": "tests"}
    with mlflow_logger(
        run_dir, sqlite, run_name="ppo-cartpole-1", tags=tags, username="me", password=PASSWORD
    ) as logger:
        run_id = run_id_of(logger)
        settings = logger.settings
    assert settings is not None

    run = sqlite.client.get_run(run_id)
    assert run.info.run_name == "ppo-cartpole-1"
    assert run.data.tags["mlflow.runName"] == "ppo-cartpole-1"
    assert run.data.tags["team"] == "rl"
    assert run.data.tags["purpose"] == "tests"
    assert run.data.tags["tracklog.version"] == version("tracklog")
    logged = json.loads(run.data.tags["tracklog.settings"])
    expected = settings.model_dump(mode="json")
    expected["outputs"][0]["password"] = "**********"
    assert logged == expected


def test_experiment_is_created_by_name_then_reused(sqlite: Store, run_dir: Path) -> None:
    name = f"fresh-{uuid.uuid4().hex}"
    assert sqlite.client.get_experiment_by_name(name) is None
    run_ids = []
    for _ in range(2):
        with mlflow_logger(run_dir, sqlite, experiment=name) as logger:
            run_ids.append(run_id_of(logger))

    experiment = sqlite.client.get_experiment_by_name(name)
    assert experiment is not None
    runs = sqlite.client.search_runs([experiment.experiment_id])
    assert sorted(run.info.run_id for run in runs) == sorted(run_ids)
    assert len(set(run_ids)) == 2


def test_artifact_location_of_a_new_experiment(
    sqlite: Store, run_dir: Path, tmp_path: Path
) -> None:
    location = tmp_path / "artifacts"
    name = f"located-{uuid.uuid4().hex}"
    with mlflow_logger(
        run_dir, sqlite, experiment=name, artifact_location=location.as_uri()
    ) as logger:
        logger.record("hist", np.arange(3))
        logger.dump(0)
        run_id = run_id_of(logger)

    experiment = sqlite.client.get_experiment_by_name(name)
    assert experiment is not None
    assert experiment.artifact_location == location.as_uri()
    (npy,) = location.rglob("step_0.npy")
    assert run_id in npy.parts
    assert np.load(npy).tolist() == [0, 1, 2]


def test_no_experiment_means_mlflows_default(sqlite: Store, run_dir: Path) -> None:
    with mlflow_logger(run_dir, sqlite, experiment=None) as logger:
        run_id = run_id_of(logger)
    assert sqlite.client.get_run(run_id).info.experiment_id == "0"


@pytest.mark.parametrize("how", ["run_id", "resume"])
def test_a_resumed_session_does_not_overwrite_earlier_media(
    sqlite: Store, run_dir: Path, tmp_path: Path, how: str
) -> None:
    def session() -> tracklog.Logger:
        if how == "run_id":
            return mlflow_logger(run_dir, sqlite, run_id=run_id)
        output = {"type": "mlflow", "tracking_uri": sqlite.uri, "experiment": EXPERIMENT}
        return tracklog.build_logger(
            {"run_dir": str(run_dir), "resume": "auto", "outputs": [output]}
        )

    run_id = None
    with session() if how == "resume" else mlflow_logger(run_dir, sqlite) as logger:
        logger.record("clip", tracklog.Video(grey_clip([1, 2]), fps=4))
        logger.dump(100)
        run_id = run_id_of(logger)
    with session() as logger:  # resumed from step 100
        logger.record("clip", tracklog.Video(grey_clip([1, 2, 3]), fps=4))
        logger.dump(100)
        assert run_id_of(logger) == run_id
    mp4s = artifact_files(sqlite, run_id, "videos")
    assert mp4s == ["videos/clip/step_100-1.mp4", "videos/clip/step_100.mp4"]
    lengths = [len(decode_mp4(fetch(sqlite, run_id, path, tmp_path))[0]) for path in mp4s]
    assert lengths == [3, 2]


def test_credentials_never_reach_the_environment_or_the_queue(
    sqlite: Store, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "someone-else")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    before = dict(os.environ)
    logger = mlflow_logger(run_dir, sqlite, username="me", password=PASSWORD)
    logger.record("a", 1.0)
    logger.dump(0)
    assert logger.flush()
    (queue_dir,) = find_queues(run_dir)
    on_disk = b"".join(path.read_bytes() for path in queue_dir.rglob("*") if path.is_file())
    assert PASSWORD.encode() not in on_disk  # it went to the delivery process by pipe
    logger.close()
    assert dict(os.environ) == before


LIFECYCLE_SCRIPT = """
import sys
import tracklog

logger = tracklog.build_logger({{
    "run_dir": {run_dir!r},
    "outputs": [{{"type": "mlflow", "tracking_uri": {uri!r}, "experiment": {experiment!r},
                  "artifact_upload_interval": 3600}}],
}})
(output,) = logger.output_formats
print(output.run_id, flush=True)
logger.info("a line only the final upload carries")
logger.record("loss", 0.5)
logger.dump(1)
{ending}
"""

_ENDINGS = {
    # never closed, dropped: the exit hook still finishes the run and uploads train.log
    "dropped": ("del logger, output", "FINISHED"),
    # a library that replaces sys.excepthook without chaining it (rich does)
    "hook-replaced": (
        "sys.excepthook = lambda *exc: print('custom hook', file=sys.stderr)\n"
        "raise RuntimeError('uncaught')",
        "FAILED",
    ),
}


@pytest.mark.parametrize("ending", sorted(_ENDINGS))
def test_the_exit_hook_ends_every_run(sqlite: Store, tmp_path: Path, ending: str) -> None:
    code, status = _ENDINGS[ending]
    script = LIFECYCLE_SCRIPT.format(
        run_dir=str(tmp_path / "run"), uri=sqlite.uri, experiment=EXPERIMENT, ending=code
    )
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    run_id = done.stdout.split()[0]
    assert sqlite.client.get_run(run_id).info.status == status, done.stderr
    log = fetch_text(sqlite, run_id, "train.log", tmp_path)
    assert log == "a line only the final upload carries\n"


def test_sys_exit_zero_inside_the_block_is_success(sqlite: Store, run_dir: Path) -> None:
    logger = mlflow_logger(run_dir, sqlite)
    run_id = run_id_of(logger)
    with pytest.raises(SystemExit), logger:
        sys.exit(0)
    assert sqlite.client.get_run(run_id).info.status == "FINISHED"


def test_a_histogram_stat_never_merges_with_a_recorded_key(sqlite: Store, run_dir: Path) -> None:
    with mlflow_logger(run_dir, sqlite) as logger:
        logger.record("w/mean", 100.0)
        logger.record("w", np.array([1.0, 3.0]))
        with pytest.warns(UserWarning, match="'w/mean' is already logged for 'w/mean'"):
            logger.dump(0)
        run_id = run_id_of(logger)
    assert steps_and_values(sqlite, run_id, "w/mean") == [(0, 100.0)]
    stats = [name for name in sqlite.client.get_run(run_id).data.metrics if name != "w/mean"]
    means = [name for name in stats if name.startswith("w/mean-")]
    assert len(means) == 1
    assert steps_and_values(sqlite, run_id, means[0]) == [(0, 2.0)]


def test_a_key_spelled_like_a_renamed_key_is_kept_too(sqlite: Store, run_dir: Path) -> None:
    with mlflow_logger(run_dir, sqlite) as logger:
        logger.record("a:b", 1.0)
        with pytest.warns(UserWarning, match="logging it as 'a_b-"):
            logger.dump(0)
        logger.flush()
        renamed = next(iter(sqlite.client.get_run(run_id_of(logger)).data.metrics))
        logger.record(renamed, 2.0)  # the literal name, recorded by the user
        logger.record("other", 3.0)
        with pytest.warns(UserWarning, match="already logged"):
            logger.dump(1)
        run_id = run_id_of(logger)
    metrics = sqlite.client.get_run(run_id).data.metrics
    assert len(metrics) == 3  # nothing merged, nothing dropped
    assert steps_and_values(sqlite, run_id, renamed) == [(0, 1.0)]
    assert steps_and_values(sqlite, run_id, "other") == [(1, 3.0)]


class _FailOnce:
    """Makes the next log_batch fail, as a server blip would (then MLflow is fine)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.real = client.log_batch
        self.failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        if not self.failed:
            self.failed = True
            raise ConnectionError("server blip")
        self.real(*args, **kwargs)


def test_params_of_a_failed_batch_are_sent_again(
    sqlite: Store, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The output as the delivery process holds it: a transient failure is retried with
    # the same rows, and what the failed request carried is sent again.
    settings = MlflowOutput(tracking_uri=sqlite.uri, experiment=EXPERIMENT)
    output = tracklog.MLFlowOutputFormat(settings)
    monkeypatch.setattr(output.client, "log_batch", _FailOnce(output.client))
    hparams = tracklog.HParam({"lr": 0.1, "gamma": 0.99})
    rows = [
        Row(step=step, timestamp=time.time(), seq=step, values={"h": hparams}) for step in (0, 1)
    ]
    with pytest.raises(ConnectionError):
        output.write_rows(rows)
    assert output.is_transient(ConnectionError("server blip"))
    output.write_rows(rows)  # the retry
    output.close()
    assert sqlite.client.get_run(output.run_id).data.params == {"lr": "0.1", "gamma": "0.99"}


def test_secrets_in_the_tracking_uri_are_masked(run_dir: Path, tmp_path: Path) -> None:
    # A sqlite URI has no password; check the masking where a server URI would have one.
    settings = tracklog.load_settings(
        {"outputs": [{"type": "mlflow", "tracking_uri": "postgresql://me:s3cret@db/mlflow"}]}
    )
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in settings.model_dump_json()
    assert "me:***@db" in settings.model_dump_json()
    (output,) = settings.outputs
    assert isinstance(output, MlflowOutput)
    assert output.tracking_uri == "postgresql://me:s3cret@db/mlflow"  # still usable


def test_settings_are_an_artifact_too(sqlite: Store, run_dir: Path, tmp_path: Path) -> None:
    tags = {f"tag{i}": "x" * 150 for i in range(60)}  # too long for one MLflow tag
    with mlflow_logger(run_dir, sqlite, tags=tags) as logger:
        run_id = run_id_of(logger)
    document = json.loads(fetch_text(sqlite, run_id, "tracklog/settings.json", tmp_path))
    assert document["outputs"][0]["tags"] == tags
    assert "tracklog.settings" not in sqlite.client.get_run(run_id).data.tags


def test_a_server_that_is_down_at_start_never_stops_training(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.servers import free_port

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    start = time.monotonic()
    logger = tracklog.build_logger(
        {
            "run_dir": str(run_dir),
            "outputs": [
                {"type": "jsonl"},
                {
                    "type": "mlflow",
                    "tracking_uri": f"http://127.0.0.1:{free_port()}",
                    "request_retries": 1,
                    "request_timeout": 2,
                },
            ],
            "delivery": {"close_timeout": 3, "retry_initial": 0.2, "deadline": 1},
        }
    )
    assert time.monotonic() - start < 1  # the run starts in the delivery process
    for step in range(5):
        logger.record("loss", float(step))
        logger.dump(step)  # never raises, never waits for the server
    with caplog.at_level(logging.WARNING, logger="tracklog"):
        logger.close()
    assert time.monotonic() - start < 10
    assert [
        row.values["loss"] for row in tracklog.readers.read_jsonl(run_dir / "progress.jsonl")
    ] == [0.0, 1.0, 2.0, 3.0, 4.0]
    (queue_dir,) = find_queues(run_dir)
    assert f"python -m tracklog replay {queue_dir}" in caplog.text
    # The delivery process gives up a deadline after close; the rows stay for replay.
    queue = Queue(queue_dir)
    while queue.delivery_lock().held_elsewhere():
        assert time.monotonic() - start < 60
        time.sleep(0.1)
    assert queue.pending(["1-mlflow"]) >= 5
    queue.close()


def test_contested_names_go_to_the_key_recorded_first(sqlite: Store, run_dir: Path) -> None:
    # Naming follows the row's order, not a set's: with 24 contested names, any other
    # order would give at least one of them to the histogram (all but surely).
    with mlflow_logger(run_dir, sqlite) as logger:
        for i in range(24):
            logger.record(f"w{i}/mean", 100.0 + i)
            logger.record(f"w{i}", np.array([1.0, 3.0]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one rename warning per pair
            logger.dump(0)
        run_id = run_id_of(logger)
    for i in range(24):
        assert steps_and_values(sqlite, run_id, f"w{i}/mean") == [(0, 100.0 + i)]


SWEEP_JOB = """\
import sys, time
import tracklog

job, start = int(sys.argv[1]), float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))  # all jobs start together
settings = {
    "run_dir": f"job{job}",
    "outputs": [{"type": "mlflow", "tracking_uri": "sqlite:///mlflow.db", "experiment": "sweep"}],
    "delivery": {"close_timeout": 120},
}
with tracklog.build_logger(settings) as logger:
    for step in range(3):
        logger.record("job", float(job))
        logger.dump(step)
"""


def test_sweep_jobs_starting_at_once_share_one_fresh_sqlite_store(tmp_path: Path) -> None:
    # Jobs of a sweep (Hydra's joblib launcher, submitit) logging to one new
    # ./mlflow.db: their delivery processes open the store at the same moment. MLflow's
    # SQLite migrations are not transactional, and without tracklog's lock two of them
    # migrating at once both failed and left a database no client could open again.
    jobs = 4
    script = tmp_path / "job.py"
    script.write_text(SWEEP_JOB)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACKLOG_", "MLFLOW_"))}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    start = time.time() + 8  # after every interpreter has imported tracklog
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(job), str(start)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for job in range(jobs)
    ]
    outputs = [process.communicate(timeout=240)[0] for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output
        assert "Traceback" not in output, output
        assert "cannot start" not in output, output
        assert "not delivered" not in output, output
        assert "could not be delivered" not in output, output

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweep")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.data.metrics["job"] for run in runs) == [float(job) for job in range(jobs)]
    for run in runs:
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "job")
        assert sorted(point.step for point in history) == [0, 1, 2]


JOBS_IN_FOLDERS = """\
import os, sys
import tracklog

for folder in sys.argv[1:]:
    os.chdir(folder)  # as Hydra does with hydra.job.chdir=true, one job after another
    settings = {
        "run_dir": "run",
        "outputs": [{"type": "mlflow", "tracking_uri": "sqlite:///mlflow.db", "experiment": "e"}],
        "delivery": {"close_timeout": 120},
    }
    with tracklog.build_logger(settings) as logger:
        logger.record("x", 1.0)
        logger.log("a line for train.log")
        logger.dump(1)
"""


def test_a_relative_sqlite_store_keeps_artifacts_beside_it_in_the_folder_of_each_job(
    tmp_path: Path,
) -> None:
    # The delivery process starts in the folder of the trainer's first logger; a later
    # logger built in another folder gets its store there and, as MLflow's own client
    # would give it, its artifacts in that folder's ./mlruns, not the first one's.
    folders = [tmp_path / "job0", tmp_path / "job1"]
    for folder in folders:
        folder.mkdir()
    script = tmp_path / "jobs.py"
    script.write_text(JOBS_IN_FOLDERS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACKLOG_", "MLFLOW_"))}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    done = subprocess.run(
        [sys.executable, str(script), *map(str, folders)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr

    for folder in folders:
        client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("e")
        default = client.get_experiment("0")
        assert experiment is not None
        assert Path(experiment.artifact_location).parent == folder / "mlruns"
        assert Path(default.artifact_location).parent == folder / "mlruns"
        (run,) = client.search_runs([experiment.experiment_id])
        assert Path(run.info.artifact_uri).is_relative_to(folder / "mlruns")
        logged = {info.path for info in client.list_artifacts(run.info.run_id)}
        assert "train.log" in logged
        assert (Path(run.info.artifact_uri) / "train.log").is_file()


def test_the_store_creation_lock_is_taken_and_never_waited_for_forever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    from tracklog.outputs import mlflow as mlflow_output

    uri = f"sqlite+pysqlite:///{tmp_path / 'mlflow.db'}"
    other = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        creating = mlflow_output._creating  # pyright: ignore[reportPrivateUsage]
        with creating(uri), pytest.raises(BlockingIOError):  # held: others would wait
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Held by a process that hangs or is stopped: waited for only so long.
        fcntl.flock(other, fcntl.LOCK_EX)
        monkeypatch.setattr(mlflow_output, "_CREATING_WAIT", 0.5)
        started = time.monotonic()
        with creating(uri):
            waited = time.monotonic() - started
        assert 0.5 <= waited < 30
    finally:
        os.close(other)
