"""tracklog: typed, configuration-validated logging for RL training on Stable-Baselines3.

The public names are the ones listed in ``__all__``; everything in a module whose name
starts with ``_`` is private.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from tracklog import callbacks, readers
from tracklog._build import build_logger
from tracklog._logger import Logger
from tracklog._row import Row
from tracklog.outputs import (
    CsvOutputFormat,
    FixedHumanOutputFormat,
    JsonlOutputFormat,
    MLFlowOutputFormat,
    OutputFormat,
    TensorBoardOutputFormat,
    WandBOutputFormat,
)
from tracklog.settings import LoggerSettings, load_settings
from tracklog.values import (
    Figure,
    Histogram,
    HParam,
    Image,
    LogValue,
    Recordable,
    Scalar,
    Text,
    Video,
)

try:
    __version__ = version("tracklog")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"

__all__ = [
    "CsvOutputFormat",
    "Figure",
    "FixedHumanOutputFormat",
    "HParam",
    "Histogram",
    "Image",
    "JsonlOutputFormat",
    "LogValue",
    "Logger",
    "LoggerSettings",
    "MLFlowOutputFormat",
    "OutputFormat",
    "Recordable",
    "Row",
    "Scalar",
    "TensorBoardOutputFormat",
    "Text",
    "Video",
    "WandBOutputFormat",
    "__version__",
    "build_logger",
    "callbacks",
    "load_settings",
    "readers",
]
