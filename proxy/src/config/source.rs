//! xDS config sources (`ConfigSource`): where EDS, RDS and SDS resources come from. We support ADS
//! and gRPC to a static cluster (the agent's SDS socket).

use std::time::Duration;

use waypoint_proto::envoy::config::core::v3::{
    ApiConfigSource, ConfigSource, api_config_source::ApiType,
    config_source::ConfigSourceSpecifier, grpc_service::TargetSpecifier,
};

use super::{CompileResult, ConfigError, field, index, opt_duration};

/// Where resources come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The ADS stream.
    Ads,
    /// A gRPC stream to a static cluster.
    Grpc {
        /// The cluster name (e.g. `sds-grpc`).
        cluster: String,
        /// Delta (incremental) xDS.
        delta: bool,
    },
}

/// A compiled `ConfigSource`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSourceSpec {
    /// Where.
    pub source: Source,
    /// `initial_fetch_timeout` (`Some(0)`: wait forever, Istio's choice).
    pub initial_fetch_timeout: Option<Duration>,
}

impl ConfigSourceSpec {
    /// Compiles `c`.
    pub fn compile(c: &ConfigSource, path: &str) -> CompileResult<Self> {
        let source = match &c.config_source_specifier {
            Some(ConfigSourceSpecifier::Ads(_)) => Source::Ads,
            Some(ConfigSourceSpecifier::ApiConfigSource(a)) => {
                api_source(a, &field(path, "api_config_source"))?
            }
            Some(_) => {
                return Err(ConfigError::new(
                    path,
                    "only ads and api_config_source (gRPC) config sources are supported",
                ));
            }
            None => return Err(ConfigError::new(path, "a config source is required")),
        };
        Ok(ConfigSourceSpec {
            source,
            initial_fetch_timeout: opt_duration(
                c.initial_fetch_timeout.as_ref(),
                &field(path, "initial_fetch_timeout"),
            )?,
        })
    }
}

/// Which ADS variant Envoy runs for `dynamic_resources.ads_config.api_type`: delta xDS for
/// `DELTA_GRPC` and state of the world for every other gRPC type (Envoy's `XdsManagerImpl` tests
/// only for `DELTA_GRPC`, so `AGGREGATED_DELTA_GRPC` gets SotW there too); `None` for REST types.
pub fn ads_is_delta(api_type: i32) -> Option<bool> {
    match ApiType::try_from(api_type) {
        Ok(ApiType::DeltaGrpc) => Some(true),
        Ok(ApiType::Grpc) | Ok(ApiType::AggregatedGrpc) | Ok(ApiType::AggregatedDeltaGrpc) => {
            Some(false)
        }
        _ => None,
    }
}

/// A gRPC `ApiConfigSource` with one `envoy_grpc` service.
pub fn api_source(a: &ApiConfigSource, path: &str) -> CompileResult<Source> {
    let delta = match ApiType::try_from(a.api_type) {
        Ok(ApiType::Grpc) | Ok(ApiType::AggregatedGrpc) => false,
        Ok(ApiType::DeltaGrpc) | Ok(ApiType::AggregatedDeltaGrpc) => true,
        _ => {
            return Err(ConfigError::new(
                field(path, "api_type"),
                "only gRPC api types are supported",
            ));
        }
    };
    let [service] = a.grpc_services.as_slice() else {
        return Err(ConfigError::new(
            field(path, "grpc_services"),
            format!(
                "exactly one gRPC service is required, got {}",
                a.grpc_services.len()
            ),
        ));
    };
    let spath = index(path, "grpc_services", 0);
    match &service.target_specifier {
        Some(TargetSpecifier::EnvoyGrpc(e)) if !e.cluster_name.is_empty() => Ok(Source::Grpc {
            cluster: e.cluster_name.clone(),
            delta,
        }),
        Some(TargetSpecifier::EnvoyGrpc(_)) => Err(ConfigError::new(
            field(&field(&spath, "envoy_grpc"), "cluster_name"),
            "cluster_name is required",
        )),
        _ => Err(ConfigError::new(spath, "envoy_grpc is required")),
    }
}
