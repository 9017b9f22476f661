//! Listener, network and HTTP filters: each typed config is decoded (raw Any or `TypedStruct`),
//! checked for its position (an HTTP filter is not a network filter) and compiled.

pub mod cors;
pub mod hcm;
pub mod http;
pub mod istio;
pub mod jwt;
pub mod local_ratelimit;
pub mod rbac;
pub mod set_filter_state;
pub mod tcp_proxy;

use waypoint_proto::envoy::{
    config::listener::v3::{
        Filter as RawFilter, ListenerFilter as RawListenerFilter,
        ListenerFilterChainMatchPredicate, listener_filter_chain_match_predicate::Rule,
    },
    extensions::filters::listener::{
        http_inspector::v3::HttpInspector, original_dst::v3::OriginalDst,
        tls_inspector::v3::TlsInspector,
    },
};

use super::{
    CompileResult, ConfigError, field, index,
    supported::ExtensionKind,
    typed::{self, Typed},
};

/// A listener filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerFilterKind {
    /// `original_dst`: restore the original destination (from the socket, or on internal listeners
    /// from passthrough metadata / filter state).
    OriginalDst,
    /// `http_inspector`: sniff HTTP/1.x or h2c for `application_protocols` matching.
    HttpInspector,
    /// `tls_inspector`: read the ClientHello for SNI and ALPN.
    TlsInspector {
        /// `initial_read_buffer_size`.
        initial_read_buffer_size: Option<u32>,
        /// `max_client_hello_size`.
        max_client_hello_size: Option<u32>,
    },
}

/// When a listener filter is skipped (`filter_disabled`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterPredicate {
    /// Always.
    Any,
    /// Any of.
    Or(Vec<FilterPredicate>),
    /// All of.
    And(Vec<FilterPredicate>),
    /// Not.
    Not(Box<FilterPredicate>),
    /// The destination port is in `[start, end)`.
    DestinationPortRange {
        /// Inclusive.
        start: u16,
        /// Exclusive.
        end: u32,
    },
}

impl FilterPredicate {
    fn compile(p: &ListenerFilterChainMatchPredicate, path: &str) -> CompileResult<Self> {
        let set = |s: &waypoint_proto::envoy::config::listener::v3::listener_filter_chain_match_predicate::MatchSet,
                   name: &str|
         -> CompileResult<Vec<FilterPredicate>> {
            let spath = field(path, name);
            if s.rules.len() < 2 {
                return Err(ConfigError::new(
                    field(&spath, "rules"),
                    "at least two rules are required",
                ));
            }
            s.rules
                .iter()
                .enumerate()
                .map(|(i, r)| FilterPredicate::compile(r, &index(&spath, "rules", i)))
                .collect()
        };
        Ok(match &p.rule {
            Some(Rule::AnyMatch(true)) => FilterPredicate::Any,
            Some(Rule::AnyMatch(false)) | None => {
                return Err(ConfigError::new(path, "a predicate rule is required"));
            }
            Some(Rule::OrMatch(s)) => FilterPredicate::Or(set(s, "or_match")?),
            Some(Rule::AndMatch(s)) => FilterPredicate::And(set(s, "and_match")?),
            Some(Rule::NotMatch(n)) => FilterPredicate::Not(Box::new(FilterPredicate::compile(
                n,
                &field(path, "not_match"),
            )?)),
            Some(Rule::DestinationPortRange(r)) => {
                let rpath = field(path, "destination_port_range");
                if r.start < 0 || r.start > 65_535 || r.end <= r.start || r.end > 65_536 {
                    return Err(ConfigError::new(
                        rpath,
                        format!("invalid port range [{}, {})", r.start, r.end),
                    ));
                }
                FilterPredicate::DestinationPortRange {
                    start: r.start as u16,
                    end: r.end as u32,
                }
            }
        })
    }

    /// Whether the predicate holds for a connection to `port`.
    pub fn matches(&self, port: u16) -> bool {
        match self {
            FilterPredicate::Any => true,
            FilterPredicate::Or(v) => v.iter().any(|p| p.matches(port)),
            FilterPredicate::And(v) => v.iter().all(|p| p.matches(port)),
            FilterPredicate::Not(p) => !p.matches(port),
            FilterPredicate::DestinationPortRange { start, end } => {
                port >= *start && u32::from(port) < *end
            }
        }
    }
}

/// A compiled listener filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerFilter {
    /// Its name.
    pub name: String,
    /// What it does.
    pub kind: ListenerFilterKind,
    /// Skipped when this holds.
    pub disabled: Option<FilterPredicate>,
}

impl ListenerFilter {
    /// Compiles `path` (a `listener_filters[i]`).
    pub fn compile(raw: &RawListenerFilter, path: &str) -> CompileResult<Self> {
        use waypoint_proto::envoy::config::listener::v3::listener_filter::ConfigType;
        let cpath = field(path, "typed_config");
        let any = match &raw.config_type {
            Some(ConfigType::TypedConfig(a)) => a,
            _ => return Err(ConfigError::new(cpath, "typed_config is required")),
        };
        let t = Typed::new(any, &cpath)?;
        let name = t
            .check_kind(
                &[ExtensionKind::ListenerFilter],
                "a listener filter",
                &cpath,
            )?
            .to_owned();
        let kind = match name.as_str() {
            "envoy.extensions.filters.listener.original_dst.v3.OriginalDst" => {
                let _: OriginalDst = t.decode(&name, &cpath)?;
                ListenerFilterKind::OriginalDst
            }
            "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector" => {
                let _: HttpInspector = t.decode(&name, &cpath)?;
                ListenerFilterKind::HttpInspector
            }
            "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector" => {
                let ti: TlsInspector = t.decode(&name, &cpath)?;
                ListenerFilterKind::TlsInspector {
                    initial_read_buffer_size: ti.initial_read_buffer_size.map(|v| v.value),
                    max_client_hello_size: ti.max_client_hello_size.map(|v| v.value),
                }
            }
            other => {
                return Err(ConfigError::new(
                    cpath,
                    format!("listener filter {other} is not supported"),
                ));
            }
        };
        Ok(ListenerFilter {
            name: raw.name.clone(),
            kind,
            disabled: raw
                .filter_disabled
                .as_ref()
                .map(|p| FilterPredicate::compile(p, &field(path, "filter_disabled")))
                .transpose()?,
        })
    }
}

