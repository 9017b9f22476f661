"""The proxy (Envoy replacement) as real tools see it: the agent spawns it against istiod-lite, and its
admin API is read with xds-protos (every JSON shape parsed into Envoy's admin messages with
`json_format.Parse`, unknown fields refused), `promtool check metrics`, and the `--mode validate`
command line. Fixtures (proxy_pod, istio_stats_pb) live in conftest.py.

Every wait is bounded (polls with deadlines); nothing listens beyond 127.0.0.1 and Unix sockets.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from conftest import WAYPOINT_NODE_ID, wait_until
from envoy.admin.v3 import (
    certs_pb2,
    clusters_pb2,
    config_dump_pb2,
    listeners_pb2,
    server_info_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import json_format, symbol_database

IDENTITY = "spiffe://cluster.local/ns/default/sa/waypoint"
VIP_CLUSTER = "inbound-vip|8000|http|httpbin.default.svc.cluster.local"
REFERENCE_CLUSTERS = {"main_internal", "encap", "connect_originate", VIP_CLUSTER}
REFERENCE_LISTENERS = {"connect_terminate", "main_internal", "connect_originate"}
WAIT_S = 20.0


# --------------------------------------------------------------------------------------------
# helpers


def any_types(doc) -> set[str]:
    """Every `@type` message name in a JSON document."""
    found = set()
    if isinstance(doc, dict):
        t = doc.get("@type")
        if isinstance(t, str):
            found.add(t.rsplit("/", 1)[-1])
        for v in doc.values():
            found |= any_types(v)
    elif isinstance(doc, list):
        for v in doc:
            found |= any_types(v)
    return found


def import_for_type(full_name: str) -> None:
    """Imports every *_pb2 module of the proto package of `full_name` (nested message names are
    tried as packages too), so json_format finds the Any's @type in the default pool."""
    parts = full_name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        package = ".".join(parts[:cut])
        spec = importlib.util.find_spec(parts[0])
        if spec is None or not spec.submodule_search_locations:
            return
        imported = False
        for base in spec.submodule_search_locations:
            folder = Path(base, *parts[1:cut])
            for f in sorted(folder.glob("*_pb2.py")):
                importlib.import_module(f"{package}.{f.stem}")
                imported = True
        if imported:
            return


def parse_all_types(doc) -> None:
    """Imports the modules for every @type in `doc` and asserts each resolves."""
    db = symbol_database.Default()
    missing = []
    for t in sorted(any_types(doc)):
        import_for_type(t)
        try:
            db.GetSymbol(t)
        except KeyError:
            missing.append(t)
    assert not missing, f"@types not resolvable with xds-protos: {missing}"


def parse_dump(text: str) -> config_dump_pb2.ConfigDump:
    doc = json.loads(text)
    parse_all_types(doc)
    return json_format.Parse(text, config_dump_pb2.ConfigDump(), ignore_unknown_fields=False)


def cls_of(full_name: str):
    """The generated class of a message, by full name (after its module was imported)."""
    import_for_type(full_name)
    return symbol_database.Default().GetSymbol(full_name)


def unpack(any_msg, cls):
    msg = cls()
    assert any_msg.Unpack(msg), f"{any_msg.type_url} does not unpack as {cls.DESCRIPTOR.full_name}"
    return msg


def configs_by_type(dump: config_dump_pb2.ConfigDump) -> dict:
    out = {}
    for c in dump.configs:
        name = c.type_url.rsplit("/", 1)[-1]
        assert name not in out, f"{name} twice in the dump"
        out[name] = c
    return out


# --------------------------------------------------------------------------------------------
# /config_dump


