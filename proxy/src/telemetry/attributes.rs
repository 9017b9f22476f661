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
            PeerField::Type => {
                return (!p.workload_type.is_empty()).then(|| p.workload_type.into());
            }
            // istio/proxy's `serializeAsProto` writes `name` only when the cluster is set.
            PeerField::Name if p.cluster.is_empty() => return None,
            PeerField::Name => &p.instance,
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

    fn peer_label(&self, _: Side, _: &str) -> Option<String> {
        // The peers this proxy learns (WDS, baggage) have an empty `labels` map, as istio/proxy's
        // do: only metadata-exchange headers fill it, and that discovery is refused at config
        // time. A lookup in it is a missing key, `unknown`.
        None
    }

    fn filter_state(&self, key: &str) -> Option<String> {
        self.stream_state
            .and_then(|s| s.get(key))
            .or_else(|| self.conn.filter_state.get(key))
            .map(str::to_owned)
    }
}

/// One TCP connection (a network `istio.stats` filter's), as expressions see it once its
/// upstream is chosen. It has no request nor response: as istio_stats evaluates a connection's
/// expressions with no headers, `request.*`, `response.*` and `xds.route_name` fail there and
/// render as `unknown`.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionAttributes<'a> {
    /// The downstream connection (addresses, SNI, filter state).
    pub conn: &'a ConnContext,
    /// The cluster the tcp_proxy chose.
    pub cluster: Option<&'a str>,
    /// Mutual TLS with the downstream peer.
    pub mtls: bool,
    /// The downstream peer.
    pub source: Option<&'a PeerLabels>,
    /// The upstream peer.
    pub destination: Option<&'a PeerLabels>,
}

impl ConnectionAttributes<'_> {
    /// The same connection seen as a stream without request or response, so both paths read
    /// connection attributes one way.
    fn stream(&self) -> StreamAttributes<'_> {
        StreamAttributes {
            conn: self.conn,
            request: None,
            response_headers: None,
            response_code: 0,
            grpc_status: None,
            cluster: self.cluster,
            route: None,
            mtls: self.mtls,
            source: self.source,
            destination: self.destination,
            stream_state: None,
        }
    }
}

impl Attributes for ConnectionAttributes<'_> {
    fn address(&self, source: bool) -> Option<SocketAddr> {
        self.stream().address(source)
    }

    fn mtls(&self) -> bool {
        self.mtls
    }

    fn sni(&self) -> Option<String> {
        self.stream().sni()
    }

    fn cluster(&self) -> Option<String> {
        self.cluster.map(str::to_owned)
    }

    fn route(&self) -> Option<String> {
        None
    }

    fn peer(&self, side: Side, field: PeerField) -> Option<String> {
        self.stream().peer(side, field)
    }

    fn peer_label(&self, side: Side, key: &str) -> Option<String> {
        self.stream().peer_label(side, key)
    }

    fn filter_state(&self, key: &str) -> Option<String> {
        self.conn.filter_state.get(key).map(str::to_owned)
    }
}

/// A stream that is still running, as istio_stats evaluates expressions for the gRPC message
/// counters it adds while the stream runs and at its end: without the request, the response
/// headers or trailers, so `request.*`, `response.*` and headers read nothing (`unknown`).
#[derive(Debug, Clone, Copy)]
pub struct RunningStream<'a>(pub StreamAttributes<'a>);

