"""Start `python -m serve` as a child process on a free loopback port (for the tests and the load test)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`with ServerProcess("--max-batch-size", "8") as server: server.url ...`; the server's stderr
    (its log) is kept in `server.log` once it has stopped. `root`: the checkout whose `serve` runs
    (another one gives a baseline to compare with)."""

    def __init__(self, *args, start_timeout=300, root=REPO_ROOT):
        self.root = Path(root)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "serve", "--host", "127.0.0.1", "--port", str(self.port), *map(str, args)]
        self.start_timeout = start_timeout
        self.process = None
        self.log = ""

    def health(self):
        with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
            return json.loads(response.read())

    def __enter__(self):
        # Only the arguments decide the server's key, not a SERVE_API_KEY left in the environment.
        environment = {name: value for name, value in os.environ.items() if name != "SERVE_API_KEY"}
        self.process = subprocess.Popen(self.args, cwd=self.root, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._log_lines = []
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._reader.join(5)
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{''.join(self._log_lines)}")
            try:
                self.health()
                return self
            except OSError:
                time.sleep(0.3)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the server did not answer /health within {self.start_timeout} s:\n{self.log}")

    def _read_log(self):
        for line in self.process.stdout:
            self._log_lines.append(line)

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        self.log = "".join(self._log_lines)
