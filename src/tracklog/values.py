"""The closed union of values tracklog logs, and the normalisation that builds it.

:func:`normalise` runs inside :meth:`tracklog.Logger.record`, on the caller's
thread, so a bad value raises at the line of algorithm code that recorded it and the
error names the key. Every value is a frozen snapshot: mutating the array, tensor or
figure after ``record()`` does not change what is logged.

``Video``, ``Image``, ``Figure`` and ``HParam`` subclass SB3's classes of the same
name, so output formats written for SB3 (``isinstance(value, Video)``) keep working
when appended to a tracklog logger. ``Checkpoint`` (saved model files) is tracklog's
own.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import stat
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeAlias, cast

import numpy as np
import numpy.typing as npt

from tracklog import _sb3 as sb3

if TYPE_CHECKING:
    import matplotlib.figure
    import torch

__all__ = [
    "Checkpoint",
    "Figure",
    "HParam",
    "HParamValue",
    "Histogram",
    "Image",
    "LogValue",
    "Recordable",
    "Scalar",
    "Text",
    "Video",
    "check_key",
    "normalise",
    "to_plain",
]


class _Frozen:
    """Refuses attribute assignment once ``__init__`` has finished."""

    _frozen: bool = False

    def __setattr__(self, name: str, value: object) -> None:
        if self._frozen:
            raise AttributeError(f"{type(self).__name__} is frozen; cannot set {name!r}")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if self._frozen:
            raise AttributeError(f"{type(self).__name__} is frozen; cannot delete {name!r}")
        object.__delattr__(self, name)

    def _freeze(self) -> None:
        mark_frozen(self)


def mark_frozen(value: _Frozen) -> None:
    """Make ``value`` refuse attribute assignment from now on (used by the queue codec,
    which builds media values without running ``__init__``)."""
    object.__setattr__(value, "_frozen", True)


@dataclass(frozen=True, slots=True)
class Scalar:
    """A number. ``bool`` and ``int`` keep their type; NaN and ±inf are valid."""

    value: bool | int | float


@dataclass(frozen=True, slots=True)
class Text:
    """A string, logged as text (never parsed as a number)."""

    value: str


@dataclass(frozen=True, slots=True, eq=False)
class Histogram:
    """A read-only 1-D copy of an array or tensor with one or more elements."""

    values: npt.NDArray[np.number[Any] | np.bool_]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape


def _as_array(data: object, what: str) -> npt.NDArray[Any]:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(data, torch.Tensor):
        return _tensor_to_numpy(cast("_Tensor", data))
    if isinstance(data, np.ndarray):
        return cast("npt.NDArray[Any]", data)
    raise TypeError(f"{what} must be a numpy array or a torch tensor, not {type(data).__name__}")


def _tensor_to_numpy(tensor: torch.Tensor) -> npt.NDArray[Any]:
    import torch

    tensor = tensor.detach()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()
    return tensor.cpu().numpy()


def _to_uint8(array: npt.NDArray[Any], what: str) -> npt.NDArray[np.uint8]:
    """Copy pixel data to uint8: uint8 as is, floats in [0, 1] scaled by 255."""
    if array.dtype == np.uint8:
        return np.array(array, dtype=np.uint8, copy=True)
    if np.issubdtype(array.dtype, np.floating):
        if array.size and not (
            np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0
        ):
            raise ValueError(
                f"{what} with dtype {array.dtype} must hold values in [0, 1]; "
                f"got min={array.min()}, max={array.max()}"
            )
        return np.asarray(np.rint(array * 255.0), dtype=np.uint8)
    raise ValueError(f"{what} must be uint8 or float in [0, 1], not {array.dtype}")


CHANNELS: Final = (1, 3, 4)
# MP4 time bases need a usable rate: a frame every 100 s at the slowest, and no
# faster than 1000 frames a second (more than any display or encoder preset shows).
MIN_FPS: Final = 0.01
MAX_FPS: Final = 1000.0
# The largest frame side H.264 (libx264) encodes; a batch of clips is tiled left to right.
MAX_VIDEO_SIDE: Final = 16384


class Video(_Frozen, sb3.Video):
    """A clip of frames at ``fps``; arguments as SB3's ``Video``.

    ``frames`` is (N,T,C,H,W) or (T,C,H,W), a numpy array or torch tensor, uint8 or
    float in [0, 1]; C is 1, 3 or 4. After construction ``frames`` is a read-only
    uint8 array of shape (N,T,C,H,W) and ``fps`` a positive float.
    """

    frames: npt.NDArray[np.uint8]  # type: ignore[assignment]  # SB3 declares th.Tensor; ours is always normalised to numpy
    fps: float

    def __init__(self, frames: object, fps: float | np.floating[Any] | np.integer[Any]) -> None:
        array = _as_array(frames, "Video frames")
        if array.ndim == 4:
            array = array[np.newaxis]
        if array.ndim != 5:
            raise ValueError(
                f"Video frames must have shape (N,T,C,H,W) or (T,C,H,W); got {array.shape}"
            )
        n, t, c, h, w = array.shape
        if min(n, t, h, w) == 0:
            raise ValueError(f"Video frames must not be empty; got shape {array.shape}")
        if c not in CHANNELS:
            raise ValueError(
                f"Video frames must have 1, 3 or 4 channels on axis C; got shape {array.shape} "
                "(is it (T,H,W,C)? use frames.transpose(0, 3, 1, 2))"
            )
        if n * w > MAX_VIDEO_SIDE or h > MAX_VIDEO_SIDE:
            tiled = f" with its {n} clips side by side" if n > 1 else ""
            raise ValueError(
                f"Video frames are {n * w}x{h} pixels{tiled}; an MP4 (H.264) frame is at "
                f"most {MAX_VIDEO_SIDE} pixels on a side: log fewer clips at once, or "
                "smaller frames"
            )
        # fps comes from the caller, whatever its annotation says: check it at run time.
        if isinstance(fps, bool) or not isinstance(fps, int | float | np.number):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"Video fps must be a number, not {type(fps).__name__}")
        if not (math.isfinite(fps) and MIN_FPS <= fps <= MAX_FPS):
            raise ValueError(
                f"Video fps must be a number in [{MIN_FPS}, {MAX_FPS}] (and > 0); got {fps}"
            )
        pixels = _to_uint8(array, "Video frames")
        pixels.flags.writeable = False
        self.frames = pixels
        self.fps = float(fps)
        self._freeze()

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        n, t, c, h, w = self.frames.shape
        return (n, t, c, h, w)

    def __repr__(self) -> str:
        return f"Video(shape={self.shape}, fps={self.fps:g})"


_LETTERS: Final = frozenset("NCHW")


class Image(_Frozen, sb3.Image):
    """A picture; arguments as SB3's ``Image``.

    ``image`` is a numpy array or torch tensor (uint8, or float in [0, 1]) laid out as
    ``dataformats`` says (``HWC``, ``CHW``, ``HW``, ``NHWC``, …), or a path to an image
    file. After construction ``image`` is a read-only uint8 array in ``NHWC`` layout
    and ``dataformats`` is ``"NHWC"``.
    """

    image: npt.NDArray[np.uint8]  # normalised; SB3 also allows a tensor or a str
    dataformats: str

    def __init__(self, image: object, dataformats: str = "HWC") -> None:
        if isinstance(image, str):
            image, dataformats = _read_image_file(image), "HWC"
        array = _as_array(image, "Image image")
        layout = _check_dataformats(dataformats, array.shape)
        # Bring the axes into N,H,W,C order, adding the missing ones.
        for letter in "NHWC":
            if letter not in layout:
                array = array[..., np.newaxis]
                layout += letter
        array = np.transpose(array, [layout.index(letter) for letter in "NHWC"])
        if array.shape[3] not in CHANNELS:
            raise ValueError(
                f"Image with dataformats {dataformats!r} has {array.shape[3]} channels; "
                "expected 1, 3 or 4"
            )
        pixels = _to_uint8(array, "Image")
        pixels.flags.writeable = False
        self.image = pixels
        self.dataformats = "NHWC"
        self._freeze()

    @property
    def shape(self) -> tuple[int, int, int, int]:
        n, h, w, c = self.image.shape
        return (n, h, w, c)

    def __repr__(self) -> str:
        return f"Image(shape={self.shape}, dataformats='NHWC')"


def _check_dataformats(dataformats: object, shape: tuple[int, ...]) -> str:
    if not isinstance(dataformats, str):
        raise TypeError(f"Image dataformats must be a str, not {type(dataformats).__name__}")
    layout = dataformats.upper()
    if not set(layout) <= _LETTERS or len(set(layout)) != len(layout):
        raise ValueError(
            f"Image dataformats {dataformats!r} must use each of the letters N, C, H, W "
            "at most once (e.g. 'HWC', 'CHW', 'HW', 'NCHW')"
        )
    if "H" not in layout or "W" not in layout:
        raise ValueError(f"Image dataformats {dataformats!r} must contain both H and W")
    if len(layout) != len(shape):
        raise ValueError(
            f"Image dataformats {dataformats!r} has {len(layout)} axes "
            f"but the image has shape {shape}"
        )
    if 0 in shape:
        raise ValueError(f"Image must not be empty; got shape {shape}")
    return layout


def _read_image_file(path: str) -> npt.NDArray[np.uint8]:
    from PIL import Image as PILImage

    with PILImage.open(path) as picture:
        if picture.mode.startswith("I"):  # 16-bit greyscale (a depth map): I;16*, or I
            grey = np.asarray(picture).astype(np.int64)
            if grey.size and (grey.min() < 0 or grey.max() > 65535):
                raise ValueError(
                    f"Image file {path!r} holds {picture.mode} pixels beyond 0..65535; "
                    "load it and pass a uint8 array, or floats in [0, 1]"
                )
            # Scaled to 8 bits (Pillow's convert() would clip everything above 255).
            eight = ((grey * 255 + 32767) // 65535).astype(np.uint8)
            return np.repeat(eight[..., None], 3, axis=2)
        if picture.mode == "F":
            raise ValueError(
                f"Image file {path!r} holds floating-point pixels, whose range it does not "
                "say; load it and pass floats in [0, 1]"
            )
        return np.asarray(picture.convert("RGBA" if "A" in picture.getbands() else "RGB"))


class Figure(_Frozen, sb3.Figure):
    """A matplotlib figure, rendered to PNG when constructed; arguments as SB3's ``Figure``.

    Rendering at construction makes the value a snapshot that output formats on other
    threads can use (matplotlib itself is not thread-safe). With ``close=True`` the
    figure is closed right after rendering.
    """

    figure: matplotlib.figure.Figure
    close: bool
    png: bytes
    size: tuple[int, int]

    def __init__(self, figure: matplotlib.figure.Figure, close: bool = True) -> None:
        from matplotlib.figure import Figure as MplFigure

        # Checked at run time too: callers (SB3 code among them) pass anything.
        if not isinstance(figure, MplFigure):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"Figure needs a matplotlib Figure, not {type(figure).__name__}")
        buffer = io.BytesIO()
        # matplotlib types savefig's **kwargs without an annotation
        figure.savefig(buffer, format="png")  # pyright: ignore[reportUnknownMemberType]
        png = buffer.getvalue()
        self.figure = figure
        self.close = bool(close)
        self.png = png
        self.size = _png_size(png)
        if close:
            import matplotlib.pyplot as plt

            plt.close(figure)
        self._freeze()

    def __repr__(self) -> str:
        return f"Figure(size={self.size[0]}x{self.size[1]}, close={self.close})"


def _png_size(png: bytes) -> tuple[int, int]:
    # The IHDR chunk follows the 8-byte signature: 4 length + 4 type, then width, height.
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


HParamValue: TypeAlias = (
    "bool | int | float | str | tuple[HParamValue, ...] | Mapping[str, HParamValue] | None"
)


class HParam(_Frozen, sb3.HParam):
    """Hyperparameters and the metrics they are judged by; arguments as SB3's ``HParam``.

    ``hparam_dict`` values are bool, int, float, str, None, lists/tuples of those, or
    nested mappings (flattened with ``.`` where a backend needs flat names). Unlike
    SB3, an empty ``metric_dict`` is allowed. Both are stored as read-only mappings.
    """

    hparam_dict: Mapping[str, HParamValue]  # type: ignore[assignment]  # wider than SB3's: nested mappings and sequences
    metric_dict: Mapping[str, float]

    def __init__(
        self,
        hparam_dict: Mapping[str, object],
        metric_dict: Mapping[str, float | np.floating[Any] | np.integer[Any]] | None = None,
    ) -> None:
        # The arguments come from user code: check them whatever their annotations say.
        if not isinstance(hparam_dict, Mapping):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(
                f"HParam hparam_dict must be a mapping, not {type(hparam_dict).__name__}"
            )
        self.hparam_dict = _freeze_params(hparam_dict, "HParam hparam_dict", ())
        _check_flat_names(self.hparam_dict)
        if metric_dict is not None and not isinstance(metric_dict, Mapping):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(
                f"HParam metric_dict must be a mapping, not {type(metric_dict).__name__}"
            )
        metrics: dict[str, float] = {}
        for name, value in (metric_dict or {}).items():
            if not isinstance(name, str) or not name:  # pyright: ignore[reportUnnecessaryIsInstance]
                raise ValueError(f"HParam metric_dict key {name!r} must be a non-empty str")
            scalar = _scalar_or_none(value)
            if scalar is None:
                raise TypeError(
                    f"HParam metric_dict[{name!r}] must be a number, not {type(value).__name__}"
                )
            metrics[name] = float(scalar)
        self.metric_dict = MappingProxyType(metrics)
        self._freeze()

    def flat(self, sep: str = ".") -> dict[str, bool | int | float | str | None]:
        """``hparam_dict`` with nested mappings joined by ``sep``; lists as JSON text."""
        return {
            name: json.dumps(to_plain(value), allow_nan=True) if isinstance(value, tuple) else value
            for name, value in _flatten(self.hparam_dict, "", sep)
        }

    def flat_with_lists(self, sep: str = ".") -> dict[str, object]:
        """Like :meth:`flat`, but lists stay lists (for backends that take them)."""
        return {name: to_plain(value) for name, value in _flatten(self.hparam_dict, "", sep)}

    def plain(self) -> dict[str, object]:
        """``hparam_dict`` as plain, JSON-ready dicts and lists."""
        plain = to_plain(self.hparam_dict)
        assert isinstance(plain, dict)
        return cast("dict[str, object]", plain)

    def __repr__(self) -> str:
        return f"HParam({dict(self.hparam_dict)!r}, {dict(self.metric_dict)!r})"


def freeze_mapping(params: Mapping[Any, object], where: str) -> Mapping[str, HParamValue]:
    """``params`` as a read-only mapping of ``HParamValue`` (as ``HParam`` keeps its
    ``hparam_dict``); raises naming ``where`` and the key of a bad entry."""
    return _freeze_params(params, where, ())


#: How deep hyperparameters and metadata may nest: a fixed limit, not Python's recursion
#: limit (which other libraries raise), so the queue's reader refuses the same rows
#: whatever else the delivery process imported.
MAX_NESTING: Final = 100


def _freeze_params(
    params: Mapping[Any, object], where: str, inside: tuple[int, ...]
) -> Mapping[str, HParamValue]:
    if id(params) in inside:
        raise ValueError(f"{where} contains itself")
    if len(inside) >= MAX_NESTING:
        raise ValueError(f"{where} is nested more than {MAX_NESTING} levels deep")
    inside = (*inside, id(params))
    frozen: dict[str, HParamValue] = {}
    for name, value in params.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where} key {name!r} must be a non-empty str")
        frozen[name] = _freeze_param(value, f"{where}[{name!r}]", inside)
    return MappingProxyType(frozen)


def _freeze_param(value: object, where: str, inside: tuple[int, ...]) -> HParamValue:
    if value is None or isinstance(value, str):
        return value
    scalar = _scalar_or_none(value)
    if scalar is not None:
        return scalar
    if isinstance(value, Mapping):
        return _freeze_params(cast("Mapping[Any, object]", value), where, inside)
    if isinstance(value, list | tuple):
        items = cast("list[object] | tuple[object, ...]", value)
        if id(items) in inside:
            raise ValueError(f"{where} contains itself")
        if len(inside) >= MAX_NESTING:
            raise ValueError(f"{where} is nested more than {MAX_NESTING} levels deep")
        within = (*inside, id(items))
        return tuple(_freeze_param(item, f"{where}[{i}]", within) for i, item in enumerate(items))
    raise TypeError(
        f"{where} has unsupported type {type(value).__name__}; "
        "use bool, int, float, str, None, a list or a nested dict (or str(value))"
    )


def _check_flat_names(params: Mapping[str, HParamValue]) -> None:
    """Refuse two entries that become one name once nested names are joined with ``.``
    (as MLflow params, W&B's flat keys and TensorBoard's HPARAMS tab name them)."""
    seen: dict[str, str] = {}

    def walk(mapping: Mapping[str, HParamValue], prefix: str, where: str) -> None:
        for name, value in mapping.items():
            here = f"{where}[{name!r}]"
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{name}.", here)
                continue
            flat = f"{prefix}{name}"
            if flat in seen:
                raise ValueError(
                    f"HParam {seen[flat]} and {here} both become {flat!r} once nested names "
                    "are joined with '.' (as MLflow and W&B name them); rename one"
                )
            seen[flat] = here

    walk(params, "", "hparam_dict")


def _flatten(
    params: Mapping[str, HParamValue], prefix: str, sep: str
) -> Iterator[tuple[str, bool | int | float | str | tuple[HParamValue, ...] | None]]:
    for name, value in params.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{name}{sep}", sep)
        else:
            yield f"{prefix}{name}", value


def to_plain(value: HParamValue) -> object:
    """A frozen hyperparameter value as plain dicts and lists (what JSON and W&B take)."""
    if isinstance(value, tuple):
        return [to_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {name: to_plain(item) for name, item in value.items()}
    return value


#: An alias: letters, digits, ``_``, ``-`` and ``.``; W&B keeps ``v<N>`` for its versions.
_ALIAS: Final = re.compile(r"(?!v[0-9]+$)[A-Za-z0-9_.-]{1,64}")


class Checkpoint(_Frozen):
    """Saved model files to keep with the run: one file or a directory of them.

    ``aliases`` name it among the checkpoints of its key: each alias always points at
    the newest checkpoint that carries it. Every checkpoint carries ``latest`` (W&B
    gives it to each new version too); add ``best`` for the best evaluation.
    ``metadata`` (a score, the step of the evaluation) takes what an ``HParam``'s
    ``hparam_dict`` takes.

    The files must exist when the value is made. At ``dump()`` the logger keeps a copy
    under ``<run_dir>/checkpoints/<key>/step_<step>/`` (nothing is copied for a
    directory from :meth:`tracklog.Logger.checkpoint_dir`), so saving over the files
    later changes nothing that is logged; the delivery process uploads that copy.
    """

    #: The file or folder; once dumped, the folder it is kept in (relative to run_dir
    #: when read back from the delivery queue).
    path: Path
    #: The folder that holds :attr:`files`: ``path``, or a file's parent folder.
    folder: Path
    aliases: tuple[str, ...]
    metadata: Mapping[str, HParamValue]
    #: Every file, as a path relative to ``folder`` (``/``-separated) and its size in bytes.
    files: tuple[tuple[str, int], ...]
    #: Where the logger keeps it, relative to ``run_dir`` (set at ``dump()``).
    stored: str | None

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        aliases: Sequence[str] = (),
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        # The arguments come from user code: check them whatever their annotations say.
        if not isinstance(path, str | os.PathLike):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"Checkpoint path must be a str or a path, not {type(path).__name__}")
        if isinstance(aliases, str) or not isinstance(aliases, Sequence):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(
                f"Checkpoint aliases must be a list of names, not {type(aliases).__name__} "
                "(aliases=['best'], not aliases='best')"
            )
        self.aliases = check_aliases(("latest", *aliases))
        if metadata is not None and not isinstance(metadata, Mapping):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"Checkpoint metadata must be a mapping, not {type(metadata).__name__}")
        self.metadata = _freeze_params(metadata or {}, "Checkpoint metadata", ())
        self.path = Path(os.path.abspath(os.fspath(path)))
        self.files = checkpoint_files(self.path)
        self.folder = self.path if self.path.is_dir() else self.path.parent
        self.stored = None
        self._freeze()

    @property
    def size(self) -> int:
        """The bytes of all its files."""
        return sum(size for _, size in self.files)

    def kept(self, folder: Path, stored: str, files: tuple[tuple[str, int], ...]) -> Checkpoint:
        """This checkpoint as the logger keeps it: in ``folder``, ``stored`` under run_dir."""
        return build_checkpoint(folder, folder, self.aliases, self.metadata, files, stored)

    def __repr__(self) -> str:
        where = self.stored or str(self.path)
        return f"Checkpoint({where!r}, files={len(self.files)}, aliases={list(self.aliases)!r})"


def build_checkpoint(
    path: Path,
    folder: Path,
    aliases: tuple[str, ...],
    metadata: Mapping[str, HParamValue],
    files: tuple[tuple[str, int], ...],
    stored: str | None,
) -> Checkpoint:
    """A ``Checkpoint`` of fields already checked (the queue's reader checks them)."""
    value = object.__new__(Checkpoint)
    for name, field in (
        ("path", path),
        ("folder", folder),
        ("aliases", aliases),
        ("metadata", metadata),
        ("files", files),
        ("stored", stored),
    ):
        object.__setattr__(value, name, field)
    mark_frozen(value)
    return value


def _stat(path: Path, what: str) -> os.stat_result:
    try:
        return path.stat()
    except OSError as error:
        problem = error.strerror or type(error).__name__
        raise ValueError(f"Checkpoint {what} {str(path)!r} cannot be read: {problem}") from None


def check_aliases(aliases: Sequence[object]) -> tuple[str, ...]:
    """``aliases`` as a tuple without repeats; raises naming a bad one."""
    checked: list[str] = []
    for alias in aliases:
        if not isinstance(alias, str) or _ALIAS.fullmatch(alias) is None:
            raise ValueError(
                f"Checkpoint alias {alias!r} must be 1 to 64 letters, digits, '_', '-' or '.' "
                "(and not v<N>, which W&B keeps for versions)"
            )
        if alias not in checked:
            checked.append(alias)
    return tuple(checked)


def checkpoint_files(path: Path) -> tuple[tuple[str, int], ...]:
    """The files of a checkpoint at ``path`` (a file, or a directory walked in name
    order, not into linked directories) with their sizes; raises naming ``path`` if it
    is missing or holds no file."""
    info = _stat(path, "path")
    if stat.S_ISREG(info.st_mode):
        return ((path.name, info.st_size),)
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"Checkpoint path {str(path)!r} is neither a file nor a directory")
    found: list[tuple[str, int]] = []
    for folder, directories, names in os.walk(path):
        directories.sort()
        base = Path(folder).relative_to(path)
        for name in sorted(names):
            if base == Path() and name == CHECKPOINT_RECORD:
                continue  # tracklog's own record of an earlier logging of this folder
            entry = _stat(Path(folder, name), "file")
            if stat.S_ISREG(entry.st_mode):
                found.append(((base / name).as_posix(), entry.st_size))
    if not found:
        raise ValueError(f"Checkpoint directory {str(path)!r} holds no file")
    return tuple(found)


