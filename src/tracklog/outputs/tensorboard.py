"""``TensorBoardOutputFormat``: TensorBoard event files, written in the delivery process.

The events are TensorBoard's own: its protobufs (``tensorboard.compat.proto``), its
summary builders (the text plugin's metadata, ``tensor_util``, the hparams plugin's
``summary_v2.hparams_pb`` and ``metadata``) and the framing of its ``RecordWriter``,
called synchronously so that a row is in the file when its write returns
(``EventFileWriter`` would add a thread and a timed flush). Only the records' checksums
are not TensorBoard's: see :class:`_RecordWriter`.
"""

from __future__ import annotations

import importlib
import itertools
import os
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Final, Protocol, assert_never

from tracklog._row import Row
from tracklog.convert.tensorboard import (
    HistogramSummary,
    HParamsSummary,
    ImageSummary,
    ScalarSummary,
    TextSummary,
    to_tensorboard,
)
from tracklog.outputs._base import OutputFormat, write_each

__all__ = ["TensorBoardOutputFormat"]

_HParams = dict[str, bool | float | str]  # HParamsSummary.hparams


# TensorBoard carries no type information (and stubs/tensorboard covers only its
# reader), so these Protocols describe the few things this output calls.


class _Message(Protocol):
    """A TensorBoard protobuf message."""

    def SerializeToString(self) -> bytes: ...


class _Summary(_Message, Protocol):
    value: Sequence[_Message]


# Keyword arguments are the message's fields, as protobuf's generated classes take them.
_Build = Callable[..., _Message]


_LENGTH: Final = struct.Struct("<Q")
_CHECKSUM: Final = struct.Struct("<I")


