//! STRICT_DNS and LOGICAL_DNS clusters from a static bootstrap: `localhost` resolved through
//! `/etc/hosts`, and a name served by a tiny UDP DNS responder on 127.0.0.1 (the cluster's c-ares
//! `resolvers`) whose answers the test changes between refreshes, so re-resolution adds and
//! removes hosts. LIVE waits for the first resolution of clusters with `wait_for_warm_on_init`; a
//! CDS update that changes a DNS cluster's resolver keeps its hosts serving until the new
//! resolution answers. Loopback only: the responder answers the test name and refuses every other.

mod common;

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{PlainAds, StaticProxy, WAIT, echo, free_port, free_ports, http, request};
use tokio::{net::UdpSocket, sync::watch};
use waypoint_proto::resource::ResourceKind;
use waypoint_testbed::echo::{EchoConfig, EchoServer};
use waypoint_testbed::istiod_lite::Resource;

const NAME: &str = "svc.dns.test";

const BOOTSTRAP: &str = r#"
node: {id: "dns~127.0.0.1~dns.default~default.svc.cluster.local", cluster: dns}
admin: {address: {socket_address: {address: 127.0.0.1, port_value: ${ADMIN}}}}
static_resources:
  listeners:
  - name: dns
    address: {socket_address: {address: 127.0.0.1, port_value: ${LISTEN}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: dns
          route_config:
            name: dns
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: /strict}
                route: {cluster: strict}
              - match: {prefix: /logical}
                route: {cluster: logical}
              - match: {prefix: /served}
                route: {cluster: served}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: strict
    type: STRICT_DNS
    connect_timeout: 2s
    dns_lookup_family: V4_ONLY
    dns_refresh_rate: 60s
    respect_dns_ttl: true
    load_assignment:
      cluster_name: strict
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: localhost, port_value: ${BACKEND}}}}}]}]
  - name: logical
    type: LOGICAL_DNS
    connect_timeout: 2s
    dns_lookup_family: V4_ONLY
    load_assignment:
      cluster_name: logical
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: localhost, port_value: ${BACKEND}}}}}]}]
  - name: served
    type: STRICT_DNS
    connect_timeout: 2s
    dns_lookup_family: V4_ONLY
    dns_refresh_rate: 0.1s
    dns_failure_refresh_rate: {base_interval: 0.1s, max_interval: 0.5s}
    typed_dns_resolver_config:
      name: envoy.network.dns_resolver.cares
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig
        resolvers: [{socket_address: {address: 127.0.0.1, port_value: ${DNS}}}]
        dns_resolver_options: {no_default_search_domain: true}
        udp_max_queries: 100
    load_assignment:
      cluster_name: served
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: svc.dns.test, port_value: ${SERVED}}}}}]}]
"#;

/// Answers A queries for [`NAME`] with the current addresses (TTL 1 s), no records for AAAA, and
/// REFUSED for any other name. Returns the shared answer list.
async fn dns_responder(socket: UdpSocket) -> Arc<Mutex<Vec<Ipv4Addr>>> {
    let (_, gate) = watch::channel(true);
    gated_responder(socket, gate).0
}

/// [`dns_responder`] that receives queries (counted) but answers them only once `gate` is true.
fn gated_responder(
    socket: UdpSocket,
    mut gate: watch::Receiver<bool>,
) -> (Arc<Mutex<Vec<Ipv4Addr>>>, Arc<AtomicUsize>) {
    let answers = Arc::new(Mutex::new(Vec::new()));
    let queries = Arc::new(AtomicUsize::new(0));
    let (current, seen) = (answers.clone(), queries.clone());
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        loop {
            let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                return;
            };
            seen.fetch_add(1, Ordering::SeqCst);
            if gate.wait_for(|open| *open).await.is_err() {
                return;
            }
            let addrs = current.lock().expect("answers").clone();
            if let Some(reply) = answer(&buf[..n], &addrs) {
                let _ = socket.send_to(&reply, peer).await;
            }
        }
    });
    (answers, queries)
}

