"""A loopback mosquitto broker for tests, the demo and benches.

It writes its own config file (`listener PORT 127.0.0.1`, so it never binds another
interface), runs `mosquitto -c` as a child process and stops it on `stop()`.
Persistence is on by default, so a `restart()` keeps persistent sessions and their
queued QoS 1 messages, as a production broker would.

Example:

    with Mosquitto() as broker:                       # free port on 127.0.0.1
        ... aiomqtt.Client(broker.host, broker.port) ...

    with Mosquitto(username="ingest", password="s3cret") as broker:
        ...                                           # anonymous clients refused
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

_SBIN_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class MosquittoError(RuntimeError):
    """The broker is not installed or did not come up."""


def find_mosquitto() -> str | None:
    """The mosquitto binary (PATH first, then the usual sbin locations), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in _SBIN_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Mosquitto:
    """One mosquitto process on (host, port), configured from the arguments.

    Args:
        port: 0 picks a free port once; `restart()` reuses it.
        username, password: when given, anonymous access is off and this user is
            the only one allowed (password file written with `mosquitto_passwd`).
        persistence: keep sessions and queued messages across `restart()`.
        max_queued_messages: per-client queue of QoS 1/2 messages (0 = unbounded,
            which the benches use to preload a stream).
        max_inflight_messages: outgoing QoS 1/2 messages in flight per client.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        username: str | None = None,
        password: str | None = None,
        persistence: bool = True,
        max_queued_messages: int = 1000,
        max_inflight_messages: int = 20,
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise MosquittoError("mosquitto is not installed (run scripts/install-mosquitto)")
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        self.binary = binary
        self.host = host
        self.port = port or free_port(host)
        self.username = username
        self.password = password
        self.persistence = persistence
        self.max_queued_messages = max_queued_messages
        self.max_inflight_messages = max_inflight_messages
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="v2g-mosquitto-"))
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def config_text(self) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'false' if self.username else 'true'}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            f"max_queued_messages {self.max_queued_messages}",
            f"max_inflight_messages {self.max_inflight_messages}",
            "set_tcp_nodelay true",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to `mosquitto` and cannot write workdir
        if self.username:
            lines.append(f"password_file {self.workdir / 'passwords'}")
        return "\n".join(lines) + "\n"

    def _write_password_file(self) -> None:
        assert self.username is not None and self.password is not None
        path = self.workdir / "passwords"
        passwd = shutil.which("mosquitto_passwd")
        if passwd is None:
            raise MosquittoError("mosquitto_passwd is missing; cannot write a password file")
        path.unlink(missing_ok=True)
        subprocess.run(
            [passwd, "-b", "-c", str(path), self.username, self.password],
            check=True,
            capture_output=True,
        )
        path.chmod(0o600)

    def start(self, timeout_s: float = 5.0) -> None:
        """Start the broker and wait until it accepts TCP connections.

        Raises:
            MosquittoError: it exited or did not listen within `timeout_s`.
        """
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.username:
            self._write_password_file()
        self.config_path.write_text(self.config_text())
        self._process = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                stderr = self._process.stderr.read().decode() if self._process.stderr else ""
                self._process = None
                raise MosquittoError(f"mosquitto exited at start: {stderr}{self._log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise MosquittoError(f"mosquitto did not listen on {self.host}:{self.port}")

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM (mosquitto saves its persistence file), then SIGKILL if it hangs."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout_s)
        if process.stderr:
            process.stderr.close()

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down `down_s` seconds, start again on the same port."""
        self.stop()
        if down_s:
            time.sleep(down_s)
        self.start()

    def close(self) -> None:
        """Stop and remove the working directory if this object created it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _log_tail(self) -> str:
        try:
            return "\n" + self.log_path.read_text()[-2000:]
        except OSError:
            return ""

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = ["Mosquitto", "MosquittoError", "find_mosquitto", "free_port"]
