//! `envoy.filters.network.tcp_proxy`: join the downstream connection to a host of the cluster,
//! byte for byte, with backpressure both ways. With `tunneling_config` the bytes travel in an
//! HTTP/2 CONNECT stream instead: on istiod's `connect_originate` that is HBONE — mutual TLS with
//! the SDS identity to `podIP:15008` (ORIGINAL_DST with the port override) and `:authority` =
//! `%DOWNSTREAM_LOCAL_ADDRESS%` (`podIP:targetPort`), on pooled connections.
//!
//! Once the upstream is connected, `idle_timeout` (Envoy's default 1 h; zero disables) closes
//! both sides after that long without a byte either way (`tcp.<stat_prefix>.idle_timeout`, no
//! response flag), and `max_downstream_connection_duration` closes them that long after the
//! upstream connected (`tcp.<stat_prefix>.max_downstream_connection_duration`, flag `DT`).
//!
//! Envoy's tcp_proxy does not drain gracefully (only the HTTP connection manager and a few
//! protocol filters do): when an LDS update drains its filter chain, the connection runs on
//! until `--drain-time-s` is over, then both sides are closed.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{
    config::{
        cluster::Discovery,
        filters::{
            istio::StatsConfig,
            tcp_proxy::{TcpProxy, TcpTarget, Tunneling},
        },
        headers::HeaderMutations,
    },
    dataplane::DataPlane,
    flags::{ProxyError, ResponseFlags},
    http::{
        request,
        stream_info::{StreamLabels, UpstreamSlot},
        timeout::{Activity, Expired, Watch},
    },
    listener::conn::{BoxIo, ConnContext, ConnValues},
    telemetry::{attributes::ConnectionAttributes, istio::Protocol},
    upstream::{
        cluster_manager::{ClusterRt, original_destination},
        connect::Origin,
    },
};

/// Envoy's default `max_connect_attempts`.
const DEFAULT_CONNECT_ATTEMPTS: u32 = 1;

/// Envoy's `istio.stats` default `tcp_reporting_duration`.
const DEFAULT_TCP_REPORTING: Duration = Duration::from_secs(5);

/// Envoy's default tcp_proxy `idle_timeout`.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Why the proxy closed a connection before either side did.
enum Cut {
    /// `idle_timeout` or `max_downstream_connection_duration`.
    Timer(Expired),
    /// The filter chain was drained by an LDS update and its drain time is over.
    Drained,
}

/// The connection's timers, from the moment the upstream connected.
fn connection_watch(tp: &TcpProxy, activity: &Arc<Activity>) -> Watch {
    let start = activity.started();
    let mut w = Watch::new(activity.clone());
    let idle = match tp.idle_timeout {
        None => Some(DEFAULT_IDLE_TIMEOUT),
        Some(d) => Some(d).filter(|d| !d.is_zero()),
    };
    if let Some(d) = idle {
        w = w.idle(d, start, Expired::ConnectionIdle);
    }
    if let Some(d) = tp
        .max_downstream_connection_duration
        .filter(|d| !d.is_zero())
    {
        w = w.at(start + d, Expired::ConnectionDuration);
    }
    w
}

