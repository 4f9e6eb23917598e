"""Real services for tests and benchmarks: an ``mlflow server`` on 127.0.0.1.

PostgreSQL for it is in ``tests/postgres.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["MlflowServer", "free_port"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class MlflowServer:
    """``mlflow server`` with a sqlite backend and ``--artifacts-destination``, on loopback.

    Artifacts are proxied through the server (``mlflow-artifacts:``), so a client only
    ever talks HTTP to it. ``backend_store_uri`` replaces the sqlite store (for example
    ``tests.postgres.PostgresServer.uri``); ``workers`` is the server's ``--workers``.
    ``start()`` waits for ``/health`` (about 20 s here); ``stop()`` and ``start()``
    again keep the same port and stores.
    """

    root: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    backend_store_uri: str | None = None
    workers: int = 1

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def start(self, timeout: float = 120.0) -> None:
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the server process without waiting for it: ``wait_ready()`` does.

        Two servers (or a test that needs none) can then use the seconds they take.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        mlflow = Path(sys.executable).with_name("mlflow")
        command = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port)]
        backend = self.backend_store_uri or f"sqlite:///{self.root / 'server.db'}"
        command += ["--backend-store-uri", backend, "--artifacts-destination", str(self.artifacts)]
        command += ["--workers", str(self.workers)]
        log = open(self.root / "server.log", "ab")  # noqa: SIM115  # handed to the child
        self.process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so stop() can kill the whole process group
            env={
                **os.environ,
                "MLFLOW_TRACKING_URI": "",
                # MLflow's GenAI job runner (several huey worker processes): unused here,
                # and it halves the server's start time on this 2-core machine.
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "MLFLOW_DISABLE_TELEMETRY": "true",  # no traffic beyond loopback
            },
        )
        log.close()

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until the launched server answers ``/health``."""
        if self.process is None:
            raise RuntimeError("mlflow server is not launched")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited; see {self.root / 'server.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"mlflow server did not answer /health within {timeout} s")

    def pause(self) -> None:
        """SIGSTOP the server's processes: connections are accepted, nothing answers."""
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT what ``pause()`` stopped."""
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None
