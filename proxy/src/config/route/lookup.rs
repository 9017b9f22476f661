//! Lookup indexes built when a route table is compiled, so that selecting a virtual host or a route
//! costs what the request's host and path cost, not what the size of the table costs.
//!
//! They change nothing in Envoy's rules, only how fast the answer is found:
//! - [`DomainIndex`]: the virtual host for a host is the exact domain, else the longest `*.suffix`
//!   wildcard, else the longest `prefix.*` wildcard, else `*` (one hash probe per distinct wildcard
//!   length instead of a scan of every domain);
//! - [`RouteIndex`]: routes are still tried in order and the first whose every condition holds wins.
//!   The index only narrows which routes can match the path at all: exact paths, prefixes and
//!   `path_separated_prefix`es sit in a radix trie (one for case-sensitive rules, one with ASCII
//!   case folded), every `safe_regex` path of the virtual host is one [`RegexSet`] automaton, and
//!   CONNECT routes are a list. The route chosen is the smallest index among those candidates whose
//!   other conditions (headers, query parameters, runtime fraction, gRPC, TLS) hold, which is what
//!   a first-match scan in order returns.

use std::collections::HashMap;

use regex::{RegexSet, RegexSetBuilder};

use super::{Domain, PathMatch, Route, VirtualHost};

/// Upper bound on the compiled size of one virtual host's regex set. Past it the regex routes stay
/// separate and are tried one by one (as before the index existed), which is slower but bounded.
const REGEX_SET_SIZE_LIMIT: usize = 64 << 20;

/// Virtual host lookup by domain (indices into the route table's `virtual_hosts`).
#[derive(Debug, Clone, Default)]
pub struct DomainIndex {
    exact: HashMap<String, usize>,
    suffixes: Wildcards,
    prefixes: Wildcards,
    any: Option<usize>,
}

/// Wildcard domains of one kind by their fixed part, with the distinct lengths of those parts
/// longest first (the longest wildcard wins).
#[derive(Debug, Clone, Default)]
struct Wildcards {
    by_text: HashMap<String, usize>,
    lengths: Vec<usize>,
}

impl Wildcards {
    fn insert(&mut self, text: &str, vh: usize) {
        // A domain repeated in one virtual host, or across them (rejected at compile), keeps the
        // first, as a scan in order would.
        self.by_text.entry(text.to_owned()).or_insert(vh);
        if !self.lengths.contains(&text.len()) {
            self.lengths.push(text.len());
        }
    }

    fn finish(&mut self) {
        self.lengths.sort_unstable_by(|a, b| b.cmp(a));
    }

    /// The longest wildcard whose fixed part is the part of `host` that `cut` returns for a length;
    /// the wildcard must stand for at least one character, so the length is below the host's.
    fn find<'h>(
        &self,
        host: &'h str,
        cut: impl Fn(&'h str, usize) -> Option<&'h str>,
    ) -> Option<usize> {
        self.lengths
            .iter()
            .filter(|len| **len < host.len())
            .find_map(|len| cut(host, *len).and_then(|part| self.by_text.get(part).copied()))
    }
}

impl DomainIndex {
    /// Indexes the domains of `vhosts`.
    pub fn build(vhosts: &[VirtualHost]) -> Self {
        let mut index = DomainIndex::default();
        for (i, vh) in vhosts.iter().enumerate() {
            for d in &vh.domains {
                match d {
                    Domain::Any => {
                        index.any.get_or_insert(i);
                    }
                    Domain::Exact(host) => {
                        index.exact.entry(host.clone()).or_insert(i);
                    }
                    Domain::Suffix(s) => index.suffixes.insert(s, i),
                    Domain::Prefix(p) => index.prefixes.insert(p, i),
                }
            }
        }
        index.suffixes.finish();
        index.prefixes.finish();
        index
    }

    /// The virtual host for `host` (lower-case, port kept or stripped as the table says).
    pub fn find(&self, host: &str) -> Option<usize> {
        if let Some(vh) = self.exact.get(host) {
            return Some(*vh);
        }
        // `get` is `None` when the cut would split a UTF-8 character: such a part cannot equal a
        // wildcard's fixed part, which is whole characters.
        self.suffixes
            .find(host, |h, len| h.get(h.len() - len..))
            .or_else(|| self.prefixes.find(host, |h, len| h.get(..len)))
            .or(self.any)
    }

    /// The virtual host holding `*`, the only one a request without a host reaches.
    pub fn any(&self) -> Option<usize> {
        self.any
    }
}

