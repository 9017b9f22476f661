//! [`WaypointMesh`]: the whole local mesh around one waypoint, on loopback, for end-to-end tests,
//! the `mesh` command and benchmarks.
//!
//! ```text
//!  curl/h2load ──TCP──▶ HboneForwarder ──HBONE (sleep)──▶ WAYPOINT_IP:15008  (agent → proxy)
//!   CLIENT_IP:port       (ztunnel, client side)             connect_terminate → main_internal →
//!                                                           VIP route → EDS → connect_originate
//!                                            ┌──HBONE (waypoint)──┘
//!                                            ▼
//!                        POD_IP:15008 HboneSink (ztunnel, pod side) ──TCP──▶ POD_IP:8080 echo
//! ```
//!
//! * istiod-lite runs in-process (CA + ADS) and serves `tests/fixtures/mesh/waypoint.yaml` — the
//!   reference waypoint snapshot with its addresses moved onto this instance's loopback /24 — plus
//!   the httpbin and sleep workloads.
//! * The echo server (HTTP/1.1, h2c, WebSocket) listens on `POD_IP:8080`; an [`HboneSink`] with the
//!   httpbin identity terminates HBONE on `POD_IP:15008` and dials each `CONNECT`'s authority,
//!   recording who asked ([`AcceptedStream::peer_identity`]).
//! * The real `agent` binary runs `proxy waypoint` in a temporary pod root (token, mesh root, pod
//!   labels) and spawns the real `proxy` binary (`binaryPath`); every port it opens is a free one
//!   unless [`MeshOptions::ports`] fixes them (the `mesh` command uses Istio's 15000/15020/...).
//! * An [`HboneForwarder`] with the sleep identity listens on `CLIENT_IP:<free port>` and opens one
//!   `CONNECT VIP:8000` stream to `WAYPOINT_IP:15008` per TCP connection: the address clients use.
//!
//! # Loopback addresses
//!
//! Each instance takes its own /24 `127.S.T.0/24` with `S` in `20..=219` and `T` in `0..=255`, so
//! parallel tests (threads of one test binary, or several binaries) never share an address: the
//! waypoint is `.2`, the service VIP `.100`, the httpbin pod `.5` and the sleep client `.7`. The
//! first candidate is derived from the process id, later ones from a process-wide counter; a
//! candidate is taken when `WAYPOINT_IP:15008` can be bound and the sink can bind `POD_IP:15008`
//! and the echo `POD_IP:8080` (the sink holding `POD_IP:15008` is what keeps other instances out).
//! Linux routes all of 127.0.0.0/8 to `lo`, so no address has to be configured.
//!
//! # Waiting and shutting down
//!
//! Every wait has a bound ([`WaypointMesh::wait_for`] polls a condition every
//! [`POLL_INTERVAL`] until a deadline, at most `bound / POLL_INTERVAL + 1` times) and fails with
//! the proxy's log tail. Dropping the mesh kills the agent and every process below it (the proxy),
//! stops the in-process servers and removes its folder (a temporary one, or [`MeshOptions::dir`];
//! kept with [`MeshOptions::keep`] or `WAYPOINT_MESH_KEEP=1`); when the drop happens during a
//! panic it first prints [`WaypointMesh::diagnostics`] (log tail, `/listeners`, dynamic listeners
//! of `/config_dump`, what the sink saw).

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    fmt,
    future::Future,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    pin::Pin,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Deserialize;
use serde_json::{Value as Json, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    task::JoinHandle,
};
use tokio_rustls::TlsConnector;
use waypoint_shared::identity::SpiffeId;

use crate::{
    echo::{EchoConfig, EchoError, EchoServer},
    hbone::{
        AcceptedStream, ClientTls, ForwarderConfig, HboneError, HboneForwarder, HboneSink,
        IstiodRequest, PeerMatch, SinkConfig, WorkloadIdentity,
    },
    istiod_lite::{Config, IstiodLite, StartError, mint_token, store::LoadError},
};

/// The agent binary: `AGENT_BIN`, else the `agent` beside `proxy_bin` (one `cargo build` target
/// dir). Panics with how to build it when it is missing.
pub fn agent_beside(proxy_bin: &Path) -> PathBuf {
    if let Ok(p) = std::env::var("AGENT_BIN") {
        return PathBuf::from(p);
    }
    let p = proxy_bin.with_file_name("agent");
    assert!(
        p.is_file(),
        "agent binary not found at {}: build it with `cargo build -p agent` or set AGENT_BIN",
        p.display()
    );
    p
}

/// The fixture template (placeholders `${WAYPOINT_IP}`, `${VIP}`, `${POD_IP}`, `${POD_IP_B64}`,
/// `${CLIENT_IP_B64}`, `${CLIENT_IP}`).
pub const FIXTURE_TEMPLATE: &str = include_str!("../fixtures/mesh/waypoint.yaml");

/// The trust domain of every identity.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The namespace of every workload.
pub const NAMESPACE: &str = "default";
/// The waypoint's service account (the agent's identity).
pub const WAYPOINT_SA: &str = "waypoint";
/// The destination pod's service account.
pub const HTTPBIN_SA: &str = "httpbin";
/// The client pod's service account.
pub const SLEEP_SA: &str = "sleep";
/// The waypoint's SPIFFE identity: what the sink must see as the HBONE client behind the waypoint.
pub const WAYPOINT_IDENTITY: &str = "spiffe://cluster.local/ns/default/sa/waypoint";
/// The httpbin pod's SPIFFE identity.
pub const HTTPBIN_IDENTITY: &str = "spiffe://cluster.local/ns/default/sa/httpbin";
/// The sleep client's SPIFFE identity.
pub const SLEEP_IDENTITY: &str = "spiffe://cluster.local/ns/default/sa/sleep";
/// The service port (routed by the waypoint).
pub const SERVICE_PORT: u16 = 8000;
/// The pod's target port (the echo server).
pub const TARGET_PORT: u16 = 8080;
/// The HBONE port.
pub const HBONE_PORT: u16 = crate::hbone::HBONE_PORT;
/// The service's cluster (also its route configuration and filter chain name).
pub const VIP_CLUSTER: &str = "inbound-vip|8000|http|httpbin.default.svc.cluster.local";
/// The `ProxyConfig.proxyStatsMatcher.inclusionPrefixes` the harness sets by default, on top of
/// Istio's inclusion list (which keeps only `server`, `cluster_manager`, `listener_manager`,
/// `cluster.xds-grpc`, RBAC results, Istio's metrics ...): the per-cluster, per-HCM, per-listener,
/// per-tcp_proxy and SDS stats the end-to-end tests and the `mesh` report read, asked for the way
/// an Istio user asks for them.
pub const STATS_INCLUSION_PREFIXES: &[&str] = &["cluster.", "http.", "listener.", "tcp.", "sds."];

/// The waypoint pod's name.
pub const POD_NAME: &str = "waypoint-1";
/// Name the echo server reports (`server` in its JSON, `x-echo-server` header).
pub const ECHO_NAME: &str = "httpbin";

