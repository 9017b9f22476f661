"""gRPC through the real waypoint over HBONE, with Python grpcio on both ends (issue #7 "must hold").

    grpc client ─h2c─▶ forwarder (sleep) ─HBONE─▶ waypoint :15008 ─▶ main_internal ─▶ VIP:8000 route
        (content-type application/grpc) ─▶ cluster inbound-vip|7070|http|httpbin (HTTP/2)
        ─▶ connect_originate ─HBONE─▶ sink POD_IP:15008 ─▶ grpc server POD_IP:<port>

The mesh is the `mesh` binary (`--serve-json`, fixture `waypoint_mesh` in conftest.py). The Python
gRPC server (generic handlers, raw bytes: no .proto to compile) listens on the httpbin pod's IP, and
the test pushes through istiod-lite (by rewriting the resource file it watches) what istiod renders
for a gRPC port 7070 of httpbin (targetPort = the server's port) plus this VirtualService:

    http:
    - name: grpc
      match: [{headers: {content-type: {prefix: application/grpc}}}]
      route: [{destination: {host: httpbin.default.svc.cluster.local, port: {number: 7070}}}]
    - name: default
      route: [{destination: {host: httpbin.default.svc.cluster.local}}]

so gRPC reaches the server through the sleep client's existing forwarder to VIP:8000. Checked:
unary, server streaming, bidi streaming (each reply before the next request), a client deadline
shorter than the server's delay (DEADLINE_EXCEEDED, and the server sees the call cancelled), and
an upstream NOT_FOUND with its message and trailing metadata preserved.

Build first: `cargo build -p agent -p proxy -p waypoint-testbed --bins`.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from concurrent import futures

import grpc
import pytest

from conftest import wait_until

SERVICE = "waypoint.test.Echo"
GRPC_PORT = 7070
HOST = "httpbin.default.svc.cluster.local"
VIP_CLUSTER = f"inbound-vip|8000|http|{HOST}"
GRPC_CLUSTER = f"inbound-vip|{GRPC_PORT}|http|{HOST}"
VS_CONFIG = "/apis/networking.istio.io/v1/namespaces/default/virtual-service/httpbin"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
# Bounds.
PUSH_TIMEOUT_S = 30.0
RPC_TIMEOUT_S = 20.0
CANCEL_SEEN_S = 10.0
STREAM_REPLIES = 50
BIDI_MESSAGES = 20
DEADLINE_S = 0.5
SERVER_DELAY_S = 5.0


# --------------------------------------------------------------------------------------------
# The gRPC server behind the sink


class EchoServicer:
    """Raw-bytes handlers. Unary `b"missing:<x>"` aborts with NOT_FOUND; `b"sleep:<ms>"` waits
    (ending early when the call is cancelled, which is recorded)."""

    def __init__(self):
        self.cancelled: "queue.Queue[bytes]" = queue.Queue()
        self.metadata: "queue.Queue[dict]" = queue.Queue()

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.metadata.put(dict(context.invocation_metadata()))
        if request.startswith(b"missing:"):
            context.set_trailing_metadata((("x-echo-detail", "looked-everywhere"),))
            context.abort(grpc.StatusCode.NOT_FOUND, f"no such thing: {request[8:].decode()}")
        if request.startswith(b"sleep:"):
            ended = threading.Event()
            context.add_callback(ended.set)
            if ended.wait(int(request[6:]) / 1000):
                self.cancelled.put(request)
            return b"slept"
        return b"echo:" + request

    def server_stream(self, request: bytes, context: grpc.ServicerContext):
        for i in range(int(request)):
            yield b"reply-%d:" % i + b"x" * 1024

    def bidi(self, requests, context: grpc.ServicerContext):
        for request in requests:
            yield b"echo:" + request


@pytest.fixture(scope="module")
def grpc_backend(waypoint_mesh):
    """The gRPC server on POD_IP:<free port>; returns (servicer, port)."""
    servicer = EchoServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(servicer.unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(servicer.server_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(servicer.bidi),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port(f"{waypoint_mesh.pod_ip}:0")
    assert port > 0, f"binding {waypoint_mesh.pod_ip}:0"
    server.start()
    try:
        yield servicer, port
    finally:
        server.stop(grace=None).wait(timeout=5)


# --------------------------------------------------------------------------------------------
# The config istiod would push


def named(items: list, key: str, name: str) -> dict:
    for item in items:
        if item.get(key) == name:
            return item
    raise AssertionError(f"no {key}={name!r} in {[i.get(key) for i in items]}")


def grpc_resources(doc: dict, pod_ip: str, port: int) -> dict:
    """`doc` (the served fixture) with httpbin's gRPC port 7070 (targetPort `port`) and the
    VirtualService above, as istiod renders them for the waypoint."""
    doc = copy.deepcopy(doc)
    endpoint_id = f"{pod_ip}:{port}"

    # CDS: the port's cluster; a gRPC port is HTTP/2 upstream (explicit_http_config).
    cluster = copy.deepcopy(named(doc["clusters"], "name", VIP_CLUSTER))
    cluster["name"] = GRPC_CLUSTER
    cluster["alt_stat_name"] = GRPC_CLUSTER + ";"
    cluster["eds_cluster_config"]["service_name"] = GRPC_CLUSTER
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    doc["clusters"].append(cluster)

    # EDS: the pod, tunnelled through connect_originate to POD_IP:<port>.
    endpoints = copy.deepcopy(named(doc["endpoints"], "cluster_name", VIP_CLUSTER))
    endpoints["cluster_name"] = GRPC_CLUSTER
    lb = endpoints["endpoints"][0]["lb_endpoints"][0]
    lb["endpoint"]["address"]["envoy_internal_address"]["endpoint_id"] = endpoint_id
    lb["metadata"]["filter_metadata"]["envoy.filters.listener.original_dst"]["local"] = endpoint_id
    doc["endpoints"].append(endpoints)

    # WDS: the port on the pod's service entry.
    for w in doc["workloads"]:
        svc = w.get("services", {}).get(f"default/{HOST}")
        if svc is not None:
            svc["ports"].append({"service_port": GRPC_PORT, "target_port": port})

    # LDS: the VirtualService on the VIP:8000 chain (translateWaypointRoute).
    listener = named(doc["listeners"], "name", "main_internal")
    chain = named(listener["filter_chains"], "name", VIP_CLUSTER)
    hcm = named(chain["filters"], "name", "envoy.filters.network.http_connection_manager")["typed_config"]
    vhost = hcm["route_config"]["virtual_hosts"][0]
    default = vhost["routes"][0]
    metadata = {"filter_metadata": {"istio": {"config": VS_CONFIG}}}
    grpc_route = copy.deepcopy(default)
    grpc_route["name"] = "grpc"
    grpc_route["match"] = {
        "prefix": "/",
        "headers": [{"name": "content-type", "string_match": {"prefix": "application/grpc"}}],
    }
    grpc_route["metadata"] = metadata
    grpc_route["decorator"] = {"operation": f"{HOST}:{GRPC_PORT}/*"}
    grpc_route["route"]["cluster"] = GRPC_CLUSTER
    catch_all = copy.deepcopy(default)
    catch_all["metadata"] = metadata
    vhost["routes"] = [grpc_route, catch_all]
    return doc


def xds_state(mesh, type_url: str) -> dict:
    """The proxy's live ADS stream's state of `type_url` at istiod-lite."""
    conns = [c for c in mesh.istiod_debug("/debug/xds")["connections"] if c["connected"]]
    conns = [c for c in conns if type_url in c["types"]]
    assert conns, "no live ADS stream at istiod-lite"
    return max(conns, key=lambda c: c["id"])["types"][type_url]


@pytest.fixture(scope="module")
def grpc_target(waypoint_mesh, grpc_backend):
    """Pushes the gRPC config, waits for the proxy's ACKs (a NACK fails), and returns the address
    gRPC clients dial: the sleep forwarder."""
    mesh = waypoint_mesh
    _, port = grpc_backend
    types = (LDS, CDS, EDS)
    before = {t: xds_state(mesh, t) for t in types}
    mesh.write_resources(grpc_resources(mesh.resources(), mesh.pod_ip, port))

    def answered():
        states = {t: xds_state(mesh, t) for t in types}
        for t, s in states.items():
            if s["nacks"] > before[t]["nacks"]:
                raise AssertionError(f"{t} NACKed: {s['last_nack']}")
        # Every type got a new response (the new listener, cluster and endpoints) and ACKed it.
        return all(s["responses"] > before[t]["responses"] and s["acked_version"] == s["sent_version"]
                   for t, s in states.items())

    wait_until(answered, PUSH_TIMEOUT_S, "the proxy to ACK the gRPC port's LDS/CDS/EDS",
               detail=lambda: "agent/proxy log tail:\n" + mesh.proxy_log_tail())
    # The ACK means compiled and swapped; a first call through a fresh HBONE stream proves the
    # data path (bounded retries while, e.g., the endpoint's first connection is set up).
    channel = grpc.insecure_channel(mesh.client_addr, options=[("grpc.enable_http_proxy", 0)])
    try:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        last = []

        def served():
            try:
                return unary(b"probe", timeout=5) == b"echo:probe"
            except grpc.RpcError as err:
                last[:] = [f"{err.code()} {err.details()}"]
                return False

        wait_until(served, PUSH_TIMEOUT_S, "a unary call through the waypoint",
                   interval=0.2, detail=lambda: f"last: {last}\n{mesh.proxy_log_tail()}")
    finally:
        channel.close()
    return mesh.client_addr


@pytest.fixture
def channel(grpc_target):
    ch = grpc.insecure_channel(grpc_target, options=[("grpc.enable_http_proxy", 0)])
    grpc.channel_ready_future(ch).result(timeout=RPC_TIMEOUT_S)
    try:
        yield ch
    finally:
        ch.close()


# --------------------------------------------------------------------------------------------
# The tests


def proxy_stat(mesh, name: str) -> int:
    """A counter of the proxy's /stats (0 when absent)."""
    status, body = mesh.admin("/stats")
    assert status == 200, f"GET /stats: {status}"
    for line in body.splitlines():
        if line.startswith(name + ": "):
            return int(line.split(": ", 1)[1])
    return 0


