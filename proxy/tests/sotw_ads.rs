//! The `proxy` binary on state-of-the-world ADS (`ads_config.api_type: GRPC`) against istiod-lite's
//! ADS service (in process, plaintext loopback gRPC):
//!
//! - the snapshot (CDS, EDS by name, LDS, RDS by name) is ACKed and applied: `/config_dump`, traffic;
//! - a listener using `envoy.filters.http.lua` is NACKed naming listener, filter and field, the
//!   others stay applied and the ACKed version stays;
//! - a listener missing from the next LDS response is removed (the response is the complete set),
//!   and its route name unsubscribed; an EDS update is followed;
//! - listener warming on SDS: a listener whose `default` secret has not arrived is warming (listed
//!   under `warming_state`, counted in `listener_manager.total_listeners_warming`, its port refuses
//!   connections, the server not LIVE) and serves TLS once the secret comes; an update naming a
//!   secret that has not arrived warms while the previous version keeps serving; one whose secret
//!   never comes goes active when `initial_fetch_timeout` expires (and its handshakes fail);
//! - a warming listener whose port another socket took meanwhile cannot listen once warm: counted
//!   in `listener_manager.listener_create_failure`, the proxy stays up, the next update binds.
//!
//! Every wait polls a condition with a deadline.

mod common;

use std::net::SocketAddr;

use common::{
    PlainAds, Proxy, WAIT, config_of, distinct_ports, eventually, get_json, http, next_request,
    next_stream, root_secret, sds_cluster, sds_server, secret_response, temp_dir, tls_secret,
};
use serde_json::{Value as Json, json};
use waypoint_proto::resource::{
    CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, ResourceKind,
};
use waypoint_testbed::{
    istiod_lite::{ConnStatus, Resource},
    waypoint::{TlsProbe, anonymous_client_config, tls_probe},
};

const NODE_ID: &str = "router~127.0.0.1~sotw.default~default.svc.cluster.local";

fn bootstrap(ads: &PlainAds, admin_port: u16, with_sds: bool) -> Json {
    let mut clusters = vec![ads.cluster()];
    if with_sds {
        clusters.push(sds_cluster());
    }
    json!({
        "node": {"id": NODE_ID, "cluster": "sotw.default"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"clusters": clusters},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"}
        }
    })
}

async fn push(ads: &PlainAds, kind: ResourceKind, doc: Json) {
    let r = Resource::from_json(kind, &doc).unwrap_or_else(|e| panic!("{doc}: {e}"));
    ads.store.push(r).await;
}

fn hcm(stat_prefix: &str, routes: Json, filters: Vec<Json>) -> Json {
    let mut http_filters = filters;
    http_filters.push(
        json!({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}),
    );
    let mut config = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "http_filters": http_filters,
    });
    if let (Some(obj), Some(routes)) = (config.as_object_mut(), routes.as_object()) {
        obj.extend(routes.clone());
    }
    json!({"name": "envoy.filters.network.http_connection_manager", "typed_config": config})
}

fn direct_route(name: &str, body: &str) -> Json {
    json!({"name": name, "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
        {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": body}}}
    ]}]})
}

fn socket_listener(name: &str, port: u16, filter: Json) -> Json {
    json!({
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [filter]}]
    })
}

fn cla(port: u16) -> Json {
    json!({"cluster_name": "backend", "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
        {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]})
}

/// Our SotW stream in the book.
fn sotw(conns: &[ConnStatus]) -> Option<&ConnStatus> {
    conns
        .iter()
        .rev()
        .find(|c| c.node_id == NODE_ID && c.stream == "sotw" && c.connected)
}

fn acked_all(c: &ConnStatus, types: &[&str]) -> bool {
    types.iter().all(|t| {
        c.types
            .get(*t)
            .is_some_and(|s| s.acks >= 1 && s.acked_version == s.sent_version)
    })
}

/// `dynamic_listeners` by name.
async fn dynamic_listeners(admin: u16) -> Vec<Json> {
    let dump = get_json(admin, "/config_dump?resource=dynamic_listeners").await;
    dump["configs"].as_array().cloned().unwrap_or_default()
}

fn listener_named<'a>(list: &'a [Json], name: &str) -> Option<&'a Json> {
    list.iter().find(|l| l["name"] == name)
}

