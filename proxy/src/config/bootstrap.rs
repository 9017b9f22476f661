//! The bootstrap under the same rules as xDS resources (`--mode validate`): the allowlist walk over
//! the whole `Bootstrap` (node, admin, dynamic_resources, bootstrap_extensions, overload_manager …,
//! with the fields we ignore on purpose listed as harmless), then the compile step for every static
//! listener and cluster and the bootstrap-level settings. Paths start at the bootstrap root
//! (`static_resources.listeners[1].filter_chains[0]…`).

use std::collections::BTreeMap;

use prost::Message;
use waypoint_proto::{
    envoy::{
        config::{
            bootstrap::v3::Bootstrap, core::v3::config_source::ConfigSourceSpecifier,
            overload::v3::resource_monitor::ConfigType as MonitorConfig,
        },
        extensions::{
            bootstrap::internal_listener::v3::InternalListener,
            resource_monitors::downstream_connections::v3::DownstreamConnectionsConfig,
        },
    },
    istio::workload::BootstrapExtension,
    json,
};

use super::{
    Cluster, ConfigError, Listener, allowlist, field, index,
    listener::socket_address,
    source::{ConfigSourceSpec, Source, api_source},
    supported::ExtensionKind,
    typed::Typed,
};

/// What the bootstrap configures, compiled.
#[derive(Debug, Clone, Default)]
pub struct CompiledBootstrap {
    /// `static_resources.listeners`.
    pub listeners: Vec<Listener>,
    /// `static_resources.clusters`.
    pub clusters: Vec<Cluster>,
    /// `bootstrap_extensions` asked for WDS (`istio.workload.BootstrapExtension`).
    pub workload_discovery: Option<ConfigSourceSpec>,
    /// `overload_manager` global downstream connection limit.
    pub max_active_downstream_connections: Option<u64>,
}

