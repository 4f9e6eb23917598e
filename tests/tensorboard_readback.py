"""Reading TensorBoard event files back with TensorBoard's own code.

``read_events`` loads a run as ``tensorboard --logdir`` does (``EventAccumulator``);
``hparams_tab`` runs the hparams plugin's request handlers, so it returns what the
HPARAMS tab would show.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = ["Accumulator", "hparams_plugin_data", "hparams_tab", "read_events", "scalars"]


# TensorBoard's modules carry no type information; these Protocols describe what the
# tests read (the same approach as the W&B tests' protobuf records).


class _ScalarEvent(Protocol):
    wall_time: float
    step: int
    value: float


class _HistogramValue(Protocol):
    min: float
    max: float
    num: float
    sum: float
    sum_squares: float
    bucket_limit: list[float]
    bucket: list[float]


class _HistogramEvent(Protocol):
    step: int
    histogram_value: _HistogramValue


class _ImageEvent(Protocol):
    step: int
    encoded_image_string: bytes
    width: int
    height: int


class _TensorProto(Protocol):
    string_val: Sequence[bytes]


class _TensorEvent(Protocol):
    step: int
    tensor_proto: _TensorProto


class _PluginData(Protocol):
    plugin_name: str


class _SummaryMetadata(Protocol):
    plugin_data: _PluginData


class Accumulator(Protocol):
    def Reload(self) -> Accumulator: ...
    def Tags(self) -> dict[str, Any]: ...
    def Scalars(self, tag: str) -> list[_ScalarEvent]: ...
    def Histograms(self, tag: str) -> list[_HistogramEvent]: ...
    def Images(self, tag: str) -> list[_ImageEvent]: ...
    def Tensors(self, tag: str) -> list[_TensorEvent]: ...
    def SummaryMetadata(self, tag: str) -> _SummaryMetadata: ...
    def PluginTagToContent(self, plugin_name: str) -> dict[str, bytes]: ...


def read_events(folder: Path) -> Accumulator:
    """Every event in ``folder`` (all its event files), as TensorBoard loads a run."""
    module = importlib.import_module("tensorboard.backend.event_processing.event_accumulator")
    accumulator: Accumulator = module.EventAccumulator(
        str(folder), size_guidance=module.STORE_EVERYTHING_SIZE_GUIDANCE
    )
    return accumulator.Reload()


def scalars(events: Accumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in events.Scalars(tag)]


def hparams_plugin_data(events: Accumulator) -> dict[str, dict[str, Any]]:
    """The hparams plugin's data by tag, parsed with its own ``plugin_data_pb2``."""
    plugin_data = importlib.import_module("tensorboard.plugins.hparams.plugin_data_pb2")
    json_format = importlib.import_module("google.protobuf.json_format")
    parsed: dict[str, dict[str, Any]] = {}
    for tag, content in events.PluginTagToContent("hparams").items():
        message = plugin_data.HParamsPluginData.FromString(content)
        parsed[tag] = json_format.MessageToDict(message)
    return parsed


def hparams_tab(logdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """What TensorBoard's HPARAMS tab shows for ``logdir``: (experiment, session groups).

    Runs the hparams plugin's own request handlers over TensorBoard's data provider,
    the code ``tensorboard --logdir`` serves the tab from.
    """
    multiplexer_module = importlib.import_module(
        "tensorboard.backend.event_processing.plugin_event_multiplexer"
    )
    provider_module = importlib.import_module("tensorboard.backend.event_processing.data_provider")
    base_plugin = importlib.import_module("tensorboard.plugins.base_plugin")
    plugin_module = importlib.import_module("tensorboard.plugins.hparams.hparams_plugin")
    api = importlib.import_module("tensorboard.plugins.hparams.api_pb2")
    get_experiment = importlib.import_module("tensorboard.plugins.hparams.get_experiment")
    list_groups = importlib.import_module("tensorboard.plugins.hparams.list_session_groups")
    context = importlib.import_module("tensorboard.context")
    json_format = importlib.import_module("google.protobuf.json_format")

    multiplexer = multiplexer_module.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = provider_module.MultiplexerDataProvider(multiplexer, str(logdir))
    tb_context = base_plugin.TBContext(
        logdir=str(logdir), multiplexer=multiplexer, data_provider=provider
    )
    backend = plugin_module.HParamsPlugin(tb_context)._context
    request_context = context.RequestContext()
    experiment = get_experiment.Handler(
        request_context, backend, "", api.GetExperimentRequest()
    ).run()
    statuses = [api.STATUS_UNKNOWN, api.STATUS_SUCCESS, api.STATUS_FAILURE, api.STATUS_RUNNING]
    request = api.ListSessionGroupsRequest(start_index=0, slice_size=100, allowed_statuses=statuses)
    groups = list_groups.Handler(request_context, backend, "", request).run()
    experiment_dict: dict[str, Any] = json_format.MessageToDict(experiment)
    groups_dict: dict[str, Any] = json_format.MessageToDict(groups)
    return experiment_dict, groups_dict