def test_unary(channel, grpc_backend, waypoint_mesh):
    servicer, _ = grpc_backend
    while not servicer.metadata.empty():
        servicer.metadata.get_nowait()
    routed = f"cluster.{GRPC_CLUSTER};.upstream_rq_total"
    before = proxy_stat(waypoint_mesh, routed)
    unary = channel.unary_unary(f"/{SERVICE}/Unary")
    payload = bytes(range(256)) * 400  # 100 KiB: several DATA frames each way
    reply, call = unary.with_call(payload, timeout=RPC_TIMEOUT_S, metadata=(("x-client", "py"),))
    assert reply == b"echo:" + payload
    assert call.code() == grpc.StatusCode.OK
    seen = servicer.metadata.get(timeout=5)
    assert seen.get("x-client") == "py", seen
    # It went through the waypoint's gRPC cluster, not around it.
    assert proxy_stat(waypoint_mesh, routed) == before + 1, routed


def test_server_streaming(channel):
    stream = channel.unary_stream(f"/{SERVICE}/ServerStream")
    call = stream(str(STREAM_REPLIES).encode(), timeout=RPC_TIMEOUT_S)
    replies = list(call)
    assert len(replies) == STREAM_REPLIES
    for i, r in enumerate(replies):
        assert r.startswith(b"reply-%d:" % i), r[:20]
        assert len(r) == len(b"reply-%d:" % i) + 1024
    assert call.code() == grpc.StatusCode.OK