/// How often [`WaypointMesh::wait_for`] re-checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// Host part of each role within the /24.
const WAYPOINT_HOST: u8 = 2;
const POD_HOST: u8 = 5;
const CLIENT_HOST: u8 = 7;
const VIP_HOST: u8 = 100;
/// Second octets of the subnets handed out, and how many subnets that makes.
const FIRST_SECOND_OCTET: u32 = 20;
const SECOND_OCTETS: u32 = 200;
const SUBNETS: u32 = SECOND_OCTETS * 256;
/// Candidates tried per claim.
const MAX_SUBNET_TRIES: usize = 64;
/// Lines of the agent/proxy log shown in errors and diagnostics.
const LOG_TAIL_LINES: usize = 80;
/// Upper bound of any admin request made by the harness.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often [`WaypointMesh::wait_agent_exit`] checks whether the agent exited (exit times are
/// measured with it).
pub const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(5);
/// How long `Drop` waits for the agent to die after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// istiod-lite did not start.
    #[error("istiod-lite: {0}")]
    Istiod(#[from] StartError),
    /// The rendered fixture was refused by istiod-lite.
    #[error("istiod-lite refused the fixture: {0}")]
    Resources(#[from] LoadError),
    /// An HBONE workload failed.
    #[error("HBONE: {0}")]
    Hbone(#[from] HboneError),
    /// The echo server failed.
    #[error("echo server: {0}")]
    Echo(#[from] EchoError),
    /// The fixture could not be rendered.
    #[error("fixture: {0}")]
    Fixture(String),
    /// Certificate material could not be made.
    #[error("certificate: {0}")]
    Cert(String),
    /// No loopback /24 was free.
    #[error("no free loopback /24 after {tried} candidates (last: {last})")]
    NoSubnet {
        /// Candidates tried.
        tried: usize,
        /// Why the last one was refused.
        last: String,
    },
    /// The agent exited on its own.
    #[error("the agent exited ({status}); agent/proxy log tail:\n{log}")]
    AgentExited {
        /// Its exit status.
        status: String,
        /// The end of its log.
        log: String,
    },
    /// A condition did not hold within its bound.
    #[error(
        "timed out after {after:?} waiting for {what} (last: {last}); agent/proxy log tail:\n{log}"
    )]
    Timeout {
        /// The condition.
        what: String,
        /// The bound.
        after: Duration,
        /// The last observation.
        last: String,
        /// The end of the agent/proxy log.
        log: String,
    },
    /// The proxy NACKed part of the fixture.
    #[error("the proxy NACKed the fixture: {0}")]
    Nacked(String),
    /// An HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> MeshError {
    let what = what.into();
    move |source| MeshError::Io { what, source }
}

// ---------------------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------------------

/// The loopback addresses of one mesh instance (see the module docs for the scheme).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshAddrs {
    /// The waypoint (`INSTANCE_IP`; `connect_terminate` binds `WAYPOINT_IP:15008`).
    pub waypoint_ip: Ipv4Addr,
    /// The httpbin service VIP (port [`SERVICE_PORT`]).
    pub vip: Ipv4Addr,
    /// The httpbin pod (echo on [`TARGET_PORT`], HBONE sink on 15008).
    pub pod_ip: Ipv4Addr,
    /// The sleep client (the forwarder listens here).
    pub client_ip: Ipv4Addr,
}

impl MeshAddrs {
    /// The addresses in `127.second.third.0/24`.
    pub fn in_subnet(second: u8, third: u8) -> Self {
        let ip = |host| Ipv4Addr::new(127, second, third, host);
        MeshAddrs {
            waypoint_ip: ip(WAYPOINT_HOST),
            vip: ip(VIP_HOST),
            pod_ip: ip(POD_HOST),
            client_ip: ip(CLIENT_HOST),
        }
    }

    /// The next candidate /24 of this process (see the module docs).
    pub fn next_candidate() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        // Knuth's multiplicative hash spreads neighbouring pids over the range.
        let start = std::process::id().wrapping_mul(2_654_435_761) % SUBNETS;
        let index = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SUBNETS;
        let second = u8::try_from(FIRST_SECOND_OCTET + index / 256).unwrap_or(u8::MAX);
        let third = u8::try_from(index % 256).unwrap_or(0);
        MeshAddrs::in_subnet(second, third)
    }

    /// A /24 whose `WAYPOINT_IP:15008` can be bound right now (for tests that only need the
    /// waypoint address, e.g. to serve the fixture without the rest of the mesh).
    pub fn claim_waypoint_ip() -> Result<Self, MeshError> {
        let mut last = String::new();
        for _ in 0..MAX_SUBNET_TRIES {
            let addrs = MeshAddrs::next_candidate();
            match std::net::TcpListener::bind(addrs.waypoint_hbone()) {
                Ok(_) => return Ok(addrs),
                Err(e) => last = format!("{}: {e}", addrs.waypoint_hbone()),
            }
        }
        Err(MeshError::NoSubnet {
            tried: MAX_SUBNET_TRIES,
            last,
        })
    }

    /// `WAYPOINT_IP:15008`.
    pub fn waypoint_hbone(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.waypoint_ip, HBONE_PORT))
    }

    /// `VIP:8000`, the authority clients `CONNECT` to.
    pub fn service(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.vip, SERVICE_PORT))
    }

    /// `POD_IP:8080`, the echo server.
    pub fn pod_app(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.pod_ip, TARGET_PORT))
    }

    /// `POD_IP:15008`, the sink.
    pub fn pod_hbone(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.pod_ip, HBONE_PORT))
    }

    /// The placeholder values of the fixture.
    pub fn substitutions(&self) -> Vec<(&'static str, String)> {
        let b64 = |ip: Ipv4Addr| base64::engine::general_purpose::STANDARD.encode(ip.octets());
        vec![
            ("WAYPOINT_IP", self.waypoint_ip.to_string()),
            ("VIP", self.vip.to_string()),
            ("POD_IP", self.pod_ip.to_string()),
            ("CLIENT_IP", self.client_ip.to_string()),
            ("POD_IP_B64", b64(self.pod_ip)),
            ("CLIENT_IP_B64", b64(self.client_ip)),
        ]
    }
}

/// Replaces every `${NAME}` of `template` with its value for `addrs`; any other `${…}` left is an
/// error.
pub fn render_fixture(template: &str, addrs: &MeshAddrs) -> Result<String, MeshError> {
    let mut out = template.to_owned();
    for (name, value) in addrs.substitutions() {
        out = out.replace(&format!("${{{name}}}"), &value);
    }
    if let Some(at) = out.find("${") {
        let line = out[..at].lines().count();
        let rest: String = out[at..].chars().take(40).collect();
        return Err(MeshError::Fixture(format!(
            "unknown placeholder at line {line}: {rest}"
        )));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Options and the mesh
// ---------------------------------------------------------------------------------------------

/// How to start a [`WaypointMesh`].
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// Names the temporary folder (short: the agent's Unix sockets live below it).
    pub name: String,
    /// The `proxy` binary the agent starts (`binaryPath`).
    pub proxy_bin: PathBuf,
    /// The `agent` binary.
    pub agent_bin: PathBuf,
    /// The fixture template served by istiod-lite.
    pub fixture: String,
    /// `--proxyLogLevel` of the agent.
    pub proxy_log_level: String,
    /// Bound for the agent to report ready (`/healthz/ready` 200 through the proxy).
    pub ready_within: Duration,
    /// Extra environment for the agent (and through it the proxy).
    pub env: Vec<(String, String)>,
    /// Fixed agent/proxy ports (the `mesh` command's Istio defaults); `None` picks free ones.
    pub ports: Option<AgentPorts>,
    /// The folder to run in (emptied first) instead of a new temporary one. Keep its path short:
    /// the agent's Unix sockets live below it and must fit `sun_path` (108 bytes).
    pub dir: Option<PathBuf>,
    /// Keep the folder when the mesh is dropped (as `WAYPOINT_MESH_KEEP=1` does).
    pub keep: bool,
    /// Serve istiod-lite's debug HTTP (`/debug/xds`, `/debug/certs`) on a free loopback port.
    pub istiod_debug: bool,
    /// Wait for readiness (and check for NACKs) in [`WaypointMesh::start`]; `false` returns once
    /// the agent is spawned (for tests that watch the start-up, or run without a proxy).
    pub wait_ready: bool,
    /// `PROXY_CONFIG` fields set over the harness's (e.g. `terminationDrainDuration`,
    /// `drainDuration`; the harness sets both to `1s`). Later entries win. Starts with
    /// `proxyStatsMatcher: {inclusionPrefixes: STATS_INCLUSION_PREFIXES}`; replace it (or remove
    /// it) to see the proxy with another stats matcher.
    pub proxy_config: Vec<(String, Json)>,
    /// A command the agent runs under: `wrapper... agent proxy waypoint ...` (e.g. `unshare --pid
    /// --fork --mount-proc` to make it PID 1). [`WaypointMesh::agent_pid`] is then the wrapper's.
    pub wrapper: Vec<String>,
}

impl MeshOptions {
    /// Defaults: the mesh fixture, proxy log level `info`, 120 s to become ready (the agent signs
    /// its certificate and the proxy pulls xDS on a busy 2-core machine), and the stats the tests
    /// read kept ([`STATS_INCLUSION_PREFIXES`]).
    pub fn new(name: &str, proxy_bin: &Path, agent_bin: &Path) -> Self {
        MeshOptions {
            name: name.to_owned(),
            proxy_bin: proxy_bin.to_owned(),
            agent_bin: agent_bin.to_owned(),
            fixture: FIXTURE_TEMPLATE.to_owned(),
            proxy_log_level: "info".to_owned(),
            ready_within: Duration::from_secs(120),
            env: Vec::new(),
            ports: None,
            dir: None,
            keep: false,
            istiod_debug: false,
            wait_ready: true,
            proxy_config: vec![(
                "proxyStatsMatcher".to_owned(),
                json!({ "inclusionPrefixes": STATS_INCLUSION_PREFIXES }),
            )],
            wrapper: Vec::new(),
        }
    }
}

/// The free ports of the agent and proxy (all on every interface, as in a pod; used on 127.0.0.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentPorts {
    /// Proxy admin (`proxyAdminPort`, Istio 15000).
    pub admin: u16,
    /// Agent status server (`statusPort`, Istio 15020).
    pub status: u16,
    /// Proxy readiness listener (`ENVOY_STATUS_PORT`, Istio 15021) → agent `/healthz/ready`.
    pub readiness: u16,
    /// Proxy Prometheus listener (`ENVOY_PROMETHEUS_PORT`, Istio 15090).
    pub prometheus: u16,
}

