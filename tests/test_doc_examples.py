"""Every ```python block of README.md and docs/*.md, run as a real script.

The blocks are collected from the Markdown when the tests are collected: one test case
per block, with the id ``<file>:<n>`` (the n-th ```python block of that file, counted
from 1). Each runs in a fresh interpreter (``sys.executable doc_example.py``) in a fresh
temporary directory, with no ``TRACKLOG_*``, ``MLFLOW_*`` or ``WANDB_*`` variable of the
developer's shell (only ``TRACKLOG_DELIVERY``, a longer ``close_timeout``: see
``example_env``), and must exit 0.

A block that is not a whole script on its own (it continues another block, uses a
``logger`` built earlier, reads a settings file shown in a ```yaml block, or only shows
a signature) gets what it needs from ``SETUPS`` below: files written into the temp dir
(the docs' own ```yaml blocks, where there is one), code around it, or the block it
continues. Nothing is skipped: a block that cannot run here fails with the reason.

Training is capped (see ``SITECUSTOMIZE``), so the text of the examples stays as it
is written (``model.learn(100_000)``) and this file runs in well under two minutes.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.servers import MlflowServer
from tracklog.readers import read_csv, read_jsonl, read_wandb_offline

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# The cap on every SB3 training run of an example, in timesteps. 2048 is PPO's default
# n_steps (one rollout: PPO cannot train on fewer) and the length of the one example that
# promises exact steps (docs/callbacks.md:1, learn(2048)), which then runs unchanged.
MAX_TIMESTEPS = 2048
TIMEOUT = 180  # seconds per block; each takes 1 to 15 s here

# Parsing ------------------------------------------------------------------------------

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\s`]*)")


@dataclass(frozen=True)
class Fenced:
    """One fenced code block of a Markdown file."""

    path: Path
    language: str
    index: int  # 1-based, among the blocks of this language in this file
    line: int  # 1-based line of the opening fence
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}:{self.index}"


def fenced_blocks(path: Path, language: str) -> list[Fenced]:
    """The ``language`` blocks of ``path``, in order, their indentation removed."""
    blocks: list[Fenced] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    number = 0
    while number < len(lines):
        opening = _FENCE.match(lines[number])
        number += 1
        if opening is None:
            continue
        indent, fence = opening["indent"], opening["fence"]
        start = number
        while number < len(lines):
            closing = lines[number].strip()
            if closing.startswith(fence) and not closing.lstrip(fence[0]):
                break
            number += 1
        body = [line.removeprefix(indent) for line in lines[start:number]]
        number += 1  # past the closing fence
        if opening["info"] == language:
            index = sum(block.language == language for block in blocks) + 1
            blocks.append(Fenced(path, language, index, start, "\n".join(body) + "\n"))
    return blocks


BLOCKS = [block for path in DOC_FILES for block in fenced_blocks(path, "python")]
BY_ID = {block.id: block for block in BLOCKS}


def doc_block(relative: str, language: str, index: int) -> str:
    """The text of the ``index``-th ``language`` block of ``relative`` (from the root)."""
    blocks = fenced_blocks(ROOT / relative, language)
    assert len(blocks) >= index, f"{relative} has no {language} block number {index}"
    return blocks[index - 1].code


# What a block needs -------------------------------------------------------------------

SERVER_URL = "<mlflow-server-url>"  # replaced by the real server's URL in files and code


@dataclass(frozen=True)
class DocFile:
    """A file written into the temp dir from a fenced block of the docs themselves.

    ``marker`` is text the block must contain (as ``Setup.marker``). ``replace`` maps
    text of the block to its replacement here (a lab's server address to the test
    server's, W&B's ``online`` to ``offline``).
    """

    doc: str
    language: str
    index: int
    marker: str
    replace: Mapping[str, str] = field(default_factory=dict)

    def text(self) -> str:
        text = doc_block(self.doc, self.language, self.index)
        assert self.marker in text, (
            f"{self.doc}: {self.language} block #{self.index} no longer contains "
            f"{self.marker!r}; update SETUPS in this file.\n{text}"
        )
        for old, new in self.replace.items():
            assert old in text, f"{self.doc} {self.language} #{self.index}: no {old!r} in it"
            text = text.replace(old, new)
        return text


@dataclass(frozen=True)
class RepoFile:
    """A file of the repository, copied into the temp dir."""

    path: str

    def text(self) -> str:
        return (ROOT / self.path).read_text(encoding="utf-8")


@dataclass(frozen=True)
class Run:
    """What ran: the example's directory and its output."""

    cwd: Path
    stdout: str
    stderr: str
    mlflow_url: str | None
    returncode: int | None  # None: it ran over TIMEOUT


