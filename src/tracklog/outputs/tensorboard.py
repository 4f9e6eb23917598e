"""``TensorBoardOutputFormat``: TensorBoard event files, written on a background worker.

The events are TensorBoard's own: its protobufs (``tensorboard.compat.proto``), its
summary builders (the text plugin's metadata, ``tensor_util``, the hparams plugin's
``summary_v2.hparams_pb`` and ``metadata``) and its ``RecordWriter`` (TFRecord framing
and checksums), called synchronously so that a row is in the file when its write
returns (``EventFileWriter`` would add a thread and a timed flush).
"""

from __future__ import annotations

import importlib
import itertools
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Protocol, assert_never

from tracklog._row import Row
from tracklog.convert.tensorboard import (
    HistogramSummary,
    HParamsSummary,
    ImageSummary,
    ScalarSummary,
    TextSummary,
    to_tensorboard,
)
from tracklog.outputs._base import OutputFormat
from tracklog.values import HParam

__all__ = ["TensorBoardOutputFormat"]

_FlatParams = dict[str, bool | int | float | str | None]  # HParam.flat()
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


class _RecordWriter(Protocol):
    """``tensorboard.summary.writer.record_writer.RecordWriter``."""

    def write(self, data: bytes) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _TensorBoard:
    """The parts of TensorBoard this output writes with."""

    record_writer: Callable[[IO[bytes]], _RecordWriter]
    event: _Build
    source_metadata: _Build
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
            "the tensorboard output (type: tensorboard) needs the 'tensorboard' package; "
            "install it with: pip install 'tracklog[tensorboard]'"
        ) from error


def _tensorboard() -> _TensorBoard:
    record_writer = _import("tensorboard.summary.writer.record_writer")
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
        record_writer=record_writer.RecordWriter,
        event=event.Event,
        source_metadata=event.SourceMetadata,
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


def _create_event_file(folder: Path) -> tuple[Path, IO[bytes]]:
    """A new event file, named as ``EventFileWriter`` names them (TensorBoard looks for
    ``tfevents``); the counter keeps two writers of one process, in one second, apart."""
    while True:
        path = folder / (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_file_numbers)}"
        )
        try:
            return path, open(path, "xb")  # noqa: SIM115  # held until close()
        except FileExistsError:  # another writer's (TensorBoard's own counts from 0 too)
            continue