/// Memory figures of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcMemory {
    /// Resident set size now, KiB.
    pub rss_kib: u64,
    /// Peak resident set size (`VmHWM`), KiB.
    pub hwm_kib: u64,
}

/// What the echo server reports about a request (its JSON answer).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct EchoSeen {
    /// The server's name ([`ECHO_NAME`]).
    pub server: String,
    /// The listener that accepted the connection (`POD_IP:8080`).
    pub listener: String,
    /// The TCP peer (the sink's dial).
    pub peer: String,
    /// Request method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2`, ...
    pub protocol: String,
    /// Request headers (repeated ones joined with `, `).
    pub headers: BTreeMap<String, String>,
    /// Request body bytes received.
    pub body_len: u64,
    /// SHA-1 of the request body (hex), when asked for with `x-echo-body-sha1`.
    #[serde(default)]
    pub body_sha1: Option<String>,
    /// Requests the `x-echo-key` has seen, this one included (absent without a key).
    #[serde(default)]
    pub request_count: Option<u64>,
}

impl EchoSeen {
    /// Parses an echo answer.
    pub fn parse(body: &[u8]) -> Result<Self, MeshError> {
        serde_json::from_slice(body).map_err(|e| {
            MeshError::Http(format!(
                "not an echo answer ({e}): {}",
                String::from_utf8_lossy(&body[..body.len().min(500)])
            ))
        })
    }
}

/// The mesh around one waypoint. See the module docs.
pub struct WaypointMesh {
    /// The addresses of this instance.
    pub addrs: MeshAddrs,
    /// istiod-lite (CA, ADS, ACK/NACK book).
    pub istiod: IstiodLite,
    /// The httpbin pod's HBONE terminator on `POD_IP:15008`.
    pub sink: HboneSink,
    /// The sleep client's forwarder: `CLIENT_IP:port` → `WAYPOINT_IP:15008`, authority `VIP:8000`.
    pub forwarder: HboneForwarder,
    /// The sleep identity (client side).
    pub sleep: Arc<WorkloadIdentity>,
    /// The httpbin identity (the sink's).
    pub httpbin: Arc<WorkloadIdentity>,
    /// The agent's and proxy's ports.
    pub ports: AgentPorts,
    /// The proxy's xDS node id.
    pub node_id: String,
    options: MeshOptions,
    dir: PathBuf,
    log: PathBuf,
    agent: Mutex<Option<Child>>,
    agent_pid: u32,
    echo: JoinHandle<()>,
}

impl fmt::Debug for WaypointMesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WaypointMesh")
            .field("addrs", &self.addrs)
            .field("ports", &self.ports)
            .field("forwarder", &self.forwarder.addr)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Numbers the temporary folders of this process.
static MESH_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A TCP port free on 127.0.0.1 right now (the OS picks it; another process may take it before it
/// is used, which the caller then sees as a bind error).
pub fn free_port() -> Result<u16, MeshError> {
    free_ports::<1>().map(|[p]| p)
}

/// `N` distinct TCP ports free on 127.0.0.1 right now. Every one is held until all are picked:
/// ports picked one after another can repeat (the OS may hand out a port it just got back), and
/// two listeners of one proxy on the same port make it exit.
pub fn free_ports<const N: usize>() -> Result<[u16; N], MeshError> {
    let mut held = Vec::with_capacity(N);
    let mut ports = [0; N];
    for port in &mut ports {
        let l =
            std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err("picking a free port"))?;
        *port = l
            .local_addr()
            .map_err(io_err("picking a free port"))?
            .port();
        held.push(l);
    }
    Ok(ports)
}