/// A node of [`PathTrie`]: the edge label from its parent and the routes whose rule ends here.
#[derive(Debug, Clone, Default)]
struct TrieNode {
    label: Box<[u8]>,
    /// Child nodes, sorted by the first byte of their label (labels of siblings start differently).
    children: Vec<usize>,
    /// `prefix` rules equal to the path up to here, ascending route index.
    prefix: Vec<usize>,
    /// `path` rules equal to the path up to here.
    exact: Vec<usize>,
    /// `path_separated_prefix` rules equal to the path up to here.
    separated: Vec<usize>,
}

/// Which list of a trie node a rule goes to.
#[derive(Debug, Clone, Copy)]
enum Rule {
    Prefix,
    Exact,
    Separated,
}

/// A radix trie over path rules. With `fold`, rules are stored ASCII-lower-cased and compared
/// ASCII-case-insensitively (`case_sensitive: false`), as `eq_ignore_ascii_case` does. Bytes are
/// compared, not characters: equal bytes of valid UTF-8 end on a character boundary.
#[derive(Debug, Clone)]
struct PathTrie {
    nodes: Vec<TrieNode>,
    fold: bool,
}

impl PathTrie {
    fn new(fold: bool) -> Self {
        PathTrie {
            nodes: vec![TrieNode::default()],
            fold,
        }
    }

    fn is_empty(&self) -> bool {
        self.nodes.len() == 1 && {
            let root = &self.nodes[0];
            root.prefix.is_empty() && root.exact.is_empty() && root.separated.is_empty()
        }
    }

    fn byte(&self, b: u8) -> u8 {
        if self.fold { b.to_ascii_lowercase() } else { b }
    }

    fn child(&self, node: usize, first: u8) -> Option<usize> {
        let children = &self.nodes[node].children;
        children
            .binary_search_by_key(&first, |c| self.nodes[*c].label[0])
            .ok()
            .map(|i| children[i])
    }

    fn insert(&mut self, rule: &str, kind: Rule, route: usize) {
        let key: Vec<u8> = rule.bytes().map(|b| self.byte(b)).collect();
        let mut node = 0;
        let mut rest = key.as_slice();
        while let Some(&first) = rest.first() {
            let Some(c) = self.child(node, first) else {
                let leaf = self.nodes.len();
                self.nodes.push(TrieNode {
                    label: rest.into(),
                    ..TrieNode::default()
                });
                let siblings = &self.nodes[node].children;
                let at = siblings.partition_point(|s| self.nodes[*s].label[0] < first);
                self.nodes[node].children.insert(at, leaf);
                node = leaf;
                break;
            };
            let label = self.nodes[c].label.clone();
            let common = label.iter().zip(rest).take_while(|(a, b)| a == b).count();
            if common < label.len() {
                // Split the edge: a new node takes the shared part, `c` keeps the remainder.
                let mid = self.nodes.len();
                let (shared, remainder) = label.split_at(common);
                let mid_node = TrieNode {
                    label: shared.into(),
                    children: vec![c],
                    ..TrieNode::default()
                };
                self.nodes[c].label = remainder.into();
                self.nodes.push(mid_node);
                // The shared part starts with the same byte, so `mid` takes `c`'s sorted place.
                if let Some(slot) = self.nodes[node].children.iter_mut().find(|s| **s == c) {
                    *slot = mid;
                }
                node = mid;
            } else {
                node = c;
            }
            rest = &rest[common..];
        }
        let n = &mut self.nodes[node];
        let list = match kind {
            Rule::Prefix => &mut n.prefix,
            Rule::Exact => &mut n.exact,
            Rule::Separated => &mut n.separated,
        };
        // Routes are inserted in ascending order, so every list stays sorted.
        list.push(route);
    }

    /// Calls `visit` with every list of routes whose rule matches `path`.
    fn walk(&self, path: &[u8], mut visit: impl FnMut(&[usize])) {
        let mut node = 0;
        let mut pos = 0;
        loop {
            let n = &self.nodes[node];
            visit(&n.prefix);
            let Some(&next) = path.get(pos) else {
                visit(&n.exact);
                visit(&n.separated);
                return;
            };
            if next == b'/' {
                visit(&n.separated);
            }
            let Some(c) = self.child(node, self.byte(next)) else {
                return;
            };
            let label = &self.nodes[c].label;
            let Some(part) = path.get(pos..pos + label.len()) else {
                return;
            };
            let same = if self.fold {
                part.eq_ignore_ascii_case(label)
            } else {
                part == &label[..]
            };
            if !same {
                return;
            }
            pos += label.len();
            node = c;
        }
    }
}

