"""Declared summaries (``summaries:``), read back from MLflow, the W&B run file,
TensorBoard, the JSONL file and the console."""

from __future__ import annotations

import math
from pathlib import Path

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlflow import MlflowClient

import tracklog
from tests.tensorboard_readback import hparams_tab, read_events, scalars
from tracklog._row import Row
from tracklog._summary import Summaries
from tracklog.readers import read_jsonl, read_wandb_offline
from tracklog.values import Scalar

#: (step, eval/r, loss) of each dump; the NaN loss is left out of every summary.
DUMPS = [(10, 1.0, 5.0), (20, 3.0, 2.0), (30, 2.0, math.nan), (40, 2.5, 4.0)]


def test_summaries_reach_mlflow_wandb_tensorboard_and_the_console(
    tmp_path: Path, mlflow_sqlite_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    settings = {
        "run_dir": run_dir,
        "summaries": {"eval/r": "best:max", "loss": ["min", "last", "mean"]},
        "outputs": [
            {"type": "console"},
            {"type": "jsonl"},
            {"type": "tensorboard"},
            {"type": "mlflow", "tracking_uri": mlflow_sqlite_uri, "experiment": "summaries"},
            {"type": "wandb", "project": "summaries", "mode": "offline"},
        ],
    }
    with tracklog.build_logger(settings) as logger:
        for step, reward, loss in DUMPS:
            logger.record("eval/r", reward)
            logger.record("loss", loss)
            logger.dump(step)
    client = MlflowClient(mlflow_sqlite_uri)
    experiment = client.get_experiment_by_name("summaries")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])

    def points(key: str) -> list[tuple[int, float]]:
        return [(p.step, p.value) for p in client.get_metric_history(run.info.run_id, key)]

    # MLflow: <key>/<kind> metrics at the step each belongs to.
    assert points("eval/r/best") == [(20, 3.0)]
    assert points("loss/min") == [(20, 2.0)]
    assert points("loss/last") == [(40, 4.0)]
    ((mean_step, mean),) = points("loss/mean")
    assert mean_step == 40
    assert mean == pytest.approx(11.0 / 3)
    # W&B computes its own from define_metric (W&B has no best: max).
    summary = read_wandb_offline(run_dir).summary
    assert summary["eval/r"] == {"max": 3}
    assert isinstance(summary["loss"], dict)
    assert set(summary["loss"]) == {"min", "last", "mean"}
    assert summary["loss"]["last"] == 4
    # TensorBoard: the same metrics as scalars; JSONL rows hold only what was logged.
    events = read_events(run_dir / "tensorboard")
    assert scalars(events, "eval/r/best") == [(20, 3.0)]
    assert scalars(events, "loss/min") == [(20, 2.0)]
    assert all(
        set(row.values) <= {"eval/r", "loss"} for row in read_jsonl(run_dir / "progress.jsonl")
    )
    out = capsys.readouterr().out
    table = out[out.index("summary of this run:") :].splitlines()
    assert table[1].split() == ["key", "summary", "value", "at", "step"]
    assert table[2].split() == ["eval/r", "best:max", "3", "20"]
    assert table[3].split() == ["loss", "min", "2", "20"]
    assert table[4].split() == ["loss", "last", "4", "40"]
    assert table[5].split() == ["loss", "mean", "3.66667", "40"]


values = st.one_of(
    st.floats(allow_infinity=False, width=64, min_value=-1e12, max_value=1e12), st.just(math.nan)
)


@given(st.lists(st.tuples(st.integers(0, 10**6), values), max_size=30))
def test_each_summary_is_what_its_name_says(dumps: list[tuple[int, float]]) -> None:
    summaries = Summaries({"x": ["min", "max", "mean", "first", "last"], "y": "best:min"})
    for seq, (step, value) in enumerate(dumps):
        summaries.add(
            Row(step=step, timestamp=0.0, seq=seq, values={"x": Scalar(value), "y": Scalar(value)})
        )
    found = {name: (step, value) for step, row in summaries.rows() for name, value in row.items()}
    kept = [(step, value) for step, value in dumps if not math.isnan(value)]
    if not kept:
        assert found == {}
        return
    lowest = min(value for _, value in kept)
    highest = max(value for _, value in kept)
    first_low = next(step for step, value in kept if value == lowest)
    first_high = next(step for step, value in kept if value == highest)
    assert found["x/min"] == (first_low, lowest)
    assert found["y/best"] == (first_low, lowest)
    assert found["x/max"] == (first_high, highest)
    assert found["x/first"] == kept[0]
    assert found["x/last"] == kept[-1]
    mean_step, mean = found["x/mean"]
    assert mean_step == kept[-1][0]
    assert mean == pytest.approx(math.fsum(v for _, v in kept) / len(kept), rel=1e-9, abs=1e-6)


@pytest.mark.parametrize(
    ("summaries", "message"),
    [
        ({"loss": ["min", "min"]}, "named twice"),
        ({"loss": ["best:max", "best:min"]}, "contradict"),
        ({"loss": []}, "at least one"),
        ({"_step": "max"}, "starts with '_'"),
        ({"loss": "median"}, "summaries.loss"),
    ],
)
def test_a_bad_summary_is_refused_naming_it(summaries: dict[str, object], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message) as caught:
        tracklog.load_settings({"summaries": summaries})
    assert "summaries" in str(caught.value)


def test_summaries_are_columns_of_tensorboards_hparams_tab(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    settings = {
        "run_dir": run_dir,
        "summaries": {"loss": ["min", "last"], "eval/r": "best:max"},
        "outputs": [{"type": "tensorboard"}],
    }
    with tracklog.build_logger(settings) as logger:
        logger.record("hparams", tracklog.HParam({"lr": 0.01}))  # no metric_dict
        logger.dump(0)
        for step, reward, loss in DUMPS:
            logger.record("eval/r", reward)
            logger.record("loss", loss)
            logger.dump(step)
    experiment, groups = hparams_tab(run_dir / "tensorboard")
    assert [info["name"]["tag"] for info in experiment["metricInfos"]] == [
        "loss/min",
        "loss/last",
        "eval/r/best",
    ]
    (group,) = groups["sessionGroups"]
    shown = {value["name"]["tag"]: value["value"] for value in group["metricValues"]}
    assert shown == {"loss/min": 2.0, "loss/last": 4.0, "eval/r/best": 3.0}
