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
REFERENCE_TERMINATE = "address: {socket_address: {address: 0.0.0.0, port_value: 15008}}"


def free_loopback_ip(port: int, tries: int = 200) -> str:
    """A 127.x.y.2 address whose `port` can be bound now (bounded tries)."""
    import random
    import socket

    rng = random.Random(os.getpid() ^ int(time.time() * 1000))
    for _ in range(tries):
        ip = f"127.{rng.randint(20, 219)}.{rng.randint(0, 255)}.2"
        with socket.socket() as s:
            try:
                s.bind((ip, port))
            except OSError:
                continue
        return ip
    raise RuntimeError(f"no free loopback address for port {port} after {tries} tries")
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


# ============================================================================================
# The agent (pilot-agent replacement) under test: appended for test_agent.py.
#
# AGENT_BIN overrides the binary (default target/debug/agent; build it with
# `cargo build -p agent -p waypoint-testbed --bins`). Each agent runs in its own "pod root" (a
# directory under the test's tmp_path, used as the working directory); its Unix sockets are reached
# through symlinks in a short /tmp directory because sun_path holds at most 107 bytes.

import signal as _signal
import socket as _socket

AGENT_DEFAULT_BIN = REPO / "target" / "debug" / "agent"
AGENT_READY_TIMEOUT_S = 20.0
WAYPOINT_NODE_ID = "waypoint~127.0.0.1~waypoint-1.default~default.svc.cluster.local"
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    return _ANSI_RE.sub("", text)


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05,
               detail: Callable[[], str] | None = None):
    """Polls pred() until it returns something truthy (returned); AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() >= deadline:
            extra = f"\n{detail()}" if detail else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now (the kernel's pick for port 0)."""
    with _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, sig: int = _signal.SIGTERM, timeout: float = 10.0) -> int | None:
    """Sends `sig` to `proc` (if alive) and waits; SIGKILL if it does not exit in time. Returns rc."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


def launch_istiod(binary: Path, workdir: Path, *, listen: str, ca_dir: Path, resources_dir: Path,
                  token_file: Path, tokens: dict, tag: str = "istiod-lite") -> Istiod:
    """Starts istiod-lite on `listen` (e.g. 127.0.0.1:0 or a fixed port, for restarts) with the
    given CA dir (root generated on first use, reused afterwards), resources and token file."""
    stderr_path = workdir / f"{tag}.stderr.log"
    stderr_f = open(stderr_path, "w")
    proc = subprocess.Popen(
        [
            str(binary),
            "--listen", listen,
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
    stderr_f.close()
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
            fail(f"{tag} printed no ready line within {READY_TIMEOUT_S}s")
        try:
            line = reader.next_line(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            fail(f"{tag} exited (rc={proc.wait(timeout=5)}) before it was ready")
        if READY_RE.search(line):
            ready = line
    addr = READY_RE.search(ready).group(1)
    debug = DEBUG_RE.search(ready)
    if not debug:
        fail(f"ready line has no debug address: {ready!r}")
    if not listen.endswith(":0"):
        assert addr == listen, f"{tag} listens on {addr}, asked for {listen}"
    return Istiod(
        proc=proc,
        addr=addr,
        debug_addr=urllib.parse.urlparse(debug.group(1)).netloc,
        ca_dir=ca_dir,
        resources_dir=resources_dir,
        resource_file=resources_dir / "waypoint.yaml",
        token_file=token_file,
        tokens=tokens,
        stderr_path=stderr_path,
        binary=binary,
    )


class IstiodSite:
    """One istiod-lite "installation" (CA dir, resources, token file incl. default/waypoint) that can
    be started, killed and restarted on the same port with the same root."""

    def __init__(self, binary: Path, workdir: Path):
        self.binary = binary
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca_dir = workdir / "ca"
        self.resources_dir = workdir / "resources"
        self.ca_dir.mkdir()
        self.resources_dir.mkdir()
        # The proxy binds LDS socket listeners: connect_terminate moves from 0.0.0.0:15008 to a
        # loopback address of this site's own, so parallel tests never fight over the port.
        self.hbone_ip = free_loopback_ip(15008)
        reference = REFERENCE_FIXTURE.read_text()
        assert REFERENCE_TERMINATE in reference
        (self.resources_dir / "waypoint.yaml").write_text(
            reference.replace(REFERENCE_TERMINATE, REFERENCE_TERMINATE.replace("0.0.0.0", self.hbone_ip))
        )
        self.tokens = {
            "default/waypoint": mint_token(binary, "default", "waypoint"),
            "default/sleep": mint_token(binary, "default", "sleep"),
        }
        self.token_file = workdir / "tokens.txt"
        self.token_file.write_text("".join(t + "\n" for t in self.tokens.values()))
        self.port: int | None = None
        self.current: Istiod | None = None
        self.launches = 0

    @property
    def root_pem(self) -> bytes:
        return (self.ca_dir / "root-cert.pem").read_bytes()

    @property
    def addr(self) -> str:
        assert self.port is not None, "istiod-lite has no port yet"
        return f"127.0.0.1:{self.port}"

    def start(self, port: int | None = None) -> Istiod:
        """Starts on `port`, else on the port of the previous run, else on a kernel-chosen port."""
        assert self.current is None or self.current.proc.poll() is not None, "already running"
        if port is not None:
            self.port = port
        self.launches += 1
        listen = f"127.0.0.1:{self.port}" if self.port is not None else "127.0.0.1:0"
        deadline = time.monotonic() + 10.0
        while True:
            try:
                server = launch_istiod(
                    self.binary, self.workdir, listen=listen, ca_dir=self.ca_dir,
                    resources_dir=self.resources_dir, token_file=self.token_file, tokens=self.tokens,
                    tag=f"istiod-lite.{self.launches}",
                )
                break
            except pytest.fail.Exception as err:
                # The port of a just-killed server may take a moment to be bindable again.
                if self.port is None or "in use" not in str(err).lower() or time.monotonic() >= deadline:
                    raise
                self.launches += 1
                time.sleep(0.2)
        self.current = server
        self.port = int(server.addr.rsplit(":", 1)[1])
        return server

    def prepare_root(self) -> bytes:
        """Runs istiod-lite once so that the CA dir holds a root (reused by later starts)."""
        server = launch_istiod(
            self.binary, self.workdir, listen="127.0.0.1:0", ca_dir=self.ca_dir,
            resources_dir=self.resources_dir, token_file=self.token_file, tokens=self.tokens,
            tag="istiod-lite.prepare",
        )
        server.close()
        return self.root_pem

    def kill(self, sig: int = _signal.SIGKILL) -> int | None:
        server = self.current
        assert server is not None
        for ch in server._channels:
            ch.close()
        server._channels.clear()
        return stop_process(server.proc, sig)

    def close(self) -> None:
        if self.current is not None:
            self.current.close()


@pytest.fixture
def istiod_site(istiod_lite_bin, tmp_path):
    """Factory of IstiodSite objects (not started); every started server is stopped at teardown."""
    sites: list[IstiodSite] = []

    def _make(name: str = "istiod") -> IstiodSite:
        site = IstiodSite(istiod_lite_bin, tmp_path / name)
        sites.append(site)
        return site

    yield _make
    for site in sites:
        site.close()


@pytest.fixture(scope="session")
def agent_bin() -> Path:
    path = Path(os.environ.get("AGENT_BIN") or AGENT_DEFAULT_BIN)
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"agent binary not found at {path}: build it with "
            "`cargo build -p agent -p waypoint-testbed --bins` or set AGENT_BIN",
            pytrace=False,
        )
    return path


SDS_SOCKET_REL = Path("var/run/secrets/workload-spiffe-uds/socket")
XDS_SOCKET_REL = Path("etc/istio/proxy/XDS")
BOOTSTRAP_REL = Path("etc/istio/proxy/envoy-rev.json")


class AgentPod:
    """A running `agent proxy waypoint` in its own pod root."""

    def __init__(self, proc: subprocess.Popen, root: Path, stderr_path: Path, links: Path):
        self.proc = proc
        self.root = root
        self.stderr_path = stderr_path
        self.links = links
        self._channels: list[grpc.Channel] = []

    # -- files --------------------------------------------------------------------------------
    @property
    def sds_path(self) -> Path:
        return self.root / SDS_SOCKET_REL

    @property
    def xds_path(self) -> Path:
        return self.root / XDS_SOCKET_REL

    @property
    def bootstrap_path(self) -> Path:
        return self.root / BOOTSTRAP_REL

    def log_lines(self) -> list[str]:
        try:
            return strip_ansi(self.stderr_path.read_text(errors="replace")).splitlines()
        except OSError:
            return []

    def stderr_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_lines()[-n:])

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 10.0) -> list[str]:
        """Waits until at least `count` stderr lines match `pattern` (regex); returns all matches."""
        rx = re.compile(pattern)

        def matches():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"agent exited (rc={self.proc.returncode}) while waiting for {pattern!r}:\n{self.stderr_tail()}"
                )
            hits = [l for l in self.log_lines() if rx.search(l)]
            return hits if len(hits) >= count else None

        return wait_until(matches, timeout, f"{count} agent log line(s) matching {pattern!r}",
                          detail=lambda: "agent stderr tail:\n" + self.stderr_tail())

    def wait_ready(self, timeout: float = AGENT_READY_TIMEOUT_S) -> None:
        """Waits for the SDS and XDS sockets and the bootstrap file."""

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited (rc={self.proc.returncode}) before it was ready:\n{self.stderr_tail()}")
            return self.sds_path.exists() and self.xds_path.exists() and self.bootstrap_path.exists()

        wait_until(ready, timeout, "the agent's sockets and bootstrap",
                   detail=lambda: "agent stderr tail:\n" + self.stderr_tail())

    # -- gRPC over the sockets ----------------------------------------------------------------
    def _uds_channel(self, link_name: str, target: Path, authority: str) -> grpc.Channel:
        link = self.links / link_name
        if not link.is_symlink():
            link.symlink_to(target)
        ch = grpc.insecure_channel(
            f"unix:{link}",
            options=[
                ("grpc.enable_http_proxy", 0),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                # As Envoy: :authority = the bootstrap cluster's name (sds-grpc / xds-grpc). grpc
                # C-core's own default for unix: targets is the percent-encoded socket path, which
                # the agent refuses (see test_uds_servers_accept_grpc_core_default_authority).
                ("grpc.default_authority", authority),
            ],
        )
        grpc.channel_ready_future(ch).result(timeout=10)
        self._channels.append(ch)
        return ch

    def sds_channel(self) -> grpc.Channel:
        return self._uds_channel("sds", self.sds_path, "sds-grpc")

    def xds_channel(self) -> grpc.Channel:
        return self._uds_channel("xds", self.xds_path, "xds-grpc")

    # -- lifetime -----------------------------------------------------------------------------
    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait (bounded); returns the exit code (AssertionError if it did not exit)."""
        for ch in self._channels:
            ch.close()
        self._channels.clear()
        if self.proc.poll() is None:
            self.proc.send_signal(_signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
                raise AssertionError(f"agent did not exit within {timeout}s of SIGTERM:\n{self.stderr_tail()}")
        return self.proc.returncode

    def close(self) -> None:
        for ch in self._channels:
            ch.close()
        self._channels.clear()
        stop_process(self.proc, _signal.SIGTERM, timeout=5)
        shutil.rmtree(self.links, ignore_errors=True)


def agent_env(istiod_addr: str, ca_addr: str | None = None, **extra: str) -> dict:
    """The waypoint pod's environment for an agent talking to istiod-lite at `istiod_addr`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ISTIO_", "CA_", "XDS_", "SECRET_", "PILOT_"))}
    env.pop("RUST_LOG", None)
    env.pop("PROXY_CONFIG", None)
    env.update(
        POD_NAME="waypoint-1",
        POD_NAMESPACE="default",
        SERVICE_ACCOUNT="waypoint",
        INSTANCE_IP="127.0.0.1",
        CA_ADDR=ca_addr or istiod_addr,
        PROXY_CONFIG=json.dumps({"discoveryAddress": istiod_addr}),
        DISABLE_ENVOY="true",
    )
    env.update(extra)
    return env


@pytest.fixture
def start_agent(agent_bin, tmp_path):
    """`start_agent(env, token=..., root_pem=..., name=...)` -> AgentPod (not yet waited for);
    every agent is stopped at teardown."""
    pods: list[AgentPod] = []

    def _start(env: dict, *, token: str | None, root_pem: bytes | None, name: str = "pod",
               args: tuple = ("proxy", "waypoint", "--log_output_level", "default:info,ca:debug")) -> AgentPod:
        root = tmp_path / name
        (root / "var/run/secrets/tokens").mkdir(parents=True)
        (root / "var/run/secrets/istio").mkdir(parents=True)
        if token is not None:
            (root / "var/run/secrets/tokens/istio-token").write_text(token + "\n")
        if root_pem is not None:
            (root / "var/run/secrets/istio/root-cert.pem").write_bytes(root_pem)
        links = Path(tempfile.mkdtemp(prefix="agent-", dir="/tmp" if os.path.isdir("/tmp") else None))
        stderr_path = tmp_path / f"{name}.agent.stderr.log"
        with open(stderr_path, "w") as err_f:
            proc = subprocess.Popen(
                [str(agent_bin), *args],
                cwd=root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=err_f,
                stderr=subprocess.STDOUT,
            )
        pod = AgentPod(proc, root, stderr_path, links)
        pods.append(pod)
        return pod

    yield _start
    for pod in pods:
        pod.close()


class StatusBidiStream(BidiStream):
    """A BidiStream that can also wait for the stream's final status."""

    def recv_status(self, timeout: float = 10.0) -> tuple[grpc.RpcError | None, list]:
        """Waits for the stream to end: returns (the RpcError or None for a clean end, the
        responses that arrived before it)."""
        before = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the stream did not end within {timeout}s ({len(before)} responses meanwhile)")
            try:
                item = self._responses.get(timeout=remaining)
            except queue.Empty:
                continue
            if item is self._END:
                self._responses.put(self._END)
                return None, before
            if isinstance(item, grpc.RpcError):
                self._responses.put(self._END)
                return item, before
            before.append(item)


@pytest.fixture
def open_status_stream():
    streams: list[StatusBidiStream] = []

    def _open(method, timeout: float = 120.0) -> StatusBidiStream:
        s = StatusBidiStream(method, timeout=timeout)
        streams.append(s)
        return s

    yield _open
    for s in streams:
        s.close()


# Timings measured by test_agent.py (name, text), listed at the end of the run.
AGENT_TIMINGS: list[tuple[str, str]] = []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if AGENT_TIMINGS:
        terminalreporter.section("agent timings")
        for name, text in AGENT_TIMINGS:
            terminalreporter.write_line(f"{name}: {text}")


# ============================================================================================
# The proxy (Envoy replacement) under test: appended for test_proxy.py.
#
# PROXY_BIN overrides the binary (default target/debug/proxy; build it with `cargo build -p proxy`).
# The agent spawns it (ProxyConfig.binaryPath) in the pod root; its admin API listens on 127.0.0.1
# at a free port (ProxyConfig.proxyAdminPort). The agent's status server is off (statusPort 0) so
# nothing listens beyond loopback and the Unix sockets.

PROXY_DEFAULT_BIN = REPO / "target" / "debug" / "proxy"
PROXY_LIVE_TIMEOUT_S = 30.0


@pytest.fixture(scope="session")
def proxy_bin() -> Path:
    path = Path(os.environ.get("PROXY_BIN") or PROXY_DEFAULT_BIN)
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"proxy binary not found at {path}: build it with `cargo build -p proxy` or set PROXY_BIN",
            pytrace=False,
        )
    return path