def test_config_dump_parses_with_xds_protos(proxy_pod, istio_stats_pb):
    pp = proxy_pod()

    # Secrets arrive over SDS (agent -> proxy) independently of xDS: wait for both to be in the dump.
    def complete():
        status, text = pp.admin("/config_dump?include_eds")
        if status != 200:
            return None
        doc = json.loads(text)
        secrets = [c for c in doc["configs"] if c["@type"].endswith("SecretsConfigDump")]
        active = {s["name"] for s in (secrets[0].get("dynamic_active_secrets", []) if secrets else [])}
        return text if {"default", "ROOTCA"} <= active else None

    text = wait_until(complete, WAIT_S, "default and ROOTCA in the config dump",
                      detail=lambda: pp.pod.stderr_tail())
    assert "PRIVATE KEY" not in text, "a private key is printed in /config_dump"
    dump = parse_dump(text)
    got = configs_by_type(dump)
    assert list(got) == [
        "envoy.admin.v3.BootstrapConfigDump",
        "envoy.admin.v3.ClustersConfigDump",
        "envoy.admin.v3.EndpointsConfigDump",
        "envoy.admin.v3.ListenersConfigDump",
        "envoy.admin.v3.ScopedRoutesConfigDump",
        "envoy.admin.v3.RoutesConfigDump",
        "envoy.admin.v3.SecretsConfigDump",
    ], list(got)

    boot = unpack(got["envoy.admin.v3.BootstrapConfigDump"], cls_of("envoy.admin.v3.BootstrapConfigDump"))
    assert boot.bootstrap.node.id == WAYPOINT_NODE_ID
    assert boot.last_updated.seconds > 0

    clusters = unpack(got["envoy.admin.v3.ClustersConfigDump"], cls_of("envoy.admin.v3.ClustersConfigDump"))
    from envoy.config.cluster.v3 import cluster_pb2

    dynamic = {unpack(c.cluster, cluster_pb2.Cluster).name: c for c in clusters.dynamic_active_clusters}
    assert set(dynamic) == REFERENCE_CLUSTERS, sorted(dynamic)
    for name, c in dynamic.items():
        assert c.version_info and c.last_updated.seconds > 0, name
    statics = {unpack(c.cluster, cluster_pb2.Cluster).name for c in clusters.static_clusters}
    assert {"sds-grpc", "xds-grpc", "agent", "prometheus_stats"} <= statics, statics

    eds = unpack(got["envoy.admin.v3.EndpointsConfigDump"], cls_of("envoy.admin.v3.EndpointsConfigDump"))
    from envoy.config.endpoint.v3 import endpoint_pb2

    cla = [unpack(e.endpoint_config, endpoint_pb2.ClusterLoadAssignment) for e in eds.dynamic_endpoint_configs]
    assert [c.cluster_name for c in cla] == [VIP_CLUSTER]
    assert eds.dynamic_endpoint_configs[0].version_info

    listeners = unpack(got["envoy.admin.v3.ListenersConfigDump"], cls_of("envoy.admin.v3.ListenersConfigDump"))
    dyn = {l.name: l for l in listeners.dynamic_listeners}
    assert set(dyn) == REFERENCE_LISTENERS, sorted(dyn)
    for name, l in dyn.items():
        assert l.active_state.version_info, name
        assert not l.HasField("error_state"), name
    assert len(listeners.static_listeners) == 2

    routes = unpack(got["envoy.admin.v3.RoutesConfigDump"], cls_of("envoy.admin.v3.RoutesConfigDump"))
    from envoy.config.route.v3 import route_pb2

    route_names = {unpack(r.route_config, route_pb2.RouteConfiguration).name for r in routes.static_route_configs}
    assert VIP_CLUSTER in route_names, route_names

    secrets = unpack(got["envoy.admin.v3.SecretsConfigDump"], cls_of("envoy.admin.v3.SecretsConfigDump"))
    by_name = {s.name: s for s in secrets.dynamic_active_secrets}
    assert set(by_name) == {"default", "ROOTCA"}
    default = unpack(by_name["default"].secret, secret_pb2.Secret)
    assert default.tls_certificate.private_key.inline_bytes == b"[redacted]"
    assert b"BEGIN CERTIFICATE" in default.tls_certificate.certificate_chain.inline_bytes
    root = unpack(by_name["ROOTCA"].secret, secret_pb2.Secret)
    assert root.validation_context.trusted_ca.inline_bytes.strip() == pp.site.root_pem.strip()
    assert by_name["default"].version_info and by_name["default"].last_updated.seconds > 0


