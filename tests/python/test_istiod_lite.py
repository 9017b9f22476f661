"""istiod-lite against real clients: Python grpcio speaking delta/SotW ADS (messages from the
xds-protos package) and the Istio CA API (ca.proto compiled at session start), with certificates
checked by `cryptography`. Fixtures live in conftest.py.
"""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtensionOID
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

NODE_ID = "waypoint~127.0.0.1~waypoint-abc.default~default.svc.cluster.local"

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"

VIP_CLUSTER = "inbound-vip|8000|http|httpbin.default.svc.cluster.local"
REFERENCE_CLUSTERS = {"main_internal", "encap", "connect_originate", VIP_CLUSTER}
REFERENCE_LISTENERS = {"connect_terminate", "main_internal", "connect_originate"}

MESSAGE_OF = {
    CDS: cluster_pb2.Cluster,
    EDS: endpoint_pb2.ClusterLoadAssignment,
    LDS: listener_pb2.Listener,
}

STREAM_WAIT_S = 10.0


# --------------------------------------------------------------------------------------------
# helpers


def node() -> base_pb2.Node:
    return base_pb2.Node(id=NODE_ID, cluster="waypoint.default")


def resource_name(type_url: str, msg) -> str:
    return msg.cluster_name if type_url == EDS else msg.name


def decode_delta(resp: discovery_pb2.DeltaDiscoveryResponse) -> dict:
    """name -> decoded message, checking every Any's type and that the names agree."""
    cls = MESSAGE_OF[resp.type_url]
    out = {}
    for r in resp.resources:
        assert r.resource.type_url == resp.type_url, (r.name, r.resource.type_url)
        msg = cls()
        assert r.resource.Unpack(msg), f"{r.name}: Any does not unpack as {cls.DESCRIPTOR.full_name}"
        assert resource_name(resp.type_url, msg) == r.name, (r.name, msg)
        assert r.version, f"{r.name}: empty resource version"
        assert r.name not in out, f"{r.name} sent twice in one response"
        out[r.name] = msg
    return out


def delta_ack(resp) -> discovery_pb2.DeltaDiscoveryRequest:
    return discovery_pb2.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce)


def recv_delta(stream, type_url: str, timeout: float = STREAM_WAIT_S):
    resp = stream.recv(timeout=timeout)
    assert resp.type_url == type_url, f"expected a {type_url} response, got {resp.type_url}: {resp}"
    assert resp.nonce, "response without a nonce"
    assert resp.system_version_info, "response without system_version_info"
    return resp


def delta_conn(doc: dict, stream_kind: str = "delta"):
    """The open connection of our node in a /debug/xds document."""
    conns = [
        c
        for c in doc["connections"]
        if c["node_id"] == NODE_ID and c["stream"] == stream_kind and c["connected"]
    ]
    assert len(conns) <= 1, f"several open {stream_kind} connections for {NODE_ID}: {conns}"
    return conns[0] if conns else None


def drop_yaml_list_item(text: str, first_line: str) -> str:
    """Removes the top-level list item starting with `first_line` (up to the next item or key)."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith(first_line)]
    assert len(starts) == 1, f"{first_line!r} found {len(starts)} times"
    start = starts[0]
    end = start + 1
    while end < len(lines) and not (lines[end].startswith("- ") or lines[end][:1].isalpha()):
        end += 1
    return "".join(lines[:start] + lines[end:])


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} found {text.count(old)} times"
    return text.replace(old, new)


def load_pem_chain(chain: list[str]) -> list[x509.Certificate]:
    certs = []
    for i, pem in enumerate(chain):
        loaded = x509.load_pem_x509_certificates(pem.encode())
        assert len(loaded) == 1, f"chain element {i} holds {len(loaded)} certificates"
        certs.append(loaded[0])
    return certs


def verify_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    """Issuer name match + the issuer's key verifies the signature over tbs_certificate_bytes."""
    assert cert.issuer == issuer.subject, f"issuer {cert.issuer} != {issuer.subject}"
    key = issuer.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    elif isinstance(key, rsa.RSAPublicKey):
        key.verify(
            cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm
        )
    elif isinstance(key, ed25519.Ed25519PublicKey):
        key.verify(cert.signature, cert.tbs_certificate_bytes)
    else:  # pragma: no cover - istiod-lite's CA uses ECDSA
        raise AssertionError(f"unexpected issuer key type {type(key)}")
    # And cryptography's own check of the same thing.
    cert.verify_directly_issued_by(issuer)