/// The reply to one query (`None` for what is not a query).
fn answer(query: &[u8], addrs: &[Ipv4Addr]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    // The question: labels, then type and class.
    let mut i = 12;
    let mut labels = Vec::new();
    while *query.get(i)? != 0 {
        let len = usize::from(query[i]);
        labels.push(String::from_utf8_lossy(query.get(i + 1..i + 1 + len)?).to_lowercase());
        i += 1 + len;
    }
    let qtype = u16::from_be_bytes([*query.get(i + 1)?, *query.get(i + 2)?]);
    let question_end = i + 5;
    let question = query.get(12..question_end)?;
    let ours = labels.join(".") == NAME;
    let records: &[Ipv4Addr] = if ours && qtype == 1 { addrs } else { &[] };
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&query[0..2]);
    // QR, RD, RA; rcode 0, or 5 (REFUSED) for names that are not ours.
    out.extend_from_slice(&[0x81, if ours { 0x80 } else { 0x85 }]);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(records.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(question);
    for a in records {
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&a.octets());
    }
    Some(out)
}

/// An echo server named `name` on `ip:port`.
async fn echo_at(name: &str, ip: Ipv4Addr, port: u16) {
    let echo = EchoServer::bind(&EchoConfig {
        name: name.into(),
        http: SocketAddr::from((ip, port)),
        grpc: None,
    })
    .await
    .expect("echo binds");
    tokio::spawn(echo.run());
}

/// Waits (bounded) until `/clusters` has every line of `want` and none of `gone`.
async fn wait_clusters(proxy: &StaticProxy, want: &[String], gone: &[String]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, text) = proxy.admin_get("/clusters").await;
        let has = |l: &String| text.lines().any(|x| x == l);
        if want.iter().all(has) && !gone.iter().any(has) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "want {want:?}, gone {gone:?} in /clusters:\n{text}\n{}",
            proxy.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) until a request to `path` is answered by the echo server `name`.
async fn wait_served_by(proxy: &StaticProxy, path: &str, name: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = request(proxy.addr(), "dns.test", path, &[]).await;
        if r.status == 200 && r.json()["server"] == name {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never reached {name}: {} {}",
            r.status,
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_and_logical_dns_clusters_resolve_and_re_resolve() {
    let backend = echo("localhost-backend").await;
    // One port free on both 127.0.0.2 and 127.0.0.3 for the served name's two backends.
    let served = free_ports(Ipv4Addr::new(127, 0, 0, 2), 1)[0];
    echo_at("two", Ipv4Addr::new(127, 0, 0, 2), served).await;
    echo_at("three", Ipv4Addr::new(127, 0, 0, 3), served).await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
    let dns_port = socket.local_addr().expect("addr").port();
    let answers = dns_responder(socket).await;
    *answers.lock().expect("answers") = vec![Ipv4Addr::new(127, 0, 0, 2)];

    let proxy = StaticProxy::start(
        "dns",
        BOOTSTRAP,
        &[("BACKEND", backend), ("SERVED", served), ("DNS", dns_port)],
    )
    .await;

    // `localhost` through /etc/hosts, for both cluster types.
    let strict_host = format!("strict::127.0.0.1:{backend}::hostname::localhost");
    let logical_host = format!("logical::127.0.0.1:{backend}::hostname::localhost");
    wait_clusters(&proxy, &[strict_host, logical_host], &[]).await;
    for path in ["/strict", "/logical"] {
        let r = request(proxy.addr(), "dns.test", path, &[]).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.json()["server"], "localhost-backend", "{path}");
    }

    // The served name: 127.0.0.2, then 127.0.0.3 only, then both.
    let two = format!("served::127.0.0.2:{served}::hostname::{NAME}");
    let three = format!("served::127.0.0.3:{served}::hostname::{NAME}");
    wait_clusters(
        &proxy,
        std::slice::from_ref(&two),
        std::slice::from_ref(&three),
    )
    .await;
    wait_served_by(&proxy, "/served", "two").await;

    *answers.lock().expect("answers") = vec![Ipv4Addr::new(127, 0, 0, 3)];
    wait_clusters(
        &proxy,
        std::slice::from_ref(&three),
        std::slice::from_ref(&two),
    )
    .await;
    wait_served_by(&proxy, "/served", "three").await;
    // config_dump shows the resolution, not the configured name, as Envoy's does.
    let (status, dump) = proxy.admin_get("/config_dump?include_eds").await;
    assert_eq!(status, 200, "{dump}");
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("config_dump JSON");
    let served_eps = dump["configs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["static_endpoint_configs"].as_array())
        .flatten()
        .find(|e| e["endpoint_config"]["cluster_name"] == "served")
        .map(|e| e["endpoint_config"]["endpoints"].clone())
        .expect("served in static_endpoint_configs");
    let endpoint = &served_eps[0]["lb_endpoints"][0]["endpoint"];
    assert_eq!(
        endpoint["address"]["socket_address"]["address"], "127.0.0.3",
        "{served_eps}"
    );
    assert_eq!(endpoint["hostname"], NAME, "{served_eps}");
    assert_eq!(served_eps.as_array().map(Vec::len), Some(1), "{served_eps}");
    for _ in 0..5 {
        let r = request(proxy.addr(), "dns.test", "/served", &[]).await;
        assert_eq!(
            r.json()["server"],
            "three",
            "the removed host gets no traffic"
        );
    }

    *answers.lock().expect("answers") =
        vec![Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)];
    wait_clusters(&proxy, &[two.clone(), three.clone()], &[]).await;
    wait_served_by(&proxy, "/served", "two").await;
    wait_served_by(&proxy, "/served", "three").await;
}

/// Two STRICT_DNS clusters whose resolvers hold their answers: LIVE waits for the one with the
/// default `wait_for_warm_on_init` (true), not for the one that sets it false.
const WARM_BOOTSTRAP: &str = r#"
node: {id: "dns~127.0.0.1~warm.default~default.svc.cluster.local", cluster: warm}
admin: {address: {socket_address: {address: 127.0.0.1, port_value: ${ADMIN}}}}
static_resources:
  listeners:
  - name: warm
    address: {socket_address: {address: 127.0.0.1, port_value: ${LISTEN}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: warm
          route_config:
            name: warm
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: /held}
                route: {cluster: held}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: held
    type: STRICT_DNS
    connect_timeout: 2s
    dns_lookup_family: V4_ONLY
    dns_refresh_rate: 60s
    typed_dns_resolver_config:
      name: envoy.network.dns_resolver.cares
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig
        resolvers: [{socket_address: {address: 127.0.0.1, port_value: ${DNS_HELD}}}]
        dns_resolver_options: {no_default_search_domain: true}
        query_timeout_seconds: 60
        query_tries: 1
    load_assignment:
      cluster_name: held
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: svc.dns.test, port_value: ${SERVED}}}}}]}]
  - name: lazy
    type: STRICT_DNS
    connect_timeout: 2s
    wait_for_warm_on_init: false
    dns_lookup_family: V4_ONLY
    dns_refresh_rate: 60s
    typed_dns_resolver_config:
      name: envoy.network.dns_resolver.cares
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig
        resolvers: [{socket_address: {address: 127.0.0.1, port_value: ${DNS_LAZY}}}]
        dns_resolver_options: {no_default_search_domain: true}
        query_timeout_seconds: 60
        query_tries: 1
    load_assignment:
      cluster_name: lazy
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: svc.dns.test, port_value: ${SERVED}}}}}]}]
"#;