impl Attributes for RunningStream<'_> {
    fn address(&self, source: bool) -> Option<SocketAddr> {
        self.0.address(source)
    }

    fn mtls(&self) -> bool {
        self.0.mtls()
    }

    fn sni(&self) -> Option<String> {
        self.0.sni()
    }

    fn cluster(&self) -> Option<String> {
        self.0.cluster()
    }

    fn route(&self) -> Option<String> {
        self.0.route()
    }

    fn peer(&self, side: Side, field: PeerField) -> Option<String> {
        self.0.peer(side, field)
    }

    fn peer_label(&self, side: Side, key: &str) -> Option<String> {
        self.0.peer_label(side, key)
    }

    fn filter_state(&self, key: &str) -> Option<String> {
        self.0.filter_state(key)
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

    /// Whether a dimension reads the request head, or a custom metric its `content-length`
    /// (`request.size`).
    pub fn reads_request(&self) -> bool {
        self.custom
            .iter()
            .any(|c| c.value == ValueSource::RequestSize)
            || self.dimensions.iter().any(|e| {
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
                        | Expr::PeerLabel { .. }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::{Snapshot, filters::set_filter_state::Sharing},
        listener::conn::{Addr, StateObject},
    };

    fn conn() -> ConnContext {
        let mut c = ConnContext::new(
            "l",
            Addr::Socket(([10, 0, 0, 2], 9000).into()),
            Addr::Socket(([10, 0, 0, 1], 40000).into()),
            Arc::new(Snapshot::default()),
        );
        c.filter_state.set(
            "k",
            StateObject {
                value: "v".into(),
                sharing: Sharing::None,
                read_only: false,
                peer: None,
            },
        );
        c
    }

    fn plan(exprs: &[&str]) -> Plan {
        let mut p = Plan::standard("waypoint");
        p.dimensions = exprs
            .iter()
            .map(|t| Expr::parse(t).unwrap_or_else(|e| panic!("{t}: {e}")))
            .collect();
        p
    }

    #[test]
    fn connection_dimensions_read_what_a_connection_has() {
        let conn = conn();
        let dest = PeerLabels {
            app: "echo".into(),
            workload: "echo-v1".into(),
            workload_type: "deployment",
            instance: "echo-v1-5d8f".into(),
            cluster: "Kubernetes".into(),
            ..PeerLabels::default()
        };
        let source = PeerLabels {
            // No cluster: istio/proxy's peer Struct then has no `name`.
            instance: "sleep-1".into(),
            ..PeerLabels::default()
        };
        let cases = [
            ("upstream_peer.app", "echo"),
            ("upstream_peer.workload", "echo-v1"),
            // An empty field is absent.
            ("downstream_peer.app", "unknown"),
            ("upstream_peer.version", "unknown"),
            ("upstream_peer.type", "deployment"),
            ("upstream_peer.name", "echo-v1-5d8f"),
            ("downstream_peer.name", "unknown"),
            ("downstream_peer.type", "unknown"),
            ("upstream_peer.labels['app']", "unknown"),
            ("filter_state['k']", "v"),
            ("filter_state['missing']", "unknown"),
            ("string(destination.port)", "9000"),
            ("source.address", "10.0.0.1:40000"),
            ("connection.mtls", "true"),
            ("xds.cluster_name", "inbound-vip|9000|tcp|echo"),
            ("'lit'", "lit"),
        ];
        let texts: Vec<&str> = cases.iter().map(|(t, _)| *t).collect();
        let values = plan(&texts).evaluate(&ConnectionAttributes {
            conn: &conn,
            cluster: Some("inbound-vip|9000|tcp|echo"),
            mtls: true,
            source: Some(&source),
            destination: Some(&dest),
        });
        assert_eq!(values.len(), cases.len());
        for ((text, want), got) in cases.iter().zip(values.iter()) {
            assert_eq!(&**got, *want, "{text}");
        }
    }

    #[test]
    fn a_running_stream_reads_no_request_nor_response() {
        let conn = conn();
        let dest = PeerLabels {
            workload: "echo-v1".into(),
            ..PeerLabels::default()
        };
        let parts = http::Request::builder()
            .uri("/x")
            .header("x-user", "alice")
            .body(())
            .expect("request")
            .into_parts()
            .0;
        let stream = StreamAttributes {
            conn: &conn,
            request: Some(&parts),
            response_headers: None,
            response_code: 200,
            grpc_status: Some(0),
            cluster: Some("c"),
            route: Some("r"),
            mtls: true,
            source: None,
            destination: Some(&dest),
            stream_state: None,
        };
        let p = plan(&[
            "request.headers['x-user']",
            "request.path",
            "response.code",
            "response.grpc_status",
            "upstream_peer.workload",
            "xds.route_name",
            "filter_state['k']",
        ]);
        let ended: Vec<String> = p.evaluate(&stream).iter().map(|v| v.to_string()).collect();
        assert_eq!(ended, ["alice", "/x", "200", "0", "echo-v1", "r", "v"]);
        let running: Vec<String> = p
            .evaluate(&RunningStream(stream))
            .iter()
            .map(|v| v.to_string())
            .collect();
        assert_eq!(
            running,
            [
                "unknown", "unknown", "unknown", "unknown", "echo-v1", "r", "v"
            ]
        );
    }

    #[test]
    fn request_and_response_forms_are_unknown_on_a_connection() {
        let conn = conn();
        let forms = [
            "request.headers['x-user']",
            "request.host",
            "request.method",
            "request.path",
            "request.protocol",
            "response.code",
            "response.grpc_status",
            "response.headers['server']",
            "xds.route_name",
            // No TLS on this connection, so no SNI either.
            "connection.requested_server_name",
        ];
        let values = plan(&forms).evaluate(&ConnectionAttributes {
            conn: &conn,
            cluster: None,
            mtls: false,
            source: None,
            destination: None,
        });
        for (text, got) in forms.iter().zip(values.iter()) {
            assert_eq!(&**got, "unknown", "{text}");
        }
        // Without a cluster, `xds.cluster_name` is unknown too; mTLS reads false.
        let values =
            plan(&["xds.cluster_name", "connection.mtls"]).evaluate(&ConnectionAttributes {
                conn: &conn,
                cluster: None,
                mtls: false,
                source: None,
                destination: None,
            });
        assert_eq!(
            values.iter().map(|v| &**v).collect::<Vec<_>>(),
            ["unknown", "false"]
        );
    }
}
