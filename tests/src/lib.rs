//! The test bed: istiod-lite (a stand-in for istiod's CA and xDS APIs), echo backends and helpers
//! shared by the end-to-end tests.

pub mod istiod_lite;

/// The echo backend (HTTP/1.1 + h2c + WebSocket, and gRPC) that tests route traffic to.
pub mod echo;
/// HBONE workloads: the source-side forwarder and destination-side terminator ztunnel would be,
/// with workload certificates from istiod-lite.
pub mod hbone;
/// Traffic-management scenarios (retries, faults, timeouts, circuit breaking, RBAC, mirroring,
/// JWT, CORS, local rate limit): the resources istiod pushes for each, and what drives them.
pub mod scenarios;
/// gRPC over Unix sockets.
pub mod uds;
/// The local mesh around one waypoint on a loopback /24 ([`waypoint::WaypointMesh`]): istiod-lite,
/// echo, HBONE sink and forwarder, and the real agent and proxy.
pub mod waypoint;