THIS = "<this block>"  # where the block itself goes among a Setup's code parts
THIS_LINE = "<this block, without its last line break>"


@dataclass(frozen=True)
class Setup:
    """What one block needs to run, and what to check after it ran.

    ``marker`` is text the block must contain: a block added or removed before it shifts
    the numbering, and this mapping must then be updated rather than run the wrong
    preludes. ``code`` is the script, in order: strings of code, ``THIS`` for the block,
    and ``"@<id>"`` for the text of another block that this one continues.
    """

    marker: str
    code: tuple[str, ...] = (THIS,)
    files: Mapping[str, DocFile | RepoFile] = field(default_factory=dict)
    server: bool = False  # the session's real `mlflow server`; MLFLOW_TRACKING_URI points at it
    demo_run: bool = False  # a copy of a real `tracklog demo` run in runs/demo
    check: Callable[[Run], None] | None = None
    cannot_run: str = ""  # non-empty: the block cannot run here, and the test fails saying why


def signature_of(qualified: str) -> tuple[str, ...]:
    """Code around a block that shows a call signature: run it as a ``def``, then compare.

    ``VideoRecorderCallback(eval_env, every_n_steps, ...)`` becomes ``def
    VideoRecorderCallback(eval_env, every_n_steps, ...): ...``, and its parameters (names,
    kinds, defaults) must be the real ones of ``qualified``.
    """
    module, name = qualified.rsplit(".", 1)
    compare = f"""\
: ...

import inspect
from {module} import {name} as real

def parameters(function):
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]

documented = parameters({name})
actual = parameters(real)
assert documented == actual, f"documented {{documented}}\\n   actual {{actual}}"
"""
    return ("def ", THIS_LINE, compare)


# The `logger` docs/custom-formats.md:1 appends to. JSONL only: a plain logger.
JSONL_LOGGER = """\
import tracklog
logger = tracklog.build_logger({"run_dir": "runs/example", "outputs": [{"type": "jsonl"}]})
"""


def jsonl_rows(run: Run, run_dir: str) -> list[dict[str, object]]:
    path = run.cwd / run_dir / "progress.jsonl"
    assert path.is_file(), f"no {path}"
    return [dict(row.values, _step=row.step) for row in read_jsonl(path)]


def check_readme(run: Run) -> None:
    # README.md:1 dumps eval/return and a video at the end of training.
    rows = jsonl_rows(run, "runs/demo")
    (row,) = [row for row in rows if "eval/return" in row]
    assert row["eval/return"] == 212.0
    assert row["_step"] == MAX_TIMESTEPS  # learn(50_000), capped
    assert (run.cwd / "runs/demo" / str(row["eval/video"])).is_file()


