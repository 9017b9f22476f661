//! Listeners: a socket address or an in-process internal listener, listener filters, and filter
//! chains selected by classic `filter_chain_match` or by the compiled `filter_chain_matcher`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    ops::Deref,
    sync::Arc,
    time::Duration,
};

use waypoint_proto::envoy::config::{
    core::v3::{Address, address, socket_address::PortSpecifier},
    listener::v3::{
        FilterChain as RawFilterChain, FilterChainMatch as RawFilterChainMatch,
        Listener as RawListener, filter_chain_match::ConnectionSourceType,
        listener::ListenerSpecifier,
    },
};

use super::{
    CompileResult, ConfigError,
    access_log::{self, AccessLog},
    field,
    filters::{ListenerFilter, NetworkFilter, compile_network_filters},
    index,
    matcher::{ChainMatcher, ClassicIndex},
    matchers::{Cidr, cidrs},
    opt_duration,
    tls::{Side, TransportSocket},
};
use crate::listener::drain::ChainDrain;

/// Envoy's default `listener_filters_timeout`.
const DEFAULT_LISTENER_FILTERS_TIMEOUT: Duration = Duration::from_secs(15);

/// Where a listener accepts connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bind {
    /// A TCP socket.
    Socket {
        /// The address.
        addr: SocketAddr,
        /// `ipv4_compat`: a `[::]` socket also accepts IPv4.
        ipv4_compat: bool,
    },
    /// In process: reached by name from `envoy_internal_address` endpoints.
    Internal,
}

/// A socket address (`socket_address` with an IP and a port value).
pub fn socket_address(a: &Address, path: &str) -> CompileResult<(SocketAddr, bool)> {
    match &a.address {
        Some(address::Address::SocketAddress(sa)) => {
            let spath = field(path, "socket_address");
            let ip: IpAddr = sa.address.parse().map_err(|_| {
                ConfigError::new(
                    field(&spath, "address"),
                    format!(
                        "'{}' is not an IP address (DNS names are not resolved)",
                        sa.address
                    ),
                )
            })?;
            let port = match sa.port_specifier {
                Some(PortSpecifier::PortValue(p)) => u16::try_from(p).map_err(|_| {
                    ConfigError::new(
                        field(&spath, "port_value"),
                        format!("port {p} out of range"),
                    )
                })?,
                Some(PortSpecifier::NamedPort(_)) => {
                    return Err(ConfigError::new(
                        field(&spath, "named_port"),
                        "named ports are not supported",
                    ));
                }
                None => 0,
            };
            Ok((SocketAddr::new(ip, port), sa.ipv4_compat))
        }
        Some(address::Address::Pipe(_)) => Err(ConfigError::new(
            field(path, "pipe"),
            "a Unix socket is not supported here",
        )),
        Some(address::Address::EnvoyInternalAddress(_)) => Err(ConfigError::new(
            field(path, "envoy_internal_address"),
            "an internal address is not supported here (use internal_listener)",
        )),
        None => Err(ConfigError::new(path, "an address is required")),
    }
}

/// Which source addresses a classic chain match accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceType {
    /// Any.
    Any,
    /// Local (same IP or loopback).
    Local,
    /// Not local.
    External,
}

/// A compiled classic `filter_chain_match`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterChainMatch {
    /// `destination_port`.
    pub destination_port: Option<u16>,
    /// `prefix_ranges` (destination IP).
    pub prefix_ranges: Vec<Cidr>,
    /// `source_type`.
    pub source_type: SourceType,
    /// `source_prefix_ranges`.
    pub source_prefix_ranges: Vec<Cidr>,
    /// `direct_source_prefix_ranges`.
    pub direct_source_prefix_ranges: Vec<Cidr>,
    /// `source_ports`.
    pub source_ports: Vec<u16>,
    /// `server_names` (SNI; `*.x` wildcards).
    pub server_names: Vec<String>,
    /// `transport_protocol` (`tls`, `raw_buffer`).
    pub transport_protocol: Option<String>,
    /// `application_protocols`.
    pub application_protocols: Vec<String>,
}

