//! Unix-socket listeners for the agent's SDS and XDS servers.

use std::path::Path;

use tokio::net::UnixListener;

/// Errors serving on a Unix socket.
#[derive(Debug, thiserror::Error)]
pub enum UdsError {
    /// Could not prepare or bind the socket path.
    #[error("unix socket {path}: {reason}")]
    Bind {
        /// The socket path.
        path: String,
        /// What failed.
        reason: String,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(String),
}

/// Binds `path`, creating its folder and replacing a stale socket file, then makes it connectable by
/// the proxy (mode 0666, as pilot-agent).
pub fn bind(path: &Path) -> Result<UnixListener, UdsError> {
    use std::os::unix::fs::PermissionsExt as _;
    let err = |reason: String| UdsError::Bind {
        path: path.display().to_string(),
        reason,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("create folder: {e}")))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(format!("remove stale socket: {e}"))),
    }
    let listener = UnixListener::bind(path).map_err(|e| err(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| err(format!("chmod: {e}")))?;
    Ok(listener)
}