#: The file tracklog writes into each kept checkpoint: key, step, aliases, metadata and
#: the run's identity (so a checkpoint says which run it continues).
CHECKPOINT_RECORD: Final = "tracklog-checkpoint.json"


LogValue: TypeAlias = Scalar | Text | Histogram | Image | Figure | Video | HParam | Checkpoint
"""Everything an output format can receive. Closed: converters match it exhaustively."""

if TYPE_CHECKING:
    from torch import Tensor as _Tensor
else:
    _Tensor = Any  # torch is imported lazily; only type checkers need the name

# A real expression, not a string: pyright resolves a string alias split over several
# literals to Unknown, and with it every record() call in strict user code.
Recordable: TypeAlias = (
    bool
    | int
    | float
    | str
    | np.generic
    | npt.NDArray[Any]
    | _Tensor
    | Sequence[float]
    | sb3.Video
    | sb3.Image
    | sb3.Figure
    | sb3.HParam
    | Checkpoint
)
"""What :meth:`tracklog.Logger.record` accepts; tracklog's media classes are SB3 subclasses.

``Sequence[float]`` is for lists and tuples of numbers (histograms); at run time other
sequences (``bytes``, ``range``) are refused as before."""


def check_key(key: object) -> str:
    """Return ``key`` if it is a valid key; raise naming the problem otherwise."""
    if not isinstance(key, str):
        raise TypeError(f"log key must be a str, not {type(key).__name__}: {key!r}")
    if not key or key.isspace():
        raise ValueError(f"log key must not be empty or blank: {key!r}")
    if key.startswith("_"):
        raise ValueError(
            f"log key {key!r} starts with '_', which is reserved for tracklog's own columns "
            "(_step, _timestamp)"
        )
    _check_encodable(key, key, "log key")
    return key


