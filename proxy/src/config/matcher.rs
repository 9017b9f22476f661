//! The listener's `filter_chain_matcher` (xDS matcher API) compiled into a tree that selects a filter
//! chain: destination IP ranges (`IPMatcher`), exact/prefix maps over the destination port,
//! application protocol, server name, transport protocol or a filter state string. Also the index
//! of classic `filter_chain_match`es by destination port and IP ([`ClassicIndex`]).
//!
//! IP ranges are looked up in an [`IpTable`] built at compile time: one hash map per prefix length
//! present, probed from the longest length to the shortest, so a connection costs one probe per
//! distinct prefix length instead of a visit of every range (istiod lists one `/32` per service
//! VIP, so a waypoint in front of 1,000 services has 1,000 ranges and one length).

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    net::IpAddr,
};

use waypoint_proto::{
    google::protobuf::{Any, StringValue},
    xds::matcher::IpMatcher,
    xds_matcher_v3::{
        Matcher as RawMatcher,
        matcher::{MatcherType, OnMatch as RawOnMatch, matcher_tree::TreeType, on_match},
    },
};

use super::{
    CompileResult, ConfigError, field, index, key, listener::FilterChain, matchers::Cidr,
    supported::ExtensionKind, typed::Typed,
};

/// What a matcher looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The (restored) destination IP.
    DestinationIp,
    /// The (restored) destination port.
    DestinationPort,
    /// The source IP.
    SourceIp,
    /// SNI.
    ServerName,
    /// `tls` / `raw_buffer`.
    TransportProtocol,
    /// ALPN or sniffed protocols, as Envoy spells them: `'h2c','http/1.1'`.
    ApplicationProtocol,
    /// A filter state object's string value.
    FilterState(String),
}

/// The filter chain an action selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainRef {
    /// The chain's `name`.
    pub name: String,
    /// Its position in the listener's `filter_chains`, once the listener has resolved the names
    /// ([`ChainMatcher::resolve`]); saves a search by name per connection.
    pub index: Option<usize>,
}

/// The result of a match: a chain, or a nested matcher.
#[derive(Debug, Clone)]
pub enum OnMatch {
    /// Select this filter chain.
    Chain(ChainRef),
    /// Continue with this matcher.
    Matcher(Box<ChainMatcher>),
}

/// One IP range entry.
#[derive(Debug, Clone)]
pub struct IpRange {
    /// Any of these.
    pub ranges: Vec<Cidr>,
    /// Then.
    pub on_match: OnMatch,
    /// `exclusive`: the entry is only considered when no more specific entry contains the address,
    /// even when that more specific entry's nested matcher fails (Envoy's trie matcher skips an
    /// exclusive entry that is not the first candidate).
    pub exclusive: bool,
}

/// A compiled tree.
#[derive(Debug, Clone)]
pub enum Tree {
    /// Exact value → result.
    Exact {
        /// The input.
        input: Input,
        /// The map.
        map: HashMap<String, OnMatch>,
    },
    /// Exact destination port → result: the port's decimal form is what Envoy's input yields, so
    /// the map is keyed by number (keys that are not a port's canonical decimal form can never
    /// match and are dropped).
    Port {
        /// The map.
        map: HashMap<u16, OnMatch>,
    },
    /// Longest prefix → result.
    Prefix {
        /// The input.
        input: Input,
        /// Sorted by descending prefix length.
        entries: Vec<(String, OnMatch)>,
    },
    /// Most specific IP range → result.
    Ip {
        /// The input (an IP).
        input: Input,
        /// Range entries, in declaration order.
        ranges: Vec<IpRange>,
        /// Entry indices by range: every range of every entry, each bucket ascending.
        table: IpTable<Vec<usize>>,
    },
}

/// A compiled `xds.type.matcher.v3.Matcher`.
#[derive(Debug, Clone)]
pub struct ChainMatcher {
    /// The tree.
    pub tree: Tree,
    /// When nothing matches.
    pub on_no_match: Option<OnMatch>,
}

/// A hasher for already well-mixed integer keys (masked IP addresses): one multiply per word
/// instead of SipHash. The keys come from configuration, so there is no flooding to defend against.
#[derive(Debug, Default, Clone, Copy)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_u128(&mut self, n: u128) {
        self.write_u64(n as u64);
        self.write_u64((n >> 64) as u64);
    }
}

