//! `envoy.filters.network.tcp_proxy`: join the downstream connection to a host of the cluster,
//! byte for byte, with backpressure both ways. With `tunneling_config` the bytes travel in an
//! HTTP/2 CONNECT stream instead: on istiod's `connect_originate` that is HBONE — mutual TLS with
//! the SDS identity to `podIP:15008` (ORIGINAL_DST with the port override) and `:authority` =
//! `%DOWNSTREAM_LOCAL_ADDRESS%` (`podIP:targetPort`), on pooled connections.

use std::{sync::Arc, time::Duration};

use crate::{
    config::{
        cluster::Discovery,
        filters::tcp_proxy::{TcpProxy, TcpTarget, Tunneling},
        headers::HeaderMutations,
    },
    dataplane::DataPlane,
    flags::ProxyError,
    http::request,
    listener::conn::{BoxIo, ConnContext, ConnValues},
    upstream::{
        cluster_manager::{ClusterRt, original_destination},
        connect::Origin,
    },
};

/// Envoy's default `max_connect_attempts`.
const DEFAULT_CONNECT_ATTEMPTS: u32 = 1;

/// Proxies `io` per `tp` until either side closes.
pub async fn serve(dp: Arc<DataPlane>, ctx: Arc<ConnContext>, tp: Arc<TcpProxy>, mut io: BoxIo) {
    let upstream = match open(&dp, &ctx, &tp).await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(target: "tcp_proxy", stat_prefix = %tp.stat_prefix, flag = %e.flag(), "upstream: {e}");
            return;
        }
    };
    let mut upstream = upstream;
    let (up, down, error) = crate::io::join(&mut io, &mut upstream).await;
    match error {
        None => {
            tracing::trace!(target: "tcp_proxy", stat_prefix = %tp.stat_prefix, up, down, "closed")
        }
        Some(e) => {
            tracing::debug!(target: "tcp_proxy", stat_prefix = %tp.stat_prefix, up, down, "ended: {e}")
        }
    }
}

fn cluster_of(tp: &TcpProxy) -> Option<String> {
    match &tp.target {
        TcpTarget::Cluster(c) => Some(c.clone()),
        TcpTarget::Weighted(list) => {
            let total: u64 = list.iter().map(|(_, w)| u64::from(*w)).sum();
            if total == 0 {
                return None;
            }
            let mut r = rand::random::<u64>() % total;
            for (name, w) in list {
                let w = u64::from(*w);
                if r < w {
                    return Some(name.clone());
                }
                r -= w;
            }
            None
        }
    }
}

async fn open(
    dp: &Arc<DataPlane>,
    ctx: &Arc<ConnContext>,
    tp: &TcpProxy,
) -> Result<BoxIo, ProxyError> {
    let name = cluster_of(tp).ok_or_else(|| ProxyError::NoCluster("weighted clusters".into()))?;
    let rt = dp
        .clusters
        .get(dp, &ctx.snapshot, &name)
        .ok_or_else(|| ProxyError::NoCluster(name.clone()))?;
    let origin = Origin {
        shared: ctx.filter_state.shared_with_upstream(),
        source: Some(ctx.remote.clone()),
    };
    let attempts = tp.max_connect_attempts.max(DEFAULT_CONNECT_ATTEMPTS);
    let mut last = None;
    for _ in 0..attempts {
        let r = match &tp.tunneling {
            Some(t) => tunnel(dp, ctx, &rt, t).await,
            None => crate::http::router::open_tcp(dp, &rt, &origin, ctx, None).await,
        };
        match r {
            Ok(io) => return Ok(io),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) if attempts > 1 => Err(ProxyError::RetriesExhausted(e.to_string())),
        Some(e) => Err(e),
        None => Err(ProxyError::ConnectFailure("no attempt".into())),
    }
}

/// An HTTP/2 CONNECT tunnel through a host of `rt` (HBONE for TLS clusters).
async fn tunnel(
    dp: &Arc<DataPlane>,
    ctx: &ConnContext,
    rt: &ClusterRt,
    t: &Tunneling,
) -> Result<BoxIo, ProxyError> {
    if t.use_post {
        return Err(ProxyError::Unsupported("tunneling_config.use_post".into()));
    }
    let values = ConnValues {
        conn: ctx,
        stream_state: None,
        request: None,
    };
    let authority = t.hostname.render(&values);
    let addr = match &rt.cluster.discovery {
        Discovery::OriginalDst(cfg) => original_destination(cfg, ctx, None),
        _ => {
            let host = rt
                .hosts
                .pick(&crate::upstream::lb::PickContext {
                    hash: None,
                    exclude: &[],
                    random: rand::random(),
                })
                .ok_or_else(|| ProxyError::NoHealthyUpstream(rt.cluster.name.clone()))?;
            match &host.address {
                crate::config::endpoint::EndpointAddress::Socket(a) => Some(*a),
                _ => None,
            }
        }
    }
    .ok_or_else(|| {
        ProxyError::NoHealthyUpstream(format!("{}: no destination address", rt.cluster.name))
    })?;
    let mut headers = http::HeaderMap::new();
    let ops = HeaderMutations {
        add: t.headers_to_add.clone(),
        remove: vec![],
    };
    request::apply_header_ops(&mut headers, &ops, &values);
    let extra: Vec<(&str, String)> = headers
        .iter()
        .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str(), v.to_owned())))
        .collect();
    let client = rt.hbone_client(dp)?;
    let connect_timeout = if rt.cluster.connect_timeout.is_zero() {
        Duration::from_secs(5)
    } else {
        rt.cluster.connect_timeout
    };
    rt.stats.rq_total.inc();
    let tunnel = tokio::time::timeout(connect_timeout, client.connect(addr, &authority, &extra))
        .await
        .map_err(|_| ProxyError::ConnectFailure(format!("HBONE to {addr}: timeout")))?
        .map_err(|e| {
            rt.stats.cx_connect_fail.inc();
            match e {
                crate::hbone::HboneError::Refused { status, .. } => {
                    ProxyError::UpstreamReset(format!("CONNECT {authority} via {addr}: {status}"))
                }
                other => ProxyError::ConnectFailure(format!("HBONE to {addr}: {other}")),
            }
        })?;
    Ok(Box::new(TunnelIo(tunnel)))
}

/// Keeps the HBONE stream's pool guard alive as long as the stream.
struct TunnelIo(crate::hbone::client::Tunnel);

impl tokio::io::AsyncRead for TunnelIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TunnelIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0.stream).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0.stream).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0.stream).poll_shutdown(cx)
    }
}