def _check_encodable(key: str, text: str, what: str) -> None:
    # Lone surrogates (from os.fsdecode of bad bytes, say) cannot be written as UTF-8:
    # refuse them here rather than in a file output at dump time.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"cannot log {key!r}: {what} contains {text[error.start : error.end]!r}, "
            "which is not valid Unicode (a lone surrogate)"
        ) from None


def _scalar_or_none(value: object) -> bool | int | float | None:
    """The Python number ``value`` stands for, or None when it is not a real scalar."""
    kind = type(value)
    if kind is float or kind is int or kind is bool:
        return value  # type: ignore[return-value]  # narrowed by the exact type check above
    if isinstance(value, np.generic):
        # pyright's isinstance() narrowing leaves numpy's type parameter Unknown (mypy
        # makes it Any, and calls a cast to the same type redundant).
        if isinstance(value, np.bool_):
            return bool(cast("np.bool_[bool]", value))
        if isinstance(value, np.integer):
            return int(value)  # pyright: ignore[reportUnknownArgumentType]
        if isinstance(value, np.floating):
            return float(value)  # pyright: ignore[reportUnknownArgumentType]
        return None
    if isinstance(value, bool | int | float):  # subclasses, e.g. IntEnum
        return value
    return None


def _array_value(key: str, array: npt.NDArray[Any]) -> LogValue:
    if array.dtype.kind not in "biuf":
        raise TypeError(
            f"cannot log {key!r}: arrays must be bool, int or float, not dtype {array.dtype}"
        )
    if array.ndim == 0:
        scalar = _scalar_or_none(array[()])
        assert scalar is not None  # dtype kind checked above
        return Scalar(scalar)
    if array.size == 0:
        raise ValueError(f"cannot log {key!r}: the array is empty (shape {array.shape})")
    values = np.array(array, copy=True).reshape(-1)
    values.flags.writeable = False
    return Histogram(values)