impl WaypointMesh {
    /// Starts everything and (unless `options.wait_ready` is off) waits at most
    /// `options.ready_within` until the agent reports ready through the proxy's readiness port,
    /// then checks that the proxy NACKed nothing. It does not
    /// wait for the waypoint's HBONE listener to serve: see [`WaypointMesh::wait_hbone_ready`].
    pub async fn start(options: MeshOptions) -> Result<Self, MeshError> {
        let n = MESH_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = options.dir.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!(
                "wpm-{}-{}-{n}",
                short(&options.name),
                std::process::id()
            ))
        });
        let _ = std::fs::remove_dir_all(&dir);
        let pod = dir.join("pod");
        for sub in [
            "var/run/secrets/tokens",
            "var/run/secrets/istio",
            "etc/istio/proxy",
            "etc/istio/pod",
        ] {
            std::fs::create_dir_all(pod.join(sub))
                .map_err(io_err(format!("creating {}", pod.join(sub).display())))?;
        }
        let resources = dir.join("resources");
        std::fs::create_dir_all(&resources).map_err(io_err("creating the resources folder"))?;

        // 1. istiod-lite, serving nothing until the addresses are known.
        let mut config = Config::for_test(&dir.join("ca"));
        config.resources = Some(resources.clone());
        if options.istiod_debug {
            config.debug_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        }
        let istiod = IstiodLite::start(config).await?;
        let root_pem = istiod.root_cert_pem().to_owned();

        // 2. Workload identities from its CA, as ztunnel would get them.
        let issue = |sa: &str| {
            IstiodRequest::new(
                istiod.addr,
                &root_pem,
                SpiffeId::new(TRUST_DOMAIN, NAMESPACE, sa),
            )
        };
        let httpbin = Arc::new(WorkloadIdentity::from_istiod(&issue(HTTPBIN_SA)).await?);
        let sleep = Arc::new(WorkloadIdentity::from_istiod(&issue(SLEEP_SA)).await?);

        // 3. Claim a /24: the sink on POD_IP:15008 and the echo on POD_IP:8080.
        let (addrs, sink, echo) = claim_subnet(&httpbin).await?;
        let echo = tokio::spawn(async move {
            if let Err(err) = echo.run().await {
                tracing::error!(%err, "echo server failed");
            }
        });

        // 4. The fixture, rendered for these addresses.
        let rendered = render_fixture(&options.fixture, &addrs)?;
        std::fs::write(resources.join("waypoint.yaml"), rendered)
            .map_err(io_err("writing the rendered fixture"))?;
        istiod.store.load_files(&resources).await?;

        // 5. The client side.
        let mut fwd = ForwarderConfig::new(
            SocketAddr::V4(SocketAddrV4::new(addrs.client_ip, 0)),
            addrs.waypoint_hbone(),
            addrs.service().to_string(),
            sleep.clone(),
        );
        fwd.expect_peer = PeerMatch::Exact(WAYPOINT_IDENTITY.to_owned());
        // From the client pod's IP, as ztunnel connects: the waypoint finds the source
        // workload (WDS) by this address.
        fwd.pool.source_ip = Some(addrs.client_ip.into());
        let forwarder = HboneForwarder::start(fwd).await?;

        // 6. The pod root and the agent.
        std::fs::write(
            pod.join("var/run/secrets/tokens/istio-token"),
            mint_token(NAMESPACE, WAYPOINT_SA, Duration::from_secs(3600)) + "\n",
        )
        .map_err(io_err("writing the token"))?;
        std::fs::write(pod.join("var/run/secrets/istio/root-cert.pem"), &root_pem)
            .map_err(io_err("writing the root certificate"))?;
        std::fs::write(
            pod.join("etc/istio/pod/labels"),
            "app=\"waypoint\"\ngateway.networking.k8s.io/gateway-name=\"waypoint\"\n",
        )
        .map_err(io_err("writing the pod labels"))?;
        let ports = match options.ports {
            Some(ports) => ports,
            None => {
                let [admin, status, readiness, prometheus] = free_ports()?;
                AgentPorts {
                    admin,
                    status,
                    readiness,
                    prometheus,
                }
            }
        };
        let log = dir.join("agent.log");
        let child = spawn_agent(&options, &pod, &log, istiod.addr, addrs, ports)?;
        let agent_pid = child.id();
        let node_id = format!(
            "waypoint~{}~{POD_NAME}.{NAMESPACE}~{NAMESPACE}.svc.cluster.local",
            addrs.waypoint_ip
        );
        let mesh = WaypointMesh {
            addrs,
            istiod,
            sink,
            forwarder,
            sleep,
            httpbin,
            ports,
            node_id,
            options,
            dir,
            log,
            agent: Mutex::new(Some(child)),
            agent_pid,
            echo,
        };

        // 7. Ready: kubelet's probe path (proxy readiness port → agent → proxy admin stats).
        if !mesh.options.wait_ready {
            return Ok(mesh);
        }
        let url_port = mesh.ports.readiness;
        mesh.wait_for(
            "/healthz/ready 200 on the proxy's readiness port",
            mesh.options.ready_within,
            || async move {
                match http_get(
                    SocketAddr::from(([127, 0, 0, 1], url_port)),
                    "/healthz/ready",
                )
                .await
                {
                    Ok((200, _)) => Ok(()),
                    Ok((status, body)) => Err(format!("{status} {}", body.trim())),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await?;
        let nacks = mesh.nacks().await;
        if !nacks.is_empty() {
            return Err(MeshError::Nacked(nacks.join("\n")));
        }
        Ok(mesh)
    }

    /// The forwarder's local address: what curl, h2load and friends target.
    pub fn client_addr(&self) -> SocketAddr {
        self.forwarder.addr
    }

    /// `http://<client addr><path>`.
    pub fn client_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.forwarder.addr)
    }

    /// The proxy admin address (`127.0.0.1:<admin port>`).
    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.admin))
    }

    /// `http://127.0.0.1:<admin port><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr())
    }

    /// GET `path` on the proxy admin port: (status, body).
    pub async fn admin_get(&self, path: &str) -> Result<(u16, String), MeshError> {
        http_get(self.admin_addr(), path).await
    }

    /// The proxy's `/config_dump` (optionally `?resource=...` etc. in `query`).
    pub async fn config_dump(&self, query: &str) -> Result<Json, MeshError> {
        let path = if query.is_empty() {
            "/config_dump".to_owned()
        } else {
            format!("/config_dump?{query}")
        };
        let (status, body) = self.admin_get(&path).await?;
        if status != 200 {
            return Err(MeshError::Http(format!("GET {path}: {status} {body}")));
        }
        serde_json::from_str(&body).map_err(|e| MeshError::Http(format!("GET {path}: {e}")))
    }

    /// Every stream the sink answered so far.
    pub fn sink_streams(&self) -> Vec<AcceptedStream> {
        self.sink.accepted()
    }

    /// The temporary folder (pod root below `pod/`, CA below `ca/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The combined agent/proxy log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The combined agent/proxy log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the agent/proxy log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The agent's pid.
    pub fn agent_pid(&self) -> u32 {
        self.agent_pid
    }

    /// The proxy's pid: the process below the agent (its child, or its grandchild under a
    /// [`MeshOptions::wrapper`]) running the proxy binary.
    pub fn proxy_pid(&self) -> Option<u32> {
        let want = self.options.proxy_bin.to_string_lossy().into_owned();
        let below = descendants(self.agent_pid);
        processes()
            .into_iter()
            .find(|p| {
                below.contains(&p.pid)
                    && p.cmdline
                        .first()
                        .is_some_and(|a| *a == want || a.ends_with("/proxy"))
            })
            .map(|p| p.pid)
    }

    /// The agent's (or its wrapper's) exit status once it exited; `None` while it runs.
    pub fn agent_exit(&self) -> Option<ExitStatus> {
        let mut guard = self.agent.lock().unwrap_or_else(PoisonError::into_inner);
        guard.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits (checking every [`EXIT_POLL_INTERVAL`]) until the agent exits; returns its status and
    /// when the exit was seen.
    pub async fn wait_agent_exit(
        &self,
        bound: Duration,
    ) -> Result<(ExitStatus, Instant), MeshError> {
        let deadline = Instant::now() + bound;
        let max_rounds = bound.as_millis() / EXIT_POLL_INTERVAL.as_millis().max(1) + 1;
        for _ in 0..max_rounds {
            if let Some(status) = self.agent_exit() {
                return Ok((status, Instant::now()));
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(EXIT_POLL_INTERVAL).await;
        }
        Err(MeshError::Timeout {
            what: "the agent to exit".to_owned(),
            after: bound,
            last: "still running".to_owned(),
            log: self.log_tail(LOG_TAIL_LINES),
        })
    }

    /// Sends `signal` to the agent process (the wrapper's pid under a [`MeshOptions::wrapper`]).
    pub fn signal_agent(&self, signal: nix::sys::signal::Signal) -> Result<(), MeshError> {
        let pid = i32::try_from(self.agent_pid)
            .map_err(|_| MeshError::Http(format!("pid {} out of range", self.agent_pid)))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).map_err(|e| MeshError::Io {
            what: format!("sending {signal} to the agent ({pid})"),
            source: io::Error::from(e),
        })
    }

    /// The agent's status server (`127.0.0.1:<statusPort>`).
    pub fn status_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.status))
    }

    /// The proxy's memory figures now.
    pub fn proxy_memory(&self) -> Option<ProcMemory> {
        proc_memory(self.proxy_pid()?)
    }

    /// Whether the agent is still running; `Err` with its status and log tail if it exited.
    pub fn check_agent(&self) -> Result<(), MeshError> {
        let mut guard = self.agent.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(child) = guard.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            return Err(MeshError::AgentExited {
                status: status.to_string(),
                log: self.log_tail(LOG_TAIL_LINES),
            });
        }
        Ok(())
    }

    /// Polls `probe` every [`POLL_INTERVAL`] until it returns `Ok`, the agent exits, or `bound`
    /// passes (then the error holds the last `Err` and the log tail).
    pub async fn wait_for<T, F, Fut>(
        &self,
        what: &str,
        bound: Duration,
        mut probe: F,
    ) -> Result<T, MeshError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        let deadline = tokio::time::Instant::now() + bound;
        let max_rounds = bound.as_millis() / POLL_INTERVAL.as_millis().max(1) + 1;
        let mut last = String::from("never checked");
        for _ in 0..max_rounds {
            self.check_agent()?;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left.max(POLL_INTERVAL), probe()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => last = e,
                Err(_) => last = "the check itself timed out".to_owned(),
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        Err(MeshError::Timeout {
            what: what.to_owned(),
            after: bound,
            last,
            log: self.log_tail(LOG_TAIL_LINES),
        })
    }

    /// Waits until the waypoint completes an HBONE handshake (mTLS with the sleep identity, the
    /// waypoint's identity checked, then the server's HTTP/2 SETTINGS) on `WAYPOINT_IP:15008`: the
    /// listener is bound and has its certificate.
    pub async fn wait_hbone_ready(&self, bound: Duration) -> Result<(), MeshError> {
        let tls = self.client_tls()?;
        let addr = self.addrs.waypoint_hbone();
        self.wait_for(
            &format!("the waypoint to serve HBONE on {addr}"),
            bound,
            || {
                let config = tls.config();
                async move {
                    match tls_probe(addr, config, Duration::from_secs(5)).await {
                        TlsProbe::Served => Ok(()),
                        other => Err(other.to_string()),
                    }
                }
            },
        )
        .await
    }

    /// Client TLS as the sleep pod, accepting only the waypoint's identity.
    pub fn client_tls(&self) -> Result<ClientTls, MeshError> {
        Ok(ClientTls::new(
            &self.sleep,
            &PeerMatch::Exact(WAYPOINT_IDENTITY.to_owned()),
        )?)
    }

    /// A forwarder that bypasses the waypoint: `CLIENT_IP:<free>` → sink `POD_IP:15008`,
    /// authority `POD_IP:8080`, as sleep, accepting only the httpbin identity (the harness
    /// self-test: forwarder → sink → echo).
    pub async fn direct_forwarder(&self) -> Result<HboneForwarder, MeshError> {
        let mut config = ForwarderConfig::new(
            SocketAddr::V4(SocketAddrV4::new(self.addrs.client_ip, 0)),
            self.addrs.pod_hbone(),
            self.addrs.pod_app().to_string(),
            self.sleep.clone(),
        );
        config.expect_peer = PeerMatch::Exact(HTTPBIN_IDENTITY.to_owned());
        Ok(HboneForwarder::start(config).await?)
    }

    /// Another client-side forwarder through the waypoint: `CLIENT_IP:<free>` → waypoint, authority
    /// `VIP:<port>`, as sleep from the client pod's IP, accepting only the waypoint identity (a
    /// second service port, e.g. the fixture's TCP port 9000).
    pub async fn service_forwarder(&self, port: u16) -> Result<HboneForwarder, MeshError> {
        let mut config = ForwarderConfig::new(
            SocketAddr::V4(SocketAddrV4::new(self.addrs.client_ip, 0)),
            self.addrs.waypoint_hbone(),
            format!("{}:{port}", self.addrs.vip),
            self.sleep.clone(),
        );
        config.expect_peer = PeerMatch::Exact(WAYPOINT_IDENTITY.to_owned());
        config.pool.source_ip = Some(self.addrs.client_ip.into());
        Ok(HboneForwarder::start(config).await?)
    }

    /// An identity for `id` (any trust domain) signed directly by the mesh CA.
    pub fn mesh_signed_identity(&self, id: &SpiffeId) -> Result<WorkloadIdentity, MeshError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| MeshError::Cert(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(|e| MeshError::Cert(e.to_string()))?;
        let (chain, _) = self
            .istiod
            .ca
            .sign(&csr, id, Duration::from_secs(3600))
            .map_err(|s| MeshError::Cert(s.message().to_owned()))?;
        let chain_pem: String = chain
            .iter()
            .map(|c| format!("{}\n", c.trim_end()))
            .collect();
        Ok(WorkloadIdentity::from_pem(
            &chain_pem,
            &key.serialize_pem(),
            self.istiod.root_cert_pem(),
        )?)
    }

    /// Every NACK the proxy sent (`type: message`).
    pub async fn nacks(&self) -> Vec<String> {
        let mut out = Vec::new();
        for conn in self.istiod.book.connections().await {
            for (t, s) in &conn.types {
                if s.nacks > 0 {
                    let msg = s
                        .last_nack
                        .as_ref()
                        .map(|n| n.message.clone())
                        .unwrap_or_default();
                    out.push(format!("{t} ({} NACKs, last: {msg})", s.nacks));
                }
            }
        }
        out
    }

    /// What helps most when a test fails: the log tail, `/listeners`, the dynamic listeners of
    /// `/config_dump` (name, address, error), `/clusters` lines of the service, what the sink and
    /// forwarder saw. Blocking (usable from `Drop`); each admin call is bounded.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        let admin = self.admin_addr();
        out.push_str(&format!(
            "=== waypoint mesh {} (addrs {:?}, ports {:?}, proxy pid {:?}) ===\n",
            self.dir.display(),
            self.addrs,
            self.ports,
            self.proxy_pid()
        ));
        out.push_str(&format!(
            "--- agent/proxy log tail ---\n{}\n",
            self.log_tail(LOG_TAIL_LINES)
        ));
        match http_get_blocking(admin, "/listeners") {
            Ok((_, body)) => out.push_str(&format!("--- /listeners ---\n{body}\n")),
            Err(e) => out.push_str(&format!("--- /listeners: {e}\n")),
        }
        match http_get_blocking(admin, "/config_dump?resource=dynamic_listeners") {
            Ok((_, body)) => {
                out.push_str("--- /config_dump dynamic listeners ---\n");
                out.push_str(&listener_summary(&body));
            }
            Err(e) => out.push_str(&format!("--- /config_dump: {e}\n")),
        }
        if let Ok((_, body)) = http_get_blocking(admin, "/clusters") {
            out.push_str("--- /clusters (service and connect_originate) ---\n");
            for line in body.lines().filter(|l| {
                (l.starts_with(VIP_CLUSTER) || l.starts_with("connect_originate::"))
                    && (l.contains("::health_flags::") || l.contains("::rq_") || l.contains("cx_"))
            }) {
                out.push_str(line);
                out.push('\n');
            }
        }
        let streams = self.sink.accepted();
        out.push_str(&format!(
            "--- sink: {:?}, last streams ---\n",
            self.sink.stats()
        ));
        for s in streams.iter().rev().take(10) {
            out.push_str(&format!("{s:?}\n"));
        }
        for e in self.sink.handshake_errors().iter().rev().take(5) {
            out.push_str(&format!("sink handshake error: {e}\n"));
        }
        out.push_str(&format!("--- forwarder: {:?}\n", self.forwarder.stats()));
        out
    }

    /// Stops the agent gracefully (SIGTERM: it drains and stops the proxy), waiting at most
    /// `bound`; then kills whatever is left. Consumes the mesh (the drop does the rest).
    pub async fn shutdown(self, bound: Duration) {
        let child = self
            .agent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut child) = child {
            let pid = child.id();
            let tree = descendants(pid);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + bound;
            let max_rounds = bound.as_millis() / POLL_INTERVAL.as_millis().max(1) + 1;
            for _ in 0..max_rounds {
                if matches!(child.try_wait(), Ok(Some(_))) || Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            kill_tree(&mut child, &tree);
        }
    }
}