def test_config_dump_resource_mask_and_name_regex(proxy_pod, istio_stats_pb):
    pp = proxy_pod()
    status, text = pp.admin("/config_dump?resource=dynamic_active_clusters")
    assert status == 200, text
    dump = parse_dump(text)
    assert {c.type_url for c in dump.configs} == {
        "type.googleapis.com/envoy.admin.v3.ClustersConfigDump.DynamicCluster"
    }
    assert len(dump.configs) == len(REFERENCE_CLUSTERS)

    status, text = pp.admin("/config_dump?resource=dynamic_listeners&name_regex=%5Econnect_")
    assert status == 200, text
    dump = parse_dump(text)
    names = sorted(unpack(c, cls_of("envoy.admin.v3.ListenersConfigDump.DynamicListener")).name for c in dump.configs)
    assert names == ["connect_originate", "connect_terminate"]

    status, text = pp.admin("/config_dump?resource=dynamic_active_clusters&mask=version_info")
    assert status == 200, text
    doc = json.loads(text)
    for item in doc["configs"]:
        assert set(item) == {"@type", "version_info"}, item
    parse_dump(text)

    status, text = pp.admin("/config_dump?resource=no_such_field")
    assert status == 404, (status, text)


# --------------------------------------------------------------------------------------------
# other JSON endpoints, parsed into Envoy's admin messages


def test_admin_json_shapes_parse(proxy_pod):
    pp = proxy_pod()
    status, text = pp.admin("/server_info")
    assert status == 200
    info = json_format.Parse(text, server_info_pb2.ServerInfo(), ignore_unknown_fields=False)
    assert info.state == server_info_pb2.ServerInfo.LIVE
    assert info.node.id == WAYPOINT_NODE_ID
    assert info.command_line_options.drain_strategy == server_info_pb2.CommandLineOptions.Immediate

    status, text = pp.admin("/clusters?format=json")
    assert status == 200
    clusters = json_format.Parse(text, clusters_pb2.Clusters(), ignore_unknown_fields=False)
    by_name = {c.name: c for c in clusters.cluster_statuses}
    assert REFERENCE_CLUSTERS <= set(by_name), sorted(by_name)
    vip = by_name[VIP_CLUSTER]
    assert vip.added_via_api and vip.eds_service_name == VIP_CLUSTER
    [host] = vip.host_statuses
    assert host.address.envoy_internal_address.server_listener_name == "connect_originate"
    assert host.address.envoy_internal_address.endpoint_id == "10.244.1.5:8080"
    assert vip.circuit_breakers.thresholds[0].max_connections.value == 4294967295
    assert not by_name["xds-grpc"].added_via_api

    status, text = pp.admin("/listeners?format=json")
    assert status == 200
    listeners = json_format.Parse(text, listeners_pb2.Listeners(), ignore_unknown_fields=False)
    names = {l.name for l in listeners.listener_statuses}
    assert REFERENCE_LISTENERS <= names, names

    def certs():
        status, text = pp.admin("/certs")
        return text if status == 200 and IDENTITY in text else None

    text = wait_until(certs, WAIT_S, "/certs with the workload identity")
    parsed = json_format.Parse(text, certs_pb2.Certificates(), ignore_unknown_fields=False)
    [cert] = parsed.certificates
    [leaf] = cert.cert_chain
    assert [s.uri for s in leaf.subject_alt_names] == [IDENTITY]
    assert leaf.expiration_time.seconds > leaf.valid_from.seconds > 0
    assert leaf.serial_number
    assert cert.ca_cert and cert.ca_cert[0].days_until_expiration > 0

    # Text shapes.
    status, text = pp.admin("/clusters")
    assert f"{VIP_CLUSTER}::envoy://connect_originate/10.244.1.5:8080::health_flags::healthy" in text.splitlines()
    assert f"{VIP_CLUSTER}::eds_service_name::{VIP_CLUSTER}" in text.splitlines()
    status, text = pp.admin("/listeners")
    assert f"connect_terminate::{pp.site.hbone_ip}:15008" in text.splitlines()


