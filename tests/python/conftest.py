"""Fixtures for the real-client (Python grpcio) tests of istiod-lite.

istiod-lite is NOT built here: set ISTIOD_LITE_BIN or build it first with
`cargo build -p waypoint-testbed --bin istiod-lite` (-> target/debug/istiod-lite).
Every wait is bounded; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import grpc
import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto" / "protos"
CA_PROTO = "istio/ca/ca.proto"
REFERENCE_FIXTURE = REPO / "tests" / "fixtures" / "istio" / "waypoint_xds_reconstructed_example.yaml"
DEFAULT_BIN = REPO / "target" / "debug" / "istiod-lite"

READY_TIMEOUT_S = 20.0
TLS_TARGET_NAME = "istiod.istio-system.svc"

READY_RE = re.compile(r"istiod-lite ready on (\S+)")
DEBUG_RE = re.compile(r"\(debug (https?://[^\s)]+)\)")


# --------------------------------------------------------------------------------------------
# istiod-lite binary and the CA proto


@pytest.fixture(scope="session")
def istiod_lite_bin() -> Path:
    path = Path(os.environ.get("ISTIOD_LITE_BIN") or DEFAULT_BIN)
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"istiod-lite binary not found at {path}: build it with "
            "`cargo build -p waypoint-testbed --bin istiod-lite` or set ISTIOD_LITE_BIN",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def ca_pb(tmp_path_factory):
    """ca.proto compiled with grpc_tools.protoc into a temp dir; returns (ca_pb2, ca_pb2_grpc)."""
    import grpc_tools
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("ca_proto_py")
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        CA_PROTO,
    ]
    rc = protoc.main(args)
    assert rc == 0, f"protoc failed ({rc}) for {PROTO_ROOT / CA_PROTO}"
    sys.path.insert(0, str(out))
    try:
        importlib.invalidate_caches()
        ca_pb2 = importlib.import_module("istio.ca.ca_pb2")
        ca_pb2_grpc = importlib.import_module("istio.ca.ca_pb2_grpc")
    finally:
        # The modules stay in sys.modules; the path entry is no longer needed.
        sys.path.remove(str(out))
    return ca_pb2, ca_pb2_grpc


# --------------------------------------------------------------------------------------------
# A running istiod-lite


def run_token_cmd(binary: Path, namespace: str, service_account: str, *pre: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(binary), *pre, "token", "--namespace", namespace, "--service-account", service_account],
        capture_output=True,
        text=True,
        timeout=20,
    )


def mint_token(binary: Path, namespace: str, service_account: str) -> str:
    """`istiod-lite token --namespace NS --service-account SA` (the documented form).

    Known istiod-lite bug (see test_token_subcommand_needs_no_ca_dir): the subcommand is refused
    unless the top-level --ca-dir is given, so fall back to `--ca-dir <throwaway> token ...`.
    """
    out = run_token_cmd(binary, namespace, service_account)
    if out.returncode != 0 and "--ca-dir" in out.stderr:
        with tempfile.TemporaryDirectory(prefix="istiod-lite-token-") as scratch:
            out = run_token_cmd(binary, namespace, service_account, "--ca-dir", scratch)
    assert out.returncode == 0, f"istiod-lite token failed ({out.returncode}): {out.stderr}"
    token = out.stdout.strip()
    assert token.count(".") == 2, f"token is not JWT-shaped: {token!r}"
    return token


@pytest.fixture(scope="session")
def token_cli(istiod_lite_bin):
    """`token_cli.mint(ns, sa)` -> token; `token_cli.run(ns, sa)` -> the raw documented command."""

    class TokenCli:
        @staticmethod
        def mint(namespace: str, service_account: str) -> str:
            return mint_token(istiod_lite_bin, namespace, service_account)

        @staticmethod
        def run(namespace: str, service_account: str) -> subprocess.CompletedProcess:
            return run_token_cmd(istiod_lite_bin, namespace, service_account)

    return TokenCli()


class _LineReader:
    """Drains a pipe on a thread so reads can be bounded by a timeout."""

    _EOF = object()

    def __init__(self, pipe):
        self._q: queue.Queue = queue.Queue()
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._run, args=(pipe,), daemon=True)
        self._t.start()

    def _run(self, pipe):
        try:
            for line in iter(pipe.readline, ""):
                self.lines.append(line.rstrip("\n"))
                self._q.put(line.rstrip("\n"))
        finally:
            self._q.put(self._EOF)

    def next_line(self, timeout: float):
        """A line, None at EOF; raises queue.Empty on timeout."""
        item = self._q.get(timeout=timeout)
        return None if item is self._EOF else item


@dataclass
class Istiod:
    proc: subprocess.Popen
    addr: str
    debug_addr: str
    ca_dir: Path
    resources_dir: Path
    resource_file: Path
    token_file: Path
    tokens: dict
    stderr_path: Path
    binary: Path
    _channels: list = field(default_factory=list)

    @property
    def root_pem(self) -> bytes:
        return (self.ca_dir / "root-cert.pem").read_bytes()

    def channel(self) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(root_certificates=self.root_pem)
        ch = grpc.secure_channel(
            self.addr,
            creds,
            options=[
                ("grpc.ssl_target_name_override", TLS_TARGET_NAME),
                ("grpc.default_authority", TLS_TARGET_NAME),
                ("grpc.enable_http_proxy", 0),
            ],
        )
        grpc.channel_ready_future(ch).result(timeout=10)
        self._channels.append(ch)
        return ch

    # -- debug HTTP ---------------------------------------------------------------------------
    def debug_get(self, path: str) -> Any:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://{self.debug_addr}{path}", timeout=5) as resp:
            assert resp.status == 200, f"GET {path}: HTTP {resp.status}"
            return json.loads(resp.read().decode())

    def wait_debug(self, path: str, pred: Callable[[Any], Any], timeout: float = 10.0, what: str = ""):
        """Polls GET `path` until pred(doc) is truthy (returns its value); bounded by `timeout`."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            last = self.debug_get(path)
            got = pred(last)
            if got:
                return got
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what or 'condition'} on {path}; "
                    f"last document:\n{json.dumps(last, indent=1)[:6000]}"
                )
            time.sleep(0.05)

    def stderr_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no stderr>"

    # -- resource file editing ----------------------------------------------------------------
    def write_resources(self, text: str) -> None:
        """Atomically replaces the resource file (the watcher never sees a half-written file)."""
        tmp = self.resource_file.with_suffix(".tmp")  # not *.yaml: the watcher ignores it
        tmp.write_text(text)
        os.replace(tmp, self.resource_file)

    def close(self) -> None:
        for ch in self._channels:
            ch.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def start_istiod(binary: Path, workdir: Path) -> Istiod:
    ca_dir = workdir / "ca"
    resources_dir = workdir / "resources"
    ca_dir.mkdir()
    resources_dir.mkdir()
    resource_file = resources_dir / "waypoint.yaml"
    shutil.copyfile(REFERENCE_FIXTURE, resource_file)

    tokens = {"default/sleep": mint_token(binary, "default", "sleep")}
    token_file = workdir / "tokens.txt"
    token_file.write_text("".join(t + "\n" for t in tokens.values()))

    stderr_path = workdir / "istiod-lite.stderr.log"
    stderr_f = open(stderr_path, "w")
    proc = subprocess.Popen(
        [
            str(binary),
            "--listen", "127.0.0.1:0",
            "--resources", str(resources_dir),
            "--ca-dir", str(ca_dir),
            "--token-file", str(token_file),
            "--debug-listen", "127.0.0.1:0",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr_f,
        text=True,
        bufsize=1,
    )
    stderr_f.close()  # the child has its own descriptor
    reader = _LineReader(proc.stdout)

    def fail(msg: str):
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        tail = "\n".join(stderr_path.read_text(errors="replace").splitlines()[-40:])
        pytest.fail(f"{msg}\nstdout: {reader.lines}\nstderr tail:\n{tail}", pytrace=False)

    deadline = time.monotonic() + READY_TIMEOUT_S
    ready = None
    while ready is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            fail(f"istiod-lite printed no ready line within {READY_TIMEOUT_S}s")
        try:
            line = reader.next_line(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            fail(f"istiod-lite exited (rc={proc.wait(timeout=5)}) before it was ready")
        if READY_RE.search(line):
            ready = line

    addr = READY_RE.search(ready).group(1)
    debug = DEBUG_RE.search(ready)
    if not debug:
        fail(f"ready line has no debug address: {ready!r}")
    debug_addr = urllib.parse.urlparse(debug.group(1)).netloc
    assert addr.startswith("127.0.0.1:") and not addr.endswith(":0"), ready
    assert (ca_dir / "root-cert.pem").is_file(), "root-cert.pem was not written"
    return Istiod(
        proc=proc,
        addr=addr,
        debug_addr=debug_addr,
        ca_dir=ca_dir,
        resources_dir=resources_dir,
        resource_file=resource_file,
        token_file=token_file,
        tokens=tokens,
        stderr_path=stderr_path,
        binary=binary,
    )


@pytest.fixture
def istiod(istiod_lite_bin, tmp_path):
    """A fresh istiod-lite per test (its own CA dir and its own copy of the reference resources)."""
    server = start_istiod(istiod_lite_bin, tmp_path)
    try:
        yield server
    finally:
        server.close()


# --------------------------------------------------------------------------------------------
# Bidirectional streams with bounded reads


class StreamClosed(AssertionError):
    pass


class BidiStream:
    """A gRPC bidi stream fed from a queue; responses are read on a thread into a queue so every
    read can be bounded: `recv(timeout)` raises AssertionError when nothing arrives in time."""

    _END = object()

    def __init__(self, method, timeout: float = 120.0):
        self._requests: queue.Queue = queue.Queue()
        self._responses: queue.Queue = queue.Queue()
        self._call = method(self._request_iter(), timeout=timeout)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _request_iter(self):
        while True:
            item = self._requests.get()
            if item is self._END:
                return
            yield item

    def _read(self):
        try:
            for resp in self._call:
                self._responses.put(resp)
        except grpc.RpcError as err:
            self._responses.put(err)
        finally:
            self._responses.put(self._END)

    def send(self, request) -> None:
        self._requests.put(request)

    def recv(self, timeout: float = 10.0):
        try:
            item = self._responses.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no response on the stream within {timeout}s") from None
        if item is self._END:
            self._responses.put(self._END)
            raise StreamClosed("the stream ended")
        if isinstance(item, grpc.RpcError):
            self._responses.put(self._END)
            raise AssertionError(f"stream failed: {item.code()} {item.details()}")
        return item

    def assert_quiet(self, timeout: float) -> None:
        """Asserts that nothing arrives within `timeout` (a bounded check of absence)."""
        try:
            item = self._responses.get(timeout=timeout)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected message on the stream: {item}")

    def close(self) -> None:
        self._requests.put(self._END)
        self._call.cancel()
        self._reader.join(timeout=5)


@pytest.fixture
def open_stream():
    streams: list[BidiStream] = []

    def _open(method, timeout: float = 120.0) -> BidiStream:
        s = BidiStream(method, timeout=timeout)
        streams.append(s)
        return s

    yield _open
    for s in streams:
        s.close()