type AddrMap<T> = HashMap<u128, T, BuildHasherDefault<AddrHasher>>;

/// Ranges of one address family: per prefix length (longest first), the masked network → value.
#[derive(Debug, Clone)]
struct FamilyTable<T> {
    width: u8,
    by_len: Vec<(u8, AddrMap<T>)>,
}

impl<T> FamilyTable<T> {
    fn new(width: u8) -> Self {
        FamilyTable {
            width,
            by_len: Vec::new(),
        }
    }

    fn masked(&self, bits: u128, len: u8) -> u128 {
        if len == 0 {
            0
        } else {
            // Only the family's low `width` bits are used (IPv4 in the low 32).
            let shift = u32::from(self.width.saturating_sub(len));
            bits & (u128::MAX << shift)
        }
    }
}

fn bits(ip: IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(a) => (true, u128::from(u32::from(a))),
        IpAddr::V6(a) => (false, u128::from(a)),
    }
}

/// Values by IP range with longest-prefix-match lookup (see the module docs). IPv4 and IPv6
/// never mix, as in [`Cidr::contains`].
#[derive(Debug, Clone)]
pub struct IpTable<T> {
    v4: FamilyTable<T>,
    v6: FamilyTable<T>,
}

impl<T> Default for IpTable<T> {
    fn default() -> Self {
        IpTable {
            v4: FamilyTable::new(32),
            v6: FamilyTable::new(128),
        }
    }
}

impl<T: Default> IpTable<T> {
    /// The value for `range` (created empty on first use).
    pub fn entry(&mut self, range: Cidr) -> &mut T {
        let (v4, addr) = bits(range.addr);
        let family = if v4 { &mut self.v4 } else { &mut self.v6 };
        let len = range.len.min(family.width);
        let key = family.masked(addr, len);
        let at = match family.by_len.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(at) => at,
            Err(at) => {
                family.by_len.insert(at, (len, AddrMap::default()));
                at
            }
        };
        family.by_len[at].1.entry(key).or_default()
    }
}

impl<T> IpTable<T> {
    /// The values of every range holding `ip`, with their prefix length, longest first.
    pub fn matches(&self, ip: IpAddr) -> impl Iterator<Item = (u8, &T)> + '_ {
        let (v4, addr) = bits(ip);
        let family = if v4 { &self.v4 } else { &self.v6 };
        family
            .by_len
            .iter()
            .filter_map(move |(len, map)| map.get(&family.masked(addr, *len)).map(|v| (*len, v)))
    }

    /// The value of the longest range holding `ip`.
    pub fn longest(&self, ip: IpAddr) -> Option<&T> {
        self.matches(ip).next().map(|(_, v)| v)
    }

    /// Whether no range was added.
    pub fn is_empty(&self) -> bool {
        self.v4.by_len.is_empty() && self.v6.by_len.is_empty()
    }
}

/// Adds `i` to an ascending list unless it is already last (a range repeated in one entry).
fn push_unique(list: &mut Vec<usize>, i: usize) {
    if list.last() != Some(&i) {
        list.push(i);
    }
}

/// Every range of every entry → the entries holding it (ascending).
fn ip_table(ranges: &[IpRange]) -> IpTable<Vec<usize>> {
    let mut table = IpTable::<Vec<usize>>::default();
    for (i, r) in ranges.iter().enumerate() {
        for c in &r.ranges {
            push_unique(table.entry(*c), i);
        }
    }
    table
}

/// The chains of one destination-port group by destination IP range.
#[derive(Debug, Clone, Default)]
struct DestinationIps {
    /// Chains by each of their `prefix_ranges`.
    table: IpTable<Vec<usize>>,
    /// Chains without `prefix_ranges` (the fallback when no range holds the address).
    any: Vec<usize>,
}

impl DestinationIps {
    fn add(&mut self, i: usize, ranges: &[Cidr]) {
        if ranges.is_empty() {
            self.any.push(i);
        }
        for r in ranges {
            push_unique(self.table.entry(*r), i);
        }
    }

    fn candidates(&self, ip: Option<IpAddr>) -> &[usize] {
        ip.and_then(|ip| self.table.longest(ip))
            .map_or(&self.any[..], |v| &v[..])
    }
}

