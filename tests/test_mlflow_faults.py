"""MLFlowOutputFormat against real faults: whose credentials reach which server, and
which errors mean "retry later".

Real ``mlflow server`` processes on 127.0.0.1, each reachable directly and through a
recording proxy (``tests/faultproxy.py``: it sees the ``Authorization`` header of each
request and answers 503, 429 or 400 on demand). Other faults are real: a sqlite store
locked by another connection (its test runs alongside the others: see ``locked_sqlite``),
a SIGSTOPped server, a killed one. The output is driven
directly (``write_rows``/``close``), not through ``build_logger``.
"""

from __future__ import annotations

import base64
import logging
import os
import signal
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tests.faultproxy import FaultProxy
from tests.servers import MlflowServer, free_port
from tracklog._row import Row
from tracklog.outputs.mlflow import MLFlowOutputFormat
from tracklog.settings import MlflowOutput
from tracklog.values import LogValue, normalise

# Passwords with the characters that end a URI's user info, path or query.
PASSWORD_A = "pa/ss#wo?rd:a@1"
PASSWORD_B = "b/?#%20&=x"
QUERY_SECRET = "q/s#e?cret"


# Servers: launched when the module starts, so they boot while the sqlite store waits.
@pytest.fixture(scope="module", autouse=True)
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[MlflowServer]]:
    servers = [MlflowServer(tmp_path_factory.mktemp(f"mlflow-{name}")) for name in "ab"]
    for server in servers:
        server.launch()
    yield servers
    for server in servers:
        server.resume()
        server.stop(signal.SIGKILL)  # a graceful stop waits for idle keep-alive clients


@pytest.fixture(scope="module")
def servers(launched: list[MlflowServer]) -> list[MlflowServer]:
    for server in launched:
        server.wait_ready()
    return launched


@pytest.fixture(scope="module")
def module_proxies(servers: list[MlflowServer]) -> Iterator[list[FaultProxy]]:
    proxies = [FaultProxy(server.url).start() for server in servers]
    yield proxies
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def proxies(module_proxies: list[FaultProxy]) -> list[FaultProxy]:
    for proxy in module_proxies:
        proxy.clear()
    return module_proxies


