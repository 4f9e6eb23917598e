"""Stable-Baselines3 callbacks for what users otherwise wire by hand.

- :class:`VideoRecorderCallback` plays an evaluation episode every N timesteps and
  logs it as a :class:`~tracklog.Video`.
- :class:`HParamCallback` logs the algorithm's hyperparameters as an
  :class:`~tracklog.HParam` when training starts, and again with the final value of
  chosen metrics when it ends.
- :class:`TracklogEvalCallback` is SB3's ``EvalCallback`` whose values land at the
  step the evaluation happened, and which moves nothing else.
- :class:`EpisodeCallback` logs every finished episode's return, length and duration
  at that episode's own ``num_timesteps``, for every env of a VecEnv.
- :class:`CheckpointCallback` is SB3's ``CheckpointCallback`` whose checkpoints (model,
  VecNormalize statistics, replay buffer) are logged as :class:`~tracklog.Checkpoint`
  values with the alias ``latest``; given to :class:`TracklogEvalCallback`, each new
  best evaluation is also saved, with the alias ``best`` and its score.

Every value these callbacks log is dumped at once, at the model's ``num_timesteps``
at that moment, by :func:`dump_values`. Whatever SB3 (or other code) recorded for its
own next dump is held back meanwhile and put back afterwards, so it is written by that
dump, at the step it would have had without the callback. (SB3's own ``EvalCallback``
dumps everything pending: the ``train/`` values of the previous update then land at
the evaluation step, in a row of their own, instead of with the next rollout's.)

The callbacks work with any SB3 ``Logger``; with a :class:`tracklog.Logger` every
value is validated where it is recorded.
"""

from __future__ import annotations

import enum
import functools
import inspect
import types
import warnings
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple, SupportsFloat, SupportsInt, cast

import numpy as np
import numpy.typing as npt
from stable_baselines3.common import callbacks as sb3_callbacks
from stable_baselines3.common import logger as sb3
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import VecEnv, sync_envs_normalization

from tracklog._checkpoints import CHECKPOINTS, new_step_dir
from tracklog._logger import Logger
from tracklog._media import safe_relpath
from tracklog.values import (
    Checkpoint,
    HParam,
    HParamValue,
    Recordable,
    Video,
    check_aliases,
    check_key,
    freeze_mapping,
)

if TYPE_CHECKING:
    # Only for annotations: gymnasium is imported by SB3 anyway, but this module
    # never needs it at run time (a plain env is used through reset/step/render).
    import gymnasium as gym
    from stable_baselines3.common.base_class import BaseAlgorithm

__all__ = [
    "CheckpointCallback",
    "EpisodeCallback",
    "HParamCallback",
    "TracklogEvalCallback",
    "VideoRecorderCallback",
    "algorithm_hparams",
    "dump_values",
]

Exclude = str | tuple[str, ...] | None


# Dumping at a step without moving anyone else's values -------------------------------


@contextmanager
def _set_aside(logger: sb3.Logger) -> Generator[None]:
    """Hold back the values pending in ``logger``; a dump inside writes only newer ones.

    On leaving, the held values are pending again, with their ``record_mean`` counts
    and exclusions; a key recorded again inside keeps its newer value. If the block
    raises, what it recorded is discarded.
    """
    values = dict(logger.name_to_value)
    counts = dict(logger.name_to_count)
    excluded = dict(logger.name_to_excluded)
    # tracklog.Logger keeps the validated form of each pending value beside SB3's dicts
    # (no public attribute holds it): tracklog's own callbacks read the pending values.
    typed = dict(logger._values) if isinstance(logger, Logger) else {}  # pyright: ignore[reportPrivateUsage]
    _clear_pending(logger)
    try:
        yield
    except BaseException:
        _clear_pending(logger)
        raise
    finally:
        for key, value in values.items():
            if key in logger.name_to_value:
                continue  # recorded again inside (after the dump): the newer value stands
            logger.name_to_value[key] = value
            if key in excluded:
                logger.name_to_excluded[key] = excluded[key]
            if key in counts:
                logger.name_to_count[key] = counts[key]
            if isinstance(logger, Logger) and key in typed:
                # tracklog's own callbacks put the logger's pending values back.
                logger._values[key] = typed[key]  # pyright: ignore[reportPrivateUsage]


