//! The stream attributes the dimension expressions of `istio.stats` read ([`super::expr`]), over
//! what the connection manager knows when a stream ends.

use std::{net::SocketAddr, sync::Arc};

use http::HeaderMap;

use super::{
    expr::{Attributes, Expr, PeerField, Side},
    istio::{PeerLabels, Plan, ValueSource},
};
use crate::listener::conn::{ConnContext, FilterState};

/// One finished stream, as expressions see it.
#[derive(Debug, Clone, Copy)]
pub struct StreamAttributes<'a> {
    /// The downstream connection.
    pub conn: &'a ConnContext,
    /// The request head, when it was kept.
    pub request: Option<&'a http::request::Parts>,
    /// The response headers, when they were kept.
    pub response_headers: Option<&'a HeaderMap>,
    /// Response code (0: none sent).
    pub response_code: u16,
    /// gRPC status.
    pub grpc_status: Option<u32>,
    /// The cluster routed to.
    pub cluster: Option<&'a str>,
    /// The route's name.
    pub route: Option<&'a str>,
    /// Mutual TLS with the downstream peer.
    pub mtls: bool,
    /// The downstream peer.
    pub source: Option<&'a PeerLabels>,
    /// The upstream peer.
    pub destination: Option<&'a PeerLabels>,
    /// The stream's filter state (the connection's is consulted after it).
    pub stream_state: Option<&'a FilterState>,
}

fn header(h: Option<&HeaderMap>, name: &str) -> Option<String> {
    h?.get(name)?.to_str().ok().map(str::to_owned)
}

impl Attributes for StreamAttributes<'_> {
    fn request_header(&self, name: &str) -> Option<String> {
        header(self.request.map(|r| &r.headers), name)
    }

    fn response_header(&self, name: &str) -> Option<String> {
        header(self.response_headers, name)
    }

    fn request(&self, e: &Expr) -> Option<String> {
        let r = self.request?;
        match e {
            Expr::RequestHost => r
                .uri
                .authority()
                .map(|a| a.as_str().to_owned())
                .or_else(|| header(Some(&r.headers), "host")),
            Expr::RequestMethod => Some(r.method.as_str().to_owned()),
            Expr::RequestPath => r.uri.path_and_query().map(|p| p.as_str().to_owned()),
            Expr::RequestUrlPath => Some(r.uri.path().to_owned()),
            Expr::RequestScheme => Some(r.uri.scheme_str().unwrap_or("http").to_owned()),
            Expr::RequestProtocol => Some(
                match r.version {
                    http::Version::HTTP_10 => "HTTP/1.0",
                    http::Version::HTTP_2 => "HTTP/2",
                    http::Version::HTTP_3 => "HTTP/3",
                    _ => "HTTP/1.1",
                }
                .to_owned(),
            ),
            Expr::RequestId => header(Some(&r.headers), "x-request-id"),
            Expr::RequestUserAgent => header(Some(&r.headers), "user-agent"),
            Expr::RequestReferer => header(Some(&r.headers), "referer"),
            _ => None,
        }
    }

    fn response_code(&self) -> Option<u16> {
        Some(self.response_code)
    }

    fn grpc_status(&self) -> Option<u32> {
        self.grpc_status
    }

    fn address(&self, source: bool) -> Option<SocketAddr> {
        if source {
            self.conn.remote.socket()
        } else {
            self.conn.local.socket()
        }
    }

    fn mtls(&self) -> bool {
        self.mtls
    }

    fn sni(&self) -> Option<String> {
        self.conn.tls.as_ref().and_then(|t| t.server_name.clone())
    }

    fn cluster(&self) -> Option<String> {
        self.cluster.map(str::to_owned)
    }

    fn route(&self) -> Option<String> {
        self.route.map(str::to_owned)
    }

    fn peer(&self, side: Side, field: PeerField) -> Option<String> {
        let p = match side {
            Side::Downstream => self.source,
            Side::Upstream => self.destination,
        }?;
        let v = match field {
            PeerField::Workload => &p.workload,
            PeerField::Namespace => &p.namespace,
            PeerField::Service => &p.canonical_service,
            PeerField::Revision => &p.canonical_revision,
            PeerField::App => &p.app,
            PeerField::Version => &p.version,
            PeerField::Cluster => &p.cluster,
            PeerField::Identity => &p.identity,
        };
        (!v.is_empty()).then(|| v.clone())
    }

    fn filter_state(&self, key: &str) -> Option<String> {
        self.stream_state
            .and_then(|s| s.get(key))
            .or_else(|| self.conn.filter_state.get(key))
            .map(str::to_owned)
    }
}

impl Plan {
    /// The dimension values of a stream, in [`Plan::dimensions`] order.
    pub fn evaluate(&self, attrs: &dyn Attributes) -> Arc<[Arc<str>]> {
        self.dimensions
            .iter()
            .map(|e| Arc::<str>::from(e.eval(attrs)))
            .collect()
    }

    /// Whether a dimension reads the request head.
    pub fn reads_request(&self) -> bool {
        self.dimensions.iter().any(|e| {
            !matches!(
                e,
                Expr::Literal(_)
                    | Expr::ResponseHeader(_)
                    | Expr::ResponseCode
                    | Expr::ResponseGrpcStatus
                    | Expr::Source(_)
                    | Expr::Destination(_)
                    | Expr::ConnectionMtls
                    | Expr::ConnectionSni
                    | Expr::XdsCluster
                    | Expr::XdsRoute
                    | Expr::Peer(..)
                    | Expr::FilterState(_)
            )
        })
    }

    /// Whether a dimension or a custom metric reads the gRPC status (`response.grpc_status`):
    /// else only a gRPC stream's series need it, and other streams skip looking it up.
    pub fn reads_grpc_status(&self) -> bool {
        self.dimensions
            .iter()
            .any(|e| matches!(e, Expr::ResponseGrpcStatus))
            || self
                .custom
                .iter()
                .any(|c| c.value == ValueSource::ResponseGrpcStatus)
    }

    /// Whether a dimension reads the response headers.
    pub fn reads_response_headers(&self) -> bool {
        self.dimensions
            .iter()
            .any(|e| matches!(e, Expr::ResponseHeader(_)))
    }
}
