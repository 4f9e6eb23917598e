"""Values as SB3's own ``Logger`` would have held them, for SB3-style ``KVWriter`` formats."""

from __future__ import annotations

from typing import assert_never

from stable_baselines3.common import logger as sb3

from tracklog.values import (
    Checkpoint,
    Figure,
    Histogram,
    HParam,
    Image,
    LogValue,
    Scalar,
    Text,
    Video,
)

__all__ = ["to_sb3"]


class _Sb3HParam(sb3.HParam):
    """SB3's HParam without its refusal of an empty ``metric_dict``."""

    def __init__(
        self,
        hparam_dict: dict[str, bool | int | float | str | None],
        metric_dict: dict[str, float],
    ) -> None:
        self.hparam_dict = hparam_dict
        self.metric_dict = metric_dict


def to_sb3(value: LogValue) -> object:
    """A plain number, str or numpy array; media stay themselves (they subclass SB3's classes)."""
    match value:
        case Scalar(value=number):
            return number
        case Text(value=text):
            return text
        case Histogram(values=values):
            return values
        case HParam():
            # SB3's TensorBoard format hands these to torch's hparams(), which wants
            # plain dicts of flat values.
            return _Sb3HParam(value.flat(), dict(value.metric_dict))
        case Image() | Figure() | Video():
            return value
        case Checkpoint():
            return value.stored or str(value.path)  # where it is kept, as the file outputs
        case _:
            assert_never(value)