def admin_request(port: int, path: str, method: str = "GET", timeout: float = 5.0) -> tuple[int, str]:
    """One request to the proxy's admin API on 127.0.0.1:`port`: (status, body). HTTP errors are
    returned, not raised."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method, data=b"" if method == "POST" else None
    )
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@dataclass
class ProxyPod:
    """An agent that runs the real proxy, with the proxy's admin port."""

    site: Any
    istiod: Istiod
    pod: AgentPod
    admin_port: int
    status_port: int
    prometheus_port: int

    def admin(self, path: str, method: str = "GET") -> tuple[int, str]:
        return admin_request(self.admin_port, path, method)

    def admin_json(self, path: str) -> Any:
        status, body = self.admin(path)
        assert status == 200, f"GET {path}: HTTP {status}: {body[:2000]}"
        return json.loads(body)

    def wait_live(self, timeout: float = PROXY_LIVE_TIMEOUT_S) -> None:
        def live():
            if self.pod.proc.poll() is not None:
                raise AssertionError(f"agent exited (rc={self.pod.proc.returncode}):\n{self.pod.stderr_tail()}")
            try:
                return self.admin("/ready") == (200, "LIVE\n")
            except OSError:
                return False

        wait_until(live, timeout, "the proxy's /ready to say LIVE",
                   detail=lambda: "agent/proxy log tail:\n" + self.pod.stderr_tail())


