//! Opening a byte stream to one upstream host: TCP (with the cluster's `connect_timeout`), Unix
//! socket, or an in-process internal listener (with `internal_upstream` passthrough metadata and
//! the downstream's shared filter state), then the cluster's TLS transport socket if it has one.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use rustls::pki_types::ServerName;
use serde_json::Value as Json;
use tokio::net::{TcpStream, UnixStream};

use crate::{
    config::{
        Cluster,
        cluster::TcpKeepalive,
        endpoint::EndpointAddress,
        tls::{MetadataSource, TransportSocket, UpstreamTls},
    },
    dataplane::DataPlane,
    flags::ProxyError,
    listener::{
        conn::{Addr, BoxIo, FilterState, Seed},
        manager::connect_internal,
    },
};

/// Envoy's default `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What an upstream connection carries from the downstream side.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// Filter state shared with the upstream (already reduced by one hop).
    pub shared: FilterState,
    /// The downstream's address, for internal listeners' remote address.
    pub source: Option<Addr>,
}

/// Connects to the host at `address` (with host `metadata`) of `cluster`.
pub async fn connect(
    dp: &Arc<DataPlane>,
    cluster: &Cluster,
    address: &EndpointAddress,
    metadata: &BTreeMap<String, Json>,
    origin: &Origin,
) -> Result<BoxIo, ProxyError> {
    let timeout = if cluster.connect_timeout.is_zero() {
        DEFAULT_CONNECT_TIMEOUT
    } else {
        cluster.connect_timeout
    };
    let (io, target, inner): (BoxIo, Option<SocketAddr>, Option<&TransportSocket>) = match address {
        EndpointAddress::Socket(a) => {
            let a = *a;
            let tcp = tokio::time::timeout(timeout, TcpStream::connect(a))
                .await
                .map_err(|_| ProxyError::ConnectFailure(format!("connect {a}: timeout")))?
                .map_err(|e| ProxyError::ConnectFailure(format!("connect {a}: {e}")))?;
            let _ = tcp.set_nodelay(true);
            if let Some(k) = &cluster.tcp_keepalive {
                set_tcp_keepalive(&tcp, k);
            }
            (Box::new(tcp), Some(a), cluster.transport_socket.as_ref())
        }
        EndpointAddress::Pipe(p) => {
            let s = tokio::time::timeout(timeout, UnixStream::connect(p))
                .await
                .map_err(|_| {
                    ProxyError::ConnectFailure(format!("connect {}: timeout", p.display()))
                })?
                .map_err(|e| ProxyError::ConnectFailure(format!("connect {}: {e}", p.display())))?;
            (Box::new(s), None, cluster.transport_socket.as_ref())
        }
        EndpointAddress::Internal {
            listener,
            endpoint_id,
        } => {
            let (metadata, inner) = match &cluster.transport_socket {
                Some(TransportSocket::InternalUpstream { passthrough, inner }) => {
                    let mut m = BTreeMap::new();
                    for p in passthrough {
                        let source: &BTreeMap<String, Json> = match p.source {
                            MetadataSource::Host => metadata,
                            MetadataSource::Cluster => &cluster.filter_metadata,
                        };
                        if let Some(v) = source.get(&p.namespace) {
                            m.insert(p.namespace.clone(), v.clone());
                        }
                    }
                    (m, Some(inner.as_ref()))
                }
                other => (BTreeMap::new(), other.as_ref()),
            };
            let io = connect_internal(
                dp,
                listener,
                Seed {
                    filter_state: origin.shared.clone(),
                    metadata,
                    endpoint_id: endpoint_id.clone(),
                    source: origin.source.clone(),
                },
            )?;
            (io, None, inner)
        }
    };
    match inner {
        None | Some(TransportSocket::RawBuffer) => Ok(io),
        Some(TransportSocket::UpstreamTls(t)) => tls(dp, t, io, target).await,
        Some(other) => Err(ProxyError::Unsupported(format!(
            "upstream transport socket {other:?}"
        ))),
    }
}

/// Turns on TCP keepalive on an upstream socket (`upstream_connection_options.tcp_keepalive`):
/// `SO_KEEPALIVE`, and each of `TCP_KEEPIDLE` / `TCP_KEEPINTVL` / `TCP_KEEPCNT` that is set (the
/// others keep the system's defaults, as in Envoy). A failure is logged, not fatal: the
/// connection works without keepalive, as Envoy's socket options do when they cannot be set.
pub fn set_tcp_keepalive(tcp: &TcpStream, k: &TcpKeepalive) {
    let mut ka = socket2::TcpKeepalive::new();
    if let Some(t) = k.time {
        ka = ka.with_time(std::time::Duration::from_secs(u64::from(t)));
    }
    if let Some(i) = k.interval {
        ka = ka.with_interval(std::time::Duration::from_secs(u64::from(i)));
    }
    if let Some(p) = k.probes {
        ka = ka.with_retries(p);
    }
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka) {
        tracing::warn!(target: "upstream", "tcp_keepalive: {e}");
    }
}

/// TLS over `io` with the cluster's `UpstreamTlsContext`.
pub async fn tls(
    dp: &Arc<DataPlane>,
    t: &UpstreamTls,
    io: BoxIo,
    target: Option<SocketAddr>,
) -> Result<BoxIo, ProxyError> {
    let config = dp
        .tls
        .client_config(t)
        .map_err(|e| ProxyError::ConnectFailure(format!("TLS context: {e}")))?;
    let name = match (&t.sni, target) {
        (Some(sni), _) => ServerName::try_from(sni.clone())
            .map_err(|e| ProxyError::ConnectFailure(format!("sni {sni}: {e}")))?,
        (None, Some(a)) => ServerName::IpAddress(a.ip().into()),
        (None, None) => ServerName::try_from("localhost")
            .map_err(|e| ProxyError::ConnectFailure(e.to_string()))?,
    };
    let s = tokio_rustls::TlsConnector::from(config)
        .connect(name, io)
        .await
        .map_err(|e| ProxyError::ConnectFailure(format!("TLS: {e}")))?;
    Ok(Box::new(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_keepalive_sets_the_socket_options_that_are_configured() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let sock = socket2::SockRef::from(&tcp);
        assert!(!sock.keepalive().expect("SO_KEEPALIVE"), "off by default");
        // istiod's xds-grpc cluster: only keepalive_time (300 s).
        set_tcp_keepalive(
            &tcp,
            &TcpKeepalive {
                time: Some(300),
                ..TcpKeepalive::default()
            },
        );
        assert!(sock.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(
            sock.tcp_keepalive_time().expect("TCP_KEEPIDLE"),
            std::time::Duration::from_secs(300)
        );
        let default_interval = sock.tcp_keepalive_interval().expect("TCP_KEEPINTVL");
        set_tcp_keepalive(
            &tcp,
            &TcpKeepalive {
                probes: Some(4),
                time: Some(60),
                interval: Some(7),
            },
        );
        assert_eq!(
            sock.tcp_keepalive_time().expect("TCP_KEEPIDLE"),
            std::time::Duration::from_secs(60)
        );
        assert_eq!(
            sock.tcp_keepalive_interval().expect("TCP_KEEPINTVL"),
            std::time::Duration::from_secs(7)
        );
        assert_ne!(default_interval, std::time::Duration::from_secs(7));
        assert_eq!(sock.tcp_keepalive_retries().expect("TCP_KEEPCNT"), 4);
    }
}
