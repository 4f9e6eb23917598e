"""A real PostgreSQL server for tests and benchmarks: a throwaway cluster on 127.0.0.1.

``initdb`` makes a cluster in a fresh temporary directory; ``pg_ctl`` runs it on a free
loopback port with password (SCRAM) authentication and no Unix socket, so it needs no
system directory and never meets the machine's own cluster. PostgreSQL refuses to run
as root: as root (CI) every server command runs as the ``postgres`` user that Debian's
package creates, on a directory handed to that user; as anyone else, as that user.

``make postgres`` installs the server from Debian's packages when it is missing.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers import free_port

__all__ = ["PostgresServer", "postgres_bin"]


def postgres_bin() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl`` (Debian keeps them off the PATH)."""
    found = shutil.which("pg_ctl")
    if found is not None and shutil.which("initdb") is not None:
        return Path(found).resolve().parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda path: int(Path(path).parts[-3]) if Path(path).parts[-3].isdigit() else 0,
    )
    if not versions:
        raise FileNotFoundError(
            "PostgreSQL is not installed (no pg_ctl on the PATH or under "
            "/usr/lib/postgresql/*/bin); run `make postgres` (as root it runs "
            "`apt-get install -y postgresql`)"
        )
    return Path(versions[-1]).parent


def _as_server_user() -> list[str]:
    """The command prefix that runs a server command as a user PostgreSQL accepts."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError(
            "running as root, but there is no `postgres` user to run PostgreSQL as; "
            "Debian's postgresql package creates it (`make postgres`)"
        ) from None
    return ["runuser", "-u", "postgres", "--"]


@dataclass
class PostgresServer:
    """One PostgreSQL cluster with one database for MLflow, on ``127.0.0.1:port``.

    ``start()`` creates the cluster the first time (a few seconds) and starts it;
    ``stop()`` and ``start()`` again keep the port and the data. ``remove()`` stops it
    and deletes the cluster.
    """

    port: int = field(default_factory=free_port)
    database: str = "mlflow"
    user: str = "mlflow"
    password: str = field(default_factory=lambda: secrets.token_hex(12), repr=False)
    root: Path | None = None

    @property
    def uri(self) -> str:
        """The SQLAlchemy URI of the database, for ``mlflow server --backend-store-uri``."""
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    @property
    def data(self) -> Path:
        assert self.root is not None, "start() first"
        return self.root / "data"

    @property
    def log(self) -> Path:
        assert self.root is not None, "start() first"
        return self.root / "server.log"

    def _run(self, *command: str) -> None:
        done = subprocess.run(
            [*_as_server_user(), *command],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"},
        )
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                + (f"\nserver log:\n{log}" if log else "")
            )

    def _create(self) -> None:
        # Under /tmp (world-traversable), not under pytest's 0700 tmp dirs: the
        # postgres user must reach it when we are root.
        self.root = Path(tempfile.mkdtemp(prefix="tracklog-postgres-"))
        superuser_password = secrets.token_hex(12)
        (self.root / "pwfile").write_text(superuser_password + "\n")
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            for path in (self.root, self.root / "pwfile"):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        initdb = postgres_bin() / "initdb"
        self._run(
            str(initdb),
            "--pgdata",
            str(self.data),
            "--username",
            "postgres",
            "--pwfile",
            str(self.root / "pwfile"),
            "--auth",
            "scram-sha-256",
            "--encoding",
            "UTF8",
            "--no-sync",  # a throwaway cluster: skip the fsync of every new file
        )
        self._start_server()
        self._create_database(superuser_password)

    def _start_server(self) -> None:
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-c port={self.port}",
                "-c unix_socket_directories=''",  # TCP only: no system socket directory
                "-c max_connections=200",
            ]
        )
        pg_ctl = str(postgres_bin() / "pg_ctl")
        command = [pg_ctl, "--pgdata", str(self.data), "--log", str(self.log), "--wait"]
        self._run(*command, "--timeout", "60", "--options", options, "start")

    def _create_database(self, superuser_password: str) -> None:
        import psycopg
        from psycopg import sql

        # autocommit: CREATE DATABASE cannot run inside a transaction.
        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user="postgres",
            password=superuser_password,
            dbname="postgres",
            autocommit=True,
        ) as connection:
            connection.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(self.user), sql.Literal(self.password)
                )
            )
            connection.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(self.database), sql.Identifier(self.user)
                )
            )

    def start(self) -> None:
        if self.root is None:
            self._create()
        else:
            self._start_server()

    def stop(self) -> None:
        if self.root is None or not (self.data / "postmaster.pid").exists():
            return
        pg_ctl = str(postgres_bin() / "pg_ctl")
        self._run(pg_ctl, "--pgdata", str(self.data), "--wait", "--mode", "fast", "stop")

    def remove(self) -> None:
        """Stop the server and delete the cluster."""
        if self.root is None:
            return
        with contextlib.suppress(RuntimeError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None