@pytest.fixture
def proxy_pod(istiod_site, start_agent, proxy_bin):
    """`proxy_pod(**agent_env)` -> ProxyPod: istiod-lite, and an agent that spawns the proxy, LIVE."""
    made: list[ProxyPod] = []

    def _make(**extra_env) -> ProxyPod:
        site = istiod_site()
        istiod = site.start()
        admin_port, status_port, prometheus_port = free_port(), free_port(), free_port()
        env = agent_env(
            istiod.addr,
            DISABLE_ENVOY="false",
            ENVOY_STATUS_PORT=str(status_port),
            ENVOY_PROMETHEUS_PORT=str(prometheus_port),
            **extra_env,
        )
        env["PROXY_CONFIG"] = json.dumps({
            "discoveryAddress": istiod.addr,
            "proxyAdminPort": admin_port,
            "statusPort": 0,
            "binaryPath": str(proxy_bin),
            "drainDuration": "1s",
            "terminationDrainDuration": "1s",
            # Istio's inclusion list keeps only its own prefixes; the tests read per-cluster and
            # SDS stats, so they ask for them as an Istio user would.
            "proxyStatsMatcher": {"inclusionPrefixes": ["cluster.", "sds."]},
        })
        pod = start_agent(env, token=site.tokens["default/waypoint"], root_pem=site.root_pem, name="proxy-pod")
        pod.wait_ready()
        pp = ProxyPod(site, istiod, pod, admin_port, status_port, prometheus_port)
        made.append(pp)
        pp.wait_live()
        return pp

    yield _make
    for pp in made:
        pp.pod.close()
        # The agent stops the proxy on SIGTERM; if the admin port still answers, stop it directly.
        try:
            admin_request(pp.admin_port, "/quitquitquit", "POST", timeout=2.0)
        except OSError:
            pass


