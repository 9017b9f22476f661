//! What the proxy's process-level tests share: the `proxy` binary started from a bootstrap in a
//! temporary folder, admin/HTTP requests on loopback, bounded polling, a scripted SDS server on a
//! Unix socket (the agent's side), and istiod-lite's ADS service served in process over plaintext
//! gRPC (the proxy dials static clusters without TLS, as it dials the agent's socket).
//!
//! Each test binary uses part of it.
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    pin::Pin,
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use prost::Message as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use waypoint_proto::{
    envoy::{
        config::core::v3::{DataSource, data_source::Specifier},
        extensions::transport_sockets::tls::v3::{
            CertificateValidationContext, Secret, TlsCertificate, secret,
        },
        service::{
            discovery::v3::{
                DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
                aggregated_discovery_service_server::AggregatedDiscoveryServiceServer,
            },
            secret::v3::secret_discovery_service_server::{
                SecretDiscoveryService, SecretDiscoveryServiceServer,
            },
        },
    },
    google::protobuf::Any,
    resource::SECRET_TYPE,
};
use waypoint_testbed::{
    echo::{EchoConfig, EchoServer},
    istiod_lite::{StatusBook, Store, ads::AdsService},
};

/// A self-signed P-256 certificate (SAN `spiffe://cluster.local/ns/test/sa/unit`) and its key.
pub const CERT: &str = include_str!("../data/test-cert.pem");
/// See [`CERT`].
pub const KEY: &str = include_str!("../data/test-key.pem");
/// Upper bound of every wait.
pub const WAIT: Duration = Duration::from_secs(20);

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    free_ports(Ipv4Addr::LOCALHOST, 1)[0]
}

/// `N` distinct loopback ports nobody listens on right now (see [`free_ports`]).
pub fn distinct_ports<const N: usize>() -> [u16; N] {
    let ports = free_ports(Ipv4Addr::LOCALHOST, N);
    std::array::from_fn(|i| ports[i])
}

