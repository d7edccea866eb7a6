"""A program run on a pseudo-terminal, driven like a user at a keyboard (a tiny pexpect)."""

from __future__ import annotations

import fcntl
import os
import re
import select
import subprocess
import sys
import termios
import time


def _take_terminal() -> None:
    """In the child: become a session leader whose controlling terminal is stdin, so the
    terminal's Ctrl-C (\\x03) reaches it as SIGINT."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """Spawn `argv` on a new pty; `send` keystrokes, `expect` output by regular expression."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        master, slave = os.openpty()
        self.fd = master
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
            preexec_fn=_take_terminal,
        )
        os.close(slave)
        self.output = ""  # everything read so far
        self.pos = 0  # where the next expect starts searching

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def sendline(self, text: str) -> None:
        self.send(text + "\r")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.output += data.decode(errors="replace").replace("\r", "")
        return bool(data)

    def expect(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        """Wait for `pattern` after the previous match; fails with the output seen so far."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output, self.pos)
            if match:
                self.pos = match.end()
                return match
            left = deadline - time.monotonic()
            if left <= 0 or (not self._read(min(left, 1.0)) and self.proc.poll() is not None):
                raise AssertionError(
                    f"{pattern!r} not seen within {timeout} s after offset {self.pos}; "
                    f"the output so far:\n{self.output[-4000:]}"
                )

    def wait(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.2)
        return self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)


def pagedllm_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "pagedllm.entrypoints.cli", *args]
