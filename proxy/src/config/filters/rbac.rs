//! RBAC (HTTP and network): Istio's AuthorizationPolicies, with peer identity from filter state
//! (`io.istio.peer_principal`) for waypoints. Policies compile into our own permission/principal
//! trees; an enforced engine plus an optional shadow (dry-run) engine.

use std::time::Duration;

use waypoint_proto::envoy::{
    config::core::v3::TypedExtensionConfig,
    config::rbac::v3::{
        Permission as RawPermission, Policy as RawPolicy, Principal as RawPrincipal,
        Rbac as RawRbac, permission::Rule, principal::Identifier, rbac::Action as RawAction,
    },
    extensions::filters::{
        http::rbac::v3::{Rbac as RawHttpRbac, RbacPerRoute},
        network::rbac::v3::{Rbac as RawNetworkRbac, rbac::EnforcementType},
    },
    extensions::path::r#match::uri_template::v3::UriTemplateMatchConfig,
    r#type::matcher::v3::{PathMatcher, filter_state_matcher, path_matcher},
};

use crate::config::{
    CompileResult, ConfigError, field, index, key,
    matchers::{Cidr, HeaderMatch, MetadataMatch, StringMatch, cidr},
    opt_duration,
    supported::ExtensionKind,
    typed::required,
    uri_template::UriTemplate,
};

/// What a matching policy means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Allow only matching requests.
    Allow,
    /// Deny matching requests.
    Deny,
    /// Allow everything; mark matches for logging.
    Log,
}

/// A compiled permission (what is being accessed).
#[derive(Debug, Clone)]
pub enum Permission {
    /// All of.
    And(Vec<Permission>),
    /// Any of.
    Or(Vec<Permission>),
    /// Everything.
    Any,
    /// A request header.
    Header(HeaderMatch),
    /// The URL path (without query).
    UrlPath(StringMatch),
    /// The destination IP.
    DestinationIp(Cidr),
    /// The destination port.
    DestinationPort(u32),
    /// A destination port range `[start, end)`.
    DestinationPortRange(i32, i32),
    /// Dynamic metadata.
    Metadata(MetadataMatch),
    /// Negation.
    Not(Box<Permission>),
    /// The SNI.
    RequestedServerName(StringMatch),
    /// `uri_template`: the path (without query) matches a URI template (Istio's `{*}`/`{**}`).
    UriTemplate(UriTemplate),
}

/// A compiled principal (who is accessing).
#[derive(Debug, Clone)]
pub enum Principal {
    /// All of.
    And(Vec<Principal>),
    /// Any of.
    Or(Vec<Principal>),
    /// Everyone.
    Any,
    /// An mTLS peer whose URI SAN (or subject) matches; `None`: any authenticated peer.
    Authenticated(Option<StringMatch>),
    /// The downstream source IP (`source_ip`, deprecated alias of `direct_remote_ip`).
    DirectRemoteIp(Cidr),
    /// The original client IP (XFF-derived).
    RemoteIp(Cidr),
    /// A request header.
    Header(HeaderMatch),
    /// The URL path.
    UrlPath(StringMatch),
    /// Dynamic metadata (e.g. JWT claims from jwt_authn).
    Metadata(MetadataMatch),
    /// A filter state string (waypoints: `io.istio.peer_principal`).
    FilterState {
        /// The key.
        key: String,
        /// The match.
        value: StringMatch,
    },
    /// Negation.
    Not(Box<Principal>),
}

/// A named policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Policy name (`ns[...]-policy[...]-rule[...]`).
    pub name: String,
    /// Any permission matches …
    pub permissions: Vec<Permission>,
    /// … and any principal matches.
    pub principals: Vec<Principal>,
}

/// One RBAC engine.
#[derive(Debug, Clone)]
pub struct Rules {
    /// What a match means.
    pub action: Action,
    /// Policies, sorted by name (Envoy evaluates in map order, which is by name).
    pub policies: Vec<Policy>,
}

fn path_match(p: &PathMatcher, path: &str) -> CompileResult<StringMatch> {
    match &p.rule {
        Some(path_matcher::Rule::Path(s)) => StringMatch::compile(s, &field(path, "path")),
        None => Err(ConfigError::new(path, "path is required")),
    }
}

fn set<T, U>(
    items: &[T],
    path: &str,
    name: &str,
    list_name: &str,
    compile: impl Fn(&T, &str) -> CompileResult<U>,
) -> CompileResult<Vec<U>> {
    let spath = field(path, name);
    items
        .iter()
        .enumerate()
        .map(|(i, r)| compile(r, &index(&spath, list_name, i)))
        .collect()
}