impl FilterChainMatch {
    fn compile(m: &RawFilterChainMatch, path: &str) -> CompileResult<Self> {
        let destination_port = m
            .destination_port
            .as_ref()
            .map(|p| {
                u16::try_from(p.value)
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| {
                        ConfigError::new(
                            field(path, "destination_port"),
                            format!("port {} out of range", p.value),
                        )
                    })
            })
            .transpose()?;
        let source_ports = m
            .source_ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                u16::try_from(*p).map_err(|_| {
                    ConfigError::new(
                        index(path, "source_ports", i),
                        format!("port {p} out of range"),
                    )
                })
            })
            .collect::<CompileResult<_>>()?;
        Ok(FilterChainMatch {
            destination_port,
            prefix_ranges: cidrs(&m.prefix_ranges, path, "prefix_ranges")?,
            source_type: match ConnectionSourceType::try_from(m.source_type) {
                Ok(ConnectionSourceType::SameIpOrLoopback) => SourceType::Local,
                Ok(ConnectionSourceType::External) => SourceType::External,
                _ => SourceType::Any,
            },
            source_prefix_ranges: cidrs(&m.source_prefix_ranges, path, "source_prefix_ranges")?,
            direct_source_prefix_ranges: cidrs(
                &m.direct_source_prefix_ranges,
                path,
                "direct_source_prefix_ranges",
            )?,
            source_ports,
            server_names: m
                .server_names
                .iter()
                .map(|s| s.to_ascii_lowercase())
                .collect(),
            transport_protocol: (!m.transport_protocol.is_empty())
                .then(|| m.transport_protocol.clone()),
            application_protocols: m.application_protocols.clone(),
        })
    }
}

/// A compiled filter chain.
#[derive(Debug, Clone)]
pub struct FilterChain {
    /// `name` (what `filter_chain_matcher` actions select).
    pub name: String,
    /// `filter_chain_match` (`None`: matches everything).
    pub chain_match: Option<FilterChainMatch>,
    /// Network filters; the last one is terminal.
    pub filters: Vec<NetworkFilter>,
    /// `transport_socket` (`None`: plaintext).
    pub transport_socket: Option<TransportSocket>,
    /// `transport_socket_connect_timeout`: TLS handshake deadline.
    pub transport_socket_connect_timeout: Option<Duration>,
    /// Drains the chain's connections once a listener update no longer contains it.
    pub drain: ChainDrain,
}

impl FilterChain {
    fn compile(c: &RawFilterChain, path: &str) -> CompileResult<Self> {
        Ok(FilterChain {
            name: c.name.clone(),
            chain_match: c
                .filter_chain_match
                .as_ref()
                .map(|m| FilterChainMatch::compile(m, &field(path, "filter_chain_match")))
                .transpose()?,
            filters: compile_network_filters(&c.filters, path)?,
            transport_socket: c
                .transport_socket
                .as_ref()
                .map(|t| {
                    TransportSocket::compile(t, Side::Downstream, &field(path, "transport_socket"))
                })
                .transpose()?,
            transport_socket_connect_timeout: opt_duration(
                c.transport_socket_connect_timeout.as_ref(),
                &field(path, "transport_socket_connect_timeout"),
            )?,
            drain: ChainDrain::new(),
        })
    }
}