@pytest.fixture(autouse=True)
def _no_mlflow_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("MLFLOW_TRACKING_", "MLFLOW_HTTP_REQUEST_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


# Helpers -----------------------------------------------------------------------------
def rows(steps: Sequence[int], **extra: object) -> list[Row]:
    """One dump per step: ``loss`` = step / 4, plus ``extra`` values in each."""
    made = []
    for step in steps:
        values: dict[str, LogValue] = {"loss": normalise("loss", step / 4)}
        values.update({key: normalise(key, value) for key, value in extra.items()})
        made.append(Row(step=step, timestamp=time.time(), seq=step, values=values))
    return made


def output(uri: str, tmp_path: Path, **fields: Any) -> MLFlowOutputFormat:
    settings = MlflowOutput(tracking_uri=uri, experiment=f"faults-{uuid.uuid4().hex}", **fields)
    return MLFlowOutputFormat(settings, state_dir=tmp_path / f"spool-{uuid.uuid4().hex}")


def losses(uri: str, run_id: str) -> list[tuple[int, float]]:
    """What the store holds, read with MLflow's client, sorted by step (duplicates kept)."""
    history = MlflowClient(uri).get_metric_history(run_id, "loss")
    return sorted((metric.step, metric.value) for metric in history)


def expected(steps: Sequence[int]) -> list[tuple[int, float]]:
    return [(step, step / 4) for step in sorted(steps)]


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def fails(target: MLFlowOutputFormat, batch: list[Row]) -> tuple[bool, float]:
    """Whether the error write_rows raised is transient, and how long the call took."""
    start = time.monotonic()
    with pytest.raises(MlflowException) as caught:
        target.write_rows(batch)
    return target.is_transient(caught.value), time.monotonic() - start


# Credentials -------------------------------------------------------------------------
def test_each_output_sends_only_its_own_credentials_and_writes_no_environment(
    proxies: list[FaultProxy],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    recwarn: pytest.WarningsRecorder,
) -> None:
    caplog.set_level(logging.DEBUG)  # MLflow's and urllib3's debug lines too
    proxy_a, proxy_b = proxies
    environment = dict(os.environ)
    # Both with the settings' username/password, A with a secret in its URI's query too.
    # Text values and lines make artifact uploads.
    a = output(
        f"{proxy_a.url}/?password={quote(QUERY_SECRET, safe='')}",
        tmp_path,
        username="alice",
        password=PASSWORD_A,
        artifact_upload_interval=0,
    )
    b = output(
        proxy_b.url, tmp_path, username="bob", password=PASSWORD_B, artifact_upload_interval=0
    )
    assert dict(os.environ) == environment
    for target in (a, b):
        target.write_rows(rows([0, 1], note="some text"))
        target.write_line("a line for train.log")
    a.close()
    b.close()
    # Resuming B's run downloads its train.log and text files: B's proxy sees those too.
    # Its credentials are the URI's (percent-encoded) user info this time.
    resumed = output(
        f"http://bob:{quote(PASSWORD_B, safe='')}@127.0.0.1:{proxy_b.port}",
        tmp_path,
        run_id=b.run_id,
    )
    resumed.write_line("one more line")
    resumed.close()
    assert dict(os.environ) == environment

    for proxy, credentials in (
        (proxy_a, basic("alice", PASSWORD_A)),
        (proxy_b, basic("bob", PASSWORD_B)),
    ):
        seen = proxy.seen
        assert {request.authorization for request in seen} == {credentials}
        kinds = {(request.method, request.path.split("?")[0].split("/")[3]) for request in seen}
        assert ("POST", "mlflow") in kinds  # REST calls
        assert ("PUT", "mlflow-artifacts") in kinds  # artifact uploads
        assert not any(
            QUERY_SECRET in request.path or "password" in request.path for request in seen
        )
    assert ("GET", "mlflow-artifacts") in {
        (request.method, request.path.split("/")[3]) for request in proxy_b.seen
    }  # the resumed run's downloads
    assert losses(proxy_a.url, a.run_id) == expected([0, 1])
    assert losses(proxy_b.url, b.run_id) == expected([0, 1])

    printed = capsys.readouterr()
    assert (
        f"View run {MlflowClient(proxy_b.url).get_run(b.run_id).info.run_name} at: {proxy_b.url}/"
        in printed.out
    )
    shown = [printed.out, printed.err, caplog.text, *(str(w.message) for w in recwarn)]
    assert_no_secret(shown)


def assert_no_secret(texts: Sequence[str]) -> None:
    for text in texts:
        for secret in (PASSWORD_A, PASSWORD_B, QUERY_SECRET):
            for form in {secret, quote(secret, safe=""), quote(secret)}:
                assert form not in text


def test_an_unreachable_server_is_named_without_any_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()
    uri = f"http://carol:{quote(PASSWORD_A, safe='')}@127.0.0.1:{port}/?password={QUERY_SECRET}"
    with pytest.warns(UserWarning, match="is unreachable") as warned:
        target = output(uri, tmp_path, request_retries=0, request_timeout=1)
    messages = [str(warning.message) for warning in warned]
    assert messages[0].startswith(f"MLflow at http://127.0.0.1:{port}/ is unreachable")
    with pytest.raises(MlflowException) as caught:
        target.write_rows(rows([0]))
    assert target.is_transient(caught.value)
    printed = capsys.readouterr()
    assert_no_secret([*messages, str(caught.value), printed.out, printed.err, caplog.text])


def test_retries_belong_to_each_output(proxies: list[FaultProxy], tmp_path: Path) -> None:
    proxy = proxies[0]
    environment = dict(os.environ)
    patient = output(proxy.url, tmp_path, request_retries=2)
    hasty = output(proxy.url, tmp_path, request_retries=0)
    with proxy.failing(503, count=1):
        patient.write_rows(rows([0]))  # MLflow retried the 503 once
    assert [request.status for request in proxy.seen[-2:]] == [503, 200]
    with proxy.failing(503, count=1):
        transient, _ = fails(hasty, rows([0]))
    assert transient
    for target in (patient, hasty):
        target.close()
    assert dict(os.environ) == environment


# Answers of the server ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "forward", "transient"),
    [
        (503, False, True),
        (429, False, True),
        (400, False, False),
        (503, True, True),  # the server logged the batch, its reply was lost
    ],
)
def test_an_error_answer_is_classified_and_the_retry_delivers_once(
    proxies: list[FaultProxy], tmp_path: Path, status: int, forward: bool, transient: bool
) -> None:
    proxy = proxies[0]
    target = output(proxy.url, tmp_path, request_retries=0)
    target.write_rows(rows([0]))
    with proxy.failing(status, count=1, forward=forward):
        assert fails(target, rows([1, 2]))[0] is transient
    if forward:  # the server has the rows already: the retry must not add them again
        assert losses(proxy.url, target.run_id) == expected([0, 1, 2])
    target.write_rows(rows([1, 2]))
    target.close()
    assert losses(proxy.url, target.run_id) == expected([0, 1, 2])