async fn refused(port: u16) -> bool {
    matches!(
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_snapshot_nack_removal_and_eds() {
    let ads = PlainAds::start().await;
    let dir = temp_dir("sotw-ads");
    let [admin, p1, p2] = distinct_ports();
    push(
        &ads,
        ResourceKind::Cluster,
        json!({"name": "backend", "type": "EDS", "connect_timeout": "1s",
            "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}}}),
    )
    .await;
    push(&ads, ResourceKind::Endpoint, cla(1111)).await;
    push(&ads, ResourceKind::Route, direct_route("route2", "two")).await;
    push(
        &ads,
        ResourceKind::Listener,
        socket_listener(
            "l1",
            p1,
            hcm(
                "l1",
                json!({"route_config": direct_route("l1", "one")}),
                vec![],
            ),
        ),
    )
    .await;
    push(
        &ads,
        ResourceKind::Listener,
        socket_listener(
            "l2",
            p2,
            hcm(
                "l2",
                json!({"rds": {"route_config_name": "route2",
                    "config_source": {"ads": {}, "resource_api_version": "V3"}}}),
                vec![],
            ),
        ),
    )
    .await;
    let proxy = Proxy::start(&dir, &bootstrap(&ads, admin, false));
    let log = || proxy.log_tail();

    // 1. Every type ACKed on a SotW stream; EDS and RDS subscribed by name, CDS/LDS wildcard.
    let conns = ads
        .book
        .wait_until(WAIT, |c| {
            sotw(c).is_some_and(|c| {
                acked_all(c, &[CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE])
            })
        })
        .await
        .unwrap_or_else(|c| panic!("no SotW ACKs: {c:#?}\n{}", log()));
    let conn = sotw(&conns).expect("stream");
    for (t, s) in &conn.types {
        assert_eq!(s.nacks, 0, "{t}: {:?}", s.last_nack);
    }
    assert!(conn.types[CLUSTER_TYPE].wildcard && conn.types[LISTENER_TYPE].wildcard);
    assert_eq!(conn.types[ENDPOINT_TYPE].subscribed, ["backend"]);
    assert!(!conn.types[ENDPOINT_TYPE].wildcard);
    assert_eq!(conn.types[ROUTE_TYPE].subscribed, ["route2"]);
    let lds_version = conn.types[LISTENER_TYPE].acked_version.clone();

    // 2. LIVE, the dump and traffic.
    eventually("/ready LIVE", log, || async {
        (http(admin, "GET", "/ready").await == (200, "LIVE\n".to_owned())).then_some(())
    })
    .await;
    let dump = get_json(admin, "/config_dump").await;
    let listeners = config_of(&dump, "ListenersConfigDump");
    assert_eq!(listeners["version_info"].as_str(), lds_version.as_deref());
    let names: Vec<&str> = listeners["dynamic_listeners"]
        .as_array()
        .expect("list")
        .iter()
        .filter(|l| l.get("active_state").is_some())
        .filter_map(|l| l["name"].as_str())
        .collect();
    assert_eq!(names, ["l1", "l2"], "{listeners}");
    let clusters = config_of(&dump, "ClustersConfigDump");
    assert!(
        clusters["dynamic_active_clusters"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["cluster"]["name"] == "backend")),
        "{clusters}"
    );
    assert_eq!(http(p1, "GET", "/").await, (200, "one".to_owned()));
    assert_eq!(http(p2, "GET", "/").await, (200, "two".to_owned()));

    // 3. A listener we cannot honour: NACK naming listener, filter and field; the rest stays.
    let lua = json!({
        "name": "lua_test",
        "internal_listener": {},
        "filter_chains": [{"filters": [hcm("lua", json!({"route_config": {"name": "lua"}}), vec![json!({
            "name": "envoy.filters.http.lua",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": "function envoy_on_request(h) end"}
            }
        })])]}]
    });
    push(&ads, ResourceKind::Listener, lua).await;
    let conns = ads
        .book
        .wait_until(WAIT, |c| {
            sotw(c)
                .and_then(|c| c.types.get(LISTENER_TYPE))
                .is_some_and(|s| s.nacks >= 1)
        })
        .await
        .unwrap_or_else(|c| panic!("the Lua listener was not NACKed: {c:#?}\n{}", log()));
    let nack = sotw(&conns).expect("stream").types[LISTENER_TYPE]
        .last_nack
        .clone()
        .expect("NACK");
    // As the delta client words it: the resource, the filter (its extension type) and the field.
    let m = &nack.message;
    assert!(m.contains("Listener 'lua_test'"), "{m}");
    assert!(
        m.contains("envoy.extensions.filters.http.lua.v3.Lua"),
        "{m}"
    );
    assert!(m.contains("http_filters[0]"), "{m}");
    assert_eq!(nack.code, 3);
    let dump = get_json(admin, "/config_dump").await;
    let listeners = config_of(&dump, "ListenersConfigDump");
    assert_eq!(
        listeners["version_info"].as_str(),
        lds_version.as_deref(),
        "the NACKed version is not taken"
    );
    let lua = listener_named(
        listeners["dynamic_listeners"].as_array().expect("list"),
        "lua_test",
    )
    .expect("lua_test listed with its error")
    .clone();
    assert!(lua.get("active_state").is_none(), "{lua}");
    assert_eq!(lua["client_status"], "NACKED");
    assert_eq!(http(p1, "GET", "/").await, (200, "one".to_owned()));
    assert_eq!(http(p2, "GET", "/").await, (200, "two".to_owned()));

    // 4. `l2` missing from the next (complete) LDS response: removed, its route unsubscribed.
    ads.store.remove(ResourceKind::Listener, "l2").await;
    eventually("l2 removed", log, || async {
        let list = dynamic_listeners(admin).await;
        (listener_named(&list, "l2").is_none() && refused(p2).await).then_some(())
    })
    .await;
    assert_eq!(http(p1, "GET", "/").await, (200, "one".to_owned()));
    ads.book
        .wait_until(WAIT, |c| {
            sotw(c)
                .and_then(|c| c.types.get(ROUTE_TYPE))
                .is_some_and(|s| s.subscribed.is_empty())
        })
        .await
        .unwrap_or_else(|c| panic!("route2 still subscribed: {c:#?}"));
    // The Lua listener gone too: a clean ACK again, and its error entry leaves the dump.
    ads.store.remove(ResourceKind::Listener, "lua_test").await;
    ads.book
        .wait_until(WAIT, |c| {
            sotw(c).is_some_and(|c| {
                let s = &c.types[LISTENER_TYPE];
                s.acked_version == s.sent_version && s.acked_version != lds_version
            })
        })
        .await
        .unwrap_or_else(|c| panic!("no LDS ACK after the fix: {c:#?}\n{}", log()));
    let list = dynamic_listeners(admin).await;
    assert_eq!(
        list.iter()
            .filter_map(|l| l["name"].as_str())
            .collect::<Vec<_>>(),
        ["l1"]
    );

    // 5. EDS follows updates.
    let clusters_has = |port: u16| async move {
        http(admin, "GET", "/clusters")
            .await
            .1
            .contains(&format!("backend::127.0.0.1:{port}::health_flags::healthy"))
    };
    assert!(clusters_has(1111).await);
    push(&ads, ResourceKind::Endpoint, cla(2222)).await;
    eventually("the new endpoint in /clusters", log, || async {
        (clusters_has(2222).await && !clusters_has(1111).await).then_some(())
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn tls_listener(port: u16, secret: &str, initial_fetch_timeout: &str) -> Json {
    let mut l = socket_listener(
        "tls",
        port,
        hcm(
            "tls",
            json!({"route_config": direct_route("tls", "tls")}),
            vec![],
        ),
    );
    l["filter_chains"][0]["transport_socket"] = json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificate_sds_secret_configs": [{"name": secret, "sds_config": {
                    "api_config_source": {"api_type": "GRPC", "transport_api_version": "V3",
                        "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]},
                    "initial_fetch_timeout": initial_fetch_timeout,
                    "resource_api_version": "V3"}}]
            }
        }
    });
    l
}