/// Classic `filter_chain_match` selection's first two steps, indexed: Envoy keeps the chains with
/// the most specific destination port (an exact port, else those without one) and, among them,
/// those with the longest `prefix_ranges` entry holding the destination IP (else those without
/// ranges). The remaining criteria (server names, transport and application protocols, source
/// type, source ranges and ports) narrow the few chains left (`listener::chain`).
#[derive(Debug, Clone, Default)]
pub struct ClassicIndex {
    by_port: HashMap<u16, DestinationIps>,
    any_port: DestinationIps,
}

impl ClassicIndex {
    /// Indexes `chains` (a listener's `filter_chains`).
    pub fn build(chains: &[FilterChain]) -> Self {
        let mut index = ClassicIndex::default();
        for (i, c) in chains.iter().enumerate() {
            match &c.chain_match {
                None => index.any_port.any.push(i),
                Some(m) => {
                    let group = match m.destination_port {
                        Some(p) => index.by_port.entry(p).or_default(),
                        None => &mut index.any_port,
                    };
                    group.add(i, &m.prefix_ranges);
                }
            }
        }
        index
    }

    /// The chains (indices into `filter_chains`, ascending) left after the destination port and
    /// destination IP steps.
    pub fn candidates(&self, destination: Option<(IpAddr, u16)>) -> &[usize] {
        let group = destination
            .and_then(|(_, port)| self.by_port.get(&port))
            .unwrap_or(&self.any_port);
        group.candidates(destination.map(|(ip, _)| ip))
    }
}

/// What the data path knows about a connection when it selects a chain.
pub struct ConnectionInfo<'a> {
    /// Destination IP (after original_dst).
    pub destination_ip: IpAddr,
    /// Destination port.
    pub destination_port: u16,
    /// Source IP.
    pub source_ip: IpAddr,
    /// SNI.
    pub server_name: Option<&'a str>,
    /// `tls` or `raw_buffer`.
    pub transport_protocol: &'a str,
    /// Application protocols from ALPN / http_inspector.
    pub application_protocols: &'a [String],
    /// Filter state lookup (string form).
    pub filter_state: &'a dyn Fn(&str) -> Option<String>,
}

impl ConnectionInfo<'_> {
    fn value(&self, input: &Input) -> Option<String> {
        match input {
            Input::DestinationIp => Some(self.destination_ip.to_string()),
            Input::DestinationPort => Some(self.destination_port.to_string()),
            Input::SourceIp => Some(self.source_ip.to_string()),
            Input::ServerName => self.server_name.map(str::to_owned),
            Input::TransportProtocol => Some(self.transport_protocol.to_owned()),
            Input::ApplicationProtocol => (!self.application_protocols.is_empty()).then(|| {
                self.application_protocols
                    .iter()
                    .map(|p| format!("'{p}'"))
                    .collect::<Vec<_>>()
                    .join(",")
            }),
            Input::FilterState(k) => (self.filter_state)(k),
        }
    }

    fn ip(&self, input: &Input) -> Option<IpAddr> {
        match input {
            Input::DestinationIp => Some(self.destination_ip),
            Input::SourceIp => Some(self.source_ip),
            _ => None,
        }
    }
}

impl OnMatch {
    fn select<'m>(&'m self, info: &ConnectionInfo<'_>) -> Option<&'m ChainRef> {
        match self {
            OnMatch::Chain(c) => Some(c),
            OnMatch::Matcher(m) => m.select_chain(info),
        }
    }

    fn resolve(&mut self, position: &dyn Fn(&str) -> Option<usize>) {
        match self {
            OnMatch::Chain(c) => c.index = position(&c.name),
            OnMatch::Matcher(m) => m.resolve(position),
        }
    }

    fn compile(
        raw: &RawOnMatch,
        path: &str,
        chains: &mut Vec<(String, String)>,
    ) -> CompileResult<Self> {
        if raw.keep_matching {
            return Err(ConfigError::new(
                field(path, "keep_matching"),
                "keep_matching is not supported",
            ));
        }
        match &raw.on_match {
            Some(on_match::OnMatch::Matcher(m)) => Ok(OnMatch::Matcher(Box::new(
                ChainMatcher::compile_inner(m, &field(path, "matcher"), chains)?,
            ))),
            Some(on_match::OnMatch::Action(a)) => {
                let apath = field(&field(path, "action"), "typed_config");
                let any = a
                    .typed_config
                    .as_ref()
                    .ok_or_else(|| ConfigError::new(&apath, "typed_config is required"))?;
                let chain = action_chain(any, &apath)?;
                chains.push((chain.clone(), apath));
                Ok(OnMatch::Chain(ChainRef {
                    name: chain,
                    index: None,
                }))
            }
            None => Err(ConfigError::new(path, "matcher or action is required")),
        }
    }
}