def check_callbacks_example(run: Run) -> None:
    # docs/callbacks.md:1 promises: hparams at 0 and 2048, evaluations at 512, 1024,
    # 1536 and 2048, videos at 1024 and 2048 (MP4 files under media/).
    rows = jsonl_rows(run, "runs/callbacks")
    assert [row["_step"] for row in rows if "hparams" in row] == [0, 2048]
    assert [row["_step"] for row in rows if "eval/mean_reward" in row] == [512, 1024, 1536, 2048]
    videos = [row for row in rows if "eval/video" in row]
    assert [row["_step"] for row in videos] == [1024, 2048]
    for row in videos:
        assert str(row["eval/video"]).endswith(".mp4")
        assert (run.cwd / "runs/callbacks" / str(row["eval/video"])).is_file()


def check_action_stats(run: Run) -> None:
    # The ActionStats callback of docs/callbacks.md:2, used for 2 rollouts: a histogram
    # of the actions at each rollout's end (a .npy file in JSONL).
    rows = jsonl_rows(run, "runs/actions")
    steps = [row["_step"] for row in rows if "rollout/actions" in row]
    assert steps == [64, 128], rows


def check_custom_format(run: Run) -> None:
    # docs/custom-formats.md:1's PrintScalars prints `step key number` for each scalar.
    assert "7 train/loss 0.5" in run.stdout.splitlines(), run.stdout
    assert "train/note" not in run.stdout  # Text is passed over


def check_sweep_run(run: Run) -> None:
    # docs/deployment.md:1 logs into the server named by sweep.yaml, in the sweep's group.
    assert run.mlflow_url is not None
    client = MlflowClient(run.mlflow_url)
    experiment = client.get_experiment_by_name("ppo-cartpole")
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`tracklog.group` = 'lr-ablation'"
    )
    assert runs, "no run of the group lr-ablation on the server"


def check_capped_ppo(run_dir: str) -> Callable[[Run], None]:
    def check(run: Run) -> None:
        # One PPO rollout of 2048 steps: learn(50_000) stopped at MAX_TIMESTEPS, so the
        # cap of SITECUSTOMIZE works.
        rows = jsonl_rows(run, run_dir)
        steps = [row["_step"] for row in rows if "rollout/ep_rew_mean" in row]
        assert steps == [MAX_TIMESTEPS], rows

    return check


def check_configure(run: Run) -> None:
    # docs/migrating.md:1: SB3's file names in the folder.
    assert (run.cwd / "runs/ppo/log.txt").is_file()


