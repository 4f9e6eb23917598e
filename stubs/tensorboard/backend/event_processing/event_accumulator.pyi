# The part of TensorBoard's event reader that tracklog's tests use.
from collections.abc import Mapping
from typing import NamedTuple

class ScalarEvent(NamedTuple):
    wall_time: float
    step: int
    value: float

class EventAccumulator:
    def __init__(self, path: str, size_guidance: Mapping[str, int] | None = None) -> None: ...
    def Reload(self) -> EventAccumulator: ...
    def Tags(self) -> dict[str, object]: ...
    def Scalars(self, tag: str) -> list[ScalarEvent]: ...
