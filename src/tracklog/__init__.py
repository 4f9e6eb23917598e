"""tracklog: typed, configuration-validated logging for RL training on Stable-Baselines3.

The public names are the ones listed in ``__all__``; everything in a module whose name
starts with ``_`` is private.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tracklog import callbacks, readers
    from tracklog._build import build_logger, configure
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
        Checkpoint,
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

# Each public name is imported on first use: `tracklog validate` and `import
# tracklog.settings` then start in a fraction of a second, without torch and SB3.
_WHERE = {
    "callbacks": "tracklog.callbacks",
    "readers": "tracklog.readers",
    "build_logger": "tracklog._build",
    "configure": "tracklog._build",
    "Logger": "tracklog._logger",
    "Row": "tracklog._row",
    "LoggerSettings": "tracklog.settings",
    "load_settings": "tracklog.settings",
    **dict.fromkeys(
        [
            "CsvOutputFormat",
            "FixedHumanOutputFormat",
            "JsonlOutputFormat",
            "MLFlowOutputFormat",
            "OutputFormat",
            "TensorBoardOutputFormat",
            "WandBOutputFormat",
        ],
        "tracklog.outputs",
    ),
    **dict.fromkeys(
        ["Checkpoint", "Figure", "Histogram", "HParam", "Image", "LogValue", "Recordable"],
        "tracklog.values",
    ),
    "Scalar": "tracklog.values",
    "Text": "tracklog.values",
    "Video": "tracklog.values",
}


def __getattr__(name: str) -> object:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'tracklog' has no attribute {name!r}")
    imported = importlib.import_module(module)
    value = imported if module.endswith("." + name) else getattr(imported, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "Checkpoint",
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
    "configure",
    "load_settings",
    "readers",
]
