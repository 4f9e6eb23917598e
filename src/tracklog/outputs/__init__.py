"""Output formats, one module per backend."""

from tracklog.outputs._base import OutputFormat
from tracklog.outputs.csv import CsvOutputFormat
from tracklog.outputs.human import FixedHumanOutputFormat
from tracklog.outputs.jsonl import JsonlOutputFormat
from tracklog.outputs.mlflow import MLFlowOutputFormat
from tracklog.outputs.tensorboard import TensorBoardOutputFormat
from tracklog.outputs.wandb import WandBOutputFormat

__all__ = [
    "CsvOutputFormat",
    "FixedHumanOutputFormat",
    "JsonlOutputFormat",
    "MLFlowOutputFormat",
    "OutputFormat",
    "TensorBoardOutputFormat",
    "WandBOutputFormat",
]
