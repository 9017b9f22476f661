//! The agent: a Rust replacement for Istio's pilot-agent in a waypoint pod. It reads the pod's
//! configuration, writes the proxy's bootstrap, gets and rotates the workload certificate from the
//! Istio CA, serves it over SDS, proxies ADS to istiod, and supervises the proxy.

pub mod app;
pub mod bootstrap;
pub mod ca;
pub mod commands;
pub mod config;
pub mod http_client;
pub mod istiod;
pub mod metrics;
pub mod proxy_admin;
pub mod sds;
pub mod secrets;
pub mod status;
pub mod supervisor;
pub mod uds;
pub mod xds_proxy;