@pytest.fixture(scope="session")
def istio_stats_pb(tmp_path_factory):
    """Istio's stats filter config (stats.PluginConfig, proto/protos/istio/stats/config.proto),
    compiled with grpc_tools.protoc so json_format can resolve that @type (it is not in xds-protos)."""
    import grpc_tools
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("stats_proto_py")
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        "istio/stats/config.proto",
    ])
    assert rc == 0, f"protoc failed ({rc}) for istio/stats/config.proto"
    sys.path.insert(0, str(out))
    try:
        importlib.invalidate_caches()
        # The generated module is istio/stats/config_pb2.py (package `stats` inside).
        module = importlib.import_module("istio.stats.config_pb2")
    finally:
        sys.path.remove(str(out))
    return module


# ============================================================================================
# The local mesh around the real waypoint, for traffic tests through HBONE: appended for
# test_grpc_waypoint.py.
#
# MESH_BIN overrides the binary (default target/debug/mesh); it runs the agent and proxy beside it
# (build all three with `cargo build -p agent -p proxy -p waypoint-testbed --bins`). The mesh runs
# with `--serve-json` (addresses as JSON once the waypoint serves HBONE, then no traffic of its
# own) on free ports; its istiod-lite re-reads `<dir>/resources/waypoint.yaml` when it changes,
# which is how a test pushes config.