impl Drop for WaypointMesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
        let child = self
            .agent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut child) = child {
            let tree = descendants(child.id());
            kill_tree(&mut child, &tree);
        }
        self.echo.abort();
        if !self.options.keep && std::env::var_os("WAYPOINT_MESH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("waypoint mesh kept in {}", self.dir.display());
        }
    }
}

/// `name` cut to 12 filesystem-safe characters (the agent's socket paths must fit `sun_path`).
fn short(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(12)
        .collect()
}

/// Takes the first free /24: `WAYPOINT_IP:15008` bindable, the sink bound on `POD_IP:15008`, the
/// echo bound on `POD_IP:8080`.
async fn claim_subnet(
    httpbin: &Arc<WorkloadIdentity>,
) -> Result<(MeshAddrs, HboneSink, EchoServer), MeshError> {
    let mut last = String::new();
    for _ in 0..MAX_SUBNET_TRIES {
        let addrs = MeshAddrs::next_candidate();
        if let Err(e) = std::net::TcpListener::bind(addrs.waypoint_hbone()) {
            last = format!("{}: {e}", addrs.waypoint_hbone());
            continue;
        }
        let sink = match HboneSink::start(SinkConfig::new(addrs.pod_hbone(), httpbin.clone())).await
        {
            Ok(sink) => sink,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        let echo = match EchoServer::bind(&EchoConfig {
            name: ECHO_NAME.to_owned(),
            http: addrs.pod_app(),
            grpc: None,
        })
        .await
        {
            Ok(echo) => echo,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        return Ok((addrs, sink, echo));
    }
    Err(MeshError::NoSubnet {
        tried: MAX_SUBNET_TRIES,
        last,
    })
}

fn spawn_agent(
    options: &MeshOptions,
    pod: &Path,
    log: &Path,
    istiod: SocketAddr,
    addrs: MeshAddrs,
    ports: AgentPorts,
) -> Result<Child, MeshError> {
    let mut proxy_config = json!({
        "discoveryAddress": istiod.to_string(),
        "proxyAdminPort": ports.admin,
        "statusPort": ports.status,
        "binaryPath": options.proxy_bin.display().to_string(),
        "drainDuration": "1s",
        "terminationDrainDuration": "1s",
    });
    for (field, value) in &options.proxy_config {
        proxy_config[field.as_str()] = value.clone();
    }
    let out = std::fs::File::create(log).map_err(io_err(format!("creating {}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(io_err("duplicating the log file"))?;
    let mut cmd = match options.wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(&options.agent_bin);
            cmd
        }
        None => Command::new(&options.agent_bin),
    };
    cmd.args([
        "proxy",
        "waypoint",
        "--proxyLogLevel",
        &options.proxy_log_level,
    ])
    .current_dir(pod)
    .env_clear()
    .env("PATH", std::env::var("PATH").unwrap_or_default())
    .env("NO_COLOR", "1")
    .env("POD_NAME", POD_NAME)
    .env("POD_NAMESPACE", NAMESPACE)
    .env("SERVICE_ACCOUNT", WAYPOINT_SA)
    .env("INSTANCE_IP", addrs.waypoint_ip.to_string())
    .env("ISTIO_META_CLUSTER_ID", "Kubernetes")
    .env("TRUST_DOMAIN", TRUST_DOMAIN)
    .env("CA_ADDR", istiod.to_string())
    .env("PROXY_CONFIG", proxy_config.to_string())
    .env("ENVOY_STATUS_PORT", ports.readiness.to_string())
    .env("ENVOY_PROMETHEUS_PORT", ports.prometheus.to_string())
    .env("DISABLE_ENVOY", "false")
    .stdin(Stdio::null())
    .stdout(out)
    .stderr(err);
    for (k, v) in &options.env {
        cmd.env(k, v);
    }
    cmd.spawn()
        .map_err(io_err(format!("starting {}", options.agent_bin.display())))
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// One process as `/proc` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    /// Its pid.
    pub pid: u32,
    /// Its parent's pid.
    pub ppid: u32,
    /// Its command line.
    pub cmdline: Vec<String>,
}

/// Every process in `/proc`.
pub fn processes() -> Vec<ProcInfo> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) S ppid ...`: comm may hold spaces and parentheses.
        let rest = &stat[stat.rfind(')')? + 1..];
        let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| {
                b.split(|c| *c == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        Some(ProcInfo { pid, ppid, cmdline })
    })
    .collect()
}

/// The pids below `root` (children, grandchildren, ...), deepest last.
pub fn descendants(root: u32) -> Vec<u32> {
    let all = processes();
    let mut out = Vec::new();
    let mut queue = VecDeque::from([root]);
    // A process tree is shallow; the bound only guards against a pid cycle from reuse.
    for _ in 0..all.len().min(4096) {
        let Some(parent) = queue.pop_front() else {
            break;
        };
        for p in all.iter().filter(|p| p.ppid == parent) {
            out.push(p.pid);
            queue.push_back(p.pid);
        }
    }
    out
}

/// SIGKILLs `tree` (collected while the agent was alive, so reparented children are not missed),
/// then the agent, and reaps it (bounded).
///
/// The agent is not put in a process group of its own: a Ctrl-C on `cargo test` must still reach
/// it (and through it the proxy), since nothing else would stop it then.
fn kill_tree(child: &mut Child, tree: &[u32]) {
    use nix::{
        sys::signal::{Signal, kill},
        unistd::Pid,
    };
    for pid in tree {
        let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
    }
    let _ = child.kill();
    let deadline = Instant::now() + KILL_WAIT;
    let max_rounds = KILL_WAIT.as_millis() / POLL_INTERVAL.as_millis().max(1) + 1;
    for _ in 0..max_rounds {
        if matches!(child.try_wait(), Ok(Some(_))) || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// `VmRSS` and `VmHWM` of `pid`.
pub fn proc_memory(pid: u32) -> Option<ProcMemory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some(ProcMemory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

// ---------------------------------------------------------------------------------------------
// Small HTTP/1.1 clients (admin API, readiness)
// ---------------------------------------------------------------------------------------------

fn split_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

/// GET `path` from `addr` with `Connection: close` (bounded by 5 s): (status, body). Meant for
/// admin-style endpoints whose answers are small and not chunked.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), MeshError> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, io::Error>(split_response(&buf))
    };
    match tokio::time::timeout(ADMIN_TIMEOUT, exchange).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(MeshError::Http(format!("GET {addr}{path}: {e}"))),
        Err(_) => Err(MeshError::Http(format!(
            "GET {addr}{path}: no answer within {ADMIN_TIMEOUT:?}"
        ))),
    }
}

/// [`http_get`] with blocking sockets (for `Drop`).
pub fn http_get_blocking(addr: SocketAddr, path: &str) -> Result<(u16, String), MeshError> {
    let err = |e: io::Error| MeshError::Http(format!("GET {addr}{path}: {e}"));
    let mut s = std::net::TcpStream::connect_timeout(&addr, ADMIN_TIMEOUT).map_err(err)?;
    s.set_read_timeout(Some(ADMIN_TIMEOUT)).map_err(err)?;
    s.set_write_timeout(Some(ADMIN_TIMEOUT)).map_err(err)?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(err)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(err)?;
    Ok(split_response(&buf))
}

/// One line per dynamic listener of a `/config_dump?resource=dynamic_listeners` answer: name,
/// address, version, error.
fn listener_summary(body: &str) -> String {
    let Ok(dump) = serde_json::from_str::<Json>(body) else {
        return format!("(not JSON) {}\n", &body[..body.len().min(2000)]);
    };
    let mut out = String::new();
    for l in dump["configs"].as_array().into_iter().flatten() {
        let active = &l["active_state"];
        let addr = &active["listener"]["address"]["socket_address"];
        out.push_str(&format!(
            "{} addr={}:{} version={} error={}\n",
            l["name"].as_str().unwrap_or("?"),
            addr["address"].as_str().unwrap_or("-"),
            addr["port_value"],
            active["version_info"].as_str().unwrap_or("-"),
            l["error_state"]["details"].as_str().unwrap_or("-"),
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 client for traffic (hyper), bodies
// ---------------------------------------------------------------------------------------------

/// Sends `req` on a new HTTP/1.1 connection to `addr` and returns the answer (its body still to
/// read; the connection is driven by a task of its own). `bound` limits connect + answer head.
pub async fn http1_request<B>(
    addr: SocketAddr,
    req: Request<B>,
    bound: Duration,
) -> Result<Response<Incoming>, MeshError>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let what = format!("{} {} via {addr}", req.method(), req.uri());
    let exchange = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| MeshError::Http(format!("{what}: connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| MeshError::Http(format!("{what}: handshake: {e}")))?;
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(%err, "test HTTP/1.1 connection ended");
            }
        });
        send.send_request(req)
            .await
            .map_err(|e| MeshError::Http(format!("{what}: {e}")))
    };
    tokio::time::timeout(bound, exchange)
        .await
        .map_err(|_| MeshError::Http(format!("{what}: no answer within {bound:?}")))?
}

/// Reads a whole body (at most `limit` bytes, within `bound`).
pub async fn read_body(body: Incoming, limit: usize, bound: Duration) -> Result<Bytes, MeshError> {
    let read = async {
        let mut body = body;
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| MeshError::Http(format!("reading the body: {e}")))?;
            if let Some(data) = frame.data_ref() {
                if out.len() + data.len() > limit {
                    return Err(MeshError::Http(format!("body over {limit} bytes")));
                }
                out.extend_from_slice(data);
            }
        }
        Ok(Bytes::from(out))
    };
    tokio::time::timeout(bound, read)
        .await
        .map_err(|_| MeshError::Http(format!("body not complete within {bound:?}")))?
}

/// Size of the chunks of a [`PatternBody`].
const PATTERN_CHUNK: usize = 64 * 1024;

/// The body bytes the echo server generates (`x-echo-response-size`) and [`PatternBody`] sends:
/// byte `k` is `k % 256`.
static PATTERN: [u8; PATTERN_CHUNK] = pattern();

const fn pattern() -> [u8; PATTERN_CHUNK] {
    let mut out = [0u8; PATTERN_CHUNK];
    let mut i = 0;
    while i < PATTERN_CHUNK {
        out[i] = (i % 256) as u8;
        i += 1;
    }
    out
}

/// A request body of `remaining` generated bytes (byte `k` is `k % 256`), sent in 64 KiB chunks
/// as the connection takes them: an upload of any size in constant memory.
#[derive(Debug)]
pub struct PatternBody {
    remaining: u64,
}

impl PatternBody {
    /// `len` bytes.
    pub fn new(len: u64) -> Self {
        PatternBody { remaining: len }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = usize::try_from(this.remaining).map_or(PATTERN_CHUNK, |r| r.min(PATTERN_CHUNK));
        this.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&PATTERN[..n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Reads a body the echo server generated, checking every byte against the pattern; returns its
/// length. Memory stays at one frame.
pub async fn read_pattern(body: Incoming, bound: Duration) -> Result<u64, MeshError> {
    let read = async {
        let mut body = body;
        let mut offset: u64 = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                MeshError::Http(format!("reading the body after {offset} bytes: {e}"))
            })?;
            if let Some(data) = frame.data_ref() {
                for (i, b) in data.iter().enumerate() {
                    let at = offset + i as u64;
                    if *b != (at % 256) as u8 {
                        return Err(MeshError::Http(format!(
                            "body byte {at} is {b}, want {}",
                            at % 256
                        )));
                    }
                }
                offset += data.len() as u64;
            }
        }
        Ok(offset)
    };
    tokio::time::timeout(bound, read)
        .await
        .map_err(|_| MeshError::Http(format!("body not complete within {bound:?}")))?
}

// ---------------------------------------------------------------------------------------------
// External tools
// ---------------------------------------------------------------------------------------------

/// What a finished tool printed.
#[derive(Debug, Clone)]
pub struct ToolOutput {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `program args...` (no stdin), killing it if it takes longer than `bound`.
pub async fn run_tool(
    program: &str,
    args: &[&str],
    bound: Duration,
) -> Result<ToolOutput, MeshError> {
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(io_err(format!("starting {program}")))?;
    let out = tokio::time::timeout(bound, child.wait_with_output())
        .await
        .map_err(|_| MeshError::Http(format!("{program} {args:?} still running after {bound:?}")))?
        .map_err(io_err(format!("waiting for {program}")))?;
    Ok(ToolOutput {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

// ---------------------------------------------------------------------------------------------
// TLS probes and foreign identities
// ---------------------------------------------------------------------------------------------

/// How an HBONE server treated a TLS client ([`tls_probe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsProbe {
    /// The handshake completed and the server spoke HTTP/2 (sent its SETTINGS).
    Served,
    /// The handshake failed, or the server closed/alerted right after it.
    Refused(String),
    /// Neither: the server kept the connection open without a word.
    Stalled,
}

impl fmt::Display for TlsProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsProbe::Served => f.write_str("served (HTTP/2 SETTINGS received)"),
            TlsProbe::Refused(why) => write!(f, "refused: {why}"),
            TlsProbe::Stalled => f.write_str("stalled: no answer and no close"),
        }
    }
}