/// `n` distinct ports free on `ip` right now. All are held until all are picked, so one call
/// cannot hand out the same port twice; once released, any process may take them (see
/// [`StaticProxy`], which starts again when that happens).
pub fn free_ports(ip: Ipv4Addr, n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind((ip, 0)).expect("free port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("free port").port())
        .collect()
}

/// A fresh temporary folder for one test.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("proxy-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

/// A child process, killed (and reaped) when dropped, a panicking test's included.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the `proxy` binary in `dir` (relative paths in its bootstrap resolve there) with
/// `args`, stdout and stderr going to `dir/proxy.log` (truncated).
fn spawn(dir: &Path, args: &[&str]) -> (Process, PathBuf) {
    let log = dir.join("proxy.log");
    let out = std::fs::File::create(&log).expect("log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_proxy"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .expect("proxy starts");
    (Process(child), log)
}

/// The last 60 lines of the log at `path` (for failure messages).
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// A running `proxy` process; killed when dropped.
pub struct Proxy {
    _process: Process,
    log: PathBuf,
}

impl Proxy {
    /// Writes `bootstrap` to `dir/bootstrap.json` and starts the proxy in `dir` (relative pipe
    /// paths resolve there), logging to `dir/proxy.log`.
    pub fn start(dir: &Path, bootstrap: &serde_json::Value) -> Proxy {
        std::fs::write(dir.join("bootstrap.json"), bootstrap.to_string()).expect("write");
        let (process, log) = spawn(dir, &["-c", "bootstrap.json", "-l", "debug"]);
        Proxy {
            _process: process,
            log,
        }
    }

    /// The last lines of the proxy's log (for failure messages).
    pub fn log_tail(&self) -> String {
        tail(&self.log)
    }
}

// ---------------------------------------------------------------------------------------------
// A proxy from a static bootstrap on ports picked for it.

/// How many times [`StaticProxy`] starts the proxy when another process took one of its picked
/// ports between the pick and the proxy's bind.
const START_ATTEMPTS: usize = 5;

/// Named ports for a bootstrap: the ones a test gives (its backends) and the ones picked free.
#[derive(Clone, Debug, Default)]
pub struct Ports(BTreeMap<String, u16>);

impl Ports {
    /// The ports `given` by name.
    pub fn new(given: &[(&str, u16)]) -> Ports {
        Ports(given.iter().map(|(n, p)| ((*n).to_owned(), *p)).collect())
    }

    /// The port named `name`; panics naming it when there is none.
    pub fn get(&self, name: &str) -> u16 {
        match self.0.get(name) {
            Some(port) => *port,
            None => panic!("no port named {name} (have {:?})", self.0),
        }
    }
}

/// The `${NAME}` placeholders of `template`.
fn placeholders(template: &str) -> BTreeSet<&str> {
    let parts = template.split("${").skip(1);
    parts
        .filter_map(|p| p.split_once('}'))
        .map(|(name, _)| name)
        .collect()
}

/// `template` with `${DIR}` replaced by `dir` and every other `${NAME}` by the port `NAME` of
/// `ports`. Whole placeholders are matched, so `${TCP}` never touches `${TCP_DEAD}`.
pub fn render(template: &str, dir: &Path, ports: &Ports) -> String {
    let mut parts = template.split("${");
    let mut out = parts.next().unwrap_or_default().to_owned();
    for part in parts {
        let (name, rest) = part
            .split_once('}')
            .unwrap_or_else(|| panic!("unclosed ${{ in the bootstrap template: {part}"));
        match name {
            "DIR" => out.push_str(&dir.display().to_string()),
            _ => out.push_str(&ports.get(name).to_string()),
        }
        out.push_str(rest);
    }
    out
}

/// How a [`StaticProxy`] is started: folder tag, loopback address, workers and log level.
#[derive(Clone, Debug)]
pub struct Launch {
    tag: String,
    ip: Ipv4Addr,
    concurrency: Option<u32>,
    level: String,
    given: Ports,
    taken_first: Option<String>,
}

impl Launch {
    /// The proxy in `temp_dir(tag)`, its ports picked on 127.0.0.1, the proxy's default worker
    /// count and log level `info` (`PROXY_TEST_LOG` overrides the level of every launch).
    pub fn new(tag: &str) -> Launch {
        Launch {
            tag: tag.to_owned(),
            ip: Ipv4Addr::LOCALHOST,
            concurrency: None,
            level: "info".to_owned(),
            given: Ports::default(),
            taken_first: None,
        }
    }

    /// Picks the ports on loopback address `ip` (its admin and listeners should bind there): a
    /// test on an address of its own cannot lose a picked port to a parallel test.
    pub fn ip(mut self, ip: Ipv4Addr) -> Launch {
        self.ip = ip;
        self
    }

    /// `--concurrency n`.
    pub fn concurrency(mut self, n: u32) -> Launch {
        self.concurrency = Some(n);
        self
    }

    /// For the launcher's own test: on the first attempt the port `name` is one a socket here
    /// holds, as if another process had taken it between the pick and the proxy's bind.
    pub fn taken_first(mut self, name: &str) -> Launch {
        self.taken_first = Some(name.to_owned());
        self
    }

    /// `-l level`.
    pub fn level(mut self, level: &str) -> Launch {
        self.level = level.to_owned();
        self
    }

    /// Starts the proxy from `template` (see [`render`]): the ports `given` fill their
    /// placeholders, every other placeholder but `${DIR}` gets a port picked free (`ADMIN` must
    /// be one).
    pub async fn template(mut self, template: &str, given: &[(&str, u16)]) -> StaticProxy {
        self.given = Ports::new(given);
        let pick: Vec<&str> = placeholders(template)
            .into_iter()
            .filter(|n| *n != "DIR" && !self.given.0.contains_key(*n))
            .collect();
        self.start(&pick, |dir, ports| render(template, dir, ports))
            .await
    }

    /// Picks a free port for each of `names` (`ADMIN` among them unless given: the admin address readiness is
    /// read from), writes `bootstrap(dir, ports)` (the picked ones and those given to
    /// [`Launch::template`]) and starts the proxy; returns once its admin
    /// `/ready` says LIVE. When the proxy exits because one of the ports was taken meanwhile
    /// (`cannot bind`, or `cannot listen` when another socket bound it too and listened first),
    /// it picks again and restarts, up to [`START_ATTEMPTS`] times.
    pub async fn start(
        self,
        names: &[&str],
        bootstrap: impl Fn(&Path, &Ports) -> String,
    ) -> StaticProxy {
        assert!(
            names.contains(&"ADMIN") || self.given.0.contains_key("ADMIN"),
            "{}: no ADMIN port among {names:?}",
            self.tag
        );
        let dir = temp_dir(&self.tag);
        let config = dir.join("bootstrap.yaml");
        let level = std::env::var("PROXY_TEST_LOG").unwrap_or_else(|_| self.level.clone());
        let concurrency = self.concurrency.map(|n| n.to_string());
        let mut args = vec!["-c", config.to_str().expect("UTF-8 temp dir"), "-l", &level];
        if let Some(n) = &concurrency {
            args.extend(["--concurrency", n]);
        }
        for attempt in 1..=START_ATTEMPTS {
            let mut ports = self.given.clone();
            ports.0.extend(
                names
                    .iter()
                    .map(|n| (*n).to_owned())
                    .zip(free_ports(self.ip, names.len())),
            );
            let _taken = match &self.taken_first {
                Some(name) if attempt == 1 => {
                    let holder = std::net::TcpListener::bind((self.ip, 0)).expect("bind");
                    ports
                        .0
                        .insert(name.clone(), holder.local_addr().expect("addr").port());
                    Some(holder)
                }
                _ => None,
            };
            std::fs::write(&config, bootstrap(&dir, &ports)).expect("write bootstrap");
            let (mut process, log) = spawn(&dir, &args);
            let admin = SocketAddr::from((self.ip, ports.get("ADMIN")));
            match ready(&mut process.0, &log, admin, &config).await {
                Ok(()) => {
                    return StaticProxy {
                        process,
                        dir,
                        log,
                        ip: self.ip,
                        ports,
                        attempts: attempt,
                    };
                }
                Err(tail)
                    if attempt < START_ATTEMPTS
                        && (tail.contains("cannot bind") || tail.contains("cannot listen")) =>
                {
                    eprintln!(
                        "{}: a picked port was taken (attempt {attempt}), picking again:\n{tail}",
                        self.tag
                    );
                }
                Err(tail) => panic!("{}: the proxy exited:\n{tail}", self.tag),
            }
        }
        unreachable!("the last attempt returns or panics")
    }
}

/// Waits (bounded) until the admin API on `admin` says LIVE on `/ready` and `/server_info` shows
/// `config` (the port may answer for another proxy that holds it while ours fails to bind it);
/// `Err(log tail)` when `child` exited first.
async fn ready(
    child: &mut std::process::Child,
    log: &Path,
    admin: SocketAddr,
    config: &Path,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{status}\n{}", tail(log)));
        }
        // Short polls: a port some other socket holds may accept and never answer, while ours
        // exits at once.
        let poll =
            tokio::time::timeout(Duration::from_millis(500), http_at(admin, "GET", "/ready"));
        if let Ok((200, body)) = poll.await
            && body == "LIVE\n"
        {
            let (_, info) = http_at(admin, "GET", "/server_info").await;
            let info: serde_json::Value = serde_json::from_str(&info).unwrap_or_default();
            if info["command_line_options"]["config_path"] == config.display().to_string() {
                return Ok(());
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the proxy was not LIVE on {admin} within {WAIT:?}:\n{}",
            tail(log)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `proxy` process started from a static bootstrap on ports picked for it (see [`Launch`]);
/// killed, and its folder removed unless the test failed, when dropped.
pub struct StaticProxy {
    process: Process,
    dir: PathBuf,
    log: PathBuf,
    ip: Ipv4Addr,
    ports: Ports,
    attempts: usize,
}

impl StaticProxy {
    /// The proxy from YAML `template` with `${NAME}` placeholders: the ports `given` (backends),
    /// `${DIR}` (its folder) and a free port for each other name (`LISTEN`, `ADMIN`, …); one
    /// worker (`--concurrency 1`). See [`Launch::template`].
    pub async fn start(tag: &str, template: &str, given: &[(&str, u16)]) -> StaticProxy {
        Launch::new(tag)
            .concurrency(1)
            .template(template, given)
            .await
    }

    /// How many times the proxy was started until it came up LIVE.
    pub fn attempts(&self) -> usize {
        self.attempts
    }

    /// The port named `name` (picked or given).
    pub fn port(&self, name: &str) -> u16 {
        self.ports.get(name)
    }

    /// The address of the listener whose port is `name`.
    pub fn addr_of(&self, name: &str) -> SocketAddr {
        SocketAddr::from((self.ip, self.port(name)))
    }

    /// The address of the `LISTEN` listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr_of("LISTEN")
    }

    /// GET `path` on the admin API: (status, body), (0, "") when it does not answer.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_at(self.addr_of("ADMIN"), "GET", path).await
    }

    /// One counter or gauge from the admin `/stats` text (0 when absent).
    pub async fn stat(&self, name: &str) -> u64 {
        let (_, body) = self.admin_get("/stats").await;
        let prefix = format!("{name}: ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits (bounded) until stat `name` is `want`.
    pub async fn wait_stat(&self, name: &str, want: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = self.stat(name).await;
            if v == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} is {v}, expected {want}\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `file` in the proxy's folder.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The text of `file` in the proxy's folder ("" while it does not exist).
    pub fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.path(file)).unwrap_or_default()
    }

    /// Waits (bounded) until `file` in the proxy's folder has the line `line`.
    pub async fn wait_log(&self, file: &str, line: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = self.read(file);
            if text.lines().any(|l| l == line) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no line {line:?} in {file}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last lines of the proxy's own log (for failure messages).
    pub fn log_tail(&self) -> String {
        tail(&self.log)
    }
}

impl Drop for StaticProxy {
    fn drop(&mut self) {
        let _ = self.process.0.kill();
        let _ = self.process.0.wait();
        // A failed test keeps the folder (bootstrap, logs) to look at.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The test bed's echo server named `name` on 127.0.0.1 (it answers with what it saw as JSON,
/// `x-echo-*` knobs for status and delay); its port.
pub async fn echo(name: &str) -> u16 {
    let echo = EchoServer::bind(&EchoConfig {
        name: name.into(),
        http: "127.0.0.1:0".parse().expect("addr"),
        grpc: None,
    })
    .await
    .expect("echo binds");
    let port = echo.http_addr().port();
    tokio::spawn(echo.run());
    port
}

/// One HTTP/1.1 request on loopback: (status, body); (0, "") when nothing answers in 5 s.
pub async fn http(port: u16, method: &str, path: &str) -> (u16, String) {
    http_at(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), method, path).await
}

/// An HTTP/1.1 answer read whole: status, headers and body.
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The response headers.
    pub headers: http::HeaderMap,
    /// The body.
    pub body: bytes::Bytes,
}

impl Reply {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The echo backend's JSON answer.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The echo backend's view of request header `header`.
    pub fn seen(&self, header: &str) -> serde_json::Value {
        self.json()["headers"][header].clone()
    }
}

/// One GET of `path` with `host` and `headers` on a fresh HTTP/1.1 connection (hyper), answered
/// within [`WAIT`]; a connection or protocol failure fails the test.
pub async fn request(addr: SocketAddr, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    use http_body_util::BodyExt as _;
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = http::Request::builder().uri(path).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .expect("answered in time")
        .expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Reply {
        status,
        headers,
        body,
    }
}

/// One HTTP/1.1 request to `addr`: (status, body); (0, "") when nothing answers in 5 s.
pub async fn http_at(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
    };
    match tokio::time::timeout(Duration::from_secs(5), fut).await {
        Ok(Ok(text)) => {
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            (status, body.to_owned())
        }
        _ => (0, String::new()),
    }
}

/// GET `path` on the admin port as JSON.
pub async fn get_json(port: u16, path: &str) -> serde_json::Value {
    let (status, body) = http(port, "GET", path).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
}

/// The config of `type_name` (`ListenersConfigDump` …) in a `/config_dump`.
pub fn config_of<'a>(dump: &'a serde_json::Value, type_name: &str) -> &'a serde_json::Value {
    let want = format!("type.googleapis.com/envoy.admin.v3.{type_name}");
    dump["configs"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["@type"] == want.as_str()))
        .unwrap_or_else(|| panic!("no {type_name} in the dump"))
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after [`WAIT`] naming `what` (and
/// `context()`, e.g. a log tail).
pub async fn eventually<T, F, Fut>(what: &str, context: impl Fn() -> String, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls GET `path` until it answers 200 and `pred(body)` holds; returns the body.
pub async fn wait_body(port: u16, path: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
    eventually(
        what,
        || format!("on {path}"),
        || async {
            let (status, body) = http(port, "GET", path).await;
            (status == 200 && pred(&body)).then_some(body)
        },
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// A scripted SDS server.

type Out = mpsc::Sender<Result<DiscoveryResponse, Status>>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// One SDS stream the proxy opened: its requests and a handle to answer.
pub struct Opened {
    /// What the proxy sends.
    pub requests: Streaming<DiscoveryRequest>,
    /// What we answer.
    pub responses: Out,
}

struct Scripted {
    opened: mpsc::UnboundedSender<Opened>,
}

#[tonic::async_trait]
impl SecretDiscoveryService for Scripted {
    type StreamSecretsStream = BoxStream<DiscoveryResponse>;
    type DeltaSecretsStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let _ = self.opened.send(Opened {
            requests: request.into_inner(),
            responses: tx,
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented("SotW only"))
    }

    async fn fetch_secrets(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented("SotW only"))
    }
}

/// A scripted SDS server on the Unix socket `path`: every stream the proxy opens is handed over.
pub fn sds_server(path: &Path) -> (JoinHandle<()>, mpsc::UnboundedReceiver<Opened>) {
    let listener = tokio::net::UnixListener::bind(path).expect("bind");
    let (opened_tx, opened_rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(SecretDiscoveryServiceServer::new(Scripted {
                opened: opened_tx,
            }))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await;
    });
    (task, opened_rx)
}

/// The next stream the proxy opens, with its first request.
pub async fn next_stream(rx: &mut mpsc::UnboundedReceiver<Opened>) -> (Opened, DiscoveryRequest) {
    let mut opened = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the proxy opens an SDS stream in time")
        .expect("server alive");
    let first = next_request(&mut opened).await;
    (opened, first)
}

/// The next request on a stream.
pub async fn next_request(opened: &mut Opened) -> DiscoveryRequest {
    tokio::time::timeout(WAIT, opened.requests.message())
        .await
        .expect("a request in time")
        .expect("stream ok")
        .expect("stream open")
}

fn inline(s: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(s.as_bytes().to_vec())),
        ..Default::default()
    })
}