fn action_chain(any: &Any, path: &str) -> CompileResult<String> {
    let t = Typed::new(any, path)?;
    let name = t
        .check_kind(&[ExtensionKind::MatchAction], "a filter chain action", path)?
        .to_owned();
    let v: StringValue = t.decode(&name, path)?;
    if v.value.is_empty() {
        return Err(ConfigError::new(path, "the filter chain name is empty"));
    }
    Ok(v.value)
}

fn input(name: &str, cfg: Option<&Any>, path: &str) -> CompileResult<Input> {
    let cpath = field(path, "typed_config");
    let any = cfg
        .ok_or_else(|| ConfigError::new(&cpath, format!("input '{name}' needs a typed_config")))?;
    let t = Typed::new(any, &cpath)?;
    let tname = t
        .check_kind(
            &[ExtensionKind::MatchInput],
            "a network match input",
            &cpath,
        )?
        .to_owned();
    Ok(match tname.rsplit('.').next().unwrap_or_default() {
        "DestinationIPInput" => Input::DestinationIp,
        "DestinationPortInput" => Input::DestinationPort,
        "SourceIPInput" => Input::SourceIp,
        "ServerNameInput" => Input::ServerName,
        "TransportProtocolInput" => Input::TransportProtocol,
        "ApplicationProtocolInput" => Input::ApplicationProtocol,
        "FilterStateInput" => {
            let fs: waypoint_proto::envoy::extensions::matching::common_inputs::network::v3::FilterStateInput =
                t.decode(&tname, &cpath)?;
            if fs.key.is_empty() {
                return Err(ConfigError::new(field(&cpath, "key"), "key is required"));
            }
            Input::FilterState(fs.key)
        }
        other => {
            return Err(ConfigError::new(
                cpath,
                format!("input {other} is not supported"),
            ));
        }
    })
}

impl ChainMatcher {
    /// Compiles `m` (at `path`); returns the matcher and every chain name it selects, with the
    /// path of the action that names it.
    pub fn compile(m: &RawMatcher, path: &str) -> CompileResult<(Self, Vec<(String, String)>)> {
        let mut chains = Vec::new();
        let matcher = ChainMatcher::compile_inner(m, path, &mut chains)?;
        Ok((matcher, chains))
    }