def check_sb3_before(run: Run) -> None:
    # docs/migrating.md:2 is SB3's own configure(): its progress.csv, no _step column.
    with (run.cwd / "runs/ppo/progress.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert rows, "SB3 wrote no row"
    assert "time/total_timesteps" in rows[0]
    assert "_step" not in rows[0]


def check_migrated(run: Run) -> None:
    # docs/migrating.md:3: console, train.log, CSV and TensorBoard from logging.yaml.
    rows = read_csv(run.cwd / "runs/ppo/progress.csv")
    assert any("rollout/ep_rew_mean" in row.values for row in rows)
    assert list((run.cwd / "runs/ppo/tensorboard").glob("events.out.tfevents.*"))
    assert (run.cwd / "runs/ppo/train.log").is_file()


def check_seed_migrated(run: Run) -> None:
    # docs/migrating.md:5: the W&B run named in logging.yaml has SB3's rows.
    wandb_run = read_wandb_offline(run.cwd / "runs/ppo-cartpole")
    assert any("rollout/ep_rew_mean" in row.values for row in wandb_run.rows)


def check_quickstart_train(run: Run) -> None:
    # docs/quickstart.md:1 dumps its own values at the end of training.
    rows = jsonl_rows(run, "runs/quickstart")
    (final,) = [row for row in rows if "final/note" in row]
    assert final["final/note"] == "trained on CartPole-v1"
    assert str(final["final/weights"]).endswith(".npy")  # a tensor: a histogram
    assert "training done" in (run.cwd / "runs/quickstart/train.log").read_text()


def check_quickstart_values(run: Run) -> None:
    # docs/quickstart.md:2 dumps one row at step 4096 with every kind of value.
    (row,) = [row for row in jsonl_rows(run, "runs/quickstart") if row["_step"] == 4096]
    assert row["train/loss"] == 0.25
    assert row["rollout/ep_rew"] == 10.0
    for key, suffix in [("eval/video", ".mp4"), ("eval/frame", ".png"), ("hparams", ".json")]:
        assert str(row[key]).endswith(suffix), (key, row[key])
        assert (run.cwd / "runs/quickstart" / str(row[key])).is_file()


def check_hydra(run: Run) -> None:
    # docs/hydra.md:1: the logger was built from cfg.logging, whose run_dir is Hydra's
    # output directory: tracklog's train.log beside Hydra's hydra.log.
    (hydra_log,) = (run.cwd / "outputs").glob("*/*/hydra.log")
    assert (hydra_log.parent / "train.log").is_file()


# docs/quickstart.md's logging.yaml ("Save this as logging.yaml").
QUICKSTART_YAML = DocFile("docs/quickstart.md", "yaml", 1, "run_dir: runs/quickstart")

# docs/deployment.md's sweep.yaml, its lab's server replaced by the session's real one.
SWEEP_YAML = DocFile(
    "docs/deployment.md",
    "yaml",
    1,
    "# sweep.yaml",
    {"http://mlflow.lab.internal:5000": SERVER_URL},
)

# block id -> what it needs. A block without an entry runs as it is written.
SETUPS: dict[str, Setup] = {
    # Quickstart: build_logger("logging.yaml") with the README's own settings file (its
    # ```yaml block: console, file, JSONL, CSV, MLflow in ./mlflow.db, W&B offline).
    "README.md:1": Setup(
        marker='build_logger("logging.yaml")',
        files={"logging.yaml": DocFile("README.md", "yaml", 1, "run_dir: runs/demo")},
        check=check_readme,
    ),
    # Whole script; only training is capped, at the 2048 steps it asks for.
    "docs/callbacks.md:1": Setup(
        marker="TracklogEvalCallback(Monitor", check=check_callbacks_example
    ),
    # A callback class: defined, then used for two tiny PPO rollouts to see it log.
    "docs/callbacks.md:2": Setup(
        marker="class ActionStats",
        code=(
            THIS,
            """
import tracklog
from stable_baselines3 import PPO

with tracklog.build_logger({"run_dir": "runs/actions", "outputs": [{"type": "jsonl"}]}) as logger:
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, n_epochs=1)
    model.set_logger(logger)
    model.learn(128, callback=ActionStats())
""",
        ),
        check=check_action_stats,
    ),
    # Signatures only: run as a def, compared with the real class.
    "docs/callbacks.md:3": Setup(
        marker="VideoRecorderCallback(eval_env",
        code=signature_of("tracklog.callbacks.VideoRecorderCallback"),
    ),
    "docs/callbacks.md:4": Setup(
        marker="HParamCallback(extra=None",
        code=signature_of("tracklog.callbacks.HParamCallback"),
    ),
    # Uses an eval_env made elsewhere: the Monitor-wrapped env of docs/callbacks.md:1.
    "docs/callbacks.md:5": Setup(
        marker="eval_callback = TracklogEvalCallback(eval_env",
        code=(
            "import gymnasium as gym\n"
            "from stable_baselines3.common.monitor import Monitor\n"
            'eval_env = Monitor(gym.make("CartPole-v1"))\n',
            THIS,
        ),
    ),
    # Appends to a `logger` built earlier; then one row goes through the new format.
    "docs/custom-formats.md:1": Setup(
        marker="class PrintScalars",
        code=(
            JSONL_LOGGER,
            THIS,
            'logger.record("train/loss", 0.5)\n'
            'logger.record("train/note", "text")\n'
            "logger.dump(step=7)\n"
            "logger.close()\n",
        ),
        check=check_custom_format,
    ),
    # build_logger("sweep.yaml"): the page's sweep.yaml, its lab server replaced by the
    # session's real `mlflow server`.
    "docs/deployment.md:1": Setup(
        marker='build_logger("sweep.yaml")',
        files={"sweep.yaml": SWEEP_YAML},
        server=True,
        check=check_sweep_run,
    ),
    # A search over the sweep's runs: run after the sweep of docs/deployment.md:1, with
    # the client and experiment_id it leaves to the reader (MlflowClient() reads
    # MLFLOW_TRACKING_URI: the server).
    "docs/deployment.md:2": Setup(
        marker="search_runs(",
        code=(
            "@docs/deployment.md:1",
            "from mlflow import MlflowClient\n"
            'experiment_id = MlflowClient().get_experiment_by_name("ppo-cartpole").experiment_id\n',
            THIS,
            'assert runs, "the search found no run of the sweep"\n',
        ),
        files={"sweep.yaml": SWEEP_YAML},
        server=True,
    ),
    # Credentials from code: the page's sweep.yaml (server replaced), and read_secret(),
    # the reader's own secret store (a placeholder by design).
    "docs/deployment.md:3": Setup(
        marker="read_secret()}",
        code=('def read_secret() -> str:\n    return "not-a-secret"\n\n', THIS),
        files={"sweep.yaml": SWEEP_YAML},
        server=True,
    ),
    # A Hydra app's main() like examples/hydra/train.py's, with that app's own config
    # group (conf/config.yaml and conf/logging/local.yaml, its default); then called.
    "docs/hydra.md:1": Setup(
        marker="@hydra.main(",
        code=(THIS, "\nmain()\n"),
        files={
            "conf/config.yaml": RepoFile("examples/hydra/conf/config.yaml"),
            "conf/logging/local.yaml": RepoFile("examples/hydra/conf/logging/local.yaml"),
        },
        check=check_hydra,
    ),
    # The home page's settings file is the ```yaml block right after the script.
    "docs/index.md:1": Setup(
        marker='build_logger("logging.yaml")',
        files={"logging.yaml": DocFile("docs/index.md", "yaml", 1, "# logging.yaml")},
        check=check_capped_ppo("runs/ppo"),
    ),
    "docs/migrating.md:1": Setup(marker="from tracklog import configure", check=check_configure),
    "docs/migrating.md:2": Setup(
        marker='PPO("MlpPolicy", "CartPole-v1", verbose=1)', check=check_sb3_before
    ),
    # "After, with the output list in a settings file (logging.yaml)": the ```yaml block
    # right before it.
    "docs/migrating.md:3": Setup(
        marker='import tracklog\n\nwith tracklog.build_logger("logging.yaml")',
        files={"logging.yaml": DocFile("docs/migrating.md", "yaml", 1, "type: tensorboard")},
        check=check_migrated,
    ),
    # The "After" of the seed migration: the ```yaml block before it as logging.yaml
    # (mode: online -> offline: no W&B account here), and the `model` and
    # `total_timesteps` the seed script had (as docs/migrating.md:2 makes them).
    "docs/migrating.md:4": Setup(
        marker="model.learn(total_timesteps)",
        code=(
            "import tracklog\n"
            "from stable_baselines3 import PPO\n"
            'model = PPO("MlpPolicy", "CartPole-v1", verbose=1)\n'
            "total_timesteps = 100_000\n",
            THIS,
        ),
        files={
            "logging.yaml": DocFile(
                "docs/migrating.md",
                "yaml",
                2,
                "run_dir: runs/ppo-cartpole",
                {"mode: online": "mode: offline"},
            )
        },
        check=check_seed_migrated,
    ),
    # Readers of the demo's run (runs/demo): a copy of a real `tracklog demo` run.
    "docs/outputs.md:1": Setup(marker="read_jsonl(", demo_run=True),
    "docs/outputs.md:2": Setup(marker="read_wandb_offline(", demo_run=True),
    # "Save this as logging.yaml": the page's ```yaml block.
    "docs/quickstart.md:1": Setup(
        marker='build_logger("logging.yaml")',
        files={"logging.yaml": QUICKSTART_YAML},
        check=check_quickstart_train,
    ),
    # "use the one build_logger returned": the quickstart's logger, from its logging.yaml.
    "docs/quickstart.md:2": Setup(
        marker='logger.record("train/loss", 0.25)',
        code=('import tracklog\nlogger = tracklog.build_logger("logging.yaml")\n', THIS),
        files={"logging.yaml": QUICKSTART_YAML},
        check=check_quickstart_values,
    ),
    "docs/viewing.md:1": Setup(marker="read_jsonl(", demo_run=True),
    "docs/viewing.md:2": Setup(
        marker="read_wandb_offline(",
        code=(THIS, "assert last_video.suffix == '.mp4' and last_video.is_file(), last_video\n"),
        demo_run=True,
    ),
}

# Capping training ---------------------------------------------------------------------

# Imported by every example's interpreter (its directory is first on PYTHONPATH). The
# examples train for real (`model.learn(100_000)` is minutes of PPO on two cores), so
# the number of timesteps of every SB3 training run is capped at MAX_TIMESTEPS.
# `BaseAlgorithm._setup_learn` is wrapped rather than `learn`: PPO, A2C, DQN, SAC... each
# override `learn`, and none of them calls `BaseAlgorithm.learn`, but all of them get the
# loop's bound (and the schedules' and callbacks' total) from `_setup_learn`. The patch is
# applied when SB3's base_class module is first imported, so an example that never
# imports SB3 does not pay for it.
SITECUSTOMIZE = """\
import functools
import importlib.machinery
import os
import sys

_CAP = int(os.environ["DOC_EXAMPLES_MAX_TIMESTEPS"])
_MODULE = "stable_baselines3.common.base_class"


def _cap(base_algorithm):
    setup_learn = base_algorithm._setup_learn

    @functools.wraps(setup_learn)
    def capped(self, total_timesteps, *args, **kwargs):
        return setup_learn(self, min(int(total_timesteps), _CAP), *args, **kwargs)

    base_algorithm._setup_learn = capped


class _CapWhenImported:
    def find_spec(self, name, path=None, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_cap(module):
            exec_module(module)
            _cap(module.BaseAlgorithm)

        spec.loader.exec_module = exec_and_cap
        return spec


sys.meta_path.insert(0, _CapWhenImported())
"""


def example_env(sitecustomize: Path, mlflow_url: str | None) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("TRACKLOG_", "MLFLOW_", "WANDB_"))
    }
    pythonpath = [str(sitecustomize), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env |= {
        "PYTHONPATH": os.pathsep.join(pythonpath),
        "DOC_EXAMPLES_MAX_TIMESTEPS": str(MAX_TIMESTEPS),
        "WANDB_SILENT": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MPLBACKEND": "Agg",  # df.plot() in docs/viewing.md: no display here
        # A 64x64 MLP trains faster on one thread, and WORKERS examples run at once.
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        # The examples read MLflow right after the logger's close(), which waits up to
        # delivery.close_timeout (30 s) for the delivery process. Here WORKERS examples
        # run at once beside the other pytest workers, on 2 cores, and the delivery
        # process runs at nice 10: starved, it can take longer than that, and the reading
        # client then raced it creating the sqlite store. An example that sets its own
        # `delivery` keeps it (settings given in code win over the environment).
        "TRACKLOG_DELIVERY": '{"close_timeout": 120}',
    }
    if mlflow_url is not None:
        env["MLFLOW_TRACKING_URI"] = mlflow_url
    return env


# Running ------------------------------------------------------------------------------

# The examples run three at a time (on 2 cores: each example spends part of its time
# waiting for its delivery process, W&B's service or the server) in a pool that the
# first test case starts; each test case then waits for its own block's result. The
# pool holds only the blocks selected for this session (-k works as usual).
WORKERS = 3


@dataclass(frozen=True)
class Job:
    block: Fenced
    setup: Setup
    cwd: Path
    mlflow_url: str | None


def script(block: Fenced, setup: Setup, mlflow_url: str | None) -> str:
    parts: list[str] = []
    for part in setup.code:
        if part == THIS:
            parts.append(block.code)
        elif part == THIS_LINE:
            parts.append(block.code.rstrip("\n"))
        elif part.startswith("@"):
            assert part[1:] in BY_ID, f"{block.id} continues {part[1:]}, which does not exist"
            parts.append(BY_ID[part[1:]].code + "\n")
        else:
            parts.append(part)
    text = "".join(parts)
    return text.replace(SERVER_URL, mlflow_url) if mlflow_url else text


def run_example(job: Job, env: Mapping[str, str], demo: Future[Path] | None) -> Run:
    """Write the block's files and script into ``job.cwd``, run it, and return what ran."""
    block, setup, mlflow_url = job.block, job.setup, job.mlflow_url
    if demo is not None:
        shutil.copytree(demo.result(), job.cwd / "runs" / "demo", symlinks=True)
    for name, source in setup.files.items():
        text = source.text()
        if mlflow_url:
            text = text.replace(SERVER_URL, mlflow_url)
        (job.cwd / name).parent.mkdir(parents=True, exist_ok=True)
        (job.cwd / name).write_text(text)
    path = job.cwd / "doc_example.py"
    path.write_text(f"# {block.id}, line {block.line}\n" + script(block, setup, mlflow_url))
    try:
        done = subprocess.run(
            [sys.executable, path.name],
            cwd=job.cwd,
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as timeout:
        stderr = timeout.stderr.decode() if isinstance(timeout.stderr, bytes) else ""
        return Run(job.cwd, "", f"timed out after {TIMEOUT} s\n{stderr}", mlflow_url, None)
    return Run(job.cwd, done.stdout, done.stderr, mlflow_url, done.returncode)


DEMO_LENGTH = ("--steps", "1024", "--video-every", "512")


def make_demo_run(root: Path, env: Mapping[str, str]) -> Path:
    """runs/demo as `tracklog demo` leaves it: the run docs/viewing.md's examples read.

    Shortened to 1024 steps with a video every 512, and without its MLflow output (no
    block reads it). The demo's exit status is not checked: it also asks that the agent
    improved, which 1024 steps need not give; the files the blocks read are checked.
    """
    settings = (ROOT / "examples" / "demo.yaml").read_text()
    settings = re.sub(r"  - type: mlflow.*?(?=  - type: )", "", settings, flags=re.DOTALL)
    assert "type: mlflow" not in settings, settings
    (root / "demo.yaml").write_text(settings)
    done = subprocess.run(
        [sys.executable, "-m", "tracklog", "demo", "--settings", "demo.yaml", *DEMO_LENGTH],
        cwd=root,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    run_dir = root / "runs" / "demo"
    progress = run_dir / "progress.jsonl"
    rows = read_jsonl(progress) if progress.is_file() else []
    for key in ("eval/video", "rollout/ep_rew_mean"):
        assert any(key in row.values for row in rows), (
            f"tracklog demo logged no {key}\n{done.stderr[-4000:]}"
        )
    return run_dir


class Examples:
    """The pool running the selected blocks; ``result(block)`` waits for one."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="doc-example")
        self.runs: dict[str, Future[Run]] = {}

    def result(self, block: Fenced) -> Run:
        assert block.id in self.runs, f"{block.id} was not started"
        return self.runs[block.id].result(timeout=20 * TIMEOUT)


def runnable(block: Fenced) -> Setup | None:
    """The block's Setup if it is to run (the mapping matches it and it can run here)."""
    setup = SETUPS.get(block.id, Setup(marker=""))
    if setup.marker not in block.code or setup.cannot_run:
        return None
    return setup


@pytest.fixture(scope="module")
def examples(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Examples]:
    this_module = sys.modules[__name__]
    selected = [
        block
        for item in request.session.items
        if isinstance(item, pytest.Function)
        and item.module is this_module
        and item.originalname == test_doc_example_runs.__name__
        and isinstance(block := item.callspec.params["block"], Fenced)
    ]
    sitecustomize = tmp_path_factory.mktemp("sitecustomize")
    (sitecustomize / "sitecustomize.py").write_text(SITECUSTOMIZE)
    jobs = [(block, setup) for block in selected if (setup := runnable(block)) is not None]
    examples = Examples()

    def submit(block: Fenced, setup: Setup, url: str | None, demo: Future[Path] | None) -> None:
        cwd = tmp_path_factory.mktemp(re.sub(r"\W+", "_", block.id))
        job = Job(block, setup, cwd, url)
        env = example_env(sitecustomize, url)
        examples.runs[block.id] = examples.pool.submit(run_example, job, env, demo)

    demo: Future[Path] | None = None
    if any(setup.demo_run for _, setup in jobs):
        root = tmp_path_factory.mktemp("demo")
        demo = examples.pool.submit(make_demo_run, root, example_env(sitecustomize, None))
    for block, setup in jobs:
        if not setup.server:
            submit(block, setup, None, demo if setup.demo_run else None)
    if any(setup.server for _, setup in jobs):
        # The session's real server: its start (~20 s) overlaps the examples above.
        try:
            server: MlflowServer = request.getfixturevalue("mlflow_server")
        except Exception as error:  # only the blocks that need it fail
            for block, setup in jobs:
                if setup.server:
                    examples.runs[block.id] = Future()
                    examples.runs[block.id].set_exception(error)
        else:
            for block, setup in jobs:
                if setup.server:
                    submit(block, setup, server.url, demo if setup.demo_run else None)
    try:
        yield examples
    finally:
        examples.pool.shutdown(wait=True, cancel_futures=True)


def test_setups_name_existing_blocks() -> None:
    # A stale entry (a block removed or renumbered) is an error, not silently unused.
    assert len(BLOCKS) >= 20, [block.id for block in BLOCKS]
    assert not set(SETUPS) - set(BY_ID), f"SETUPS for missing blocks: {set(SETUPS) - set(BY_ID)}"


def test_each_marker_names_one_block_of_its_file() -> None:
    # Else a block inserted before it could shift the numbering unnoticed.
    for block_id, setup in SETUPS.items():
        page = block_id.rsplit(":", 1)[0]
        holding = [block.id for block in BLOCKS if block.id.startswith(page + ":")]
        holding = [name for name in holding if setup.marker in BY_ID[name].code]
        assert holding == [block_id], f"{block_id}: marker {setup.marker!r} is in {holding}"
        for source in setup.files.values():
            source.text()  # a DocFile checks its own marker and replacements


@pytest.mark.parametrize("block", BLOCKS, ids=lambda block: block.id)
def test_doc_example_runs(block: Fenced, examples: Examples) -> None:
    setup = SETUPS.get(block.id, Setup(marker=""))
    assert setup.marker in block.code, (
        f"{block.id} (line {block.line}) no longer contains {setup.marker!r}: a block was "
        "added, removed or changed; update SETUPS in this file.\n" + block.code
    )
    if setup.cannot_run:
        compile(block.code, block.id, "exec")  # a syntax error is reported as such
        pytest.fail(setup.cannot_run)
    run = examples.result(block)
    assert run.returncode == 0, (
        f"{block.id} (line {block.line}) exited {run.returncode}; script "
        f"{run.cwd / 'doc_example.py'}\n--- stderr ---\n{run.stderr[-6000:]}"
    )
    if setup.check is not None:
        setup.check(run)