def test_bidi_streaming_interleaves(channel, open_stream):
    s = open_stream(channel.stream_stream(f"/{SERVICE}/Bidi"), timeout=RPC_TIMEOUT_S * 3)
    # Each reply arrives before the next request is sent: nothing on the path buffers the stream.
    for i in range(BIDI_MESSAGES):
        s.send(b"m%d" % i)
        assert s.recv(timeout=10) == b"echo:m%d" % i


def test_deadline_exceeded_cancels_upstream(channel, grpc_backend):
    servicer, _ = grpc_backend
    while not servicer.cancelled.empty():
        servicer.cancelled.get_nowait()
    unary = channel.unary_unary(f"/{SERVICE}/Unary")
    tag = b"sleep:%d" % int(SERVER_DELAY_S * 1000)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        unary(tag, timeout=DEADLINE_S)
    took = time.monotonic() - started
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (err.value.code(), err.value.details())
    assert took < SERVER_DELAY_S, f"the deadline did not cut the call short ({took:.2f}s)"
    # The cancellation travelled through the waypoint to the server, well before its delay ended.
    try:
        cancelled = servicer.cancelled.get(timeout=CANCEL_SEEN_S)
    except queue.Empty:
        raise AssertionError("the server never saw the call cancelled") from None
    assert cancelled == tag
    assert time.monotonic() - started < SERVER_DELAY_S, "the server saw the end only after its delay"