    fn compile_inner(
        m: &RawMatcher,
        path: &str,
        chains: &mut Vec<(String, String)>,
    ) -> CompileResult<Self> {
        let tree = match &m.matcher_type {
            Some(MatcherType::MatcherTree(t)) => {
                let tpath = field(path, "matcher_tree");
                let ipath = field(&tpath, "input");
                let raw_input = t
                    .input
                    .as_ref()
                    .ok_or_else(|| ConfigError::new(&ipath, "input is required"))?;
                let inp = input(&raw_input.name, raw_input.typed_config.as_ref(), &ipath)?;
                match &t.tree_type {
                    Some(TreeType::ExactMatchMap(mm)) => {
                        let mpath = field(&tpath, "exact_match_map");
                        let mut map = HashMap::new();
                        let mut ports = HashMap::new();
                        let mut keys: Vec<&String> = mm.map.keys().collect();
                        keys.sort();
                        for k in keys {
                            let kpath = key(&mpath, "map", k);
                            let on = OnMatch::compile(&mm.map[k], &kpath, chains)?;
                            if inp == Input::DestinationPort {
                                let Ok(port) = k.parse::<u16>() else {
                                    return Err(ConfigError::new(
                                        &kpath,
                                        format!("'{k}' is not a port number"),
                                    ));
                                };
                                // `08000` or `+80` parse but the input is never spelled so.
                                if port.to_string() == *k {
                                    ports.insert(port, on);
                                }
                            } else {
                                map.insert(k.clone(), on);
                            }
                        }
                        if inp == Input::DestinationPort {
                            Tree::Port { map: ports }
                        } else {
                            Tree::Exact { input: inp, map }
                        }
                    }
                    Some(TreeType::PrefixMatchMap(mm)) => {
                        let mpath = field(&tpath, "prefix_match_map");
                        let mut entries = Vec::new();
                        let mut keys: Vec<&String> = mm.map.keys().collect();
                        keys.sort();
                        for k in keys {
                            entries.push((
                                k.clone(),
                                OnMatch::compile(&mm.map[k], &key(&mpath, "map", k), chains)?,
                            ));
                        }
                        entries.sort_by_key(|e| std::cmp::Reverse(e.0.len()));
                        Tree::Prefix {
                            input: inp,
                            entries,
                        }
                    }
                    Some(TreeType::CustomMatch(c)) => {
                        let cpath = field(&field(&tpath, "custom_match"), "typed_config");
                        let any = c
                            .typed_config
                            .as_ref()
                            .ok_or_else(|| ConfigError::new(&cpath, "typed_config is required"))?;
                        let t = Typed::new(any, &cpath)?;
                        let name = t
                            .check_kind(
                                &[ExtensionKind::CustomMatcher],
                                "a custom matcher",
                                &cpath,
                            )?
                            .to_owned();
                        if !matches!(inp, Input::DestinationIp | Input::SourceIp) {
                            return Err(ConfigError::new(
                                &ipath,
                                "an IPMatcher needs DestinationIPInput or SourceIPInput",
                            ));
                        }
                        let ip: IpMatcher = t.decode(&name, &cpath)?;
                        let mut ranges = Vec::new();
                        for (i, r) in ip.range_matchers.iter().enumerate() {
                            let rpath = index(&cpath, "range_matchers", i);
                            if r.ranges.is_empty() {
                                return Err(ConfigError::new(
                                    field(&rpath, "ranges"),
                                    "at least one range is required",
                                ));
                            }
                            let cidrs = r
                                .ranges
                                .iter()
                                .enumerate()
                                .map(|(j, c)| {
                                    Cidr::parse(
                                        &c.address_prefix,
                                        c.prefix_len.as_ref().map(|v| v.value),
                                        &index(&rpath, "ranges", j),
                                    )
                                })
                                .collect::<CompileResult<Vec<_>>>()?;
                            let on = r.on_match.as_ref().ok_or_else(|| {
                                ConfigError::new(field(&rpath, "on_match"), "on_match is required")
                            })?;
                            ranges.push(IpRange {
                                ranges: cidrs,
                                on_match: OnMatch::compile(on, &field(&rpath, "on_match"), chains)?,
                                exclusive: r.exclusive,
                            });
                        }
                        Tree::Ip {
                            input: inp,
                            table: ip_table(&ranges),
                            ranges,
                        }
                    }
                    None => {
                        return Err(ConfigError::new(
                            tpath,
                            "exact_match_map, prefix_match_map or custom_match is required",
                        ));
                    }
                }
            }
            Some(MatcherType::MatcherList(_)) => {
                return Err(ConfigError::new(
                    field(path, "matcher_list"),
                    "matcher_list is not supported",
                ));
            }
            None => return Err(ConfigError::new(path, "matcher_tree is required")),
        };
        let on_no_match = m
            .on_no_match
            .as_ref()
            .map(|o| OnMatch::compile(o, &field(path, "on_no_match"), chains))
            .transpose()?;
        Ok(ChainMatcher { tree, on_no_match })
    }

    /// Records each selected chain's position in the listener's `filter_chains` (`position` of
    /// a name), so selection needs no search by name.
    pub fn resolve(&mut self, position: &dyn Fn(&str) -> Option<usize>) {
        match &mut self.tree {
            Tree::Exact { map, .. } => map.values_mut().for_each(|on| on.resolve(position)),
            Tree::Port { map } => map.values_mut().for_each(|on| on.resolve(position)),
            Tree::Prefix { entries, .. } => {
                entries.iter_mut().for_each(|(_, on)| on.resolve(position))
            }
            Tree::Ip { ranges, .. } => ranges.iter_mut().for_each(|r| r.on_match.resolve(position)),
        }
        if let Some(on) = &mut self.on_no_match {
            on.resolve(position);
        }
    }