def _sequence_value(key: str, value: list[object] | tuple[object, ...]) -> LogValue:
    """A list or tuple of numbers is a histogram, as a 1-d array is (SB3 accepts them)."""
    kind = type(value).__name__
    for index, item in enumerate(value):
        if _scalar_or_none(item) is None:
            raise TypeError(
                f"cannot log {key!r}: a {kind} is logged as a histogram, so it must hold only "
                f"numbers; item {index} is {type(item).__module__}.{type(item).__qualname__}"
            )
    if not value:
        raise ValueError(f"cannot log {key!r}: the {kind} is empty")
    try:
        array = np.array(value)
    except OverflowError as error:
        raise ValueError(f"cannot log {key!r}: an int of the {kind} {error}") from error
    if array.dtype.kind not in "biuf":  # ints beyond 64 bits make an object array
        raise ValueError(
            f"cannot log {key!r}: an int of the {kind} does not fit in 64 bits; "
            "record floats instead"
        )
    return _array_value(key, array)


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _reject(key: str, value: object) -> NoReturn:
    raise TypeError(
        f"cannot log {key!r}: unsupported value type {type(value).__module__}."
        f"{type(value).__qualname__}; record a number, str, numpy array, torch tensor, "
        "or tracklog.Video/Image/Figure/HParam/Checkpoint"
    )


