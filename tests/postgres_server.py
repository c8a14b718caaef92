"""A throwaway PostgreSQL server for tests: Debian's server binaries (``initdb``, ``pg_ctl``), a new
cluster in a temporary folder, a free loopback port and a Unix socket in that folder, no fsync; a
user with a password and a database of its own. Stopped and deleted afterwards.

PostgreSQL refuses to run as root: as root, the cluster belongs to the ``postgres`` system user
(created by Debian's package) and every server command runs as that user (``runuser``).
``make test`` installs the package when it is missing (see the Makefile's ``postgres-server``).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MISSING = ("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or under /usr/lib/postgresql/*/bin. "
           "`make test` installs Debian's postgresql package when run as root; otherwise install it yourself "
           "(sudo apt-get install postgresql), or set SUBFIT_SKIP_POSTGRES=1 to skip these tests")


def server_binaries() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: on PATH, else Debian's newest version."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    folder: Path
    bin: Path
    port: int
    user: str
    password: str
    database: str
    as_user: list[str]  # command prefix running a server command as the cluster's owner

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def url_with(self, **parts) -> str:
        """The URL with one part changed (``port``, ``password``, ``database``)."""
        p = {"user": self.user, "password": self.password, "port": self.port, "database": self.database, **parts}
        return f"postgresql://{p['user']}:{p['password']}@127.0.0.1:{p['port']}/{p['database']}"

    @classmethod
    def start(cls, database: str = "sweeps") -> PostgresServer:
        binaries = server_binaries()
        if binaries is None:
            raise RuntimeError(MISSING)
        as_user: list[str] = []
        # in /tmp: short (a Unix socket path has ~100 characters), and reachable by the postgres user
        folder = Path(tempfile.mkdtemp(prefix="subfit-pg-", dir="/tmp" if os.path.isdir("/tmp") else None))
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root, and there is no 'postgres' system user to own the test "
                                   "cluster (Debian's postgresql package creates it)") from None
            os.chown(folder, owner.pw_uid, owner.pw_gid)
            as_user = ["runuser", "-u", "postgres", "--"] if shutil.which("runuser") else ["su", "postgres", "-s",
                                                                                              "/bin/sh", "-c"]
        admin_pw = secrets.token_hex(8)
        server = cls(folder, binaries, 0, "subfit", f"pw{secrets.token_hex(8)}", database, as_user)
        try:
            (folder / "admin.pw").write_text(admin_pw + "\n")
            if as_user:
                shutil.chown(folder / "admin.pw", "postgres")
            server.run("initdb", "-D", str(folder / "data"), "-U", "admin", f"--pwfile={folder / 'admin.pw'}",
                       "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C")
            for attempt in range(3):  # a free port can be taken between the check and the start
                server.port = free_port()
                options = (f"-c listen_addresses=127.0.0.1 -p {server.port} -c unix_socket_directories={folder} "
                           "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=50")
                try:
                    server.run("pg_ctl", "-D", str(folder / "data"), "-l", str(folder / "server.log"), "-w", "-t", "60",
                               "-o", options, "start")
                    break
                except RuntimeError:
                    if attempt == 2:
                        raise
            server.admin(f"CREATE ROLE {server.user} LOGIN PASSWORD '{server.password}'",
                         f"CREATE DATABASE {database} OWNER {server.user}")
        except BaseException:
            server.stop()
            raise
        return server

    def run(self, program: str, *args: str) -> str:
        cmd = [str(self.bin / program), *args]
        if self.as_user[-1:] == ["-c"]:  # su takes one shell command line
            cmd = [*self.as_user, " ".join(map(quote, cmd))]
        else:
            cmd = [*self.as_user, *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=self.folder, timeout=120)
        if done.returncode != 0:
            log = self.folder / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr[-2000:]}{done.stdout[-500:]}\n{tail}")
        return done.stdout

    def admin(self, *statements: str, database: str = "postgres") -> None:
        """Run SQL statements as the cluster's superuser, over the Unix socket (trusted)."""
        import psycopg  # the driver of the postgres extra

        with psycopg.connect(host=str(self.folder), port=self.port, user="admin", dbname=database,
                             autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)

    def stop(self) -> None:
        """Stop the server (at once: the data is thrown away) and delete its folder."""
        try:
            if (self.folder / "data" / "postmaster.pid").exists():
                self.run("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")
        finally:
            for _ in range(20):  # the server's last files can appear while it shuts down
                shutil.rmtree(self.folder, ignore_errors=True)
                if not self.folder.exists():
                    break
                time.sleep(0.1)


def quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