/// The regex paths of a virtual host as one automaton.
#[derive(Debug, Clone)]
struct RegexIndex {
    set: RegexSet,
    /// Per pattern of the set: the routes using it, ascending.
    routes: Vec<Vec<usize>>,
    /// The smallest route index with a regex path (the set is skipped when a route before it has
    /// already matched).
    first: usize,
}

/// Route candidates by path for one virtual host (see the module docs).
#[derive(Debug, Clone)]
pub struct RouteIndex {
    sensitive: PathTrie,
    insensitive: PathTrie,
    regex: Option<RegexIndex>,
    /// Regex routes left out of the set (it would be too large): tried one by one.
    unindexed: Vec<usize>,
    /// `connect_matcher` routes: the only ones a CONNECT request can match.
    connect: Vec<usize>,
}

impl Default for RouteIndex {
    fn default() -> Self {
        RouteIndex {
            sensitive: PathTrie::new(false),
            insensitive: PathTrie::new(true),
            regex: None,
            unindexed: Vec::new(),
            connect: Vec::new(),
        }
    }
}

/// The smallest route index whose conditions hold, as lists of candidates are offered.
struct Best<F> {
    index: usize,
    accept: F,
}

impl<F: FnMut(usize) -> bool> Best<F> {
    /// Tries the routes of `list` (ascending) that come before the best one so far.
    fn offer(&mut self, list: &[usize]) {
        for &i in list {
            if i >= self.index {
                return;
            }
            if (self.accept)(i) {
                self.index = i;
                return;
            }
        }
    }
}

impl RouteIndex {
    /// Indexes the path rules of `routes`.
    pub fn build(routes: &[Route]) -> Self {
        let mut index = RouteIndex::default();
        let mut patterns: Vec<&str> = Vec::new();
        let mut by_pattern: HashMap<&str, usize> = HashMap::new();
        let mut regex_routes: Vec<Vec<usize>> = Vec::new();
        let mut regex_all: Vec<usize> = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            let m = &r.matcher;
            let trie = if m.case_sensitive {
                &mut index.sensitive
            } else {
                &mut index.insensitive
            };
            match &m.path {
                PathMatch::Prefix(p) => trie.insert(p, Rule::Prefix, i),
                PathMatch::Exact(p) => trie.insert(p, Rule::Exact, i),
                PathMatch::PathSeparatedPrefix(p) => trie.insert(p, Rule::Separated, i),
                PathMatch::Connect => index.connect.push(i),
                PathMatch::Regex(re) => {
                    regex_all.push(i);
                    // Identical patterns share one slot of the set.
                    let slot = *by_pattern.entry(re.as_str()).or_insert_with(|| {
                        patterns.push(re.as_str());
                        regex_routes.push(Vec::new());
                        patterns.len() - 1
                    });
                    regex_routes[slot].push(i);
                }
            }
        }
        if let Some(&first) = regex_all.first() {
            match RegexSetBuilder::new(&patterns)
                .size_limit(REGEX_SET_SIZE_LIMIT)
                .build()
            {
                Ok(set) => {
                    index.regex = Some(RegexIndex {
                        set,
                        routes: regex_routes,
                        first,
                    })
                }
                Err(e) => {
                    tracing::debug!(target: "config", patterns = patterns.len(), error = %e,
                        "route regexes do not fit one automaton; they are tried one by one");
                    index.unindexed = regex_all;
                }
            }
        }
        index
    }

    /// The first route in table order whose path rule matches and for which `accept` (the route's
    /// other conditions) holds. `path` is the request path without query, fragment (and path
    /// parameters when the table ignores them), as `RouteMatch::matches_path` sees it.
    pub fn first_match(
        &self,
        path: &str,
        is_connect: bool,
        accept: impl FnMut(usize) -> bool,
    ) -> Option<usize> {
        let mut best = Best {
            index: usize::MAX,
            accept,
        };
        if is_connect {
            best.offer(&self.connect);
        } else {
            let bytes = path.as_bytes();
            self.sensitive.walk(bytes, |list| best.offer(list));
            if !self.insensitive.is_empty() {
                self.insensitive.walk(bytes, |list| best.offer(list));
            }
            best.offer(&self.unindexed);
            // `is_match` stops at the first pattern that matches and allocates nothing; most
            // paths match no regex of a large table, and then the per-pattern answer is not needed.
            if let Some(rx) = &self.regex
                && rx.first < best.index
                && rx.set.is_match(path)
            {
                for p in rx.set.matches(path).iter() {
                    if let Some(list) = rx.routes.get(p) {
                        best.offer(list);
                    }
                }
            }
        }
        (best.index != usize::MAX).then_some(best.index)
    }
}