MESH_DEFAULT_BIN = REPO / "target" / "debug" / "mesh"
MESH_READY_TIMEOUT_S = 180.0
ISTIOD_DEBUG_RE = re.compile(r"istiod-lite\s+(http://\S+)/debug/xds")


@pytest.fixture(scope="session")
def mesh_bin() -> Path:
    path = Path(os.environ.get("MESH_BIN") or MESH_DEFAULT_BIN)
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"mesh binary not found at {path}: build it with "
            "`cargo build -p agent -p proxy -p waypoint-testbed --bins` or set MESH_BIN",
            pytrace=False,
        )
    return path


@dataclass
class MeshRun:
    """A running `mesh --serve-json` and what it wrote."""

    proc: subprocess.Popen
    info: dict
    log_path: Path
    workdir: Path

    @property
    def client_addr(self) -> str:
        """The sleep client's HBONE forwarder (to the waypoint, authority VIP:8000)."""
        return self.info["client_addr"]

    @property
    def pod_ip(self) -> str:
        return self.info["pod_ip"]

    @property
    def resource_file(self) -> Path:
        return Path(self.info["dir"]) / "resources" / "waypoint.yaml"

    @property
    def admin_port(self) -> int:
        return urllib.parse.urlparse(self.info["admin_url"]).port

    def admin(self, path: str) -> tuple[int, str]:
        return admin_request(self.admin_port, path)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(strip_ansi(self.log_path.read_text(errors="replace")).splitlines()[-n:])
        except OSError:
            return "<no log>"

    def proxy_log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(Path(self.info["log"]).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no agent/proxy log>"

    def istiod_debug(self, path: str) -> Any:
        """GET istiod-lite's debug `path` (its address is in the mesh's printed URLs)."""
        found = wait_until(lambda: ISTIOD_DEBUG_RE.search(strip_ansi(self.log_path.read_text(errors="replace"))),
                           10.0, "the mesh to print istiod-lite's debug URL", detail=self.log_tail)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{found.group(1)}{path}", timeout=5) as resp:
            return json.loads(resp.read().decode())

    def resources(self) -> Any:
        """The served resource file as one document (the rendered fixture is YAML, or JSON once a
        test has replaced it)."""
        import yaml

        return yaml.safe_load(self.resource_file.read_text())

    def write_resources(self, doc: Any) -> None:
        """Replaces the resource file atomically (JSON is YAML too), so istiod-lite pushes the
        difference."""
        tmp = self.resource_file.with_suffix(".tmp")  # not *.yaml: the watcher ignores it
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.resource_file)