/// Proxies `io` per `tp` until either side closes. With a network `istio.stats` filter before it
/// on the chain (`stats`), the connection is reported in Istio's TCP metrics: opened once the
/// upstream is chosen, bytes every `tcp_reporting_duration` and at close, closed at close.
pub async fn serve(
    dp: Arc<DataPlane>,
    ctx: Arc<ConnContext>,
    tp: Arc<TcpProxy>,
    io: BoxIo,
    stats: Option<&StatsConfig>,
) {
    let started = (Instant::now(), SystemTime::now());
    let slot = UpstreamSlot::default();
    let opened = open(&dp, &ctx, &tp, Some(&slot)).await;
    let series = stats.and_then(|s| {
        let labels = StreamLabels::new(s, true, &ctx);
        let flags = match &opened {
            Ok(_) => ResponseFlags::default(),
            Err(e) => e.response_flags(),
        };
        let upstream = slot.get();
        let mut key = labels.key(
            &ctx.snapshot,
            &upstream,
            Protocol::Tcp,
            0,
            None,
            flags,
            true,
        );
        // The dimension values, once per connection (its series is the same at every report),
        // and only when the plan has dimensions.
        if !key.plan.dimensions.is_empty() {
            key.extra = key.plan.evaluate(&ConnectionAttributes {
                conn: &ctx,
                cluster: upstream.cluster.as_ref().map(|c| c.name.as_str()),
                mtls: labels.mutual_tls,
                source: key.source.as_deref(),
                destination: key.destination.as_deref(),
            });
        }
        let extra = key.extra.clone();
        dp.server
            .stats
            .istio
            .tcp_series(key)
            .map(|series| (series, extra))
    });
    let series = series.as_ref().map(|(s, extra)| (&**s, &**extra));
    if let Some((s, _)) = series {
        s.opened.fetch_add(1, Ordering::Relaxed);
    }
    let mut upstream = match opened {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(target: "tcp_proxy", stat_prefix = %tp.stat_prefix, flag = %e.flag(), "upstream: {e}");
            if let Some((s, extra)) = series {
                s.close(0, 0, extra);
            }
            log(&tp, &ctx, started, e.response_flags(), (0, 0), &slot);
            return;
        }
    };
    let meter = Arc::new(Meter::default());
    let activity = Activity::new();
    let mut watch = connection_watch(&tp, &activity);
    let mut io = Metered {
        inner: io,
        meter: meter.clone(),
        activity,
    };
    let every = stats
        .and_then(|s| s.tcp_reporting_duration)
        .unwrap_or(DEFAULT_TCP_REPORTING);
    let mut reported = (0, 0);
    let report = |reported: &mut (u64, u64)| {
        if let Some((s, _)) = series {
            let (rx, tx) = meter.get();
            s.received.fetch_add(rx - reported.0, Ordering::Relaxed);
            s.sent.fetch_add(tx - reported.1, Ordering::Relaxed);
            *reported = (rx, tx);
        }
    };
    let mut joined = Box::pin(crate::io::join(&mut io, &mut upstream));
    let mut tick = (series.is_some() && !every.is_zero())
        .then(|| tokio::time::interval_at(tokio::time::Instant::now() + every, every));
    let mut drain = ctx.drain.clone();
    let ended = loop {
        tokio::select! {
            r = &mut joined => break Ok(r),
            _ = async {
                match tick.as_mut() {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => std::future::pending().await,
                }
            } => report(&mut reported),
            kind = watch.expired() => break Err(Cut::Timer(kind)),
            _ = drain.closed() => break Err(Cut::Drained),
        }
    };
    // A timer closes both sides at once, as Envoy closes without flushing.
    drop(joined);
    drop(upstream);
    drop(io);
    report(&mut reported);
    if let Some((s, extra)) = series {
        // Also records the custom metrics (`istio.stats` definitions), as at a connection's close.
        let (received, sent) = meter.get();
        s.close(received, sent, extra);
    }
    let flags = match &ended {
        Ok(_) | Err(Cut::Drained) => ResponseFlags::default(),
        Err(Cut::Timer(kind)) => kind.response_flags(),
    };
    log(&tp, &ctx, started, flags, meter.get(), &slot);
    match ended {
        Ok((up, down, None)) => {
            tracing::trace!(target: "tcp_proxy", stat_prefix = %tp.stat_prefix, up, down, "closed")
        }
        Ok((up, down, Some(e))) => {
            tracing::debug!(target: "tcp_proxy", stat_prefix = %tp.stat_prefix, up, down, "ended: {e}")
        }
        Err(Cut::Drained) => {
            tracing::debug!(target: "tcp_proxy", stat_prefix = %tp.stat_prefix, "closed: the filter chain's drain time is over");
        }
        Err(Cut::Timer(kind)) => {
            let stat = match kind {
                Expired::ConnectionDuration => "max_downstream_connection_duration",
                _ => "idle_timeout",
            };
            dp.server
                .stats
                .counter(&format!("tcp.{}.{stat}", tp.stat_prefix))
                .inc();
            tracing::debug!(target: "tcp_proxy", stat_prefix = %tp.stat_prefix, "closed: {kind}");
        }
    }
}