impl Permission {
    /// Compiles `p`.
    // Deprecated forms are honoured: Istio and older control planes still send them.
    #[allow(deprecated)]
    pub fn compile(p: &RawPermission, path: &str) -> CompileResult<Self> {
        Ok(match &p.rule {
            Some(Rule::AndRules(s)) => Permission::And(set(
                &s.rules,
                path,
                "and_rules",
                "rules",
                Permission::compile,
            )?),
            Some(Rule::OrRules(s)) => Permission::Or(set(
                &s.rules,
                path,
                "or_rules",
                "rules",
                Permission::compile,
            )?),
            Some(Rule::Any(true)) => Permission::Any,
            Some(Rule::Any(false)) => {
                return Err(ConfigError::new(field(path, "any"), "any must be true"));
            }
            Some(Rule::Header(h)) => {
                Permission::Header(HeaderMatch::compile(h, &field(path, "header"))?)
            }
            Some(Rule::UrlPath(u)) => Permission::UrlPath(path_match(u, &field(path, "url_path"))?),
            Some(Rule::DestinationIp(c)) => {
                Permission::DestinationIp(cidr(c, &field(path, "destination_ip"))?)
            }
            Some(Rule::DestinationPort(port)) => {
                if *port > 65_535 {
                    return Err(ConfigError::new(
                        field(path, "destination_port"),
                        format!("port {port} out of range"),
                    ));
                }
                Permission::DestinationPort(*port)
            }
            Some(Rule::DestinationPortRange(r)) => {
                if r.start >= r.end {
                    return Err(ConfigError::new(
                        field(path, "destination_port_range"),
                        format!("empty range [{}, {})", r.start, r.end),
                    ));
                }
                Permission::DestinationPortRange(r.start, r.end)
            }
            Some(Rule::Metadata(m)) => {
                Permission::Metadata(MetadataMatch::compile(m, &field(path, "metadata"))?)
            }
            Some(Rule::NotRule(n)) => {
                Permission::Not(Box::new(Permission::compile(n, &field(path, "not_rule"))?))
            }
            Some(Rule::RequestedServerName(s)) => Permission::RequestedServerName(
                StringMatch::compile(s, &field(path, "requested_server_name"))?,
            ),
            Some(Rule::UriTemplate(t)) => {
                Permission::UriTemplate(uri_template(t, &field(path, "uri_template"))?)
            }
            Some(_) => {
                return Err(ConfigError::new(
                    path,
                    "this permission rule is not supported",
                ));
            }
            None => return Err(ConfigError::new(path, "a permission rule is required")),
        })
    }
}

/// `Permission.uri_template`: a `TypedExtensionConfig` holding Envoy's `UriTemplateMatchConfig`.
fn uri_template(t: &TypedExtensionConfig, path: &str) -> CompileResult<UriTemplate> {
    let cpath = field(path, "typed_config");
    let typed = required(t.typed_config.as_ref(), &cpath)?;
    let name = typed
        .check_kind(&[ExtensionKind::PathMatcher], "a path matcher", &cpath)?
        .to_owned();
    let config: UriTemplateMatchConfig = typed.decode(&name, &cpath)?;
    UriTemplate::compile(&config.path_template, &field(&cpath, "path_template"))
}

impl Principal {
    /// Compiles `p`.
    // Deprecated forms are honoured: Istio and older control planes still send them.
    #[allow(deprecated)]
    pub fn compile(p: &RawPrincipal, path: &str) -> CompileResult<Self> {
        Ok(match &p.identifier {
            Some(Identifier::AndIds(s)) => {
                Principal::And(set(&s.ids, path, "and_ids", "ids", Principal::compile)?)
            }
            Some(Identifier::OrIds(s)) => {
                Principal::Or(set(&s.ids, path, "or_ids", "ids", Principal::compile)?)
            }
            Some(Identifier::Any(true)) => Principal::Any,
            Some(Identifier::Any(false)) => {
                return Err(ConfigError::new(field(path, "any"), "any must be true"));
            }
            Some(Identifier::Authenticated(a)) => Principal::Authenticated(
                a.principal_name
                    .as_ref()
                    .map(|m| {
                        StringMatch::compile(
                            m,
                            &field(&field(path, "authenticated"), "principal_name"),
                        )
                    })
                    .transpose()?,
            ),
            #[allow(deprecated)]
            Some(Identifier::SourceIp(c)) => {
                Principal::DirectRemoteIp(cidr(c, &field(path, "source_ip"))?)
            }
            Some(Identifier::DirectRemoteIp(c)) => {
                Principal::DirectRemoteIp(cidr(c, &field(path, "direct_remote_ip"))?)
            }
            Some(Identifier::RemoteIp(c)) => {
                Principal::RemoteIp(cidr(c, &field(path, "remote_ip"))?)
            }
            Some(Identifier::Header(h)) => {
                Principal::Header(HeaderMatch::compile(h, &field(path, "header"))?)
            }
            Some(Identifier::UrlPath(u)) => {
                Principal::UrlPath(path_match(u, &field(path, "url_path"))?)
            }
            Some(Identifier::Metadata(m)) => {
                Principal::Metadata(MetadataMatch::compile(m, &field(path, "metadata"))?)
            }
            Some(Identifier::FilterState(f)) => {
                let fpath = field(path, "filter_state");
                if f.key.is_empty() {
                    return Err(ConfigError::new(field(&fpath, "key"), "key is required"));
                }
                match &f.matcher {
                    Some(filter_state_matcher::Matcher::StringMatch(s)) => Principal::FilterState {
                        key: f.key.clone(),
                        value: StringMatch::compile(s, &field(&fpath, "string_match"))?,
                    },
                    _ => {
                        return Err(ConfigError::new(
                            fpath,
                            "only string_match filter state matchers are supported",
                        ));
                    }
                }
            }
            Some(Identifier::NotId(n)) => {
                Principal::Not(Box::new(Principal::compile(n, &field(path, "not_id"))?))
            }
            Some(_) => return Err(ConfigError::new(path, "this principal is not supported")),
            None => return Err(ConfigError::new(path, "a principal is required")),
        })
    }
}