/// Waits (bounded) until `counter` is at least 1.
async fn wait_query(counter: &AtomicUsize, what: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while counter.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: no DNS query within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_waits_for_the_first_resolution_of_clusters_that_wait_for_warm() {
    let served = free_ports(Ipv4Addr::new(127, 0, 0, 2), 1)[0];
    echo_at("two", Ipv4Addr::new(127, 0, 0, 2), served).await;
    let (open_held, held_gate) = watch::channel(false);
    let (_never, lazy_gate) = watch::channel(false);
    let held_socket = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
    let lazy_socket = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
    let held_port = held_socket.local_addr().expect("addr").port();
    let lazy_port = lazy_socket.local_addr().expect("addr").port();
    let (held_answers, held_queries) = gated_responder(held_socket, held_gate);
    let (_, lazy_queries) = gated_responder(lazy_socket, lazy_gate);
    *held_answers.lock().expect("answers") = vec![Ipv4Addr::new(127, 0, 0, 2)];

    let admin = free_port();
    let start = tokio::spawn(async move {
        let ports = [
            ("ADMIN", admin),
            ("SERVED", served),
            ("DNS_HELD", held_port),
            ("DNS_LAZY", lazy_port),
        ];
        StaticProxy::start("dns-warm", WARM_BOOTSTRAP, &ports).await
    });
    // Both clusters asked; neither has an answer: the server is still initializing.
    wait_query(&held_queries, "held").await;
    wait_query(&lazy_queries, "lazy").await;
    let (status, body) = http(admin, "GET", "/ready").await;
    assert_eq!(
        (status, body.as_str()),
        (503, "PRE_INITIALIZING\n"),
        "LIVE before the held cluster resolved"
    );

    // The held cluster's answer makes the server LIVE, while the lazy one still has none.
    open_held.send_replace(true);
    let proxy = tokio::time::timeout(WAIT, start)
        .await
        .expect("LIVE once the held cluster resolved")
        .expect("start task");
    assert_eq!(
        lazy_queries.load(Ordering::SeqCst),
        1,
        "the lazy query is pending"
    );
    let r = request(proxy.addr(), "dns.test", "/held", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["server"], "two");
}

/// Everything but the ADS server's address comes over ADS: listener `upd` (LDS) to cluster `upd`
/// (CDS).
const UPDATE_BOOTSTRAP: &str = r#"
node: {id: "dns~127.0.0.1~upd.default~default.svc.cluster.local", cluster: upd}
admin: {address: {socket_address: {address: 127.0.0.1, port_value: ${ADMIN}}}}
dynamic_resources:
  ads_config:
    api_type: DELTA_GRPC
    transport_api_version: V3
    grpc_services: [{envoy_grpc: {cluster_name: xds-grpc}}]
  cds_config: {ads: {}, resource_api_version: V3}
  lds_config: {ads: {}, resource_api_version: V3}
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: xds-grpc
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${ADS}}}}}]}]
"#;