/// A compiled listener.
#[derive(Debug, Clone)]
pub struct Listener {
    /// The resource as received (for `/config_dump` and the admin API).
    pub raw: Arc<RawListener>,
    /// `name`.
    pub name: String,
    /// `address` / `internal_listener`.
    pub bind: Bind,
    /// `additional_addresses`.
    pub additional_addresses: Vec<SocketAddr>,
    /// `listener_filters`, in order.
    pub listener_filters: Vec<ListenerFilter>,
    /// `listener_filters_timeout` (15s default; zero: none).
    pub listener_filters_timeout: Duration,
    /// `continue_on_listener_filters_timeout`.
    pub continue_on_listener_filters_timeout: bool,
    /// `filter_chains`.
    pub filter_chains: Vec<FilterChain>,
    /// `default_filter_chain`.
    pub default_filter_chain: Option<FilterChain>,
    /// `filter_chain_matcher`.
    pub chain_matcher: Option<ChainMatcher>,
    /// `filter_chains` indexed by destination port and IP for classic `filter_chain_match`
    /// selection (`listener::chain`).
    pub chain_index: ClassicIndex,
    /// `per_connection_buffer_limit_bytes`.
    pub per_connection_buffer_limit_bytes: Option<u32>,
    /// `access_log`.
    pub access_log: Vec<AccessLog>,
    /// `ignore_global_conn_limit`.
    pub ignore_global_conn_limit: bool,
    /// The resource without `filter_chains`, `default_filter_chain` and `filter_chain_matcher`:
    /// what an update must leave unchanged to be a filter-chain-only update.
    shell: RawListener,
}

/// Transitional: code written against the raw Envoy listener keeps working (`l.address`).
impl Deref for Listener {
    type Target = RawListener;
    fn deref(&self) -> &RawListener {
        &self.raw
    }
}