def normalise(key: str, value: object) -> LogValue:
    """Turn a recorded Python, NumPy or torch value into a :data:`LogValue`.

    Raises ``TypeError`` or ``ValueError`` whose message names ``key``.
    """
    scalar = _scalar_or_none(value)
    if scalar is not None:
        if type(scalar) is int and not _INT64_MIN <= scalar <= _INT64_MAX:
            raise ValueError(
                f"cannot log {key!r}: the int {str(scalar)[:24]}… does not fit in 64 bits, "
                "which JSON readers, pandas and every tracker need; record float(value)"
            )
        return Scalar(scalar)
    if isinstance(value, Video | Image | Figure | HParam | Checkpoint):
        return value
    if isinstance(value, str):
        _check_encodable(key, value, "the text")
        return Text(str(value))  # a plain str, also for subclasses such as np.str_
    if isinstance(value, np.ma.MaskedArray):
        masked = cast("np.ma.MaskedArray[tuple[int, ...], np.dtype[Any]]", value)
        return _array_value(key, np.ma.compressed(masked))  # only the unmasked values
    if isinstance(value, np.ndarray):
        return _array_value(key, cast("npt.NDArray[Any]", value))
    if isinstance(value, list | tuple):
        return _sequence_value(key, cast("list[object] | tuple[object, ...]", value))
    if value is None:
        raise TypeError(
            f"cannot log {key!r}: the value is None; skip the record() call when there is "
            "nothing to log, or record float('nan') for a missing number"
        )
    if isinstance(value, dict):
        raise TypeError(
            f"cannot log {key!r}: a dict is not one value; record each entry under a key of "
            f"its own ({key + '/<name>'!r}), or hyperparameters as tracklog.HParam(...)"
        )
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        tensor = cast("_Tensor", value)
        if tensor.is_complex():
            _reject(key, tensor)
        try:
            array = _tensor_to_numpy(tensor)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as error:
            raise TypeError(
                f"cannot log {key!r}: this torch tensor ({tensor.dtype}, layout {tensor.layout}, "
                f"device {tensor.device}) has no NumPy form: {error}"
            ) from error
        return _array_value(key, array)
    return _from_sb3(key, value)


def _from_sb3(key: str, value: object) -> LogValue:
    try:
        if isinstance(value, sb3.Video):
            return Video(value.frames, value.fps)
        if isinstance(value, sb3.Image):
            return Image(value.image, value.dataformats)
        if isinstance(value, sb3.Figure):
            return Figure(value.figure, value.close)
        if isinstance(value, sb3.HParam):
            return HParam(value.hparam_dict, value.metric_dict)
    except (TypeError, ValueError) as error:
        raise type(error)(f"cannot log {key!r}: {error}") from error
    _reject(key, value)
