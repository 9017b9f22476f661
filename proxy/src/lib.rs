//! The waypoint proxy: reads an Envoy v3 bootstrap, consumes the xDS istiod generates for a waypoint
//! (through the agent's XDS proxy), compiles it into immutable snapshots with precise NACKs for
//! anything it does not implement, and serves the admin API (data path: later issues).

pub mod access_log;
pub mod admin;
pub mod bootstrap;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod flags;
pub mod hbone;
pub mod http;
pub mod io;
pub mod listener;
pub mod rbac;
pub mod server;
pub mod stats;
pub mod stats_matcher;
pub mod tcp_proxy;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod workers;
pub mod xds;