def uri_sans(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    return ext.value.get_values_for_type(x509.UniformResourceIdentifier)


def make_csr(uri: str) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def cert_request(ca_pb2, csr_pem: str, validity_s: int = 3600):
    metadata = struct_pb2.Struct()
    metadata.update({"CertSigner": ""})
    return ca_pb2.IstioCertificateRequest(csr=csr_pem, validity_duration=validity_s, metadata=metadata)


# --------------------------------------------------------------------------------------------
# 1. delta ADS over the reference resources, then file edits pushed incrementally


def test_delta_ads_reference_resources(istiod, open_stream):
    ads = ads_pb2_grpc.AggregatedDiscoveryServiceStub(istiod.channel())
    stream = open_stream(ads.DeltaAggregatedResources)

    # CDS, wildcard (empty resource_names_subscribe on the first request of the type).
    stream.send(discovery_pb2.DeltaDiscoveryRequest(node=node(), type_url=CDS))
    cds = recv_delta(stream, CDS)
    clusters = decode_delta(cds)
    assert set(clusters) == REFERENCE_CLUSTERS
    assert list(cds.removed_resources) == []
    vip = clusters[VIP_CLUSTER]
    assert vip.type == cluster_pb2.Cluster.EDS
    assert vip.eds_cluster_config.service_name == VIP_CLUSTER
    assert vip.connect_timeout.seconds == 10
    assert vip.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    assert clusters["connect_originate"].type == cluster_pb2.Cluster.ORIGINAL_DST
    cds_versions = {r.name: r.version for r in cds.resources}
    stream.send(delta_ack(cds))

    # EDS by name.
    stream.send(discovery_pb2.DeltaDiscoveryRequest(type_url=EDS, resource_names_subscribe=[VIP_CLUSTER]))
    eds = recv_delta(stream, EDS)
    cla = decode_delta(eds)
    assert set(cla) == {VIP_CLUSTER}
    lb = [e for group in cla[VIP_CLUSTER].endpoints for e in group.lb_endpoints]
    assert len(lb) == 1
    internal = lb[0].endpoint.address.envoy_internal_address
    assert internal.server_listener_name == "connect_originate"
    assert internal.endpoint_id == "10.244.1.5:8080"
    stream.send(delta_ack(eds))

    # LDS, wildcard.
    stream.send(discovery_pb2.DeltaDiscoveryRequest(type_url=LDS))
    lds = recv_delta(stream, LDS)
    listeners = decode_delta(lds)
    assert set(listeners) == REFERENCE_LISTENERS
    assert listeners["connect_terminate"].address.socket_address.port_value == 15008
    assert listeners["main_internal"].HasField("internal_listener")
    stream.send(delta_ack(lds))

    # istiod-lite recorded one ACK per type and no NACK.
    def acked(doc):
        conn = delta_conn(doc)
        if not conn:
            return None
        types = conn["types"]
        if all(types.get(t, {}).get("acks", 0) >= 1 for t in (CDS, EDS, LDS)):
            return conn
        return None

    conn = istiod.wait_debug("/debug/xds", acked, what="ACKs of CDS, EDS and LDS")
    for t, resp in ((CDS, cds), (EDS, eds), (LDS, lds)):
        st = conn["types"][t]
        assert st["acks"] == 1, (t, st)
        assert st["nacks"] == 0, (t, st)
        assert st["last_nack"] is None, (t, st)
        assert st["responses"] == 1, (t, st)
        assert st["sent_nonce"] == resp.nonce, (t, st)
        assert st["acked_version"] == resp.system_version_info, (t, st)
    assert conn["types"][CDS]["wildcard"] is True
    assert conn["types"][LDS]["wildcard"] is True
    assert conn["types"][EDS]["wildcard"] is False
    assert conn["types"][EDS]["subscribed"] == [VIP_CLUSTER]

    original = istiod.resource_file.read_text()

    # Edit one cluster: only that cluster is pushed.
    edited = replace_once(
        original, "  connect_timeout: 10s\n  lb_policy: LEAST_REQUEST\n", "  connect_timeout: 7s\n  lb_policy: LEAST_REQUEST\n"
    )
    istiod.write_resources(edited)
    push = recv_delta(stream, CDS)
    changed = decode_delta(push)
    assert set(changed) == {VIP_CLUSTER}, f"expected only {VIP_CLUSTER}, got {sorted(changed)}"
    assert list(push.removed_resources) == []
    assert changed[VIP_CLUSTER].connect_timeout.seconds == 7
    assert push.resources[0].version != cds_versions[VIP_CLUSTER]
    assert push.system_version_info != cds.system_version_info
    stream.send(delta_ack(push))

    # Add a cluster: only the new one is pushed.
    added = replace_once(
        edited,
        "\nendpoints:",
        "\n- {name: extra, type: STATIC, connect_timeout: 1s}\n\nendpoints:",
    )
    istiod.write_resources(added)
    push = recv_delta(stream, CDS)
    assert set(decode_delta(push)) == {"extra"}
    assert list(push.removed_resources) == []
    stream.send(delta_ack(push))

    # Delete a cluster: it arrives in removed_resources, nothing else is pushed.
    removed = drop_yaml_list_item(added, "- name: encap ")
    assert "name: encap" not in removed.split("\nendpoints:")[0].split("\nclusters:")[1]
    istiod.write_resources(removed)
    push = recv_delta(stream, CDS)
    assert list(push.removed_resources) == ["encap"]
    assert len(push.resources) == 0, [r.name for r in push.resources]
    stream.send(delta_ack(push))

    def removal_acked(doc):
        conn = delta_conn(doc)
        st = conn and conn["types"].get(CDS)
        return st if st and st["acks"] >= 4 else None

    st = istiod.wait_debug("/debug/xds", removal_acked, what="ACK of the removal")
    assert st["last_removed"] == ["encap"]
    assert st["nacks"] == 0 and st["last_nack"] is None
    assert st["acked_version"] == push.system_version_info
    doc = istiod.debug_get("/debug/xds")
    assert doc["load_error"] is None
    # EDS and LDS did not change, so nothing else was sent.
    conn = delta_conn(doc)
    assert conn["types"][EDS]["responses"] == 1
    assert conn["types"][LDS]["responses"] == 1
    stream.assert_quiet(0.5)


# --------------------------------------------------------------------------------------------
# 2. NACKs are recorded


def test_delta_nack_is_recorded(istiod, open_stream):
    ads = ads_pb2_grpc.AggregatedDiscoveryServiceStub(istiod.channel())
    stream = open_stream(ads.DeltaAggregatedResources)
    stream.send(discovery_pb2.DeltaDiscoveryRequest(node=node(), type_url=CDS, resource_names_subscribe=["*"]))
    cds = recv_delta(stream, CDS)
    assert set(decode_delta(cds)) == REFERENCE_CLUSTERS

    stream.send(
        discovery_pb2.DeltaDiscoveryRequest(
            type_url=CDS,
            response_nonce=cds.nonce,
            error_detail=status_pb2.Status(code=3, message="test nack"),
        )
    )

    def nacked(doc):
        conn = delta_conn(doc)
        st = conn and conn["types"].get(CDS)
        return st if st and st["last_nack"] else None

    st = istiod.wait_debug("/debug/xds", nacked, what="the NACK")
    assert st["nacks"] == 1
    assert st["acks"] == 0
    assert st["acked_version"] is None
    assert st["last_nack"] == {
        "version": cds.system_version_info,
        "nonce": cds.nonce,
        "code": 3,
        "message": "test nack",
    }
    # A NACK of unchanged resources triggers no resend.
    stream.assert_quiet(0.5)


# --------------------------------------------------------------------------------------------
# 3. CreateCertificate with a real CSR


def test_create_certificate_real_csr(istiod, ca_pb):
    ca_pb2, ca_pb2_grpc = ca_pb
    stub = ca_pb2_grpc.IstioCertificateServiceStub(istiod.channel())
    key, csr_pem = make_csr("spiffe://cluster.local/ns/default/sa/whatever")
    before = dt.datetime.now(dt.timezone.utc)
    resp = stub.CreateCertificate(
        cert_request(ca_pb2, csr_pem, 3600),
        metadata=[
            ("authorization", f"Bearer {istiod.tokens['default/sleep']}"),
            ("clusterid", "Kubernetes"),  # "ClusterID" on the wire (HTTP/2 header names are lower case)
        ],
        timeout=10,
    )
    chain = list(resp.cert_chain)
    assert len(chain) >= 2, chain
    certs = load_pem_chain(chain)
    leaf, root = certs[0], certs[-1]

    # The identity comes from the token (sa "sleep"), not from the CSR (sa "whatever").
    assert uri_sans(leaf) == ["spiffe://cluster.local/ns/default/sa/sleep"]
    # The leaf certifies the CSR's key.
    assert leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        is_ca = leaf.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    assert not is_ca, "leaf must not be a CA"

    # The chain's last element is root-cert.pem, and every link verifies up to it.
    root_file = x509.load_pem_x509_certificate(istiod.root_pem)
    assert root.public_bytes(serialization.Encoding.DER) == root_file.public_bytes(serialization.Encoding.DER)
    assert chain[-1].strip() == istiod.root_pem.decode().strip()
    for child, parent in zip(certs, certs[1:]):
        verify_signed_by(child, parent)
    verify_signed_by(leaf, certs[1])
    verify_signed_by(root, root_file)  # self-signed root

    # Validity ~ the requested 3600 s, starting now.
    lifetime = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
    assert abs(lifetime - 3600) <= 60, lifetime
    assert abs((leaf.not_valid_before_utc - before).total_seconds()) <= 120, leaf.not_valid_before_utc

    # /debug/certs recorded it with the ClusterID header.
    def issued(doc):
        hits = [c for c in doc["issued"] if int(c["serial"], 16) == leaf.serial_number]
        return hits[0] if hits else None

    rec = istiod.wait_debug("/debug/certs", issued, timeout=5, what="the issued certificate")
    assert rec["identity"] == "spiffe://cluster.local/ns/default/sa/sleep"
    assert rec["cluster_id"] == "Kubernetes"
    assert rec["not_after"] - rec["not_before"] == pytest.approx(3600, abs=60)


# --------------------------------------------------------------------------------------------
# 4. CreateCertificate refuses bad callers and bad CSRs


def test_create_certificate_rejects_bad_token(istiod, ca_pb, token_cli):
    ca_pb2, ca_pb2_grpc = ca_pb
    stub = ca_pb2_grpc.IstioCertificateServiceStub(istiod.channel())
    _, csr_pem = make_csr("spiffe://cluster.local/ns/default/sa/sleep")
    good_token = istiod.tokens["default/sleep"]
    # Well-formed (minted by istiod-lite itself) but not in the token file.
    unlisted = token_cli.mint("default", "intruder")

    cases = {
        "no authorization header": [],
        "made-up token": [("authorization", "Bearer made-up-token")],
        "JWT-shaped token not in the token file": [("authorization", f"Bearer {unlisted}")],
        "token without the Bearer prefix": [("authorization", good_token)],
    }
    for what, metadata in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateCertificate(cert_request(ca_pb2, csr_pem), metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (what, err.value.code(), err.value.details())

    for what, csr in {
        "garbage CSR": "not a csr",
        "empty CSR": "",
        "corrupted CSR": csr_pem.replace(csr_pem.splitlines()[3], "A" * len(csr_pem.splitlines()[3])),
    }.items():
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateCertificate(
                cert_request(ca_pb2, csr),
                metadata=[("authorization", f"Bearer {good_token}")],
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, err.value.code(), err.value.details())

    # Nothing was issued.
    assert istiod.debug_get("/debug/certs")["issued"] == []


# --------------------------------------------------------------------------------------------
# 5. State-of-the-world ADS


def test_sotw_ads(istiod, open_stream):
    ads = ads_pb2_grpc.AggregatedDiscoveryServiceStub(istiod.channel())
    stream = open_stream(ads.StreamAggregatedResources)
    stream.send(discovery_pb2.DiscoveryRequest(node=node(), type_url=CDS))
    resp = stream.recv(timeout=STREAM_WAIT_S)
    assert resp.type_url == CDS
    assert resp.version_info, "no version_info"
    assert resp.nonce, "no nonce"
    names = set()
    for any_ in resp.resources:
        assert any_.type_url == CDS
        c = cluster_pb2.Cluster()
        assert any_.Unpack(c)
        names.add(c.name)
    assert len(resp.resources) == 4
    assert names == REFERENCE_CLUSTERS

    stream.send(
        discovery_pb2.DiscoveryRequest(
            node=node(), type_url=CDS, version_info=resp.version_info, response_nonce=resp.nonce
        )
    )

    def acked(doc):
        conn = delta_conn(doc, "sotw")
        st = conn and conn["types"].get(CDS)
        return st if st and st["acks"] >= 1 else None

    st = istiod.wait_debug("/debug/xds", acked, what="the SotW ACK")
    assert st["acks"] == 1
    assert st["nacks"] == 0 and st["last_nack"] is None
    assert st["acked_version"] == resp.version_info
    assert st["sent_version"] == resp.version_info
    assert st["sent_nonce"] == resp.nonce
    assert st["wildcard"] is True
    assert st["responses"] == 1
    # An ACK of the current version is not answered.
    stream.assert_quiet(0.5)


# --------------------------------------------------------------------------------------------
# 6. The documented token CLI


def test_token_subcommand_needs_no_ca_dir(token_cli):
    out = token_cli.run("default", "sleep")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().count(".") == 2, out.stdout
