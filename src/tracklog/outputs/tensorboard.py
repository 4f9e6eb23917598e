"""``TensorBoardOutputFormat``: TensorBoard event files, written on a background worker."""

from __future__ import annotations

import functools
import importlib
import itertools
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Protocol, assert_never

import numpy as np
import numpy.typing as npt

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


class _Message(Protocol):
    """A TensorBoard protobuf message (the generated classes carry no type information)."""

    def SerializeToString(self) -> bytes: ...


# Keyword arguments are the message's fields, as protobuf's generated classes take them.
_Build = Callable[..., _Message]


@dataclass(frozen=True, slots=True)
class _Protos:
    """The TensorBoard protobuf classes and constants this output builds events from."""

    event: _Build
    summary: _Build
    value: _Build
    image: _Build
    histogram: _Build
    metadata: _Build
    plugin_data: _Build
    tensor: _Build
    tensor_shape: _Build
    dim: _Build
    hparams_data: _Build
    experiment: _Build
    hparam_info: _Build
    metric_info: _Build
    metric_name: _Build
    session_start: _Build
    session_end: _Build
    hparam_value: _Build
    null_tensor: _Message
    dt_string: int
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


def _protos() -> _Protos:
    summary = _import("tensorboard.compat.proto.summary_pb2")
    event = _import("tensorboard.compat.proto.event_pb2")
    tensor = _import("tensorboard.compat.proto.tensor_pb2")
    shape = _import("tensorboard.compat.proto.tensor_shape_pb2")
    types = _import("tensorboard.compat.proto.types_pb2")
    api = _import("tensorboard.plugins.hparams.api_pb2")
    plugin = _import("tensorboard.plugins.hparams.plugin_data_pb2")
    hparams_metadata = _import("tensorboard.plugins.hparams.metadata")
    struct = _import("google.protobuf.struct_pb2")
    return _Protos(
        event=event.Event,
        summary=summary.Summary,
        value=summary.Summary.Value,
        image=summary.Summary.Image,
        histogram=summary.HistogramProto,
        metadata=summary.SummaryMetadata,
        plugin_data=summary.SummaryMetadata.PluginData,
        tensor=tensor.TensorProto,
        tensor_shape=shape.TensorShapeProto,
        dim=shape.TensorShapeProto.Dim,
        hparams_data=plugin.HParamsPluginData,
        experiment=api.Experiment,
        hparam_info=api.HParamInfo,
        metric_info=api.MetricInfo,
        metric_name=api.MetricName,
        session_start=plugin.SessionStartInfo,
        session_end=plugin.SessionEndInfo,
        hparam_value=struct.Value,
        null_tensor=hparams_metadata.NULL_TENSOR,
        dt_string=types.DT_STRING,
        data_types={
            bool: api.DATA_TYPE_BOOL,
            float: api.DATA_TYPE_FLOAT64,
            str: api.DATA_TYPE_STRING,
        },
        status_success=api.STATUS_SUCCESS,
        status_failure=api.STATUS_FAILURE,
    )


_HPARAMS_PLUGIN = "hparams"  # tensorboard.plugins.hparams.metadata.PLUGIN_NAME
_HPARAMS_VERSION = 0  # ... .PLUGIN_DATA_VERSION
_EXPERIMENT_TAG = "_hparams_/experiment"
_SESSION_START_TAG = "_hparams_/session_start_info"
_SESSION_END_TAG = "_hparams_/session_end_info"
_TEXT_PLUGIN = "text"

_file_numbers = itertools.count()

# CRC-32C, which every TFRecord frame carries. TensorBoard's own implementation is pure
# Python: 0.1 s per MB, holding the GIL (so slowing the training thread) for a GIF
# video. This one runs 1 KiB blocks side by side with NumPy and joins their CRCs.
_CRC32C_POLY = 0x82F63B78  # Castagnoli, bit-reflected
_BLOCK = 1024
_VECTOR_FROM = 64 * 1024  # smaller data: the byte loop is faster


@functools.cache
def _crc_tables() -> tuple[list[int], list[list[int]], npt.NDArray[np.uint32]]:
    """The byte table (as a list and an array), and 4 tables that advance a CRC
    register over ``_BLOCK`` zero bytes, one per byte of the register (CRCs are linear)."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_CRC32C_POLY), table >> 1)
    table = table.astype(np.uint32)
    shifts = np.arange(4, dtype=np.uint32)[:, None] * np.uint32(8)
    states = (np.arange(256, dtype=np.uint32)[None, :] << shifts).reshape(-1)
    for _ in range(_BLOCK):
        states = table[states & 0xFF] ^ (states >> 8)
    return table.tolist(), states.reshape(4, 256).tolist(), table


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (as ``google-crc32c`` or TensorFlow compute it)."""
    table, (z0, z1, z2, z3), vector_table = _crc_tables()
    head = len(data) % _BLOCK if len(data) >= _VECTOR_FROM else len(data)
    crc = 0xFFFFFFFF
    for byte in data[:head]:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    if head < len(data):
        # Each block's register, from 0, all blocks at once: one column a step.
        blocks = np.frombuffer(data, np.uint8, offset=head).reshape(-1, _BLOCK)
        registers = np.zeros(blocks.shape[0], np.uint32)
        for column in np.ascontiguousarray(blocks.T):
            registers = vector_table[(registers ^ column) & 0xFF] ^ (registers >> 8)
        for register in registers.tolist():  # crc after a block = shifted crc ^ block's
            shifted = z0[crc & 0xFF] ^ z1[(crc >> 8) & 0xFF] ^ z2[(crc >> 16) & 0xFF]
            crc = shifted ^ z3[crc >> 24] ^ register
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C of TFRecord frames (TensorFlow's ``crc32c::Mask``)."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _event_file_name() -> str:
    # TensorFlow's own naming, which TensorBoard looks for; the counter keeps two
    # writers of one process (in one second) apart.
    return (
        f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
        f"{os.getpid()}.{next(_file_numbers)}"
    )


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