class _RecordWriter:
    """``tensorboard.summary.writer.record_writer.RecordWriter``, with its checksums
    computed in C by google-crc32c.

    TensorBoard computes a record's masked CRC-32C in pure Python, one table look-up
    per byte: 210 µs for a row of 50 scalars (1.25 KB), three times what building the
    row's event costs, and the largest share of this output's CPU in the delivery
    process. google-crc32c computes the same checksum in 0.3 µs. ``write`` is
    TensorBoard's framing, line for line (length, its masked checksum, the data, the
    data's masked checksum); a test compares the bytes with TensorBoard's own writer.
    """

    def __init__(self, file: IO[bytes], crc32c: Callable[[bytes], int]) -> None:
        self._file = file
        self._crc32c = crc32c

    def _masked(self, data: bytes) -> bytes:
        crc = self._crc32c(data)  # masked as TFRecord does (and TensorBoard's masked_crc32c)
        return _CHECKSUM.pack((((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)

    def write(self, data: bytes) -> None:
        header = _LENGTH.pack(len(data))
        self._file.write(header + self._masked(header) + data + self._masked(data))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True, slots=True)
class _TensorBoard:
    """The parts of TensorBoard this output writes with."""

    crc32c: Callable[[bytes], int]
    event: _Build
    source_metadata: _Build
    session_log: _Build
    session_start: int
    summary: _Build
    value: _Build
    image: _Build
    histogram: _Build
    make_tensor_proto: _Build  # tensor_util.make_tensor_proto(values, dtype=...)
    dt_string: int
    text_metadata: Callable[[str, str], _Message]  # (display_name, description)
    # The hparams plugin: the session start summary, plugin data and its metadata.
    hparams_pb: Callable[..., _Summary]
    hparams_metadata: Callable[[_Message], _Message]
    hparams_data: _Build
    experiment: _Build
    hparam_info: _Build
    metric_info: _Build
    metric_name: _Build
    session_end: _Build
    null_tensor: _Message
    experiment_tag: str
    session_end_tag: str
    data_types: dict[type, int]
    status_success: int
    status_failure: int


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(
            "the tensorboard output (type: tensorboard) needs the "
            f"{name.split('.')[0].replace('_', '-')!r} package; install it with: "
            "pip install 'tracklog[tensorboard]'"
        ) from error


def _tensorboard() -> _TensorBoard:
    crc32c = _import("google_crc32c")
    event = _import("tensorboard.compat.proto.event_pb2")
    summary = _import("tensorboard.compat.proto.summary_pb2")
    types = _import("tensorboard.compat.proto.types_pb2")
    tensor_util = _import("tensorboard.util.tensor_util")
    text_metadata = _import("tensorboard.plugins.text.metadata")
    hparams_summary = _import("tensorboard.plugins.hparams.summary_v2")
    hparams_metadata = _import("tensorboard.plugins.hparams.metadata")
    plugin_data = _import("tensorboard.plugins.hparams.plugin_data_pb2")
    api = _import("tensorboard.plugins.hparams.api_pb2")
    return _TensorBoard(
        crc32c=crc32c.value,
        event=event.Event,
        source_metadata=event.SourceMetadata,
        session_log=event.SessionLog,
        session_start=event.SessionLog.START,
        summary=summary.Summary,
        value=summary.Summary.Value,
        image=summary.Summary.Image,
        histogram=summary.HistogramProto,
        make_tensor_proto=tensor_util.make_tensor_proto,
        dt_string=types.DT_STRING,
        text_metadata=text_metadata.create_summary_metadata,
        hparams_pb=hparams_summary.hparams_pb,
        hparams_metadata=hparams_metadata.create_summary_metadata,
        hparams_data=plugin_data.HParamsPluginData,
        experiment=api.Experiment,
        hparam_info=api.HParamInfo,
        metric_info=api.MetricInfo,
        metric_name=api.MetricName,
        session_end=plugin_data.SessionEndInfo,
        null_tensor=hparams_metadata.NULL_TENSOR,
        experiment_tag=hparams_metadata.EXPERIMENT_TAG,
        session_end_tag=hparams_metadata.SESSION_END_INFO_TAG,
        data_types={
            bool: api.DATA_TYPE_BOOL,
            float: api.DATA_TYPE_FLOAT64,
            str: api.DATA_TYPE_STRING,
        },
        status_success=api.STATUS_SUCCESS,
        status_failure=api.STATUS_FAILURE,
    )


_file_numbers = itertools.count()


def _create_event_file(folder: Path, session_started: float | None) -> tuple[Path, IO[bytes]]:
    """A new event file. TensorBoard reads a folder's event files in the order of their
    names (it looks for ``tfevents``), so the name starts with when the logger's session
    started, then when the file was created: the rows of a session are read after the
    sessions before it, whenever they were written. A dead session's queue replayed
    after its restart has already marked its restart (``SessionLog.START``) is then read
    before that marker, which hides its steps from the restart's on, as TensorBoard
    does for the rows that session wrote itself. (Named by the time the file was
    created, as ``EventFileWriter`` names them, it was read after the marker and
    showed the dead session's points beside the restart's.)"""
    started = int(session_started if session_started is not None else time.time())
    while True:
        path = folder / (
            f"events.out.tfevents.{started:010d}.{time.time_ns():020d}."
            f"{socket.gethostname()}.{os.getpid()}.{next(_file_numbers)}"
        )
        try:
            return path, open(path, "xb")  # held until close()
        except FileExistsError:  # another writer's (TensorBoard's own counts from 0 too)
            continue


class TensorBoardOutputFormat(OutputFormat):
    """Writes every dump as one event of a new TensorBoard event file in ``folder``.

    Numbers become scalars (float32, as TensorBoard keeps them), arrays histograms,
    images and figures PNG images, videos animated GIFs in the Images tab (encoded
    with Pillow, no moviepy), text the Text tab, and ``HParam`` the HPARAMS tab, all
    in the one event file. Keys are tags as they are. The delivery process runs it;
    each ``write_row``/``write_rows`` call flushes the file before it returns, so a row
    is readable as soon as it is written (``logger.flush()`` waits for that).

    HPARAMS tab: the first ``HParam`` starts the run's session with its
    hyperparameters; the first one whose ``metric_dict`` names metrics declares the
    tab's metric columns (until then TensorBoard offers every scalar as one). The
    logger's declared summaries (``<key>/<kind>``, written when it closes) are
    columns too, from the first ``HParam`` on.
    TensorBoard shows each metric's last scalar point, so ``metric_dict`` values are
    not drawn into a chart that is logged anyway (SB3's convention: they are
    placeholders, or the final value of that chart). Only a metric never recorded as
    a scalar by this logger gets them as its points, at their dumps' steps, when the
    logger closes.

    The rows come from the logger's queue, so a killed trainer loses none of them; a
    killed delivery process starts a new event file, which TensorBoard reads as one run
    with the folder's other files. ``session_started`` (when the logger that queued the
    rows started) orders the files: see ``_create_event_file``.

    ``resuming`` (a process continuing an earlier one's run, ``resume: auto``): the
    first row with a positive step (a ``dump()`` at step 0 of settings or hparams
    before training does not count) is preceded by a ``SessionLog.START`` event at its
    step, TensorBoard's own restart marker: TensorBoard then shows this process's
    values, and not the earlier process's at later steps (logged after the checkpoint
    this one restarted from; they stay in that process's event file).
    """

    name = "tensorboard"

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        resuming: bool = False,
        summary_metrics: Sequence[str] = (),
        session_started: float | None = None,
    ) -> None:
        self._tb = _tensorboard()
        self._summary_metrics = tuple(summary_metrics)
        self._restart_pending = resuming
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path, file = _create_event_file(self.folder, session_started)
        self._writer = _RecordWriter(file, self._tb.crc32c)
        # Worker side: the session's hyperparameters and when it started, whether the
        # experiment (the metric columns) is written, the tags recorded as scalars, and
        # metric_dict points waiting for close() to see whether their tag ever was.
        self._session: tuple[_HParams, float] | None = None
        self._experiment_written = False
        self._recorded: set[str] = set()
        self._hparam_points: list[tuple[int, float, str, float]] = []
        self._last_step = 0
        self._status = self._tb.status_success
        self._closed = False
        self._write_event(
            self._tb.event(
                wall_time=time.time(),
                file_version="brain.Event:2",
                source_metadata=self._tb.source_metadata(writer="tracklog"),
            )
        )
        self._writer.flush()

    def write_row(self, row: Row) -> None:
        self.write_rows([row])

    def write_rows(self, rows: list[Row]) -> None:
        """Write each row as one event, then flush the file (once per call); a row that
        fails stops the call, and says how many rows before it were written."""
        try:
            write_each(rows, self._write_row)
        finally:
            self._writer.flush()

    def _write_row(self, row: Row) -> None:
        if self._restart_pending and row.step > 0:  # not at a dump(0) of the settings
            self._restart_pending = False
            start = self._tb.session_log(status=self._tb.session_start)
            self._write_event(
                self._tb.event(wall_time=row.timestamp, step=row.step, session_log=start)
            )
        items = [item for key, value in row.values.items() for item in to_tensorboard(key, value)]
        # Before the HParams: a metric recorded in the same dump is recorded already.
        self._recorded.update(item.tag for item in items if isinstance(item, ScalarSummary))
        values: list[_Message] = []
        for item in items:
            match item:
                case ScalarSummary():
                    values.append(self._tb.value(tag=item.tag, simple_value=item.value))
                case HistogramSummary():
                    values.append(self._histogram(item))
                case ImageSummary():
                    values.append(self._image(item))
                case TextSummary():
                    values.append(self._text(item))
                case HParamsSummary():
                    values.extend(self._hparams(item, row))
                case _:
                    assert_never(item)
        self._last_step = row.step
        if values:
            self._write_event(
                self._tb.event(
                    wall_time=row.timestamp, step=row.step, summary=self._tb.summary(value=values)
                )
            )

    # Summaries -------------------------------------------------------------------------
    def _histogram(self, item: HistogramSummary) -> _Message:
        histogram = self._tb.histogram(
            min=item.min,
            max=item.max,
            num=item.num,
            sum=item.sum,
            sum_squares=item.sum_squares,
            bucket_limit=item.bucket_limit,
            bucket=item.bucket,
        )
        return self._tb.value(tag=item.tag, histo=histogram)

    def _image(self, item: ImageSummary) -> _Message:
        image = self._tb.image(
            height=item.height,
            width=item.width,
            colorspace=item.colorspace,
            encoded_image_string=item.encoded,
        )
        return self._tb.value(tag=item.tag, image=image)

    def _text(self, item: TextSummary) -> _Message:
        # A list, not an array: NumPy's bytes arrays would drop trailing NULs.
        tensor = self._tb.make_tensor_proto([item.text.encode("utf-8")], dtype=self._tb.dt_string)
        metadata = self._tb.text_metadata(item.tag, "")
        return self._tb.value(tag=item.tag, metadata=metadata, tensor=tensor)

    def _plugin_value(self, tag: str, **data: _Message) -> _Message:
        """An hparams plugin summary value, as ``summary_v2`` builds them."""
        metadata = self._tb.hparams_metadata(self._tb.hparams_data(**data))
        return self._tb.value(tag=tag, metadata=metadata, tensor=self._tb.null_tensor)

    def _hparams(self, item: HParamsSummary, row: Row) -> list[_Message]:
        """The session start (first HParam) and the experiment (first naming metrics).

        TensorBoard keeps the first summary of each ``_hparams_/`` tag in a run, so each
        is written once, when its content is known. The metric values wait for close().
        """
        values: list[_Message] = []
        if self._session is None:
            self._session = (item.hparams, row.timestamp)
            # trial_id "": no session group name, so the tab names the row after the run
            # (summary_v2 would group runs by a hash of their hyperparameters).
            start = self._tb.hparams_pb(item.hparams, trial_id="", start_time_secs=row.timestamp)
            values.extend(start.value)
        if (item.metrics or self._summary_metrics) and not self._experiment_written:
            self._experiment_written = True
            hparams, started = self._session
            metrics = tuple(dict.fromkeys([*item.metrics, *self._summary_metrics]))
            values.append(self._experiment(hparams, metrics, started))
        self._hparam_points.extend(
            (row.step, row.timestamp, name, number)
            for name, number in item.metrics.items()
            if name not in self._recorded
        )
        return values

    def _experiment(self, hparams: _HParams, metrics: tuple[str, ...], created: float) -> _Message:
        # Built from api_pb2 rather than summary_v2.hparams_config_pb, whose HParam sets a
        # type only through a Domain (which would also narrow the tab's filter to a value).
        tb = self._tb
        experiment = tb.experiment(
            time_created_secs=created,
            hparam_infos=[
                tb.hparam_info(name=name, type=tb.data_types[type(value)])
                for name, value in hparams.items()
            ],
            metric_infos=[
                tb.metric_info(name=tb.metric_name(group="", tag=metric)) for metric in metrics
            ],
        )
        return self._plugin_value(tb.experiment_tag, experiment=experiment)

    def _write_hparam_points(self) -> None:
        """The metric_dict values of metrics never recorded as scalars, at their dumps."""
        points = [point for point in self._hparam_points if point[2] not in self._recorded]
        self._hparam_points.clear()
        for (step, wall_time), dump in itertools.groupby(points, key=lambda p: (p[0], p[1])):
            summary = self._tb.summary(
                value=[self._tb.value(tag=tag, simple_value=v) for _, _, tag, v in dump]
            )
            self._write_event(self._tb.event(wall_time=wall_time, step=step, summary=summary))

    # The file --------------------------------------------------------------------------
    def _write_event(self, event: _Message) -> None:
        self._writer.write(event.SerializeToString())

    def mark_failed(self, reason: str) -> None:
        self._status = self._tb.status_failure

    def close(self) -> None:
        """Write the pending metric values, end the hparams session, close the file."""
        if self._closed:
            return
        self._closed = True
        try:
            self._write_hparam_points()
            if self._session is not None:
                end = self._tb.session_end(status=self._status, end_time_secs=time.time())
                value = self._plugin_value(self._tb.session_end_tag, session_end_info=end)
                self._write_event(
                    self._tb.event(
                        wall_time=time.time(),
                        step=self._last_step,
                        summary=self._tb.summary(value=[value]),
                    )
                )
        finally:
            self._writer.close()  # flushes first