# A server that does not answer, or is gone --------------------------------------------
def test_a_stopped_server_times_out_as_transient_and_the_retry_delivers_once(
    servers: list[MlflowServer], tmp_path: Path
) -> None:
    server = servers[1]
    target = output(server.url, tmp_path, request_retries=0, request_timeout=2)
    target.write_rows(rows([0]))
    server.pause()
    try:
        transient, took = fails(target, rows([1, 2]))
    finally:
        server.resume()
    assert transient
    assert took < 10  # this output's timeout, not MLflow's 120 s
    target.write_rows(rows([1, 2]))  # the server also handles the first try now
    target.close()
    assert losses(server.url, target.run_id) == expected([0, 1, 2])


def test_a_killed_server_is_transient_and_the_retry_delivers_once(
    servers: list[MlflowServer], tmp_path: Path
) -> None:
    server = servers[1]
    target = output(server.url, tmp_path, request_retries=0)
    target.write_rows(rows([0]))
    server.stop(signal.SIGKILL)
    try:
        transient, took = fails(target, rows([1, 2]))
    finally:
        server.start()
    assert transient
    assert took < 10
    target.write_rows(rows([1, 2]))
    target.close()
    assert losses(server.url, target.run_id) == expected([0, 1, 2])


# A locked sqlite store -----------------------------------------------------------------
def locked_sqlite_scenario(uri: str, spool: Path) -> tuple[bool, list[tuple[int, float]]]:
    """Rows written while another connection holds ``BEGIN EXCLUSIVE``, then again.

    Returns whether the error was transient and what the store holds afterwards.
    """
    target = output(uri, spool)
    target.write_rows(rows([0]))
    lock = sqlite3.connect(uri.removeprefix("sqlite:///"), isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        transient, _ = fails(target, rows([1, 2]))  # after MLflow's busy_timeout, 20 s
    finally:
        lock.rollback()
        lock.close()
    target.write_rows(rows([1, 2]))
    target.close()
    return transient, losses(uri, target.run_id)


@pytest.fixture(scope="module", autouse=True)
def locked_sqlite(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Future[tuple[bool, list[tuple[int, float]]]]]:
    """The locked-store scenario, run from the module's start on a thread of its own.

    MLflow's sqlite store waits 20 s for a lock (``PRAGMA busy_timeout = 20000`` in
    ``mlflow/store/db/utils.py``) before it reports "database is locked"; that wait runs
    alongside the servers' start and the other tests. Its own sqlite file: the lock
    is held across tests.
    """
    root = tmp_path_factory.mktemp("mlflow-locked")
    with ThreadPoolExecutor(1, thread_name_prefix="locked-sqlite") as executor:
        yield executor.submit(locked_sqlite_scenario, f"sqlite:///{root / 'mlflow.db'}", root)


def test_a_locked_sqlite_store_is_transient_and_the_retry_delivers_once(
    locked_sqlite: Future[tuple[bool, list[tuple[int, float]]]],
) -> None:
    transient, stored = locked_sqlite.result(timeout=120)
    assert transient
    assert stored == expected([0, 1, 2])