async fn probe(port: u16) -> TlsProbe {
    let config = anonymous_client_config().expect("client config");
    tls_probe(
        SocketAddr::from(([127, 0, 0, 1], port)),
        config,
        std::time::Duration::from_secs(5),
    )
    .await
}

async fn warming_gauge(admin: u16) -> Option<u64> {
    listener_manager_stat(admin, "total_listeners_warming").await
}

/// `listener_manager.<name>` from the admin `/stats` (None when absent).
async fn listener_manager_stat(admin: u16, name: &str) -> Option<u64> {
    let (_, stats) = http(
        admin,
        "GET",
        &format!("/stats?filter=%5Elistener_manager%5C.{name}%24"),
    )
    .await;
    let prefix = format!("listener_manager.{name}: ");
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
}

/// Pushes a `tls` listener naming `secret`; returns the SDS stream the proxy opens for it.
async fn update_tls(
    ads: &PlainAds,
    opened: &mut tokio::sync::mpsc::UnboundedReceiver<common::Opened>,
    port: u16,
    secret: &str,
    initial_fetch_timeout: &str,
) -> common::Opened {
    push(
        ads,
        ResourceKind::Listener,
        tls_listener(port, secret, initial_fetch_timeout),
    )
    .await;
    let (stream, first) = next_stream(opened).await;
    assert_eq!(first.resource_names, [secret]);
    stream
}