def test_admin_methods_drain_and_logging(proxy_pod):
    pp = proxy_pod()
    for path in ("/quitquitquit", "/drain_listeners", "/healthcheck/fail", "/healthcheck/ok"):
        status, body = pp.admin(path)
        assert status == 405, (path, status, body)
    status, body = pp.admin("/logging?level=debug", "POST")
    assert status == 200 and "xds: debug" in body, body
    status, body = pp.admin("/logging?xds=warning", "POST")
    assert status == 200 and "xds: warning" in body, body
    status, body = pp.admin("/logging?level=chatty", "POST")
    assert status == 400, body
    status, body = pp.admin("/logging")
    assert status == 200 and body.startswith("active loggers:\n"), body

    assert pp.admin("/healthcheck/fail", "POST")[0] == 200
    assert pp.admin("/ready") == (200, "LIVE\n")
    assert pp.admin("/drain_listeners?graceful", "POST") == (200, "OK\n")
    assert pp.admin("/ready") == (503, "DRAINING\n")
    status, stats = pp.admin("/stats?filter=%5Eserver%5C.(state%7Clive)%24")
    assert "server.state: 1" in stats.splitlines() and "server.live: 0" in stats.splitlines(), stats


# --------------------------------------------------------------------------------------------
# /stats and /stats/prometheus


# promtool's lint findings that follow from Envoy's own metric names, which we keep on purpose
# (dashboards and pilot-agent read them): Envoy counters carry no `_total` suffix, and one Envoy
# gauge counts days. Anything else (and every parse error) fails the test.
ENVOY_NAMING_LINT = [
    re.compile(r'^envoy_\w+ counter metrics should have "_total" suffix$'),
    re.compile(r'^envoy_server_days_until_first_cert_expiring use base unit "seconds" instead of "days"$'),
    # Istio's standard metric name (Kiali and the Grafana dashboards query it).
    re.compile(r'^istio_request_duration_milliseconds use base unit "seconds" instead of "milliseconds"$'),
    # Envoy's cluster.<name>.membership_total is a gauge.
    re.compile(r'^envoy_cluster_membership_total non-counter metrics should not have "_total" suffix$'),
]


def check_exposition(text: str) -> dict[str, str]:
    """Structural checks of the text format: one TYPE line per family, before and next to its
    samples, `envoy_` names. Returns family -> type."""
    types: dict[str, str] = {}
    current = None
    seen_samples: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types, f"second TYPE line for {name}"
            types[name] = kind
            current = name
            continue
        if line.startswith("#") or not line:
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$", line)
        assert m, f"bad sample line {line!r}"
        name = m.group(1)
        family = re.sub(r"_(bucket|sum|count)$", "", name) if types.get(current) == "histogram" else name
        assert family == current, f"sample {name} outside its family block ({current})"
        # Envoy's stats, and Istio's standard metrics (istio_build even before any traffic).
        assert name.startswith(("envoy_", "istio_")), name
        name = family
        float(m.group(3))
        seen_samples.add(name)
    assert set(types) == seen_samples, set(types) ^ seen_samples
    return types