/// LDS listener `upd` on `port`, every request to cluster `upd`.
fn update_listener(port: u16) -> serde_json::Value {
    serde_json::json!({
        "name": "upd",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "upd",
                "route_config": {"name": "upd", "virtual_hosts": [{
                    "name": "all", "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upd"}}]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
            }
        }]}]
    })
}

/// CDS cluster `upd`: STRICT_DNS for [`NAME`] through the resolver on `dns_port`.
fn update_cluster(dns_port: u16, served: u16) -> serde_json::Value {
    serde_json::json!({
        "name": "upd",
        "type": "STRICT_DNS",
        "connect_timeout": "2s",
        "dns_lookup_family": "V4_ONLY",
        "dns_refresh_rate": "60s",
        "typed_dns_resolver_config": {
            "name": "envoy.network.dns_resolver.cares",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
                "resolvers": [{"socket_address": {"address": "127.0.0.1", "port_value": dns_port}}],
                "dns_resolver_options": {"no_default_search_domain": true},
                "query_timeout_seconds": 60,
                "query_tries": 1
            }
        },
        "load_assignment": {"cluster_name": "upd", "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": NAME, "port_value": served}}}}]}]}
    })
}

async fn push(ads: &PlainAds, kind: ResourceKind, doc: &serde_json::Value) {
    let r = Resource::from_json(kind, doc).unwrap_or_else(|e| panic!("{e}"));
    ads.store.push(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_dns_cluster_keeps_its_hosts_until_the_new_resolution() {
    let served = free_ports(Ipv4Addr::new(127, 0, 0, 2), 1)[0];
    echo_at("two", Ipv4Addr::new(127, 0, 0, 2), served).await;
    echo_at("three", Ipv4Addr::new(127, 0, 0, 3), served).await;
    let (_open, open_gate) = watch::channel(true);
    let (open_new, new_gate) = watch::channel(false);
    let old_socket = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
    let new_socket = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
    let old_port = old_socket.local_addr().expect("addr").port();
    let new_port = new_socket.local_addr().expect("addr").port();
    let (old_answers, _) = gated_responder(old_socket, open_gate);
    let (new_answers, new_queries) = gated_responder(new_socket, new_gate);
    *old_answers.lock().expect("answers") = vec![Ipv4Addr::new(127, 0, 0, 2)];
    *new_answers.lock().expect("answers") = vec![Ipv4Addr::new(127, 0, 0, 3)];

    let ads = PlainAds::start().await;
    let listen = free_port();
    push(
        &ads,
        ResourceKind::Cluster,
        &update_cluster(old_port, served),
    )
    .await;
    push(&ads, ResourceKind::Listener, &update_listener(listen)).await;
    let proxy = StaticProxy::start(
        "dns-update",
        UPDATE_BOOTSTRAP,
        &[("ADS", ads.addr.port()), ("LISTEN", listen)],
    )
    .await;
    wait_served_by(&proxy, "/", "two").await;

    // New DNS settings: the cluster resolves anew through a resolver that has not answered yet.
    push(
        &ads,
        ResourceKind::Cluster,
        &update_cluster(new_port, served),
    )
    .await;
    wait_query(&new_queries, "the new resolver").await;
    for _ in 0..5 {
        let r = request(proxy.addr(), "dns.test", "/", &[]).await;
        assert_eq!(r.status, 200, "the old hosts keep serving: {}", r.text());
        assert_eq!(r.json()["server"], "two");
    }

    // Its answer replaces them.
    open_new.send_replace(true);
    wait_served_by(&proxy, "/", "three").await;
}