    /// The filter chain name for a connection, if any.
    pub fn select<'m>(&'m self, info: &ConnectionInfo<'_>) -> Option<&'m str> {
        self.select_chain(info).map(|c| c.name.as_str())
    }

    /// The filter chain for a connection, if any. A matched entry whose nested matcher matches
    /// nothing falls through to `on_no_match`, as in Envoy's map and trie matchers.
    pub fn select_chain<'m>(&'m self, info: &ConnectionInfo<'_>) -> Option<&'m ChainRef> {
        let hit = match &self.tree {
            Tree::Exact { input, map } => info
                .value(input)
                .and_then(|v| map.get(&v))
                .and_then(|on| on.select(info)),
            Tree::Port { map } => map
                .get(&info.destination_port)
                .and_then(|on| on.select(info)),
            Tree::Prefix { input, entries } => info.value(input).and_then(|v| {
                entries
                    .iter()
                    .filter(|(p, _)| v.starts_with(p.as_str()))
                    .find_map(|(_, on)| on.select(info))
            }),
            Tree::Ip {
                input,
                ranges,
                table,
            } => info.ip(input).and_then(|ip| {
                // Candidates longest prefix first, then in declaration order; an exclusive entry
                // counts only as the first candidate (Envoy's trie matcher).
                let mut first = true;
                for (_, bucket) in table.matches(ip) {
                    for r in bucket.iter().filter_map(|i| ranges.get(*i)) {
                        if !first && r.exclusive {
                            continue;
                        }
                        if let Some(chain) = r.on_match.select(info) {
                            return Some(chain);
                        }
                        first = false;
                    }
                }
                None
            }),
        };
        hit.or_else(|| self.on_no_match.as_ref().and_then(|o| o.select(info)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        let (addr, len) = s.split_once('/').expect("a/len");
        Cidr::parse(addr, Some(len.parse().expect("len")), "").expect("cidr")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn chain(name: &str) -> OnMatch {
        OnMatch::Chain(ChainRef {
            name: name.into(),
            index: None,
        })
    }

    /// A nested matcher that selects `name` only for destination port `port`.
    fn on_port(port: u16, name: &str) -> OnMatch {
        OnMatch::Matcher(Box::new(ChainMatcher {
            tree: Tree::Port {
                map: HashMap::from([(port, chain(name))]),
            },
            on_no_match: None,
        }))
    }

    fn ip_matcher(
        entries: Vec<(&[&str], OnMatch, bool)>,
        on_no_match: Option<OnMatch>,
    ) -> ChainMatcher {
        let ranges: Vec<IpRange> = entries
            .into_iter()
            .map(|(cidrs, on_match, exclusive)| IpRange {
                ranges: cidrs.iter().map(|c| cidr(c)).collect(),
                on_match,
                exclusive,
            })
            .collect();
        ChainMatcher {
            tree: Tree::Ip {
                input: Input::DestinationIp,
                table: ip_table(&ranges),
                ranges,
            },
            on_no_match,
        }
    }

    fn no_filter_state(_: &str) -> Option<String> {
        None
    }

    fn conn(dst: &str, port: u16) -> ConnectionInfo<'static> {
        ConnectionInfo {
            destination_ip: ip(dst),
            destination_port: port,
            source_ip: ip("10.244.0.9"),
            server_name: None,
            transport_protocol: "raw_buffer",
            application_protocols: &[],
            filter_state: &no_filter_state,
        }
    }

    #[test]
    fn ip_table_finds_every_holding_range_longest_first() {
        let mut t = IpTable::<Vec<&str>>::default();
        for (c, v) in [
            ("10.0.0.0/8", "8"),
            ("10.1.0.0/16", "16"),
            ("10.1.2.3/32", "32"),
            ("0.0.0.0/0", "0"),
            ("::/0", "v6-0"),
            ("fd00::/8", "v6-8"),
            ("fd00::1/128", "v6-128"),
        ] {
            t.entry(cidr(c)).push(v);
        }
        let hits = |a: &str| -> Vec<(u8, &str)> {
            t.matches(ip(a))
                .flat_map(|(l, v)| v.iter().map(move |s| (l, *s)))
                .collect()
        };
        assert_eq!(
            hits("10.1.2.3"),
            [(32, "32"), (16, "16"), (8, "8"), (0, "0")]
        );
        assert_eq!(hits("10.1.9.9"), [(16, "16"), (8, "8"), (0, "0")]);
        assert_eq!(hits("192.168.0.1"), [(0, "0")]);
        // Families never mix: an IPv6 address is not in 0.0.0.0/0.
        assert_eq!(hits("fd00::1"), [(128, "v6-128"), (8, "v6-8"), (0, "v6-0")]);
        assert_eq!(hits("2001:db8::1"), [(0, "v6-0")]);
        assert_eq!(t.longest(ip("10.200.0.1")), Some(&vec!["8"]));
        // Host bits of a configured range are ignored (the range is its network).
        let mut t = IpTable::<u8>::default();
        *t.entry(cidr("10.1.2.3/24")) = 1;
        assert_eq!(t.longest(ip("10.1.2.200")), Some(&1));
        assert!(IpTable::<u8>::default().is_empty() && !t.is_empty());
    }

    /// The example of `IPMatcher.IPRangeMatcher.exclusive` in the xDS docs: X (exclusive) on
    /// 0.0.0.0/0, Y on 192.0.0.0/2 whose nested matcher fails.
    #[test]
    fn exclusive_ranges_yield_to_a_more_specific_failed_match() {
        let m = ip_matcher(
            vec![
                (&["0.0.0.0/0"], chain("x"), true),
                (&["192.0.0.0/2"], on_port(80, "y"), false),
            ],
            Some(chain("fallback")),
        );
        assert_eq!(m.select(&conn("192.168.0.1", 80)), Some("y"));
        // Y's nested matcher fails: X is exclusive, so it does not apply either.
        assert_eq!(m.select(&conn("192.168.0.1", 81)), Some("fallback"));
        // No more specific range: X is the first candidate and applies.
        assert_eq!(m.select(&conn("10.0.0.1", 81)), Some("x"));

        // X not exclusive: it applies after Y fails.
        let m = ip_matcher(
            vec![
                (&["0.0.0.0/0"], chain("x"), false),
                (&["192.0.0.0/2"], on_port(80, "y"), false),
            ],
            None,
        );
        assert_eq!(m.select(&conn("192.168.0.1", 81)), Some("x"));
        // An exclusive first candidate that fails still lets the next ones be tried.
        let m = ip_matcher(
            vec![
                (&["192.0.0.0/2"], on_port(80, "y"), true),
                (&["0.0.0.0/0"], chain("x"), false),
            ],
            None,
        );
        assert_eq!(m.select(&conn("192.168.0.1", 81)), Some("x"));
    }

    #[test]
    fn equal_prefixes_are_tried_in_declaration_order() {
        let m = ip_matcher(
            vec![
                (&["10.0.0.0/8"], on_port(80, "first"), false),
                (&["10.0.0.0/8", "10.1.0.0/16"], on_port(81, "second"), false),
                (&["10.0.0.0/8"], chain("third"), false),
            ],
            None,
        );
        assert_eq!(m.select(&conn("10.9.0.1", 80)), Some("first"));
        assert_eq!(m.select(&conn("10.9.0.1", 81)), Some("second"));
        assert_eq!(m.select(&conn("10.9.0.1", 82)), Some("third"));
        // The /16 puts the second entry first for its addresses.
        assert_eq!(m.select(&conn("10.1.0.1", 80)), Some("first"));
        assert_eq!(m.select(&conn("10.1.0.1", 81)), Some("second"));
    }

    /// Envoy's trie matcher spelled out: every (range, entry) holding the address, sorted by
    /// prefix length (longest first) then declaration; exclusive entries only as the first.
    fn select_by_scan<'m>(m: &'m ChainMatcher, info: &ConnectionInfo<'_>) -> Option<&'m str> {
        let Tree::Ip { ranges, .. } = &m.tree else {
            return None;
        };
        let mut hits: Vec<(u8, usize)> = ranges
            .iter()
            .enumerate()
            .flat_map(|(i, r)| {
                r.ranges
                    .iter()
                    .filter(|c| c.contains(info.destination_ip))
                    .map(move |c| (c.len, i))
            })
            .collect();
        hits.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut first = true;
        for (_, i) in hits {
            let r = &ranges[i];
            if !first && r.exclusive {
                continue;
            }
            if let Some(c) = r.on_match.select(info) {
                return Some(&c.name);
            }
            first = false;
        }
        m.on_no_match
            .as_ref()
            .and_then(|o| o.select(info))
            .map(|c| c.name.as_str())
    }

    #[test]
    fn ip_matcher_agrees_with_envoys_sorted_scan() {
        const POOL: &[&str] = &[
            "0.0.0.0/0",
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.0/24",
            "10.1.2.3/32",
            "10.1.2.4/31",
            "10.2.0.0/15",
            "::/0",
            "fd00::/8",
            "fd00::1/128",
        ];
        const ADDRS: &[&str] = &[
            "10.1.2.3",
            "10.1.2.4",
            "10.1.2.5",
            "10.1.3.1",
            "10.3.0.1",
            "11.0.0.1",
            "fd00::1",
            "fd00::2",
            "2001:db8::1",
        ];
        let mut state = 0x1234_5678_u64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        for _ in 0..2_000 {
            let entries: Vec<(Vec<&str>, OnMatch, bool)> = (0..1 + next(6))
                .map(|e| {
                    let cidrs = (0..1 + next(2)).map(|_| POOL[next(POOL.len())]).collect();
                    let name = format!("e{e}");
                    let on = if next(2) == 0 {
                        chain(&name)
                    } else {
                        on_port(80 + next(2) as u16, &name)
                    };
                    (cidrs, on, next(3) == 0)
                })
                .collect();
            let m = ip_matcher(
                entries
                    .iter()
                    .map(|(c, on, x)| (c.as_slice(), on.clone(), *x))
                    .collect(),
                (next(2) == 0).then(|| chain("none")),
            );
            for a in ADDRS {
                for port in [80, 81] {
                    let info = conn(a, port);
                    assert_eq!(m.select(&info), select_by_scan(&m, &info), "{a}:{port}");
                }
            }
        }
    }

    #[test]
    fn resolved_chains_carry_their_position() {
        let mut m = ip_matcher(
            vec![(&["10.0.0.0/8"], on_port(80, "b"), false)],
            Some(chain("a")),
        );
        m.resolve(&|name| ["a", "b"].iter().position(|n| *n == name));
        assert_eq!(
            m.select_chain(&conn("10.0.0.1", 80)).and_then(|c| c.index),
            Some(1)
        );
        assert_eq!(
            m.select_chain(&conn("10.0.0.1", 81)).and_then(|c| c.index),
            Some(0)
        );
    }

    #[test]
    fn port_maps_are_keyed_by_number_and_only_canonical_keys_match() {
        let doc = serde_json::json!({"matcher_tree": {
        "input": {"name": "port", "typed_config": {"@type":
            "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.DestinationPortInput"}},
        "exact_match_map": {"map": {
            "8000": {"action": {"name": "a", "typed_config": {
                "@type": "type.googleapis.com/google.protobuf.StringValue", "value": "http"}}},
            "08080": {"action": {"name": "b", "typed_config": {
                "@type": "type.googleapis.com/google.protobuf.StringValue", "value": "never"}}}
        }}}});
        let raw: RawMatcher = waypoint_proto::json::from_json(&doc).expect("decodes");
        let (m, referenced) = ChainMatcher::compile(&raw, "m").expect("compiles");
        assert!(matches!(m.tree, Tree::Port { .. }));
        assert_eq!(referenced.len(), 2);
        assert_eq!(m.select(&conn("10.0.0.1", 8000)), Some("http"));
        // Envoy compares the port's decimal text: "08080" is never produced.
        assert_eq!(m.select(&conn("10.0.0.1", 8080)), None);
        let bad = serde_json::json!({"matcher_tree": {
            "input": {"name": "port", "typed_config": {"@type":
                "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.DestinationPortInput"}},
            "exact_match_map": {"map": {"http": {"action": {"name": "a", "typed_config": {
                "@type": "type.googleapis.com/google.protobuf.StringValue", "value": "x"}}}}}}});
        let raw: RawMatcher = waypoint_proto::json::from_json(&bad).expect("decodes");
        let err = ChainMatcher::compile(&raw, "m").expect_err("not a port");
        assert!(err.to_string().contains("not a port number"), "{err}");
    }
}