def test_upstream_status_and_message_preserved(channel):
    unary = channel.unary_unary(f"/{SERVICE}/Unary")
    with pytest.raises(grpc.RpcError) as err:
        unary(b"missing:widget-42", timeout=RPC_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND, (err.value.code(), err.value.details())
    assert err.value.details() == "no such thing: widget-42"
    trailing = dict(err.value.trailing_metadata() or ())
    assert trailing.get("x-echo-detail") == "looked-everywhere", trailing
    # The channel stays usable after an error status.
    assert unary(b"after", timeout=RPC_TIMEOUT_S) == b"echo:after"


def push_and_wait_ack(mesh, doc: dict, type_url: str, what: str) -> None:
    """Serves `doc` and waits for the proxy to ACK a new `type_url` response (a NACK fails)."""
    before = xds_state(mesh, type_url)
    mesh.write_resources(doc)

    def acked():
        s = xds_state(mesh, type_url)
        if s["nacks"] > before["nacks"]:
            raise AssertionError(f"{type_url} NACKed: {s['last_nack']}")
        return s["responses"] > before["responses"] and s["acked_version"] == s["sent_version"]

    wait_until(acked, PUSH_TIMEOUT_S, what, detail=lambda: mesh.proxy_log_tail())


def test_proxy_errors_reach_grpc_clients_as_grpc_statuses(channel, waypoint_mesh):
    """A reply the waypoint makes itself (here: no healthy upstream) reaches a gRPC client as
    Envoy sends it: a trailers-only response with grpc-status UNAVAILABLE and the reason as
    grpc-message — not an HTTP 503 the client can only report as a protocol error. The channel
    was connected before the endpoints went away: an EDS update reaches connections already open
    (a long-lived gRPC connection must not keep using removed endpoints)."""
    mesh = waypoint_mesh
    served = mesh.resources()
    empty = copy.deepcopy(served)
    named(empty["endpoints"], "cluster_name", GRPC_CLUSTER)["endpoints"] = []
    push_and_wait_ack(mesh, empty, EDS, "the proxy to ACK the gRPC cluster without endpoints")
    unary = channel.unary_unary(f"/{SERVICE}/Unary")
    try:
        with pytest.raises(grpc.RpcError) as err:
            unary(b"nowhere", timeout=RPC_TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (err.value.code(), err.value.details())
        assert err.value.details() == "no healthy upstream"
    finally:
        push_and_wait_ack(mesh, served, EDS, "the proxy to ACK the restored endpoints")

    def serves_again():
        try:
            return unary(b"back", timeout=RPC_TIMEOUT_S) == b"echo:back"
        except grpc.RpcError:
            return False

    wait_until(serves_again, PUSH_TIMEOUT_S, "the gRPC port to serve again", interval=0.2)
