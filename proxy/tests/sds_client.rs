//! The proxy's SDS client against a scripted SDS server on a Unix socket (as the agent's): one
//! SotW stream per secret with the node on the first request, ACK with the accepted version, NACK
//! naming the bad field while the last good secret stays, reconnect after the server drops the
//! stream (declaring the version it holds), and what `/certs`, `/stats` and `/config_dump` show.

mod common;

use common::{
    KEY, Proxy, next_request, next_stream, root_secret as root, sds_cluster, sds_server,
    secret_response as response, temp_dir, tls_secret as tls, wait_body,
};
use tonic::Status;
use waypoint_proto::resource::SECRET_TYPE;

async fn http(port: u16, path: &str) -> (u16, String) {
    common::http(port, "GET", path).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_nack_reconnect_and_admin_views() {
    let dir = temp_dir("sds-client");
    let (server, mut opened_rx) = sds_server(&dir.join("sds.sock"));
    let admin_port = common::free_port();
    let bootstrap = serde_json::json!({
        "node": {"id": "waypoint~127.0.0.1~t.default~default.svc.cluster.local", "cluster": "t.default"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"clusters": [sds_cluster()]}
    });
    let _proxy = Proxy::start(&dir, &bootstrap);

    // Two streams, one per secret, node on the first request, no version yet.
    let mut streams = Vec::new();
    for _ in 0..2 {
        streams.push(next_stream(&mut opened_rx).await);
    }
    streams.sort_by(|a, b| a.1.resource_names.cmp(&b.1.resource_names));
    let [(mut rootca, first_root), (mut default, first_default)] =
        <[_; 2]>::try_from(streams).unwrap_or_else(|_| panic!("two streams"));
    assert_eq!(first_root.resource_names, ["ROOTCA"]);
    assert_eq!(first_default.resource_names, ["default"]);
    for first in [&first_root, &first_default] {
        assert_eq!(first.type_url, SECRET_TYPE);
        assert_eq!(
            first.node.as_ref().map(|n| n.id.as_str()),
            Some("waypoint~127.0.0.1~t.default~default.svc.cluster.local")
        );
        assert!(first.version_info.is_empty() && first.response_nonce.is_empty());
    }

    // ACKs.
    rootca
        .responses
        .send(Ok(response("r1", "n-r1", root())))
        .await
        .expect("send");
    let ack = next_request(&mut rootca).await;
    assert_eq!(
        (ack.version_info.as_str(), ack.response_nonce.as_str()),
        ("r1", "n-r1")
    );
    assert!(ack.error_detail.is_none() && ack.node.is_none());
    default
        .responses
        .send(Ok(response("v1", "n1", tls(KEY))))
        .await
        .expect("send");
    let ack = next_request(&mut default).await;
    assert_eq!(
        (ack.version_info.as_str(), ack.response_nonce.as_str()),
        ("v1", "n1")
    );
    assert!(ack.error_detail.is_none());

    let certs = wait_body(admin_port, "/certs", "the certificate in /certs", |b| {
        b.contains("spiffe://cluster.local/ns/test/sa/unit")
    })
    .await;
    let certs: serde_json::Value = serde_json::from_str(&certs).expect("json");
    assert_eq!(certs["certificates"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        certs["certificates"][0]["ca_cert"][0]["path"], "<inline>",
        "{certs}"
    );

    // A bad key: NACK naming the field, version stays v1, the good secret stays.
    default
        .responses
        .send(Ok(response("v2", "n2", tls("not a key"))))
        .await
        .expect("send");
    let nack = next_request(&mut default).await;
    assert_eq!(nack.version_info, "v1");
    assert_eq!(nack.response_nonce, "n2");
    let detail = nack.error_detail.expect("NACK");
    assert!(
        detail.message.contains("Secret 'default'")
            && detail.message.contains("tls_certificate.private_key"),
        "{}",
        detail.message
    );
    let dump = wait_body(
        admin_port,
        "/config_dump?resource=dynamic_active_secrets",
        "the NACK in the dump",
        |b| b.contains("error_state"),
    )
    .await;
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("json");
    let default_entry = dump["configs"]
        .as_array()
        .and_then(|c| c.iter().find(|s| s["name"] == "default"))
        .expect("default secret");
    assert_eq!(default_entry["version_info"], "v1");
    assert_eq!(default_entry["client_status"], "NACKED");
    assert!(
        default_entry["error_state"]["details"]
            .as_str()
            .is_some_and(|d| d.contains("tls_certificate.private_key")),
        "{default_entry}"
    );
    assert_eq!(
        default_entry["secret"]["tls_certificate"]["private_key"]["inline_bytes"],
        "W3JlZGFjdGVkXQ==",
        "the accepted secret stays, redacted"
    );
    let (_, stats) = http(admin_port, "/stats?filter=%5Esds%5C.default%5C.update_").await;
    assert!(stats.contains("sds.default.update_success: 1\n"), "{stats}");
    assert!(
        stats.contains("sds.default.update_rejected: 1\n"),
        "{stats}"
    );

    // The server drops the stream: the proxy reconnects and declares the version it holds.
    let _ = default
        .responses
        .send(Err(Status::unavailable("going away")))
        .await;
    drop(default);
    let (mut again, first) = next_stream(&mut opened_rx).await;
    assert_eq!(first.resource_names, ["default"]);
    assert_eq!(first.version_info, "v1");
    assert!(
        first.node.is_some(),
        "node on the first request of every stream"
    );
    again
        .responses
        .send(Ok(response("v3", "n3", tls(KEY))))
        .await
        .expect("send");
    let ack = next_request(&mut again).await;
    assert_eq!(ack.version_info, "v3");
    assert!(ack.error_detail.is_none());
    wait_body(
        admin_port,
        "/config_dump?resource=dynamic_active_secrets&name_regex=%5Edefault%24",
        "v3 accepted",
        |b| b.contains("\"version_info\": \"v3\"") && !b.contains("error_state"),
    )
    .await;

    drop(rootca);
    server.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
