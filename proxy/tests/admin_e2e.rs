//! End to end through the real agent: istiod-lite (in-process, TLS) serves the reference waypoint
//! snapshot plus two WDS workloads; the `agent` binary runs in a temporary pod root and spawns this
//! crate's `proxy` binary (ProxyConfig `binaryPath`), bridging ADS and SDS over its Unix sockets. The
//! test reads the proxy's admin API: ACKs in istiod-lite's book, `/ready`, `/config_dump`, `/stats`,
//! `/certs`, `/clusters`, `/listeners`, `/logging`; then a listener with a Lua filter is pushed (NACK,
//! the rest stays applied) and fixed (ACK).
//!
//! The agent binary is `target/<profile>/agent` next to the proxy binary (build it with
//! `cargo build -p agent`) or `AGENT_BIN`. Every wait polls with a deadline; all sockets are on
//! loopback or Unix sockets in the pod root. The snapshot is served as is except for the address of
//! `connect_terminate` (0.0.0.0:15008 in the reference): the proxy binds LDS listeners, so each
//! test moves it to a loopback address of its own (`MeshAddrs::claim_waypoint_ip`) and concurrent
//! tests do not fight for :15008.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::{Value as Json, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use waypoint_proto::resource::{
    CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, ResourceKind, WORKLOAD_TYPE,
};
use waypoint_testbed::{
    istiod_lite::{Config, ConnStatus, IstiodLite, mint_token},
    waypoint::MeshAddrs,
};

const NODE_ID: &str = "waypoint~127.0.0.1~waypoint-1.default~default.svc.cluster.local";
const IDENTITY: &str = "spiffe://cluster.local/ns/default/sa/waypoint";
const VIP_CLUSTER: &str = "inbound-vip|8000|http|httpbin.default.svc.cluster.local";
const START_WAIT: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(20);
/// `connect_terminate`'s address in the reference snapshot, replaced per test.
const REFERENCE_TERMINATE_ADDRESS: &str =
    "address: {socket_address: {address: 0.0.0.0, port_value: 15008}}";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn agent_bin() -> PathBuf {
    waypoint_testbed::waypoint::agent_beside(Path::new(env!("CARGO_BIN_EXE_proxy")))
}

/// A running agent (and through it the proxy) in its own pod root.
struct Pod {
    child: Option<Child>,
    root: PathBuf,
    log: PathBuf,
    /// Where `connect_terminate` listens (a loopback address of this test's own).
    hbone: std::net::SocketAddr,
    admin_port: u16,
    status_port: u16,
    prometheus_port: u16,
}