def _clear_pending(logger: sb3.Logger) -> None:
    logger.name_to_value.clear()
    logger.name_to_count.clear()
    logger.name_to_excluded.clear()
    if isinstance(logger, Logger):
        # tracklog's own callbacks clear the logger's pending values.
        logger._values.clear()  # pyright: ignore[reportPrivateUsage]


def dump_values(
    logger: sb3.Logger, step: int, values: Mapping[str, Recordable], exclude: Exclude = None
) -> None:
    """Record ``values`` and dump them, and only them, at ``step`` right away.

    Values recorded earlier for the logger's next dump (SB3's ``train/`` values, say)
    stay pending, with their ``record_mean`` counts, and are written by that dump as if
    this call had not happened. A value that cannot be logged raises (naming its key)
    before anything is dumped. Use it in your own callbacks to log at the step where
    something happened.
    """
    with _set_aside(logger):
        for key, value in values.items():
            logger.record(key, value, exclude=exclude)
        logger.dump(step=step)


# VideoRecorderCallback -----------------------------------------------------------------


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(cast(SupportsInt, value))  # an int or a NumPy integer, checked above


class VideoRecorderCallback(BaseCallback):
    """Every ``every_n_steps`` timesteps, plays ``n_episodes`` in ``eval_env`` and logs the video.

    ``eval_env`` is a separate environment (a gymnasium ``Env`` or an SB3 ``VecEnv``)
    made with ``render_mode="rgb_array"``; its episodes must end (a time limit). The
    episodes are played one after another with ``model.predict(deterministic=...)`` and
    logged as one :class:`~tracklog.Video` under ``key``, dumped at once at the
    ``num_timesteps`` the recording started at (see :func:`dump_values`), so the video
    sits at the step of the policy it shows. Recordings happen at the first step at or
    after each multiple of ``every_n_steps`` (counted in timesteps, all envs together,
    unlike ``EvalCallback``'s ``eval_freq``, which counts calls).

    Every ``frame_stride``-th frame is kept (long episodes at full size take a lot of
    memory: 500 CartPole frames are 360 MB). ``fps`` defaults to the env's
    ``metadata["render_fps"]`` divided by ``frame_stride`` (real time), else 30. With
    ``seed``, every recording starts from the same reset, so videos compare across
    training. A ``VecEnv`` plays its first env only; it resets itself when that
    episode ends, so its last frame is the one before the final step. If the training
    env is wrapped in ``VecNormalize``, ``eval_env`` must be a ``VecEnv`` wrapped the
    same way; its statistics are synchronised before each recording, as
    ``EvalCallback`` does.

    ``recorded_steps`` lists the step of every recording, in order.
    """

    def __init__(
        self,
        eval_env: gym.Env[Any, Any] | VecEnv,
        every_n_steps: int,
        n_episodes: int = 1,
        *,
        deterministic: bool = True,
        fps: float | None = None,
        key: str = "eval/video",
        frame_stride: int = 1,
        seed: int | None = None,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        self.every_n_steps = _positive_int("every_n_steps", every_n_steps)
        self.n_episodes = _positive_int("n_episodes", n_episodes)
        self.frame_stride = _positive_int("frame_stride", frame_stride)
        self.key = check_key(key)
        render_mode = getattr(eval_env, "render_mode", None)
        if render_mode != "rgb_array":
            raise ValueError(
                f"VideoRecorderCallback eval_env must render frames: its render_mode is "
                f"{render_mode!r}, not 'rgb_array'; make it with "
                "gym.make(env_id, render_mode='rgb_array') or "
                "make_vec_env(env_id, env_kwargs={'render_mode': 'rgb_array'})"
            )
        self.eval_env = eval_env
        self.deterministic = deterministic
        self.seed = seed
        self.fps = self._default_fps() if fps is None else fps
        # User input: the annotation is not enforced at run time.
        if isinstance(self.fps, bool) or not isinstance(self.fps, int | float) or self.fps <= 0:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"fps must be a positive number, got {fps!r}")
        self.recorded_steps: list[int] = []
        self._next_at = self.every_n_steps

    def _default_fps(self) -> float:
        env = self.eval_env
        metadata = env.get_attr("metadata", [0])[0] if isinstance(env, VecEnv) else env.metadata
        render_fps = (
            cast("Mapping[str, object]", metadata).get("render_fps")
            if isinstance(metadata, Mapping)
            else None
        )
        if (
            isinstance(render_fps, int | float)
            and not isinstance(render_fps, bool)
            and render_fps > 0
        ):
            return float(render_fps) / self.frame_stride
        return 30.0

    def _init_callback(self) -> None:
        if self.model.get_vec_normalize_env() is not None and not isinstance(self.eval_env, VecEnv):
            raise ValueError(
                "VideoRecorderCallback: the training env is wrapped in VecNormalize, so "
                "eval_env must be a VecEnv wrapped in VecNormalize too (the policy expects "
                "normalised observations)"
            )

    def _on_training_start(self) -> None:
        self._next_at = (self.num_timesteps // self.every_n_steps + 1) * self.every_n_steps

    def _on_step(self) -> bool:
        if self.num_timesteps >= self._next_at:
            self._next_at = (self.num_timesteps // self.every_n_steps + 1) * self.every_n_steps
            self.record_video()
        return True

    def record_video(self) -> Video:
        """Play the episodes now and dump the video at the model's ``num_timesteps``.

        Called by the callback during training; call it yourself after ``learn()`` to
        record the final policy.
        """
        step = self.model.num_timesteps
        if isinstance(self.eval_env, VecEnv):
            if self.model.get_vec_normalize_env() is not None:
                sync_envs_normalization(self.training_env, self.eval_env)
            frames = self._play_vec_env(self.eval_env)
        else:
            frames = self._play_env(self.eval_env)
        clip = np.stack(frames)
        frames.clear()  # Video copies the clip: hold two copies at most, not three
        # (T,H,W,C) as environments render -> (T,C,H,W) as Video takes
        video = Video(clip.transpose(0, 3, 1, 2), fps=self.fps)
        del clip
        dump_values(self.logger, step, {self.key: video})
        self.recorded_steps.append(step)
        if self.verbose >= 1:
            print(f"recorded {video.shape[1]} frames under {self.key!r} at step {step}")
        return video

    def _play_env(self, env: gym.Env[Any, Any]) -> list[npt.NDArray[np.uint8]]:
        frames: list[npt.NDArray[np.uint8]] = []
        t = 0
        for episode in range(self.n_episodes):
            observation, _ = env.reset(seed=self.seed if episode == 0 else None)
            frames.append(_frame(env.render()))
            state: tuple[npt.NDArray[Any], ...] | None = None
            start = np.ones((1,), dtype=bool)
            done = False
            while not done:
                action, state = self.model.predict(
                    observation, state=state, episode_start=start, deterministic=self.deterministic
                )
                observation, _, terminated, truncated, _ = env.step(action)
                done = bool(terminated or truncated)
                start = np.zeros((1,), dtype=bool)
                t += 1
                if t % self.frame_stride == 0:
                    frames.append(_frame(env.render()))
        return frames

    def _play_vec_env(self, env: VecEnv) -> list[npt.NDArray[np.uint8]]:
        if self.seed is not None:
            env.seed(self.seed)
        observation = env.reset()
        frames = [_frame(env.get_images()[0])]
        state: tuple[npt.NDArray[Any], ...] | None = None
        starts = np.ones((env.num_envs,), dtype=bool)
        episodes, t = 0, 0
        while True:
            assert not isinstance(observation, tuple)  # VecEnv.reset/step never return one
            actions, state = self.model.predict(
                observation, state=state, episode_start=starts, deterministic=self.deterministic
            )
            # SB3 types the step's infos as a bare list[dict] (ignored here).
            observation, _, starts, _ = env.step(actions)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
            t += 1
            if starts[0]:
                episodes += 1
                if episodes == self.n_episodes:
                    return frames
            if t % self.frame_stride == 0:
                # After an episode ends this is the first frame of the next one.
                frames.append(_frame(env.get_images()[0]))


def _frame(image: object) -> npt.NDArray[np.uint8]:
    """One rendered frame as an (H,W,C) array."""
    if image is None:
        raise ValueError(
            "eval_env.render() returned None; was it made with render_mode='rgb_array'?"
        )
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, np.newaxis]
    if array.ndim != 3:
        raise ValueError(f"eval_env rendered a frame of shape {array.shape}; expected (H,W,C)")
    return array


# HParamCallback ------------------------------------------------------------------------

# Constructor arguments that are not hyperparameters (or are logged under another name).
_NOT_HPARAMS: Final = frozenset(
    {"self", "policy", "env", "verbose", "tensorboard_log", "_init_setup_model"}
)
# Arguments that SB3 accepts as a number or a schedule (progress_remaining -> value).
_SCHEDULES: Final = frozenset({"learning_rate", "clip_range", "clip_range_vf"})
_MAX_TEXT: Final = 200


def algorithm_hparams(model: BaseAlgorithm) -> dict[str, HParamValue]:
    """The hyperparameters of an SB3 algorithm, as readable values for an ``HParam``.

    ``algorithm``, ``policy``, ``env`` (its id, when known) and ``n_envs``, then every
    argument of the algorithm's constructor that the model keeps as an attribute of the
    same name (``learning_rate``, ``gamma``, ``n_steps``, ``batch_size``, ``ent_coef``,
    ``train_freq``, ``policy_kwargs``, ...; for a subclass taking ``**kwargs``, its
    parent's arguments too). Schedules become their value if constant, else a
    description (``LinearSchedule(start=0.001, end=0.0, end_fraction=1.0)``, or
    ``name: 0.001 -> 0``); classes become their name; named tuples and enums their
    fields and values.
    """
    hparams: dict[str, HParamValue] = {
        "algorithm": type(model).__name__,
        "policy": type(model.policy).__name__,
    }
    env_id = _env_id(model)
    if env_id is not None:
        hparams["env"] = env_id
    hparams["n_envs"] = model.n_envs
    for name in _constructor_arguments(type(model)):
        if name in _NOT_HPARAMS or name in hparams:
            continue
        value = getattr(model, name, _MISSING)
        if value is _MISSING:
            continue
        hparams[name] = _schedule(value) if name in _SCHEDULES else _readable(value)
    return hparams


_MISSING: Final = object()


def _constructor_arguments(cls: type) -> list[str]:
    """Named arguments of ``cls.__init__``, and of its parents' while it takes ``**kwargs``."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()  # type: ignore[misc]  # reading a class's __init__ is what we mean
        names += [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return list(dict.fromkeys(names))


def _env_id(model: BaseAlgorithm) -> str | None:
    env = model.get_env()
    if env is None:
        return None
    try:
        spec = env.get_attr("spec", [0])[0]
    except (AttributeError, IndexError, NotImplementedError):
        return None
    env_id = getattr(spec, "id", None)
    return env_id if isinstance(env_id, str) else None


def _schedule(value: object) -> HParamValue:
    """A number, or a schedule as its constant value or a description."""
    if not callable(value) or isinstance(value, type):
        return _readable(value)
    inner = getattr(value, "value_schedule", value)  # SB3's FloatSchedule wraps the user's
    schedule = cast("Callable[[float], float]", value)  # SB3's Schedule; checked by the call
    try:
        start, end = float(schedule(1.0)), float(schedule(0.0))
    except (TypeError, ValueError, ArithmeticError):
        return _name(inner)
    if start == end:
        return start
    if _has_own_repr(inner):
        return _text(repr(inner))
    return f"{_name(inner)}: {start:g} -> {end:g}"


def _readable(value: object) -> HParamValue:
    """``value`` as something an HParam holds (numbers, text, tuples, mappings)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic | np.ndarray):
        return _readable(cast("np.generic[Any] | npt.NDArray[Any]", value).tolist())
    if isinstance(value, enum.Enum):
        return _readable(value.value)
    if isinstance(value, type):
        return value.__qualname__
    if isinstance(value, tuple) and hasattr(cast("tuple[object, ...]", value), "_asdict"):
        # a named tuple, such as SB3's TrainFreq
        return _readable(cast(NamedTuple, value)._asdict())
    if isinstance(value, Mapping):
        mapping = cast("Mapping[object, object]", value)
        return {str(key): _readable(item) for key, item in mapping.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return tuple(_readable(item) for item in cast("Iterable[object]", value))
    if _has_own_repr(value):
        return _text(str(value))  # torch.device('cpu') -> 'cpu'; action noise objects
    return _name(value)


def _has_own_repr(value: object) -> bool:
    """True when ``value`` describes itself (not ``<function f at 0x...>``)."""
    if isinstance(value, types.FunctionType | types.MethodType | functools.partial):
        return False
    kind = type(value)
    return kind.__repr__ is not object.__repr__ or kind.__str__ is not object.__str__


def _name(value: object) -> str:
    if isinstance(value, functools.partial):
        return _name(value.func)
    name = getattr(value, "__qualname__", None)
    return name if isinstance(name, str) else type(value).__qualname__


def _text(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


class _LastValues(sb3.KVWriter):
    """An SB3 ``KVWriter`` that remembers the last number dumped under each name."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)
        self.last: dict[str, float] = {}

    def write(
        self, key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]], step: int = 0
    ) -> None:
        for name in self.names & key_values.keys():
            value = key_values[name]
            if isinstance(value, int | float | np.integer | np.floating) and not isinstance(
                value, bool
            ):
                self.last[name] = float(cast(SupportsFloat, value))  # a number, checked above

    def close(self) -> None:
        pass


class HParamCallback(BaseCallback):
    """Logs the algorithm's hyperparameters as an :class:`~tracklog.HParam` under ``key``.

    At the start of training: :func:`algorithm_hparams` of the model, updated with
    ``extra`` (say the env id or the seed; ``extra`` wins on a shared name), dumped at
    once at the model's ``num_timesteps``, so a run that crashes still has them (MLflow
    params, the W&B config, TensorBoard's hparams).

    At the end of training it records them again, with the last value dumped under
    each name in ``metrics`` as the HParam's ``metric_dict``: the scores that hparams
    views show beside the hyperparameters. TensorBoard's HPARAMS tab gets these names
    as its metric columns and shows each one's last point, which is that value (the
    metrics' charts get no extra point); the W&B run summary gets the values. That
    second record leaves MLflow out: its params are already set, it shows each
    metric's latest value by itself, and it would log the values again as extra
    points at the final step. A name never dumped during training is left out with a
    warning (a typo, or a metric the algorithm does not log).

    The names are not declared in the first record: there are no values yet, and a
    placeholder would reach MLflow as a point of the metric's history (and W&B as its
    summary) until training ends.

    ``hparams`` holds what was logged; ``metric_values`` the final metric values.
    """

    def __init__(
        self,
        extra: Mapping[str, object] | None = None,
        metrics: Sequence[str] = ("rollout/ep_rew_mean", "rollout/ep_len_mean"),
        *,
        key: str = "hparams",
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        try:
            self.extra = dict(HParam(extra or {}).hparam_dict)
        except (TypeError, ValueError) as error:
            raise type(error)(f"HParamCallback extra: {error}") from error
        # User input: the annotation is not enforced at run time.
        if isinstance(metrics, str) or not isinstance(metrics, Sequence):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(
                f"HParamCallback metrics must be a sequence of metric names, not {metrics!r}"
            )
        for name in metrics:
            # User input: the annotation is not enforced at run time.
            if not isinstance(name, str) or not name:  # pyright: ignore[reportUnnecessaryIsInstance]
                raise ValueError(f"HParamCallback metrics holds {name!r}, not a metric name")
        self.metrics = tuple(metrics)
        self.key = check_key(key)
        self.hparams: dict[str, HParamValue] = {}
        self.metric_values: dict[str, float] = {}
        self._last = _LastValues(self.metrics)

    def _on_training_start(self) -> None:
        self.hparams = {**algorithm_hparams(self.model), **self.extra}
        dump_values(self.logger, self.num_timesteps, {self.key: HParam(self.hparams)})
        self._last = _LastValues(self.metrics)
        if self.metrics:
            self.logger.output_formats.append(self._last)

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        if self._last in self.logger.output_formats:
            self.logger.output_formats.remove(self._last)
        if not self.metrics:
            return
        self.metric_values = {n: self._last.last[n] for n in self.metrics if n in self._last.last}
        missing = [name for name in self.metrics if name not in self.metric_values]
        if missing:
            warnings.warn(
                f"HParamCallback: no value was dumped under the metric(s) {missing} during "
                "training; they are left out of the hparams' metrics",
                stacklevel=2,
            )
        if self.metric_values:
            final = HParam(self.hparams, self.metric_values)
            dump_values(self.logger, self.model.num_timesteps, {self.key: final}, exclude="mlflow")


# TracklogEvalCallback ------------------------------------------------------------------


class TracklogEvalCallback(EvalCallback):
    """SB3's ``EvalCallback``, same arguments and behaviour, that moves no one else's values.

    Each evaluation's ``eval/mean_reward``, ``eval/mean_ep_length`` (and
    ``eval/success_rate``) are dumped at once at the ``num_timesteps`` the evaluation
    ran at, in a row of their own (with ``time/total_timesteps``), as SB3 does; unlike
    SB3's, the dump leaves the values recorded for the algorithm's next dump pending
    (see :func:`dump_values`), so ``train/`` and ``rollout/`` rows keep the steps they
    have without evaluation. ``eval_freq`` counts calls, as in SB3: with ``n_envs``
    training envs an evaluation runs every ``eval_freq * n_envs`` timesteps.

    ``eval_steps`` lists the step of every evaluation, in order.
    """

    def __init__(
        self,
        eval_env: gym.Env[Any, Any] | VecEnv,
        callback_on_new_best: BaseCallback | None = None,
        callback_after_eval: BaseCallback | None = None,
        n_eval_episodes: int = 5,
        eval_freq: int = 10000,
        log_path: str | None = None,
        best_model_save_path: str | None = None,
        deterministic: bool = True,
        render: bool = False,
        verbose: int = 1,
        warn: bool = True,
        *,
        checkpoints: CheckpointCallback | None = None,
    ) -> None:
        super().__init__(
            eval_env,
            callback_on_new_best=callback_on_new_best,
            callback_after_eval=callback_after_eval,
            n_eval_episodes=n_eval_episodes,
            eval_freq=eval_freq,
            log_path=log_path,
            best_model_save_path=best_model_save_path,
            deterministic=deterministic,
            render=render,
            verbose=verbose,
            warn=warn,
        )
        self.eval_steps: list[int] = []
        #: Saves each new best model as a checkpoint with aliases ``best`` and ``latest``.
        self.checkpoints = checkpoints

    def _init_callback(self) -> None:
        super()._init_callback()
        if self.checkpoints is not None and getattr(self.checkpoints, "model", None) is None:
            # Not (or not yet) initialised by learn()'s callback list: it may save only
            # the best models, or come later in the list (which initialises it again).
            self.checkpoints.init_callback(self.model)

    def _on_step(self) -> bool:
        # SB3's condition for an evaluation in EvalCallback._on_step.
        if not (self.eval_freq > 0 and self.n_calls % self.eval_freq == 0):
            return super()._on_step()
        best = self.best_mean_reward
        with _set_aside(self.logger):
            continue_training = super()._on_step()
        self.eval_steps.append(self.num_timesteps)
        if self.checkpoints is not None and self.best_mean_reward > best:
            score = {
                "mean_reward": float(self.best_mean_reward),
                "n_eval_episodes": self.n_eval_episodes,
                "deterministic": self.deterministic,
            }
            self.checkpoints.save(aliases=("best",), metadata=score)
        return continue_training


# CheckpointCallback --------------------------------------------------------------------


class CheckpointCallback(sb3_callbacks.CheckpointCallback):
    """SB3's ``CheckpointCallback``, whose checkpoints are logged with aliases.

    Every ``save_freq`` calls (as in SB3: with ``n_envs`` envs, every
    ``save_freq * n_envs`` timesteps) it saves, into one folder:

    - ``<name_prefix>.zip``, the model (``PPO.load`` reads it);
    - ``<name_prefix>_vecnormalize.pkl``, the ``VecNormalize`` statistics, when the
      training env has them (``save_vecnormalize``, on by default: they are easy to
      lose, and a model without them is not the model that was trained);
    - ``<name_prefix>_replay_buffer.pkl``, the replay buffer, with
      ``save_replay_buffer=True`` and an off-policy algorithm;

    and logs the folder as a :class:`~tracklog.Checkpoint` under ``key`` at the
    model's ``num_timesteps`` with the alias ``latest``. Pending values do not move
    (see :func:`dump_values`). With ``save_path=None`` (the default) and a tracklog
    logger, the folder is ``<run_dir>/checkpoints/<key>/step_<num_timesteps>/``, kept
    where it is; with a ``save_path``, the folders are ``<save_path>/step_<N>/`` and
    the logger keeps a copy. With a logger that is not tracklog's, ``save_path`` is
    needed and the files are saved, not logged. Where the logger has no run_dir (a
    rank other than 0 of a multi-process job, without ``all_ranks``), nothing is saved:
    rank 0 saves the model.

    :meth:`save` saves and logs one checkpoint now; :class:`TracklogEvalCallback`
    calls it for each new best model. ``saved`` lists ``(num_timesteps, folder)`` of
    every checkpoint, oldest first.
    """

    def __init__(
        self,
        save_freq: int,
        save_path: str | None = None,
        name_prefix: str = "model",
        save_replay_buffer: bool = False,
        save_vecnormalize: bool = True,
        verbose: int = 0,
        *,
        key: str = "checkpoint",
    ) -> None:
        super().__init__(
            _positive_int("save_freq", save_freq),
            save_path or "",
            name_prefix=name_prefix,
            save_replay_buffer=save_replay_buffer,
            save_vecnormalize=save_vecnormalize,
            verbose=verbose,
        )
        self.key = check_key(key)
        #: No save_path: checkpoints go to the run_dir of the (tracklog) logger.
        self._in_run_dir = save_path is None
        self._off = False  # a logger without a run_dir (a rank other than 0)
        self.saved: list[tuple[int, Path]] = []
        self._folder: Path | None = None

    def _init_callback(self) -> None:
        self._off = False
        if not self._in_run_dir:
            super()._init_callback()  # creates save_path
        elif not isinstance(self.logger, Logger):
            raise ValueError(
                "CheckpointCallback needs a save_path when the model's logger is not a "
                "tracklog Logger (with one, checkpoints go to <run_dir>/checkpoints)"
            )
        else:
            run_dir = self.logger.get_dir()
            if run_dir is None:
                # A rank other than 0 of a multi-process job: its logger writes
                # nothing, and rank 0 saves the (same) model.
                self._off = True
            else:
                self.save_path = str(Path(run_dir, CHECKPOINTS, safe_relpath(self.key)))

    def _on_step(self) -> bool:
        if self.n_calls % self.save_freq == 0 and not self._off:
            self.save()
        return True

    def _checkpoint_path(self, checkpoint_type: str = "", extension: str = "") -> str:
        """The file of one part of the checkpoint being saved, or else of the last one
        saved (SB3's hook, same arguments: code that asks after a save finds its files)."""
        folder = self._folder or (self.saved[-1][1] if self.saved else self._new_folder())
        part = f"_{checkpoint_type.rstrip('_')}" if checkpoint_type else ""
        return str(folder / f"{self.name_prefix}{part}.{extension}")

    def _new_folder(self) -> Path:
        # The model's count: this callback's own lags when it is called only by
        # TracklogEvalCallback (or after it in learn()'s list).
        step = self.model.num_timesteps
        if self._in_run_dir and isinstance(self.logger, Logger):
            folder = self.logger.checkpoint_dir(self.key, step)
        else:
            folder = new_step_dir(Path(self.save_path), step)
        self._folder = folder
        return folder

    def save(
        self, aliases: Sequence[str] = (), metadata: Mapping[str, object] | None = None
    ) -> Path | None:
        """Save the model (and its VecNormalize statistics and replay buffer, as set up)
        into a new folder, log it as a checkpoint at ``num_timesteps`` with ``latest``
        and ``aliases``; return the folder (None where nothing is saved: a rank other
        than 0). A bad alias or metadata raises first, before any file is written."""
        check_aliases(aliases)
        freeze_mapping(metadata or {}, "Checkpoint metadata")
        if self._off:
            return None
        folder = self._new_folder()
        try:
            model_path = self._checkpoint_path(extension="zip")
            self.model.save(model_path)
            if self.verbose >= 2:
                print(f"Saving model checkpoint to {model_path}")
            buffer = getattr(self.model, "replay_buffer", None)
            if self.save_replay_buffer and buffer is not None:
                path = self._checkpoint_path("replay_buffer_", extension="pkl")
                self.model.save_replay_buffer(path)  # type: ignore[attr-defined]  # off-policy algorithms have it
            vec_normalize = self.model.get_vec_normalize_env()
            if self.save_vecnormalize and vec_normalize is not None:
                vec_normalize.save(self._checkpoint_path("vecnormalize_", extension="pkl"))
        finally:
            self._folder = None
        step = self.model.num_timesteps
        self.saved.append((step, folder))
        if isinstance(self.logger, Logger):
            checkpoint = Checkpoint(folder, aliases=aliases, metadata=metadata)
            self.logger.dump_rows([(step, {self.key: checkpoint})])
        return folder


# EpisodeCallback -----------------------------------------------------------------------


class EpisodeCallback(BaseCallback):
    """Logs every finished episode, of every env of a VecEnv, at its own ``num_timesteps``.

    SB3 logs only ``rollout/ep_rew_mean``, a mean over the last 100 episodes. This logs
    each episode as CleanRL does: ``<prefix>/return``, ``<prefix>/length`` and
    ``<prefix>/time`` (seconds since its env's Monitor started), read from the
    ``info["episode"]`` that SB3's ``Monitor`` wrapper adds when an episode ends
    (``make_vec_env`` and SB3's algorithms wrap every env in one; gymnasium's
    ``RecordEpisodeStatistics`` works too, its ``t`` being the episode's own duration).
    Several episodes ending at one step are several rows at that step. Training
    without a Monitor is warned about once; an ``info["episode"]`` without a numeric
    return is skipped (said once), never an error.

    The rows are written with :meth:`tracklog.Logger.dump_rows`: one call per env step
    for every episode that ended in it, and nothing recorded for the algorithm's next
    dump moves. By default they skip the console and ``train.log`` (``exclude``), where
    a table per episode would bury everything else; JSONL, CSV, TensorBoard, MLflow and
    W&B get every one. With a plain SB3 ``Logger`` each episode is one
    :func:`dump_values`.
    """

    def __init__(
        self,
        prefix: str = "episode",
        exclude: Exclude = ("stdout", "log"),
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose=verbose)
        check_key(prefix)
        self.prefix = prefix
        self.exclude = exclude
        #: Episodes logged so far.
        self.episodes = 0
        self._said_unusable = False

    def _on_training_start(self) -> None:
        env = self.training_env
        if not any(env.env_is_wrapped(Monitor)):
            warnings.warn(
                "EpisodeCallback: no env of the training VecEnv is wrapped in SB3's Monitor, "
                "so episodes are logged only if another wrapper puts info['episode'] there",
                UserWarning,
                stacklevel=2,
            )

    def _on_step(self) -> bool:
        infos: object = self.locals.get("infos")
        if not isinstance(infos, list | tuple):
            return True
        rows: list[tuple[int, Mapping[str, Recordable]]] = []
        for info in cast("Sequence[object]", infos):
            found_info = cast("dict[str, object]", info) if isinstance(info, dict) else {}
            episode = found_info.get("episode")
            if not isinstance(episode, dict):
                continue
            values = self._values(cast("dict[str, object]", episode))
            if values:
                rows.append((self.num_timesteps, values))
        if not rows:
            return True
        self.episodes += len(rows)
        if isinstance(self.logger, Logger):
            self.logger.dump_rows(rows, exclude=self.exclude)
        else:
            for step, row in rows:
                dump_values(self.logger, step, row, exclude=self.exclude)
        return True

    def _values(self, episode: dict[str, object]) -> dict[str, Recordable]:
        """Monitor's ``r``, ``l`` and ``t`` as numbers (also from 1-element arrays, as
        gymnasium's RecordEpisodeStatistics gives them); an entry without a usable
        return is skipped and said once."""
        found = {name: _one_number(episode.get(name)) for name in ("r", "l", "t")}
        episode_return, length, seconds = found["r"], found["l"], found["t"]
        if episode_return is None:
            if not self._said_unusable:
                self._said_unusable = True
                warnings.warn(
                    f"EpisodeCallback: info['episode'] without a number under 'r' is skipped "
                    f"(keys: {sorted(episode)[:8]}); said once",
                    UserWarning,
                    stacklevel=3,
                )
            return {}
        values: dict[str, Recordable] = {f"{self.prefix}/return": episode_return}
        if length is not None:
            values[f"{self.prefix}/length"] = round(length)
        if seconds is not None:
            values[f"{self.prefix}/time"] = seconds
        return values


def _one_number(value: object) -> float | None:
    """``value`` as a float if it is one number (a 0-d or 1-element array too)."""
    if value is None or isinstance(value, str | bytes):
        return None
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return float(array.reshape(())) if array.size == 1 else None