/// The HTTP/2 client preface and an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Connects to `addr` with `config`, sends the HTTP/2 preface and waits (at most `bound`) for the
/// first bytes back. In TLS 1.3 the client finishes its handshake before the server has checked the
/// client certificate, so a refusal shows as an alert or a close on the first read: both count as
/// [`TlsProbe::Refused`].
pub async fn tls_probe(addr: SocketAddr, config: Arc<ClientConfig>, bound: Duration) -> TlsProbe {
    let attempt = async {
        let tcp = match TcpStream::connect(addr).await {
            Ok(t) => t,
            Err(e) => return TlsProbe::Refused(format!("TCP connect: {e}")),
        };
        let mut tls = match TlsConnector::from(config)
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
        {
            Ok(t) => t,
            Err(e) => return TlsProbe::Refused(format!("TLS handshake: {e}")),
        };
        if let Err(e) = tls.write_all(H2_PREFACE).await {
            return TlsProbe::Refused(format!("writing the HTTP/2 preface: {e}"));
        }
        let mut buf = [0u8; 64];
        match tls.read(&mut buf).await {
            Ok(0) => TlsProbe::Refused("closed after the handshake".to_owned()),
            // A SETTINGS frame header: type 4.
            Ok(n) if n >= 4 && buf[3] == 4 => TlsProbe::Served,
            Ok(n) => TlsProbe::Refused(format!("unexpected first bytes {:02x?}", &buf[..n])),
            Err(e) => TlsProbe::Refused(format!("first read: {e}")),
        }
    };
    tokio::time::timeout(bound, attempt)
        .await
        .unwrap_or(TlsProbe::Stalled)
}