/// Writes the tcp_proxy's access logs for a connection that started at `started` and moved
/// `(received, sent)` bytes downstream.
fn log(
    tp: &TcpProxy,
    ctx: &ConnContext,
    started: (Instant, SystemTime),
    flags: ResponseFlags,
    (received, sent): (u64, u64),
    slot: &UpstreamSlot,
) {
    if tp.access_log.is_empty() {
        return;
    }
    crate::access_log::log_connection(
        &tp.access_log,
        ctx,
        started.1,
        started.0.elapsed(),
        flags,
        received,
        sent,
        Some(&slot.get()),
    );
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
    slot: Option<&UpstreamSlot>,
) -> Result<BoxIo, ProxyError> {
    let name = cluster_of(tp).ok_or_else(|| ProxyError::NoCluster("weighted clusters".into()))?;
    let rt = dp
        .clusters
        .get(dp, &dp.server.config.snapshot(), &name)
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
            None => crate::http::router::open_tcp(dp, &rt, &origin, ctx, None, slot).await,
        };
        match r {
            Ok(io) => return Ok(io),
            Err(e) => last = Some(e),
        }
    }
    match last {
        // Envoy's `onConnectMaxAttempts`: the last failure's flag (`UF`) plus `URX`.
        Some(e) if attempts > 1 => Err(ProxyError::NotRetried {
            last: Box::new(e),
            flag: crate::flags::ResponseFlag::UpstreamRetryLimitExceeded,
            retried: true,
        }),
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

impl crate::io::Stream for TunnelIo {
    crate::io::pass_chunks!(all: 0.stream);
}

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

/// Bytes read from and written to the downstream so far.
#[derive(Debug, Default)]
struct Meter {
    received: AtomicU64,
    sent: AtomicU64,
}

impl Meter {
    fn get(&self) -> (u64, u64) {
        (
            self.received.load(Ordering::Relaxed),
            self.sent.load(Ordering::Relaxed),
        )
    }
}

/// The downstream connection, counting bytes both ways as they pass (and noting each as
/// activity for the idle timeout).
struct Metered {
    inner: BoxIo,
    meter: Arc<Meter>,
    activity: Arc<Activity>,
}

impl Metered {
    fn count(&self, n: usize, counter: &AtomicU64) {
        if n > 0 {
            counter.fetch_add(n as u64, Ordering::Relaxed);
            self.activity.touch();
        }
    }
}

impl crate::io::Stream for Metered {
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Option<Poll<std::io::Result<Bytes>>> {
        let polled = self.inner.poll_read_chunk(cx)?;
        if let Poll::Ready(Ok(chunk)) = &polled {
            self.count(chunk.len(), &self.meter.received);
        }
        Some(polled)
    }

    fn takes_chunks(&self) -> bool {
        self.inner.takes_chunks()
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<std::io::Result<usize>> {
        let polled = self.inner.poll_write_chunk(cx, chunk);
        if let Poll::Ready(Ok(n)) = polled {
            self.count(n, &self.meter.sent);
        }
        polled
    }
}

impl AsyncRead for Metered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.meter.received.fetch_add(n as u64, Ordering::Relaxed);
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Metered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r
            && *n > 0
        {
            self.meter.sent.fetch_add(*n as u64, Ordering::Relaxed);
            self.activity.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