impl Pod {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(80)..].join("\n")
    }

    fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!("agent exited ({status}):\n{}", self.log_tail());
        }
    }

    /// SIGTERM to the agent (which stops the proxy), bounded wait, SIGKILL as a last resort; then
    /// make sure the proxy is gone too.
    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // The proxy must not outlive the test: ask it directly if the admin port still answers.
        if http(self.admin_port, "GET", "/ready").await.is_ok() {
            let _ = http(self.admin_port, "POST", "/quitquitquit").await;
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

/// One HTTP/1.1 request to the admin port: (status, body).
async fn http(port: u16, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok((status, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| std::io::Error::other("admin request timed out"))?
}

async fn get_json(port: u16, path: &str) -> Json {
    let (status, body) = http(port, "GET", path).await.expect("admin answers");
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what` and the pod's log.
async fn poll<T, F, Fut>(pod: &mut Pod, timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        pod.assert_running();
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}; agent/proxy log tail:\n{}",
                pod.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start(tag: &str) -> (IstiodLite, Pod, PathBuf) {
    let dir = std::env::temp_dir().join(format!("proxy-e2e-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let resources = dir.join("resources");
    std::fs::create_dir_all(&resources).expect("mkdir");
    let hbone = MeshAddrs::claim_waypoint_ip()
        .expect("a free loopback address for connect_terminate")
        .waypoint_hbone();
    let reference = std::fs::read_to_string(
        repo().join("tests/fixtures/istio/waypoint_xds_reconstructed_example.yaml"),
    )
    .expect("reference fixture");
    assert!(
        reference.contains(REFERENCE_TERMINATE_ADDRESS),
        "the reference snapshot no longer has {REFERENCE_TERMINATE_ADDRESS}"
    );
    std::fs::write(
        resources.join("waypoint.yaml"),
        reference.replace(
            REFERENCE_TERMINATE_ADDRESS,
            &format!(
                "address: {{socket_address: {{address: {}, port_value: {}}}}}",
                hbone.ip(),
                hbone.port()
            ),
        ),
    )
    .expect("fixture");
    std::fs::copy(
        repo().join("tests/fixtures/proxy/waypoint_workloads.yaml"),
        resources.join("workloads.yaml"),
    )
    .expect("workload fixture");
    let mut config = Config::for_test(&dir.join("ca"));
    config.resources = Some(resources);
    let istiod = IstiodLite::start(config).await.expect("istiod-lite starts");

    let root = dir.join("pod");
    std::fs::create_dir_all(root.join("var/run/secrets/tokens")).expect("mkdir");
    std::fs::create_dir_all(root.join("var/run/secrets/istio")).expect("mkdir");
    std::fs::write(
        root.join("var/run/secrets/tokens/istio-token"),
        mint_token("default", "waypoint", Duration::from_secs(3600)) + "\n",
    )
    .expect("token");
    std::fs::write(
        root.join("var/run/secrets/istio/root-cert.pem"),
        istiod.root_cert_pem(),
    )
    .expect("root");

    let [admin_port, status_port, prometheus_port] =
        waypoint_testbed::waypoint::free_ports().expect("free ports");
    let addr = istiod.addr.to_string();
    let proxy_config = json!({
        "discoveryAddress": addr,
        "proxyAdminPort": admin_port,
        // 0: no agent status server (it would listen on every interface).
        "statusPort": 0,
        "binaryPath": env!("CARGO_BIN_EXE_proxy"),
        "drainDuration": "1s",
        "terminationDrainDuration": "1s",
        // What an Istio user does to see SDS stats: Istio's inclusion list keeps only its own
        // prefixes (`server`, `cluster_manager`, `cluster.xds-grpc`, ...).
        "proxyStatsMatcher": {"inclusionPrefixes": ["sds."]},
    });
    let log = dir.join("agent.log");
    let out = std::fs::File::create(&log).expect("log file");
    let err = out.try_clone().expect("log file");
    let mut cmd = Command::new(agent_bin());
    cmd.args(["proxy", "waypoint", "--proxyLogLevel", "info"])
        .current_dir(&root)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("POD_NAME", "waypoint-1")
        .env("POD_NAMESPACE", "default")
        .env("SERVICE_ACCOUNT", "waypoint")
        .env("INSTANCE_IP", "127.0.0.1")
        .env("CA_ADDR", &addr)
        .env("PROXY_CONFIG", proxy_config.to_string())
        .env("ENVOY_STATUS_PORT", status_port.to_string())
        .env("ENVOY_PROMETHEUS_PORT", prometheus_port.to_string())
        .env("DISABLE_ENVOY", "false")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let child = cmd.spawn().expect("agent starts");
    let pod = Pod {
        child: Some(child),
        root,
        log,
        hbone,
        admin_port,
        status_port,
        prometheus_port,
    };
    (istiod, pod, dir)
}

fn our_conn(conns: &[ConnStatus]) -> Option<&ConnStatus> {
    conns
        .iter()
        .rev()
        .find(|c| c.node_id == NODE_ID && c.stream == "delta" && c.connected)
}

fn names(list: Option<&Json>, path: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = list
        .and_then(Json::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|i| {
                    let mut v = i;
                    for p in path {
                        v = v.get(p)?;
                    }
                    v.as_str().map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn config_of<'a>(dump: &'a Json, type_name: &str) -> &'a Json {
    dump["configs"]
        .as_array()
        .and_then(|c| {
            c.iter()
                .find(|c| c["@type"] == format!("type.googleapis.com/envoy.admin.v3.{type_name}"))
        })
        .unwrap_or_else(|| panic!("no {type_name} in the dump"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_admin_through_the_agent() {
    let (istiod, mut pod, dir) = start("admin").await;
    let port = pod.admin_port;

    // 1. ACKs for CDS, EDS, LDS and WDS from the waypoint node, no NACK.
    let book = istiod.book.clone();
    let acked = book
        .wait_until(START_WAIT, |conns| {
            our_conn(conns).is_some_and(|c| {
                [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, WORKLOAD_TYPE]
                    .iter()
                    .all(|t| c.types.get(*t).is_some_and(|s| s.acks >= 1))
            })
        })
        .await;
    let conns = match acked {
        Ok(c) => c,
        Err(c) => panic!(
            "no ACKs for CDS/EDS/LDS/WDS from {NODE_ID}: {c:#?}\nlog:\n{}",
            pod.log_tail()
        ),
    };
    let conn = our_conn(&conns).expect("connection");
    for (t, s) in &conn.types {
        assert_eq!(s.nacks, 0, "{t}: {:?}", s.last_nack);
    }

    // 2. LIVE.
    poll(&mut pod, WAIT, "/ready LIVE", || async {
        match http(port, "GET", "/ready").await {
            Ok((200, body)) if body == "LIVE\n" => Some(()),
            _ => None,
        }
    })
    .await;

    // 3. The config dump.
    let dump = get_json(port, "/config_dump").await;
    let listeners = config_of(&dump, "ListenersConfigDump");
    assert_eq!(
        names(listeners.get("dynamic_listeners"), &["name"]),
        ["connect_originate", "connect_terminate", "main_internal"]
    );
    for l in listeners["dynamic_listeners"].as_array().expect("list") {
        assert!(
            l["active_state"]["version_info"]
                .as_str()
                .is_some_and(|v| !v.is_empty()),
            "{l}"
        );
        assert!(l.get("error_state").is_none(), "{l}");
    }
    let mut statics = vec![
        format!("0.0.0.0_{}", pod.status_port),
        format!("0.0.0.0_{}", pod.prometheus_port),
    ];
    statics.sort();
    assert_eq!(
        names(listeners.get("static_listeners"), &["listener", "name"]),
        statics
    );
    let clusters = config_of(&dump, "ClustersConfigDump");
    assert_eq!(
        names(
            clusters.get("dynamic_active_clusters"),
            &["cluster", "name"]
        ),
        ["connect_originate", "encap", VIP_CLUSTER, "main_internal"]
    );
    for c in clusters["dynamic_active_clusters"]
        .as_array()
        .expect("list")
    {
        assert!(
            c["version_info"].as_str().is_some_and(|v| !v.is_empty()),
            "{c}"
        );
        assert!(c["last_updated"].is_string(), "{c}");
    }
    assert!(
        names(clusters.get("static_clusters"), &["cluster", "name"])
            .contains(&"sds-grpc".to_owned())
    );
    let routes = config_of(&dump, "RoutesConfigDump");
    assert!(
        names(
            routes.get("static_route_configs"),
            &["route_config", "name"]
        )
        .contains(&VIP_CLUSTER.to_owned()),
        "{routes}"
    );

    // 4. The readiness stats pilot-agent reads.
    let (status, stats) = http(
        port,
        "GET",
        "/stats?usedonly&filter=%5E(cluster_manager%5C.cds%7Clistener_manager%5C.lds)%5C.(update_success%7Cupdate_rejected)%24",
    )
    .await
    .expect("stats");
    assert_eq!(status, 200);
    let value = |name: &str| {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.parse::<u64>().ok())
    };
    assert!(
        value("cluster_manager.cds.update_success").unwrap_or(0) >= 1,
        "{stats}"
    );
    assert!(
        value("listener_manager.lds.update_success").unwrap_or(0) >= 1,
        "{stats}"
    );
    for line in stats.lines() {
        assert!(
            line.starts_with("cluster_manager.cds.") || line.starts_with("listener_manager.lds."),
            "filter let through {line}"
        );
    }
    let (_, live) = http(
        port,
        "GET",
        "/stats?usedonly&filter=%5E(server%5C.state%7Clistener_manager%5C.workers_started)",
    )
    .await
    .expect("stats");
    assert!(live.contains("server.state: 0\n"), "{live}");
    assert!(
        live.contains("listener_manager.workers_started: 1\n"),
        "{live}"
    );

    // 5. SDS: the identity shows in /certs and the secrets (redacted) in the dump.
    let certs = poll(
        &mut pod,
        WAIT,
        "/certs with the workload identity",
        || async {
            let (status, body) = http(port, "GET", "/certs").await.ok()?;
            (status == 200 && body.contains(IDENTITY)).then_some(body)
        },
    )
    .await;
    let certs: Json = serde_json::from_str(&certs).expect("certs JSON");
    let first = &certs["certificates"][0];
    let leaf = &first["cert_chain"][0];
    assert_eq!(leaf["subject_alt_names"][0]["uri"], IDENTITY, "{certs}");
    assert!(
        leaf["serial_number"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    assert!(leaf["valid_from"].is_string() && leaf["expiration_time"].is_string());
    assert!(
        first["ca_cert"].as_array().is_some_and(|c| !c.is_empty()),
        "{certs}"
    );
    let dump = get_json(port, "/config_dump?resource=dynamic_active_secrets").await;
    let text = dump.to_string();
    assert!(!text.contains("PRIVATE KEY"), "private key in the dump");
    let secrets = names(dump.get("configs"), &["name"]);
    assert_eq!(secrets, ["ROOTCA", "default"], "{dump}");
    let (_, sds) = http(port, "GET", "/stats?filter=%5Esds%5C.")
        .await
        .expect("stats");
    assert!(sds.contains("sds.default.update_success: "), "{sds}");
    // The agent's inclusion list reached the proxy: the service cluster's stats do not exist
    // (no `cluster.` prefix was asked for), `cluster.xds-grpc;.*` does (Istio's required prefix).
    let (_, all) = http(port, "GET", "/stats").await.expect("stats");
    assert!(!all.contains(&format!("cluster.{VIP_CLUSTER}")), "{all}");
    assert!(
        all.lines().any(|l| l.starts_with("cluster.xds-grpc;.")),
        "{all}"
    );
    assert!(all.contains("server.state: 0\n"), "{all}");
    let (_, prom) = http(port, "GET", "/stats/prometheus")
        .await
        .expect("prometheus");
    assert!(!prom.contains(VIP_CLUSTER), "{prom}");
    assert!(prom.contains("cluster_name=\"xds-grpc\""), "{prom}");

    // 6. /clusters, /listeners, /server_info, /logging.
    let (_, clusters) = http(port, "GET", "/clusters").await.expect("clusters");
    assert!(
        clusters.contains(&format!(
            "{VIP_CLUSTER}::envoy://connect_originate/10.244.1.5:8080::health_flags::healthy\n"
        )),
        "{clusters}"
    );
    assert!(
        clusters.contains("xds-grpc::default_priority::max_connections::"),
        "{clusters}"
    );
    let cj = get_json(port, "/clusters?format=json").await;
    assert!(
        cj["cluster_statuses"]
            .as_array()
            .is_some_and(|c| c.len() >= 8),
        "{cj}"
    );
    let (_, listeners) = http(port, "GET", "/listeners").await.expect("listeners");
    assert!(
        listeners.contains(&format!("connect_terminate::{}\n", pod.hbone)),
        "{listeners}"
    );
    assert!(
        listeners.contains("main_internal::envoy://main_internal/\n"),
        "{listeners}"
    );
    let info = get_json(port, "/server_info").await;
    assert_eq!(info["state"], "LIVE");
    assert_eq!(info["node"]["id"], NODE_ID);
    let (status, body) = http(port, "POST", "/logging?level=debug")
        .await
        .expect("logging");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("  xds: debug\n"), "{body}");
    let (status, _) = http(port, "POST", "/logging?level=loud")
        .await
        .expect("logging");
    assert_eq!(status, 400);
    let (status, _) = http(port, "POST", "/logging?level=info")
        .await
        .expect("logging");
    assert_eq!(status, 200);
    let (status, _) = http(port, "GET", "/quitquitquit").await.expect("405");
    assert_eq!(status, 405);

    pod.stop().await;
    istiod.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    let _ = &pod.root;
}

fn lua_listener(with_lua: bool) -> Json {
    let mut filters = vec![];
    if with_lua {
        filters.push(json!({
            "name": "envoy.filters.http.lua",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": "function envoy_on_request(h) end"}
            }
        }));
    }
    filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    }));
    json!({
        "name": "lua_test",
        "internal_listener": {},
        "filter_chains": [{
            "filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "lua_test",
                    "route_config": {"name": "lua_test"},
                    "http_filters": filters
                }
            }]
        }]
    })
}

/// A listener the proxy cannot honour is NACKed naming listener, filter and field; the other
/// resources stay applied; the fixed version is ACKed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_filter_is_nacked_and_fix_is_acked() {
    let (istiod, mut pod, dir) = start("nack").await;
    let port = pod.admin_port;
    let book = istiod.book.clone();
    if let Err(c) = book
        .wait_until(START_WAIT, |conns| {
            our_conn(conns)
                .and_then(|c| c.types.get(LISTENER_TYPE))
                .is_some_and(|s| s.acks >= 1)
        })
        .await
    {
        panic!("no LDS ACK: {c:#?}\nlog:\n{}", pod.log_tail());
    }
    // An LDS ACK comes before the initial fetch ends (clusters, secrets): LIVE first, so the
    // check after the NACK below sees whether a rejected listener takes the proxy out of LIVE.
    poll(&mut pod, WAIT, "/ready LIVE", || async {
        match http(port, "GET", "/ready").await {
            Ok((200, body)) if body == "LIVE\n" => Some(()),
            _ => None,
        }
    })
    .await;

    istiod
        .push_json(ResourceKind::Listener, &lua_listener(true))
        .await
        .expect("push");
    let nacked = book
        .wait_until(WAIT, |conns| {
            our_conn(conns)
                .and_then(|c| c.types.get(LISTENER_TYPE))
                .is_some_and(|s| s.nacks >= 1)
        })
        .await;
    let conns = match nacked {
        Ok(c) => c,
        Err(c) => panic!(
            "the Lua listener was not NACKed (the config compiler must reject envoy.filters.http.lua): {:#?}\nlog:\n{}",
            our_conn(&c).map(|c| &c.types),
            pod.log_tail()
        ),
    };
    let nack = our_conn(&conns)
        .and_then(|c| c.types.get(LISTENER_TYPE))
        .and_then(|s| s.last_nack.clone())
        .expect("last NACK");
    // The message comes from the config compiler (proxy/src/config): the resource, the filter (by
    // its name or its extension type) and the field path.
    let m = &nack.message;
    assert!(m.contains("'lua_test'"), "{m}");
    assert!(
        m.contains("envoy.filters.http.lua")
            || m.contains("envoy.extensions.filters.http.lua.v3.Lua"),
        "{m}"
    );
    assert!(m.contains("http_filters[0]"), "{m}");

    // The rest stays applied and the proxy stays LIVE.
    let (status, body) = http(port, "GET", "/ready").await.expect("ready");
    assert_eq!((status, body.as_str()), (200, "LIVE\n"));
    let dump = get_json(port, "/config_dump?resource=dynamic_listeners").await;
    let active: Vec<String> = dump["configs"]
        .as_array()
        .expect("configs")
        .iter()
        .filter(|l| l.get("active_state").is_some())
        .filter_map(|l| l["name"].as_str().map(str::to_owned))
        .collect();
    for l in ["connect_originate", "connect_terminate", "main_internal"] {
        assert!(active.contains(&l.to_owned()), "{l} not active: {dump}");
    }
    let failed = dump["configs"]
        .as_array()
        .expect("configs")
        .iter()
        .find(|l| l["name"] == "lua_test")
        .expect("lua_test in the dump with its error");
    assert!(failed.get("active_state").is_none(), "{failed}");
    assert!(
        failed["error_state"]["details"]
            .as_str()
            .is_some_and(|d| d.contains("http_filters[0]")),
        "{failed}"
    );

    // The fix is ACKed and becomes active.
    let acks_before = our_conn(&conns)
        .and_then(|c| c.types.get(LISTENER_TYPE))
        .map(|s| s.acks)
        .unwrap_or(0);
    istiod
        .push_json(ResourceKind::Listener, &lua_listener(false))
        .await
        .expect("push");
    if let Err(c) = book
        .wait_until(WAIT, |conns| {
            our_conn(conns)
                .and_then(|c| c.types.get(LISTENER_TYPE))
                .is_some_and(|s| s.acks > acks_before && s.acked_version == s.sent_version)
        })
        .await
    {
        panic!("the fixed listener was not ACKed: {:#?}", our_conn(&c));
    }
    poll(&mut pod, WAIT, "lua_test active in the dump", || async {
        let dump = get_json(
            port,
            "/config_dump?resource=dynamic_listeners&name_regex=%5Elua_test%24",
        )
        .await;
        let l = dump["configs"].as_array()?.first()?.clone();
        (l.get("active_state").is_some() && l.get("error_state").is_none()).then_some(())
    })
    .await;

    // A socket listener whose address is taken is NACKed (Envoy: "cannot bind"), the others stay.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = holder.local_addr().expect("addr");
    let nacks_before = our_conn(&book.connections().await)
        .and_then(|c| c.types.get(LISTENER_TYPE))
        .map(|s| s.nacks)
        .unwrap_or(0);
    let mut l = lua_listener(false);
    l["name"] = json!("taken_test");
    l.as_object_mut()
        .expect("object")
        .remove("internal_listener");
    l["address"] = json!({"socket_address": {"address": "127.0.0.1", "port_value": taken.port()}});
    istiod
        .push_json(ResourceKind::Listener, &l)
        .await
        .expect("push");
    let conns = match book
        .wait_until(WAIT, |conns| {
            our_conn(conns)
                .and_then(|c| c.types.get(LISTENER_TYPE))
                .is_some_and(|s| s.nacks > nacks_before)
        })
        .await
    {
        Ok(c) => c,
        Err(c) => panic!(
            "a listener on a taken address was not NACKed: {:#?}\nlog:\n{}",
            our_conn(&c),
            pod.log_tail()
        ),
    };
    let m = our_conn(&conns)
        .and_then(|c| c.types.get(LISTENER_TYPE))
        .and_then(|s| s.last_nack.clone())
        .expect("last NACK")
        .message;
    assert!(
        m.contains("'taken_test'") && m.contains(&format!("cannot bind {taken}")),
        "{m}"
    );
    let (status, _) = http(port, "GET", "/ready").await.expect("ready");
    assert_eq!(status, 200);
    drop(holder);

    pod.stop().await;
    istiod.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A listener whose HTTP connection manager uses `rds` gets its RouteConfiguration over ADS (the
/// proxy subscribes the name after LDS), serves with it, and follows an update of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rds_routes_are_subscribed_and_served() {
    let (istiod, mut pod, dir) = start("rds").await;
    let book = istiod.book.clone();
    if let Err(c) = book
        .wait_until(START_WAIT, |conns| {
            our_conn(conns)
                .and_then(|c| c.types.get(LISTENER_TYPE))
                .is_some_and(|s| s.acks >= 1)
        })
        .await
    {
        panic!("no LDS ACK: {c:#?}\nlog:\n{}", pod.log_tail());
    }
    let route = |body: &str| {
        json!({
            "name": "rds_route",
            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": body}}}
            ]}]
        })
    };
    istiod
        .push_json(ResourceKind::Route, &route("from-rds-1"))
        .await
        .expect("push route");
    let port = free_port();
    let listener = json!({
        "name": "rds_test",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "rds_test",
                "rds": {"route_config_name": "rds_route", "config_source": {"ads": {}, "resource_api_version": "V3"}},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
            }
        }]}]
    });
    istiod
        .push_json(ResourceKind::Listener, &listener)
        .await
        .expect("push listener");
    poll(
        &mut pod,
        WAIT,
        "the RDS route served on the new listener",
        || async {
            let (status, body) = http(port, "GET", "/x").await.ok()?;
            (status == 200 && body == "from-rds-1").then_some(())
        },
    )
    .await;
    let rds = our_conn(&book.connections().await)
        .and_then(|c| c.types.get(ROUTE_TYPE).cloned())
        .expect("an RDS subscription on the stream");
    assert!(rds.acks >= 1 && rds.nacks == 0, "{rds:#?}");
    istiod
        .push_json(ResourceKind::Route, &route("from-rds-2"))
        .await
        .expect("push route");
    poll(&mut pod, WAIT, "the updated RDS route", || async {
        let (status, body) = http(port, "GET", "/x").await.ok()?;
        (status == 200 && body == "from-rds-2").then_some(())
    })
    .await;
    pod.stop().await;
    istiod.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