class TensorBoardOutputFormat(OutputFormat):
    """Writes every dump as one event of a new TensorBoard event file in ``folder``.

    Numbers become scalars (float32, as TensorBoard keeps them), arrays histograms,
    images and figures PNG images, videos animated GIFs in the Images tab (encoded
    with Pillow, no moviepy), text the Text tab, and ``HParam`` the HPARAMS tab. Keys
    are tags as they are. Encoding happens on a background worker; the event file is
    flushed after each batch of rows, so ``logger.flush()`` makes a dump readable.

    HPARAMS tab: the first ``HParam`` starts the run's session with its
    hyperparameters; the first one whose ``metric_dict`` names metrics declares the
    tab's metric columns (until then TensorBoard offers every scalar as one).
    TensorBoard shows each metric's last scalar point, so ``metric_dict`` values are
    not drawn into a chart that is logged anyway (SB3's convention: they are
    placeholders, or the final value of that chart). Only a metric never recorded as
    a scalar by this logger gets them as its points, at their dumps' steps, when the
    logger closes.

    A local file has no outage to wait out, so this output keeps no spool: a row still
    queued when the process is killed is lost (``close()``, ``atexit`` and SIGTERM
    deliver everything first).
    """

    name = "tensorboard"
    background = True

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self._protos = _protos()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / _event_file_name()
        self._file: IO[bytes] = open(self.path, "xb")  # noqa: SIM115  # held until close()
        # Worker side: the session's hyperparameters and when it started, whether the
        # experiment (the metric columns) is written, the tags recorded as scalars, and
        # metric_dict points waiting for close() to see whether their tag ever was.
        self._session: tuple[dict[str, bool | float | str], float] | None = None
        self._experiment_written = False
        self._recorded: set[str] = set()
        self._hparam_points: list[tuple[int, float, str, float]] = []
        # Training-thread side, for the warnings.
        self._first_hparams: _FlatParams | None = None
        self._declared_metrics: tuple[str, ...] | None = None
        self._last_step = 0
        self._status = self._protos.status_success
        self._closed = False
        self._write_record(self._protos.event(wall_time=time.time(), file_version="brain.Event:2"))
        self._file.flush()

    def check_row(self, row: Row) -> None:
        for key, value in row.values.items():
            if isinstance(value, HParam):
                self._check_hparam(key, value)

    def _check_hparam(self, key: str, value: HParam) -> None:
        # On the training thread, so the warning belongs to the dump that caused it.
        flat = value.flat()
        if self._first_hparams is None:
            self._first_hparams = flat
        elif flat != self._first_hparams:
            warnings.warn(
                f"TensorBoard shows one set of hparams per run: the HPARAMS tab keeps the "
                f"first HParam's hyperparameters, not {key!r}'s",
                stacklevel=4,
            )
        names = tuple(value.metric_dict)
        if not names:
            return
        if self._declared_metrics is None:
            self._declared_metrics = names
            return
        added = [name for name in names if name not in self._declared_metrics]
        if added:
            warnings.warn(
                f"TensorBoard's HPARAMS tab keeps the metrics of the first HParam naming "
                f"any, {list(self._declared_metrics)}; {key!r} also names {added}, which "
                "the tab cannot add",
                stacklevel=4,
            )

    def write_row(self, row: Row) -> None:
        self.write_rows([row])

    def write_rows(self, rows: list[Row]) -> None:
        """Write each row as one event, then flush the file (once per batch)."""
        failed: Exception | None = None
        for row in rows:
            try:
                self._write_row(row)
            except Exception as error:  # one bad row must not take the batch with it
                failed = failed or error
        self._file.flush()
        if failed is not None:
            raise failed

    def _write_row(self, row: Row) -> None:
        items = [item for key, value in row.values.items() for item in to_tensorboard(key, value)]
        # Before the HParams: a metric recorded in the same dump is recorded already.
        self._recorded.update(item.tag for item in items if isinstance(item, ScalarSummary))
        values: list[_Message] = []
        for item in items:
            match item:
                case ScalarSummary():
                    values.append(self._protos.value(tag=item.tag, simple_value=item.value))
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
            summary = self._protos.summary(value=values)
            self._write_record(
                self._protos.event(wall_time=row.timestamp, step=row.step, summary=summary)
            )

    # Summaries -------------------------------------------------------------------------
    def _histogram(self, item: HistogramSummary) -> _Message:
        histogram = self._protos.histogram(
            min=item.min,
            max=item.max,
            num=item.num,
            sum=item.sum,
            sum_squares=item.sum_squares,
            bucket_limit=item.bucket_limit,
            bucket=item.bucket,
        )
        return self._protos.value(tag=item.tag, histo=histogram)

    def _image(self, item: ImageSummary) -> _Message:
        image = self._protos.image(
            height=item.height,
            width=item.width,
            colorspace=item.colorspace,
            encoded_image_string=item.encoded,
        )
        return self._protos.value(tag=item.tag, image=image)

    def _text(self, item: TextSummary) -> _Message:
        p = self._protos
        tensor = p.tensor(
            dtype=p.dt_string,
            tensor_shape=p.tensor_shape(dim=[p.dim(size=1)]),
            string_val=[item.text.encode("utf-8")],
        )
        metadata = p.metadata(plugin_data=p.plugin_data(plugin_name=_TEXT_PLUGIN))
        return p.value(tag=item.tag, metadata=metadata, tensor=tensor)

    def _plugin_value(self, tag: str, **data: _Message) -> _Message:
        p = self._protos
        content = p.hparams_data(version=_HPARAMS_VERSION, **data).SerializeToString()
        metadata = p.metadata(
            plugin_data=p.plugin_data(plugin_name=_HPARAMS_PLUGIN, content=content)
        )
        return p.value(tag=tag, metadata=metadata, tensor=p.null_tensor)

    def _hparams(self, item: HParamsSummary, row: Row) -> list[_Message]:
        """The session start (first HParam) and the experiment (first naming metrics).

        TensorBoard keeps the first summary of each ``_hparams_/`` tag in a run, so each
        is written once, when its content is known. The metric values wait for close().
        """
        values: list[_Message] = []
        if self._session is None:
            self._session = (item.hparams, row.timestamp)
            values.append(self._session_start(item.hparams, row.timestamp))
        if item.metrics and not self._experiment_written:
            self._experiment_written = True
            hparams, started = self._session
            values.append(self._experiment(hparams, tuple(item.metrics), started))
        self._hparam_points.extend(
            (row.step, row.timestamp, name, number)
            for name, number in item.metrics.items()
            if name not in self._recorded
        )
        return values

    def _experiment(
        self, hparams: dict[str, bool | float | str], metrics: tuple[str, ...], created: float
    ) -> _Message:
        p = self._protos
        experiment = p.experiment(
            time_created_secs=created,
            hparam_infos=[
                p.hparam_info(name=name, type=p.data_types[type(value)])
                for name, value in hparams.items()
            ],
            metric_infos=[
                p.metric_info(name=p.metric_name(group="", tag=metric)) for metric in metrics
            ],
        )
        return self._plugin_value(_EXPERIMENT_TAG, experiment=experiment)

    def _session_start(self, hparams: dict[str, bool | float | str], started: float) -> _Message:
        p = self._protos
        start = p.session_start(
            start_time_secs=started,
            hparams={name: self._hparam_value(value) for name, value in hparams.items()},
        )
        return self._plugin_value(_SESSION_START_TAG, session_start_info=start)

    def _write_hparam_points(self) -> None:
        """The metric_dict values of metrics never recorded as scalars, at their dumps."""
        points = [point for point in self._hparam_points if point[2] not in self._recorded]
        self._hparam_points.clear()
        for (step, wall_time), dump in itertools.groupby(points, key=lambda p: (p[0], p[1])):
            summary = self._protos.summary(
                value=[self._protos.value(tag=tag, simple_value=v) for _, _, tag, v in dump]
            )
            self._write_record(self._protos.event(wall_time=wall_time, step=step, summary=summary))

    def _hparam_value(self, value: bool | float | str) -> _Message:
        build = self._protos.hparam_value
        if isinstance(value, bool):
            return build(bool_value=value)
        if isinstance(value, str):
            return build(string_value=value)
        return build(number_value=value)

    # The file --------------------------------------------------------------------------
    def _write_record(self, event: _Message) -> None:
        # TFRecord framing: length, masked CRC-32C of the length, data, masked CRC of it.
        data = event.SerializeToString()
        crc = masked_crc32c
        header = len(data).to_bytes(8, "little")
        self._file.write(
            header + crc(header).to_bytes(4, "little") + data + crc(data).to_bytes(4, "little")
        )

    def mark_failed(self, reason: str) -> None:
        self._status = self._protos.status_failure

    def close(self) -> None:
        """Write the pending metric values, end the hparams session, close the file."""
        if self._closed:
            return
        self._closed = True
        try:
            self._write_hparam_points()
            if self._session is not None:
                p = self._protos
                end = p.session_end(status=self._status, end_time_secs=time.time())
                value = self._plugin_value(_SESSION_END_TAG, session_end_info=end)
                self._write_record(
                    p.event(
                        wall_time=time.time(),
                        step=self._last_step,
                        summary=p.summary(value=[value]),
                    )
                )
        finally:
            self._file.close()
