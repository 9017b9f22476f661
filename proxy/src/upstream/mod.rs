//! Upstreams: clusters at run time (hosts, load balancing, pools), connecting to hosts.

pub mod cluster_manager;
pub mod connect;
pub mod lb;
pub mod pool;