/// Waits until the active `tls` listener is the version naming `secret`, and none warms.
async fn active_with_secret(admin: u16, secret: &str, log: &dyn Fn() -> String) {
    let quoted = format!("\"{secret}\"");
    eventually(
        &format!("the version naming '{secret}' active"),
        log,
        || async {
            let list = dynamic_listeners(admin).await;
            let l = listener_named(&list, "tls")?.clone();
            let socket = &l["active_state"]["listener"]["filter_chains"][0]["transport_socket"];
            (l.get("warming_state").is_none() && socket.to_string().contains(&quoted)).then_some(())
        },
    )
    .await;
}

/// A proxy whose one listener, `tls` on `port`, warms: the SDS client's `ROOTCA` is answered,
/// its `default` stream is held for the test to answer.
struct WarmingTls {
    ads: PlainAds,
    dir: std::path::PathBuf,
    _sds: tokio::task::JoinHandle<()>,
    opened: tokio::sync::mpsc::UnboundedReceiver<common::Opened>,
    proxy: Proxy,
    admin: u16,
    port: u16,
    default: common::Opened,
    /// Held open: a closed stream would be opened again by the proxy.
    _rootca: common::Opened,
}

impl WarmingTls {
    async fn start(tag: &str) -> WarmingTls {
        let ads = PlainAds::start().await;
        let dir = temp_dir(tag);
        let (sds, mut opened) = sds_server(&dir.join("sds.sock"));
        let [admin, port] = distinct_ports();
        push(
            &ads,
            ResourceKind::Listener,
            tls_listener(port, "default", "0s"),
        )
        .await;
        let proxy = Proxy::start(&dir, &bootstrap(&ads, admin, true));
        // The SDS client asks for `default` and `ROOTCA`; only ROOTCA is answered for now.
        let (s1, first) = next_stream(&mut opened).await;
        let (s2, _) = next_stream(&mut opened).await;
        let (default, mut rootca) = if first.resource_names == ["default"] {
            (s1, s2)
        } else {
            (s2, s1)
        };
        rootca
            .responses
            .send(Ok(secret_response("r1", "r1", root_secret())))
            .await
            .expect("send");
        assert!(next_request(&mut rootca).await.error_detail.is_none());
        WarmingTls {
            ads,
            dir,
            _sds: sds,
            opened,
            proxy,
            admin,
            port,
            default,
            _rootca: rootca,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_warms_until_its_sds_secret_arrives() {
    let mut w = WarmingTls::start("sotw-warming").await;
    let (ads, admin, port) = (&w.ads, w.admin, w.port);
    let log = || w.proxy.log_tail();
    let opened = &mut w.opened;
    let default = &mut w.default;

    // LDS is ACKed when the listener is accepted, not when it is warm.
    ads.book
        .wait_until(WAIT, |c| {
            sotw(c).is_some_and(|c| acked_all(c, &[LISTENER_TYPE]))
        })
        .await
        .unwrap_or_else(|c| panic!("no LDS ACK: {c:#?}\n{}", log()));
    let tls = eventually("the listener warming in the dump", log, || async {
        let list = dynamic_listeners(admin).await;
        listener_named(&list, "tls").cloned()
    })
    .await;
    assert!(tls.get("warming_state").is_some(), "{tls}");
    assert!(tls.get("active_state").is_none(), "{tls}");
    assert_eq!(tls["warming_state"]["listener"]["name"], "tls");
    assert_eq!(warming_gauge(admin).await, Some(1));
    let (status, body) = http(admin, "GET", "/ready").await;
    assert_eq!((status, body.as_str()), (503, "PRE_INITIALIZING\n"));
    assert!(
        refused(port).await,
        "a warming listener takes no connection"
    );

    // The secret arrives: active, serving TLS, the server LIVE.
    default
        .responses
        .send(Ok(secret_response("v1", "n1", tls_secret(common::KEY))))
        .await
        .expect("send");
    assert!(next_request(default).await.error_detail.is_none());
    eventually("the listener active", log, || async {
        let list = dynamic_listeners(admin).await;
        let l = listener_named(&list, "tls")?.clone();
        (l.get("active_state").is_some() && l.get("warming_state").is_none()).then_some(())
    })
    .await;
    assert_eq!(warming_gauge(admin).await, Some(0));
    eventually("/ready LIVE", log, || async {
        (http(admin, "GET", "/ready").await == (200, "LIVE\n".to_owned())).then_some(())
    })
    .await;
    assert_eq!(probe(port).await, TlsProbe::Served);

    // An update naming a secret that has not arrived warms; the previous version keeps serving.
    let other = update_tls(ads, opened, port, "other", "0s").await;
    let tls = eventually("the update warming", log, || async {
        let list = dynamic_listeners(admin).await;
        listener_named(&list, "tls")
            .filter(|l| l.get("warming_state").is_some())
            .cloned()
    })
    .await;
    assert!(
        tls.get("active_state").is_some(),
        "the old version stays: {tls}"
    );
    assert_ne!(
        tls["active_state"]["version_info"],
        tls["warming_state"]["version_info"]
    );
    assert_eq!(warming_gauge(admin).await, Some(1));
    assert_eq!(
        probe(port).await,
        TlsProbe::Served,
        "the old version serves"
    );
    let mut secret = tls_secret(common::KEY);
    secret.name = "other".into();
    other
        .responses
        .send(Ok(secret_response("o1", "o1", secret)))
        .await
        .expect("send");
    active_with_secret(admin, "other", &log).await;
    assert_eq!(warming_gauge(admin).await, Some(0));
    assert_eq!(probe(port).await, TlsProbe::Served);

    // A secret that never comes: active anyway once `initial_fetch_timeout` expires, and its
    // handshakes fail.
    let _never = update_tls(ads, opened, port, "never", "0.2s").await;
    active_with_secret(admin, "never", &log).await;
    assert_eq!(warming_gauge(admin).await, Some(0));
    assert!(
        matches!(probe(port).await, TlsProbe::Refused(_)),
        "no certificate: the handshake fails"
    );
    let _ = std::fs::remove_dir_all(&w.dir);
}

/// Sockets with SO_REUSEADDR bind one port together as long as none listens, so a warming
/// listener's port (bound by the proxy, not listening) can be taken by another process: when the
/// listener is warm it cannot listen. That is counted (`listener_create_failure`), logged, the
/// proxy stays up, and the next update binds again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_taken_while_its_listener_warms_is_counted_and_bound_again() {
    let w = WarmingTls::start("sotw-taken-warming").await;
    let (ads, admin, port) = (&w.ads, w.admin, w.port);
    let log = || w.proxy.log_tail();
    let default = &w.default;
    eventually("the listener warming", log, || async {
        let list = dynamic_listeners(admin).await;
        listener_named(&list, "tls").and_then(|l| l.get("warming_state").map(|_| ()))
    })
    .await;

    let holder = tokio::net::TcpSocket::new_v4().expect("socket");
    holder.set_reuseaddr(true).expect("SO_REUSEADDR");
    holder
        .bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .expect("the warming listener's port binds beside the proxy's socket");
    let holder = holder
        .listen(16)
        .expect("and listens: the proxy's socket does not");
    default
        .responses
        .send(Ok(secret_response("v1", "n1", tls_secret(common::KEY))))
        .await
        .expect("send");
    eventually("listener_create_failure counted", log, || async {
        (listener_manager_stat(admin, "listener_create_failure").await == Some(1)).then_some(())
    })
    .await;
    // The port is the holder's; the proxy goes on (no listener warms: LIVE).
    let _client = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tokio::time::timeout(WAIT, holder.accept())
        .await
        .expect("the holder accepts in time")
        .expect("accept");
    eventually("/ready LIVE", log, || async {
        (http(admin, "GET", "/ready").await == (200, "LIVE\n".to_owned())).then_some(())
    })
    .await;

    // Released, the port is bound by the next update of the listener.
    drop(holder);
    push(
        ads,
        ResourceKind::Listener,
        tls_listener(port, "default", "1s"),
    )
    .await;
    eventually("the listener serving", log, || async {
        (probe(port).await == TlsProbe::Served).then_some(())
    })
    .await;
    let _ = std::fs::remove_dir_all(&w.dir);
}