/// A server verifier that accepts any certificate: for probes whose point is what the *server*
/// does with the client, so the client side must not be the one to fail.
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS 1.3, ALPN `h2`, no client certificate, any server accepted.
pub fn anonymous_client_config() -> Result<Arc<ClientConfig>, MeshError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| MeshError::Cert(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// An identity for `id` issued by a fresh root of its own (not the mesh's), trusting
/// `trust_root_pem` for servers: what a workload of another mesh would present.
pub fn foreign_identity(
    id: &SpiffeId,
    trust_root_pem: &str,
) -> Result<WorkloadIdentity, MeshError> {
    let cert_err = |e: rcgen::Error| MeshError::Cert(e.to_string());
    let now = time::OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate().map_err(cert_err)?;
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, &id.trust_domain);
    dn.push(DnType::CommonName, "foreign mesh root");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = now - time::Duration::hours(1);
    ca.not_after = now + time::Duration::days(1);
    let ca_cert = ca.self_signed(&ca_key).map_err(cert_err)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).map_err(cert_err)?;

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name = DistinguishedName::new();
    leaf.subject_alt_names = vec![SanType::URI(id.uri().try_into().map_err(cert_err)?)];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.not_before = now - time::Duration::minutes(5);
    leaf.not_after = now + time::Duration::days(1);
    let leaf = leaf.signed_by(&key, &issuer).map_err(cert_err)?;
    let chain = format!("{}{}", leaf.pem(), ca_cert.pem());
    Ok(WorkloadIdentity::from_pem(
        &chain,
        &key.serialize_pem(),
        trust_root_pem,
    )?)
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 rapid reset
// ---------------------------------------------------------------------------------------------

/// A GOAWAY frame as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoAway {
    /// Last stream id the server processed.
    pub last_stream_id: u32,
    /// The error code (`0xb` ENHANCE_YOUR_CALM, `0x0` NO_ERROR, ...).
    pub error_code: u32,
    /// Additional debug data, as text.
    pub debug: String,
}

/// What a [`rapid_reset`] burst got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RapidReset {
    /// HEADERS + RST_STREAM pairs written.
    pub sent: usize,
    /// The server's GOAWAY, if one came.
    pub goaway: Option<GoAway>,
    /// Whether the server closed the connection (EOF or an error on read) within the bound.
    pub closed: bool,
    /// Why writing stopped early, if it did.
    pub write_error: Option<String>,
}

/// HTTP/2 frame types and flags used here (RFC 9113, section 6).
mod h2_frame {
    pub(super) const HEADERS: u8 = 0x1;
    pub(super) const RST_STREAM: u8 = 0x3;
    pub(super) const SETTINGS: u8 = 0x4;
    pub(super) const GOAWAY: u8 = 0x7;
    pub(super) const END_HEADERS: u8 = 0x4;
    pub(super) const ACK: u8 = 0x1;
    pub(super) const CANCEL: u32 = 0x8;
    /// Largest frame payload read (the default SETTINGS_MAX_FRAME_SIZE).
    pub(super) const MAX_READ: usize = 16_384;
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
}

/// The HPACK block of a classic CONNECT: `:method CONNECT`, `:authority <authority>`, both literal
/// without indexing (names from the static table: 2 and 1), so every block stands alone.
fn connect_block(authority: &str) -> Vec<u8> {
    let mut block = vec![0x02, 7];
    block.extend_from_slice(b"CONNECT");
    block.push(0x01);
    block.push(authority.len().min(127) as u8);
    block.extend_from_slice(&authority.as_bytes()[..authority.len().min(127)]);
    block
}

/// The HTTP/2 rapid-reset attack (CVE-2023-44487), with hand-written frames so that nothing on the
/// client side hides what the server does: mTLS with `config` to `addr`, the preface, then up to
/// `max_streams` pairs of `HEADERS` (a CONNECT to `authority`) + `RST_STREAM(CANCEL)` in batches
/// of 50, while a reader watches for GOAWAY and the close. Writing stops at GOAWAY, a write error,
/// `max_streams` or `bound`; the close is then awaited for at most 15 s.
///
/// (The h2 crate's client loses the GOAWAY when the server closes hard: its connection task
/// surfaces the broken pipe of the next write instead of the frame already received.)
pub async fn rapid_reset(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    authority: &str,
    max_streams: usize,
    bound: Duration,
) -> Result<RapidReset, MeshError> {
    use tokio::sync::watch;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(io_err(format!("connecting to {addr}")))?;
    let _ = tcp.set_nodelay(true);
    let tls = TlsConnector::from(config)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .map_err(io_err(format!("TLS handshake with {addr}")))?;
    let (mut rd, mut wr) = tokio::io::split(tls);

    // The reader: server SETTINGS seen, GOAWAY seen, closed.
    let (settings_tx, mut settings_rx) = watch::channel(false);
    let (goaway_tx, goaway_rx) = watch::channel(None::<GoAway>);
    let reader = tokio::spawn(async move {
        let mut head = [0u8; 9];
        let mut payload = vec![0u8; h2_frame::MAX_READ];
        loop {
            if rd.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            if len > h2_frame::MAX_READ || rd.read_exact(&mut payload[..len]).await.is_err() {
                return;
            }
            match head[3] {
                h2_frame::SETTINGS if head[4] & h2_frame::ACK == 0 => {
                    let _ = settings_tx.send(true);
                }
                h2_frame::GOAWAY if len >= 8 => {
                    let p = &payload[..len];
                    let _ = goaway_tx.send(Some(GoAway {
                        last_stream_id: u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff,
                        error_code: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
                        debug: String::from_utf8_lossy(&p[8..]).into_owned(),
                    }));
                }
                _ => {}
            }
        }
    });

    let mut out = RapidReset::default();
    let deadline = tokio::time::Instant::now() + bound;
    let mut buf = Vec::with_capacity(64 * 1024);
    buf.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    frame(&mut buf, h2_frame::SETTINGS, 0, 0, &[]);
    let written = async {
        wr.write_all(&buf).await?;
        wr.flush().await
    };
    if let Err(e) = written.await {
        out.write_error = Some(format!("preface: {e}"));
    }
    let settings = tokio::time::timeout_at(deadline, settings_rx.wait_for(|s| *s)).await;
    if !matches!(settings, Ok(Ok(_))) && out.write_error.is_none() {
        out.write_error = Some("no SETTINGS from the server".to_owned());
    }
    if out.write_error.is_none() {
        buf.clear();
        frame(&mut buf, h2_frame::SETTINGS, h2_frame::ACK, 0, &[]);
        let block = connect_block(authority);
        let cancel = h2_frame::CANCEL.to_be_bytes();
        let mut stream_id: u32 = 1;
        'burst: for _ in 0..max_streams.div_ceil(50) {
            for _ in 0..50 {
                if out.sent >= max_streams {
                    break;
                }
                frame(
                    &mut buf,
                    h2_frame::HEADERS,
                    h2_frame::END_HEADERS,
                    stream_id,
                    &block,
                );
                frame(&mut buf, h2_frame::RST_STREAM, 0, stream_id, &cancel);
                stream_id += 2;
                out.sent += 1;
            }
            let write = tokio::time::timeout_at(deadline, async {
                wr.write_all(&buf).await?;
                wr.flush().await
            });
            match write.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    out.write_error = Some(e.to_string());
                    break 'burst;
                }
                Err(_) => {
                    out.write_error = Some(format!("writing stalled past {bound:?}"));
                    break 'burst;
                }
            }
            buf.clear();
            if goaway_rx.borrow().is_some() || tokio::time::Instant::now() >= deadline {
                break;
            }
            // Let the reader see what came back.
            tokio::task::yield_now().await;
        }
    }
    // Keep the write half open: a close must be the server's doing.
    let mut reader = reader;
    out.closed = tokio::time::timeout(Duration::from_secs(15), &mut reader)
        .await
        .is_ok();
    reader.abort();
    out.goaway = goaway_rx.borrow().clone();
    drop(wr);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// WebSocket client