fn policy(name: &str, p: &RawPolicy, path: &str) -> CompileResult<Policy> {
    if p.permissions.is_empty() {
        return Err(ConfigError::new(
            field(path, "permissions"),
            "at least one permission is required",
        ));
    }
    if p.principals.is_empty() {
        return Err(ConfigError::new(
            field(path, "principals"),
            "at least one principal is required",
        ));
    }
    Ok(Policy {
        name: name.to_owned(),
        permissions: p
            .permissions
            .iter()
            .enumerate()
            .map(|(i, x)| Permission::compile(x, &index(path, "permissions", i)))
            .collect::<CompileResult<_>>()?,
        principals: p
            .principals
            .iter()
            .enumerate()
            .map(|(i, x)| Principal::compile(x, &index(path, "principals", i)))
            .collect::<CompileResult<_>>()?,
    })
}

impl Rules {
    /// Compiles an `envoy.config.rbac.v3.RBAC`.
    pub fn compile(r: &RawRbac, path: &str) -> CompileResult<Self> {
        let action = match RawAction::try_from(r.action) {
            Ok(RawAction::Allow) => Action::Allow,
            Ok(RawAction::Deny) => Action::Deny,
            Ok(RawAction::Log) => Action::Log,
            Err(_) => return Err(ConfigError::new(field(path, "action"), "unknown action")),
        };
        let mut names: Vec<&String> = r.policies.keys().collect();
        names.sort();
        let policies = names
            .into_iter()
            .map(|n| policy(n, &r.policies[n], &key(path, "policies", n)))
            .collect::<CompileResult<_>>()?;
        Ok(Rules { action, policies })
    }
}

/// A compiled HTTP RBAC filter.
#[derive(Debug, Clone)]
pub struct HttpRbac {
    /// Enforced rules (`None`: allow all).
    pub rules: Option<Rules>,
    /// Dry-run rules (results go to dynamic metadata and stats only).
    pub shadow_rules: Option<Rules>,
}

impl HttpRbac {
    /// Compiles `r` (at `path`).
    pub fn compile(r: &RawHttpRbac, path: &str) -> CompileResult<Self> {
        Ok(HttpRbac {
            rules: r
                .rules
                .as_ref()
                .map(|x| Rules::compile(x, &field(path, "rules")))
                .transpose()?,
            shadow_rules: r
                .shadow_rules
                .as_ref()
                .map(|x| Rules::compile(x, &field(path, "shadow_rules")))
                .transpose()?,
        })
    }

    /// Compiles a per-route override.
    pub fn compile_per_route(r: &RbacPerRoute, path: &str) -> CompileResult<Option<Self>> {
        r.rbac
            .as_ref()
            .map(|x| HttpRbac::compile(x, &field(path, "rbac")))
            .transpose()
    }
}

/// A compiled network RBAC filter.
#[derive(Debug, Clone)]
pub struct NetworkRbac {
    /// Enforced rules.
    pub rules: Option<Rules>,
    /// Dry-run rules.
    pub shadow_rules: Option<Rules>,
    /// Re-check on every read (`CONTINUOUS`) instead of once on the first byte.
    pub continuous: bool,
    /// `delay_deny`: wait this long before closing a denied connection.
    pub delay_deny: Option<Duration>,
}

impl NetworkRbac {
    /// Compiles `r` (at `path`).
    pub fn compile(r: &RawNetworkRbac, path: &str) -> CompileResult<Self> {
        Ok(NetworkRbac {
            rules: r
                .rules
                .as_ref()
                .map(|x| Rules::compile(x, &field(path, "rules")))
                .transpose()?,
            shadow_rules: r
                .shadow_rules
                .as_ref()
                .map(|x| Rules::compile(x, &field(path, "shadow_rules")))
                .transpose()?,
            continuous: EnforcementType::try_from(r.enforcement_type)
                == Ok(EnforcementType::Continuous),
            delay_deny: opt_duration(r.delay_deny.as_ref(), &field(path, "delay_deny"))?,
        })
    }
}

/// Envoy's RBAC decision for one engine, given predicates the data path evaluates.
impl Rules {
    /// Whether the engine lets a request through, given which policy (by index) matches.
    pub fn allows(&self, matched: Option<usize>) -> bool {
        match self.action {
            Action::Allow => matched.is_some(),
            Action::Deny => matched.is_none(),
            Action::Log => true,
        }
    }
}