/// A compiled network filter.
#[derive(Debug, Clone)]
pub enum NetworkFilterKind {
    /// `envoy.filters.network.http_connection_manager` (terminal).
    HttpConnectionManager(std::sync::Arc<hcm::HttpConnectionManager>),
    /// `envoy.filters.network.tcp_proxy` (terminal).
    TcpProxy(std::sync::Arc<tcp_proxy::TcpProxy>),
    /// `envoy.filters.network.set_filter_state`.
    SetFilterState(set_filter_state::SetFilterState),
    /// `envoy.filters.network.rbac`.
    Rbac(Box<rbac::NetworkRbac>),
    /// `istio.stats` (TCP metrics).
    IstioStats(istio::StatsConfig),
    /// `istio.metadata_exchange`.
    MetadataExchange(istio::MetadataExchange),
    /// Network `peer_metadata` (baggage).
    PeerMetadata(istio::NetworkPeerMetadata),
}

/// A named network filter.
#[derive(Debug, Clone)]
pub struct NetworkFilter {
    /// Its name.
    pub name: String,
    /// Its config.
    pub kind: NetworkFilterKind,
}

impl NetworkFilter {
    /// Whether it ends a chain.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.kind,
            NetworkFilterKind::HttpConnectionManager(_) | NetworkFilterKind::TcpProxy(_)
        )
    }

    /// Compiles one `filters[i]`.
    pub fn compile(raw: &RawFilter, path: &str) -> CompileResult<Self> {
        use waypoint_proto::envoy::config::listener::v3::filter::ConfigType;
        let cpath = field(path, "typed_config");
        let any = match &raw.config_type {
            Some(ConfigType::TypedConfig(a)) => a,
            _ => return Err(ConfigError::new(cpath, "typed_config is required")),
        };
        let t = typed::Typed::new(any, &cpath)?;
        let name = t
            .check_kind(&[ExtensionKind::NetworkFilter], "a network filter", &cpath)?
            .to_owned();
        let kind = match name.as_str() {
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager" => {
                NetworkFilterKind::HttpConnectionManager(std::sync::Arc::new(
                    hcm::HttpConnectionManager::compile(
                        &t.decode(&name, &cpath)?,
                        &t.inner_path(&cpath),
                    )?,
                ))
            }
            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy" => {
                NetworkFilterKind::TcpProxy(std::sync::Arc::new(tcp_proxy::TcpProxy::compile(
                    &t.decode(&name, &cpath)?,
                    &t.inner_path(&cpath),
                )?))
            }
            "envoy.extensions.filters.network.set_filter_state.v3.Config" => {
                let c: waypoint_proto::envoy::extensions::filters::network::set_filter_state::v3::Config =
                    t.decode(&name, &cpath)?;
                NetworkFilterKind::SetFilterState(set_filter_state::SetFilterState::compile(
                    &c.on_new_connection,
                    &t.inner_path(&cpath),
                    "on_new_connection",
                )?)
            }
            "envoy.extensions.filters.network.rbac.v3.RBAC" => NetworkFilterKind::Rbac(Box::new(
                rbac::NetworkRbac::compile(&t.decode(&name, &cpath)?, &t.inner_path(&cpath))?,
            )),
            "stats.PluginConfig" => {
                NetworkFilterKind::IstioStats(istio::StatsConfig::compile(&t, &cpath)?)
            }
            "envoy.tcp.metadataexchange.config.MetadataExchange" => {
                NetworkFilterKind::MetadataExchange(istio::MetadataExchange::compile(&t, &cpath)?)
            }
            "envoy.extensions.network_filters.peer_metadata.Config" => {
                NetworkFilterKind::PeerMetadata(istio::NetworkPeerMetadata::compile(&t, &cpath)?)
            }
            other => {
                return Err(ConfigError::new(
                    cpath,
                    format!("network filter {other} is not supported"),
                ));
            }
        };
        Ok(NetworkFilter {
            name: raw.name.clone(),
            kind,
        })
    }
}

/// Compiles a filter chain's `filters`: non-empty, exactly one terminal filter, last.
pub fn compile_network_filters(
    list: &[RawFilter],
    path: &str,
) -> CompileResult<Vec<NetworkFilter>> {
    if list.is_empty() {
        return Err(ConfigError::new(
            field(path, "filters"),
            "a filter chain needs at least one filter",
        ));
    }
    let filters = list
        .iter()
        .enumerate()
        .map(|(i, f)| NetworkFilter::compile(f, &index(path, "filters", i)))
        .collect::<CompileResult<Vec<_>>>()?;
    let last = filters.len() - 1;
    for (i, f) in filters.iter().enumerate() {
        if f.is_terminal() && i != last {
            return Err(ConfigError::new(
                index(path, "filters", i),
                format!("terminal filter '{}' must be the last in the chain", f.name),
            ));
        }
    }
    if !filters[last].is_terminal() {
        return Err(ConfigError::new(
            index(path, "filters", last),
            format!(
                "the last filter ('{}') must be terminal: http_connection_manager or tcp_proxy",
                filters[last].name
            ),
        ));
    }
    Ok(filters)
}
