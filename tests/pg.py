"""A real PostgreSQL server on loopback for tests: ``initdb`` in a temporary directory, ``pg_ctl``
on a free port, password authentication over TCP. Skips (with the reason) only where the
binaries are absent, or where the tests run as root and no ``postgres`` user can own the server.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

USER = "aq"


def _bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True):
        return Path(candidate).parent
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgServer:
    root: Path
    port: int
    password: str
    bindir: Path
    run_as: str | None

    def url(self, db: str) -> str:
        """No password in it: it comes from PGPASSWORD, as users are told to."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{db}"

    def env(self, password: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["PGPASSWORD"] = self.password if password is None else password
        return env

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            check=True,
            capture_output=True,
            text=True,
            user=self.run_as,
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.root / "data"), "-o", options,
                  "-l", str(self.root / "log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")

    def create_db(self, name: str) -> str:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=USER, password=self.password,
            dbname="postgres", autocommit=True,
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def start_server(tmp: Path) -> PgServer:
    bindir = _bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb; .ci/run installs Debian's postgresql)")
    pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed")
    run_as = None
    if os.geteuid() == 0:  # initdb refuses root: the server runs as the postgres user
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to own the server")
        run_as = "postgres"
    tmp.mkdir(parents=True, exist_ok=True)
    if run_as:
        shutil.chown(tmp, user=run_as)
    password = "pw-" + secrets.token_hex(8)
    pwfile = tmp / "pwfile"
    pwfile.write_text(password + "\n")
    if run_as:
        shutil.chown(pwfile, user=run_as)
    server = PgServer(tmp, _free_port(), password, bindir, run_as)
    server._run(
        "initdb", "-D", str(tmp / "data"), "-U", USER, f"--pwfile={pwfile}",
        "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync",
    )
    pwfile.unlink()
    server.start()
    return server