/// A SotW SDS response carrying `secret`.
pub fn secret_response(version: &str, nonce: &str, secret: Secret) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: version.to_owned(),
        resources: vec![Any {
            type_url: SECRET_TYPE.to_owned(),
            value: secret.encode_to_vec(),
        }],
        type_url: SECRET_TYPE.to_owned(),
        nonce: nonce.to_owned(),
        ..Default::default()
    }
}

/// The `default` certificate secret with [`CERT`] and `key`.
pub fn tls_secret(key: &str) -> Secret {
    Secret {
        name: "default".into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(CERT),
            private_key: inline(key),
            ..Default::default()
        })),
    }
}

/// The `ROOTCA` validation secret trusting [`CERT`].
pub fn root_secret() -> Secret {
    Secret {
        name: "ROOTCA".into(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(CERT),
                ..Default::default()
            },
        )),
    }
}

/// The static cluster a bootstrap reaches the SDS server through (`./sds.sock` in the test dir).
pub fn sds_cluster() -> serde_json::Value {
    serde_json::json!({
        "name": "sds-grpc",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "sds-grpc", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"pipe": {"path": "./sds.sock"}}}}
        ]}]}
    })
}

// ---------------------------------------------------------------------------------------------
// istiod-lite's ADS, in process, plaintext.

/// istiod-lite's ADS service (SotW and delta) over a [`Store`], on a plaintext loopback port.
pub struct PlainAds {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The resources served.
    pub store: Arc<Store>,
    /// ACKs and NACKs per stream.
    pub book: Arc<StatusBook>,
    task: JoinHandle<()>,
}

impl PlainAds {
    /// Starts serving an empty store.
    pub async fn start() -> PlainAds {
        let store = Arc::new(Store::new());
        let book = Arc::new(StatusBook::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let service = AdsService::new(store.clone(), book.clone());
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        PlainAds {
            addr,
            store,
            book,
            task,
        }
    }

    /// A bootstrap's static `xds-grpc` cluster pointing here.
    pub fn cluster(&self) -> serde_json::Value {
        serde_json::json!({
            "name": "xds-grpc",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": self.addr.ip().to_string(), "port_value": self.addr.port()}}}}
            ]}]}
        })
    }
}

impl Drop for PlainAds {
    fn drop(&mut self) {
        self.task.abort();
    }
}