def run_promtool(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    findings = [l for l in (out.stdout + out.stderr).splitlines() if l.strip()]
    assert out.returncode in (0, 3), f"promtool failed (rc={out.returncode}): {findings}"
    unexpected = [f for f in findings if not any(rx.match(f) for rx in ENVOY_NAMING_LINT)]
    assert not unexpected, f"promtool findings beyond Envoy's naming: {unexpected}\n{text[:3000]}"


def test_prometheus_exposition_passes_promtool(proxy_pod):
    pp = proxy_pod()
    wait_until(lambda: "sds.default.update_success" in pp.admin("/stats")[1], WAIT_S, "SDS stats")
    status, text = pp.admin("/stats/prometheus")
    assert status == 200
    types = check_exposition(text)
    assert types["envoy_cluster_manager_cds_update_success"] == "counter"
    assert types["envoy_server_live"] == "gauge"
    assert types["envoy_server_memory_allocated"] == "gauge"
    # Tag extraction: cluster.<name>.<stat> -> envoy_cluster_<stat>{cluster_name="<name>"}.
    assert f'envoy_cluster_update_success{{cluster_name="{VIP_CLUSTER}"}} 1' in text.splitlines(), text
    assert types["istio_build"] == "gauge"
    run_promtool(text)
    # The reference client library reads it too.
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["istio_build"].samples[0].labels["component"] == "proxy"
    # prometheus_client strips a counter's `_total`; Envoy's counters have none to strip.
    assert families["envoy_cluster_manager_cds_update_success"].type == "counter"

    status, filtered = pp.admin("/stats/prometheus?usedonly&filter=%5Eserver%5C.")
    assert status == 200
    check_exposition(filtered)
    assert all(l.split("{")[0].startswith("envoy_server_") for l in filtered.splitlines() if not l.startswith("#"))
    assert pp.admin("/stats?format=prometheus")[1].count("# TYPE") == text.count("# TYPE")


def test_stats_text_json_and_filters(proxy_pod):
    pp = proxy_pod()
    status, text = pp.admin(
        "/stats?usedonly&filter=%5E(cluster_manager%5C.cds%7Clistener_manager%5C.lds)%5C.(update_success%7Cupdate_rejected)%24"
    )
    assert status == 200
    values = dict(l.split(": ") for l in text.splitlines())
    assert set(values) <= {
        "cluster_manager.cds.update_success", "cluster_manager.cds.update_rejected",
        "listener_manager.lds.update_success", "listener_manager.lds.update_rejected",
    }, values
    assert int(values["cluster_manager.cds.update_success"]) >= 1
    assert int(values["listener_manager.lds.update_success"]) >= 1
    status, text = pp.admin("/stats?format=json&filter=%5Eserver%5C.")
    doc = json.loads(text)
    names = {s["name"]: s["value"] for s in doc["stats"]}
    for n in ("server.uptime", "server.live", "server.memory_allocated", "server.concurrency", "server.state"):
        assert n in names, names
    assert names["server.live"] == 1 and names["server.state"] == 0
    assert pp.admin("/stats?filter=(")[0] == 400
    status, text = pp.admin("/stats?filter=cluster_manager.active_clusters")
    assert int(text.split(": ")[1]) == 8, text  # 4 static + 4 dynamic


# --------------------------------------------------------------------------------------------
# --mode validate


def test_validate_mode_on_agent_bootstrap(proxy_pod, proxy_bin, tmp_path):
    pp = proxy_pod()
    bootstrap = pp.pod.bootstrap_path
    out = subprocess.run([str(proxy_bin), "--mode", "validate", "-c", str(bootstrap)],
                         cwd=pp.pod.root, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"validate failed (rc={out.returncode}): {out.stdout}{out.stderr}"

    doc = json.loads(bootstrap.read_text())
    doc["admin"]["address"]["socket_address"]["adress"] = doc["admin"]["address"]["socket_address"].pop("address")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(doc))
    out = subprocess.run([str(proxy_bin), "--mode", "validate", "-c", str(broken)],
                         cwd=pp.pod.root, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1, f"broken bootstrap accepted (rc={out.returncode}): {out.stdout}{out.stderr}"
    assert "admin.address.socket_address.adress" in out.stdout + out.stderr, out.stdout + out.stderr


# --------------------------------------------------------------------------------------------
# SDS rotation


def test_sds_rotation_reaches_certs_and_stats(proxy_pod):
    """With a 10 s certificate the agent rotates at ~5 s and pushes on the open SDS stream; the proxy
    accepts the new version (ACK), /certs shows the new serial and sds.default.update_success grows."""
    pp = proxy_pod(SECRET_TTL="10s")

    def serial():
        status, text = pp.admin("/certs")
        if status != 200 or IDENTITY not in text:
            return None
        return json.loads(text)["certificates"][0]["cert_chain"][0]["serial_number"]

    first = wait_until(serial, WAIT_S, "the first certificate in /certs")
    started = time.monotonic()
    second = wait_until(lambda: (s := serial()) and s != first and s, 20.0, "a rotated certificate in /certs",
                        detail=lambda: pp.pod.stderr_tail())
    assert second != first
    status, stats = pp.admin("/stats?filter=%5Esds%5C.default%5C.update_(success%7Crejected)%24")
    values = dict(l.split(": ") for l in stats.splitlines())
    assert int(values["sds.default.update_success"]) >= 2, values
    assert int(values.get("sds.default.update_rejected", "0")) == 0, values
    doc = pp.admin_json("/config_dump?resource=dynamic_active_secrets&name_regex=%5Edefault%24")
    [secret] = doc["configs"]
    assert secret["secret"]["tls_certificate"]["private_key"]["inline_bytes"] == "W3JlZGFjdGVkXQ=="  # "[redacted]"
    print(f"[timing] rotation seen in /certs {time.monotonic() - started:.2f}s after the first certificate")