impl Listener {
    /// Compiles `l` (paths from `path`, empty for an xDS resource).
    pub fn compile(mut l: RawListener, path: &str) -> CompileResult<Self> {
        let shell = {
            // Taken out for the copy only: a waypoint's chains are most of the listener.
            let chains = std::mem::take(&mut l.filter_chains);
            let default = l.default_filter_chain.take();
            let matcher = l.filter_chain_matcher.take();
            let shell = l.clone();
            l.filter_chains = chains;
            l.default_filter_chain = default;
            l.filter_chain_matcher = matcher;
            shell
        };
        if l.name.is_empty() {
            return Err(ConfigError::new(field(path, "name"), "name is required"));
        }
        let internal = matches!(
            l.listener_specifier,
            Some(ListenerSpecifier::InternalListener(_))
        );
        let bind = match (&l.address, internal) {
            (Some(_), true) => {
                return Err(ConfigError::new(
                    field(path, "address"),
                    "an internal listener has no address",
                ));
            }
            (Some(a), false) => {
                let (addr, ipv4_compat) = socket_address(a, &field(path, "address"))?;
                Bind::Socket { addr, ipv4_compat }
            }
            (None, true) => Bind::Internal,
            (None, false) => {
                return Err(ConfigError::new(
                    path,
                    "address or internal_listener is required",
                ));
            }
        };
        if l.use_original_dst.is_some_and(|b| b.value) {
            return Err(ConfigError::new(
                field(path, "use_original_dst"),
                "redirecting to the listener of the original destination (iptables capture) is not supported",
            ));
        }
        let additional_addresses = l
            .additional_addresses
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let apath = index(path, "additional_addresses", i);
                let addr = a.address.as_ref().ok_or_else(|| {
                    ConfigError::new(field(&apath, "address"), "address is required")
                })?;
                socket_address(addr, &field(&apath, "address")).map(|(s, _)| s)
            })
            .collect::<CompileResult<Vec<_>>>()?;
        if internal && !additional_addresses.is_empty() {
            return Err(ConfigError::new(
                field(path, "additional_addresses"),
                "an internal listener has no addresses",
            ));
        }
        let listener_filters = l
            .listener_filters
            .iter()
            .enumerate()
            .map(|(i, f)| ListenerFilter::compile(f, &index(path, "listener_filters", i)))
            .collect::<CompileResult<Vec<_>>>()?;
        let filter_chains = l
            .filter_chains
            .iter()
            .enumerate()
            .map(|(i, c)| FilterChain::compile(c, &index(path, "filter_chains", i)))
            .collect::<CompileResult<Vec<_>>>()?;
        let default_filter_chain = l
            .default_filter_chain
            .as_ref()
            .map(|c| FilterChain::compile(c, &field(path, "default_filter_chain")))
            .transpose()?;
        if filter_chains.is_empty() && default_filter_chain.is_none() {
            return Err(ConfigError::new(
                field(path, "filter_chains"),
                "a listener needs at least one filter chain",
            ));
        }
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, c) in filter_chains.iter().enumerate() {
            if c.name.is_empty() {
                continue;
            }
            if let Some(first) = names.insert(c.name.as_str(), i) {
                return Err(ConfigError::new(
                    field(&index(path, "filter_chains", i), "name"),
                    format!(
                        "duplicate filter chain name '{}' (also filter_chains[{first}])",
                        c.name
                    ),
                ));
            }
        }
        let chain_matcher = match &l.filter_chain_matcher {
            None => {
                for (i, c) in filter_chains.iter().enumerate() {
                    if let Some(j) = filter_chains[..i]
                        .iter()
                        .position(|o| o.chain_match == c.chain_match)
                    {
                        return Err(ConfigError::new(
                            index(path, "filter_chains", i),
                            format!("filter_chains[{j}] has the same filter_chain_match"),
                        ));
                    }
                }
                None
            }
            Some(m) => {
                let mpath = field(path, "filter_chain_matcher");
                if let Some(i) = filter_chains.iter().position(|c| c.chain_match.is_some()) {
                    return Err(ConfigError::new(
                        field(&index(path, "filter_chains", i), "filter_chain_match"),
                        "filter_chain_match would be ignored next to filter_chain_matcher; use one of them",
                    ));
                }
                let (mut matcher, referenced) = ChainMatcher::compile(m, &mpath)?;
                for (chain, apath) in referenced {
                    if !names.contains_key(chain.as_str()) {
                        return Err(ConfigError::new(
                            apath,
                            format!("no filter chain named '{chain}'"),
                        ));
                    }
                }
                matcher.resolve(&|name| names.get(name).copied());
                Some(matcher)
            }
        };
        let chain_index = ClassicIndex::build(&filter_chains);
        Ok(Listener {
            name: l.name.clone(),
            bind,
            additional_addresses,
            listener_filters,
            listener_filters_timeout: opt_duration(
                l.listener_filters_timeout.as_ref(),
                &field(path, "listener_filters_timeout"),
            )?
            .unwrap_or(DEFAULT_LISTENER_FILTERS_TIMEOUT),
            continue_on_listener_filters_timeout: l.continue_on_listener_filters_timeout,
            filter_chains,
            default_filter_chain,
            chain_matcher,
            chain_index,
            per_connection_buffer_limit_bytes: l.per_connection_buffer_limit_bytes.map(|v| v.value),
            access_log: access_log::compile_all(&l.access_log, path)?,
            ignore_global_conn_limit: l.ignore_global_conn_limit,
            shell,
            raw: Arc::new(l),
        })
    }

    /// Whether replacing `self` by `new` is Envoy's in-place filter chain update
    /// (`ListenerImpl::supportUpdateFilterChain`): everything but `filter_chains`,
    /// `default_filter_chain` and `filter_chain_matcher` is unchanged and `new` has filter
    /// chains. Then only the chains that changed drain; otherwise the whole listener is replaced
    /// and every connection of `self` drains.
    ///
    /// Fields compare as received: a control plane that marshals deterministically (istiod does)
    /// sends equal bytes for equal typed configs.
    pub fn filter_chain_only_change(&self, new: &Listener) -> bool {
        !new.raw.filter_chains.is_empty() && self.shell == new.shell
    }

    /// Each chain with the config it was compiled from: `filter_chains` in order, then
    /// `default_filter_chain`.
    pub fn chains_with_config(&self) -> impl Iterator<Item = (&FilterChain, &RawFilterChain)> {
        self.filter_chains
            .iter()
            .zip(&self.raw.filter_chains)
            .chain(
                self.default_filter_chain
                    .iter()
                    .zip(self.raw.default_filter_chain.as_ref()),
            )
    }

    /// The chain named `name`.
    pub fn chain(&self, name: &str) -> Option<&FilterChain> {
        self.filter_chains.iter().find(|c| c.name == name)
    }
}