/// Checks and compiles `b`; every problem is returned, each with its JSON path.
pub fn compile(b: &Bootstrap) -> Result<CompiledBootstrap, Vec<ConfigError>> {
    let mut problems =
        match json::decode_dynamic("envoy.config.bootstrap.v3.Bootstrap", &b.encode_to_vec()) {
            Ok(d) => allowlist::check(&d),
            Err(e) => vec![ConfigError::new("", format!("does not decode: {e}"))],
        };
    // Resources with allowlist problems are not compiled (their errors would only repeat them).
    let has_problem_under = |problems: &[ConfigError], prefix: &str| {
        problems
            .iter()
            .any(|p| p.path == prefix || p.path.starts_with(&format!("{prefix}.")))
    };
    let mut out = CompiledBootstrap::default();
    let statics = b.static_resources.clone().unwrap_or_default();
    let mut seen = BTreeMap::new();
    for (i, l) in statics.listeners.iter().enumerate() {
        let path = index("static_resources", "listeners", i);
        if let Some(first) = seen.insert(l.name.clone(), i) {
            problems.push(ConfigError::new(
                field(&path, "name"),
                format!(
                    "duplicate listener name '{}' (also static_resources.listeners[{first}])",
                    l.name
                ),
            ));
        }
        if has_problem_under(&problems, &path) {
            continue;
        }
        match Listener::compile(l.clone(), &path) {
            Ok(c) => out.listeners.push(c),
            Err(e) => problems.push(e),
        }
    }
    let mut seen = BTreeMap::new();
    for (i, c) in statics.clusters.iter().enumerate() {
        let path = index("static_resources", "clusters", i);
        if let Some(first) = seen.insert(c.name.clone(), i) {
            problems.push(ConfigError::new(
                field(&path, "name"),
                format!(
                    "duplicate cluster name '{}' (also static_resources.clusters[{first}])",
                    c.name
                ),
            ));
        }
        if has_problem_under(&problems, &path) {
            continue;
        }
        match Cluster::compile(c.clone(), &path) {
            Ok(c) => out.clusters.push(c),
            Err(e) => problems.push(e),
        }
    }
    let static_cluster = |name: &str| statics.clusters.iter().any(|c| c.name == name);

    if let Some(d) = &b.dynamic_resources {
        let dpath = "dynamic_resources";
        if let Some(ads) = &d.ads_config {
            match api_source(ads, &field(dpath, "ads_config")) {
                Ok(Source::Grpc { cluster, .. }) if !static_cluster(&cluster) => {
                    problems.push(ConfigError::new(
                        field(
                            &field(
                                &index(&field(dpath, "ads_config"), "grpc_services", 0),
                                "envoy_grpc",
                            ),
                            "cluster_name",
                        ),
                        format!("no static cluster named '{cluster}'"),
                    ))
                }
                Ok(_) => {}
                Err(e) => problems.push(e),
            }
        }
        for (name, cfg) in [("lds_config", &d.lds_config), ("cds_config", &d.cds_config)] {
            if let Some(cfg) = cfg {
                let p = field(dpath, name);
                if !matches!(
                    cfg.config_source_specifier,
                    Some(ConfigSourceSpecifier::Ads(_))
                ) {
                    problems.push(ConfigError::new(&p, "only ads is supported"));
                } else if d.ads_config.is_none() {
                    problems.push(ConfigError::new(
                        &p,
                        "ads needs dynamic_resources.ads_config",
                    ));
                } else if let Err(e) = ConfigSourceSpec::compile(cfg, &p) {
                    problems.push(e);
                }
            }
        }
    }

    // `stats_config`: the stats matcher and histogram bucket rules (the server compiles them
    // again from the same message; here a bad one refuses the bootstrap with its path).
    if !has_problem_under(&problems, "stats_config") {
        if let Err(e) = crate::stats_matcher::StatsMatcher::from_bootstrap(b) {
            problems.push(e);
        }
        if let Err(e) = crate::telemetry::bucket_rules(b) {
            problems.push(e);
        }
    }

    if let Some(admin) = &b.admin
        && let Some(a) = &admin.address
        && let Err(e) = socket_address(a, "admin.address")
    {
        problems.push(e);
    }

    for (i, ext) in b.bootstrap_extensions.iter().enumerate() {
        let cpath = field(&index("", "bootstrap_extensions", i), "typed_config");
        if has_problem_under(&problems, &cpath) {
            continue;
        }
        let Some(any) = &ext.typed_config else {
            problems.push(ConfigError::new(cpath, "typed_config is required"));
            continue;
        };
        let result = Typed::new(any, &cpath).and_then(|t| {
            let name = t
                .check_kind(
                    &[ExtensionKind::BootstrapExtension],
                    "a bootstrap extension",
                    &cpath,
                )?
                .to_owned();
            match name.as_str() {
                "istio.workload.BootstrapExtension" => {
                    let w: BootstrapExtension = t.decode(&name, &cpath)?;
                    let spath = field(&t.inner_path(&cpath), "config_source");
                    let src = w
                        .config_source
                        .as_ref()
                        .ok_or_else(|| ConfigError::new(&spath, "config_source is required"))?;
                    let spec = ConfigSourceSpec::compile(src, &spath)?;
                    if spec.source != Source::Ads {
                        return Err(ConfigError::new(
                            spath,
                            "workload discovery is only fetched over ADS",
                        ));
                    }
                    out.workload_discovery = Some(spec);
                    Ok(())
                }
                _ => {
                    let _: InternalListener = t.decode(&name, &cpath)?;
                    Ok(())
                }
            }
        });
        if let Err(e) = result {
            problems.push(e);
        }
    }

    if let Some(om) = &b.overload_manager {
        for (i, m) in om.resource_monitors.iter().enumerate() {
            let cpath = field(
                &index("overload_manager", "resource_monitors", i),
                "typed_config",
            );
            if has_problem_under(&problems, &cpath) {
                continue;
            }
            let result = match &m.config_type {
                Some(MonitorConfig::TypedConfig(any)) => Typed::new(any, &cpath).and_then(|t| {
                    let name = t
                        .check_kind(
                            &[ExtensionKind::ResourceMonitor],
                            "a resource monitor",
                            &cpath,
                        )?
                        .to_owned();
                    let d: DownstreamConnectionsConfig = t.decode(&name, &cpath)?;
                    if d.max_active_downstream_connections <= 0 {
                        return Err(ConfigError::new(
                            field(&t.inner_path(&cpath), "max_active_downstream_connections"),
                            "must be positive",
                        ));
                    }
                    out.max_active_downstream_connections =
                        Some(d.max_active_downstream_connections as u64);
                    Ok(())
                }),
                None => Err(ConfigError::new(cpath, "typed_config is required")),
            };
            if let Err(e) = result {
                problems.push(e);
            }
        }
    }

    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// `--mode validate`: every problem, or none.
pub fn validate(b: &Bootstrap) -> Vec<ConfigError> {
    compile(b).err().unwrap_or_default()
}