@pytest.fixture(scope="module")
def waypoint_mesh(mesh_bin, tmp_path_factory):
    """The local mesh (istiod-lite, echo + HBONE sink, the sleep forwarder, agent + proxy), serving
    HBONE; shared by the tests of a module, stopped (SIGTERM, bounded) afterwards."""
    out = tmp_path_factory.mktemp("mesh")
    serve_json = out / "serve.json"
    log_path = out / "mesh.log"
    # Short: the agent's Unix sockets live below it. The mesh empties it first.
    workdir = Path(tempfile.mkdtemp(prefix="wpm-py-", dir="/tmp" if os.path.isdir("/tmp") else None))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                str(mesh_bin),
                "--serve-json", str(serve_json),
                "--workdir", str(workdir),
                "--admin-port", "0",
                "--status-port", "0",
                "--readiness-port", "0",
                "--prometheus-port", "0",
                "--ready-within", "120",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def started():
        if proc.poll() is not None:
            raise AssertionError(f"mesh exited (rc={proc.returncode}) before serving:\n"
                                 f"{strip_ansi(log_path.read_text(errors='replace'))[-6000:]}")
        return serve_json.is_file()

    run = None
    try:
        wait_until(started, MESH_READY_TIMEOUT_S, "the mesh to serve (its --serve-json file)",
                   interval=0.2, detail=lambda: strip_ansi(log_path.read_text(errors="replace"))[-6000:])
        run = MeshRun(proc, json.loads(serve_json.read_text()), log_path, workdir)
        yield run
    finally:
        stop_process(proc, _signal.SIGTERM, timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)