// ---------------------------------------------------------------------------------------------

/// WebSocket opcodes (RFC 6455, section 5.2).
pub mod ws_opcode {
    /// Text frame.
    pub const TEXT: u8 = 0x1;
    /// Binary frame.
    pub const BINARY: u8 = 0x2;
    /// Close.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xA;
}

/// Largest frame payload a [`WsClient`] accepts.
pub const WS_MAX_FRAME: usize = 1 << 20;

/// A minimal WebSocket client (RFC 6455) over plain TCP: one frame at a time, no fragmentation,
/// masked as clients must.
#[derive(Debug)]
pub struct WsClient {
    io: TcpStream,
    /// The head of the server's `101` answer.
    pub response_head: String,
}

impl WsClient {
    /// Opens `GET path` with `Upgrade: websocket` on a new connection to `addr` and checks the
    /// `101` and its `Sec-WebSocket-Accept` (within `bound`).
    pub async fn connect(
        addr: SocketAddr,
        host: &str,
        path: &str,
        bound: Duration,
    ) -> Result<Self, MeshError> {
        let key_bytes: [u8; 16] = rand::random();
        let key = base64::engine::general_purpose::STANDARD.encode(key_bytes);
        let handshake = async {
            let mut io = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect {addr}: {e}"))?;
            let _ = io.set_nodelay(true);
            io.write_all(
                format!(
                    "GET {path} HTTP/1.1\r\nhost: {host}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
                     sec-websocket-key: {key}\r\nsec-websocket-version: 13\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .map_err(|e| format!("sending the upgrade: {e}"))?;
            // Byte by byte up to the blank line, so no frame byte is swallowed with the head.
            let mut head = Vec::new();
            for _ in 0..16 * 1024 {
                let b = io.read_u8().await.map_err(|e| {
                    format!(
                        "reading the answer head after {:?}: {e}",
                        String::from_utf8_lossy(&head)
                    )
                })?;
                head.push(b);
                if head.ends_with(b"\r\n\r\n") {
                    break;
                }
            }
            Ok::<_, String>((io, String::from_utf8_lossy(&head).into_owned()))
        };
        let (io, head) = tokio::time::timeout(bound, handshake)
            .await
            .map_err(|_| {
                MeshError::Http(format!("WebSocket handshake: no answer within {bound:?}"))
            })?
            .map_err(MeshError::Http)?;
        let status = head.split_whitespace().nth(1).unwrap_or_default();
        if status != "101" {
            return Err(MeshError::Http(format!(
                "WebSocket handshake answered: {head}"
            )));
        }
        let mut sha1 = sha1_smol::Sha1::new();
        sha1.update(key.as_bytes());
        sha1.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        let want = base64::engine::general_purpose::STANDARD.encode(sha1.digest().bytes());
        let accept = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("sec-websocket-accept")
                .then(|| v.trim().to_owned())
        });
        if accept.as_deref() != Some(want.as_str()) {
            return Err(MeshError::Http(format!(
                "Sec-WebSocket-Accept is {accept:?}, want {want}: {head}"
            )));
        }
        Ok(WsClient {
            io,
            response_head: head,
        })
    }

    /// Sends one final, masked frame.
    pub async fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        frame.push(0x80 | opcode);
        match payload.len() {
            n @ 0..=125 => frame.push(0x80 | n as u8),
            n @ 126..=0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask: [u8; 4] = rand::random();
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.io.write_all(&frame).await?;
        self.io.flush().await
    }

    /// Receives one frame: (opcode, payload). Refuses masked or oversized frames.
    pub async fn recv(&mut self) -> io::Result<(u8, Vec<u8>)> {
        let mut head = [0u8; 2];
        self.io.read_exact(&mut head).await?;
        if head[1] & 0x80 != 0 {
            return Err(io::Error::other("the server masked a frame"));
        }
        let len = match head[1] & 0x7f {
            126 => u64::from(self.io.read_u16().await?),
            127 => self.io.read_u64().await?,
            n => u64::from(n),
        };
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l <= WS_MAX_FRAME)
            .ok_or_else(|| io::Error::other(format!("frame of {len} bytes")))?;
        let mut payload = vec![0u8; len];
        self.io.read_exact(&mut payload).await?;
        Ok((head[0] & 0x0f, payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_renders_every_placeholder() {
        let addrs = MeshAddrs::in_subnet(21, 3);
        let text = render_fixture(FIXTURE_TEMPLATE, &addrs).expect("renders");
        assert!(text.contains("address: \"127.21.3.2\", port_value: 15008"));
        assert!(text.contains("address_prefix: \"127.21.3.100\""));
        assert!(text.contains("endpoint_id: \"127.21.3.5:8080\""));
        assert!(text.contains("{local: \"127.21.3.5:8080\"}"));
        // 127.21.3.5 and 127.21.3.7 as raw bytes.
        assert!(text.contains("[\"fxUDBQ==\"]"), "pod address");
        assert!(text.contains("[\"fxUDBw==\"]"), "client address");
        // Outside comments, no address of the reference cluster is left.
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            let data = line.split(" #").next().unwrap_or(line);
            assert!(
                !data.contains("10.244.") && !data.contains("10.96.") && !data.contains("0.0.0.0:"),
                "{line}"
            );
        }
        assert!(render_fixture("a: ${NOPE}", &addrs).is_err());
    }

    #[tokio::test]
    async fn rendered_fixture_loads_in_istiod_lite() {
        use waypoint_proto::resource::ResourceKind;
        let dir = std::env::temp_dir().join(format!("wpm-fixture-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let text = render_fixture(FIXTURE_TEMPLATE, &MeshAddrs::in_subnet(22, 9)).expect("renders");
        std::fs::write(dir.join("waypoint.yaml"), text).expect("write");
        let store = crate::istiod_lite::Store::new();
        store.load_files(&dir).await.expect("loads");
        let snap = store.snapshot();
        assert_eq!(snap.of(ResourceKind::Listener).count(), 3);
        // main_internal, encap, connect_originate and the service's HTTP and TCP port clusters.
        assert_eq!(snap.of(ResourceKind::Cluster).count(), 5);
        assert_eq!(snap.of(ResourceKind::Endpoint).count(), 2);
        assert_eq!(snap.of(ResourceKind::Workload).count(), 2);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn candidates_differ_within_a_process() {
        let a = MeshAddrs::next_candidate();
        let b = MeshAddrs::next_candidate();
        assert_ne!(a, b);
        for addrs in [a, b] {
            let o = addrs.waypoint_ip.octets();
            assert_eq!(o[0], 127);
            assert!((20..220).contains(&o[1]), "{addrs:?}");
            assert_eq!(o[3], 2);
        }
    }
}
