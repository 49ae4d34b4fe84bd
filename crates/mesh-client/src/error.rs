use std::net::SocketAddr;

/// Why the mesh could not build a channel or a server.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The target string is not one the mesh understands.
    #[error("invalid target {target:?}: {reason}")]
    InvalidTarget {
        /// The target as given.
        target: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A configuration value is out of range or inconsistent.
    #[error("invalid mesh config: {field}: {reason}")]
    InvalidConfig {
        /// Dotted path of the offending field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server failed while serving connections.
    #[error("server on {addr} failed: {source}")]
    Serve {
        /// The address the server was listening on.
        addr: SocketAddr,
        /// The underlying transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// An I/O error, for example reading the listener's local address.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// The first error of type `E` among `err` and its causes, outermost first:
/// "is this error caused by an `E`?" for errors that reach the mesh boxed
/// (`tonic::Status`, `tonic::ConnectError`, `h2::Error`, `std::io::Error`).
///
/// Walks [`std::error::Error::source`] and also looks inside a
/// [`std::io::Error`] made from another error (`io::Error::other(inner)`),
/// whose `source()` skips `inner` itself: hyper and tonic hand I/O errors
/// around that way. The walk is bounded (64 causes) so a cyclic `source()`
/// cannot hang the caller.
///
/// ```
/// use mesh_client::caused_by;
///
/// let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
/// let boxed: mesh_client::BoxError = Box::new(io);
/// assert_eq!(
///     caused_by::<std::io::Error>(&*boxed).map(|e| e.kind()),
///     Some(std::io::ErrorKind::ConnectionRefused)
/// );
/// assert!(caused_by::<tonic::Status>(&*boxed).is_none());
/// ```
pub fn caused_by<'a, E>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a E>
where
    E: std::error::Error + 'static,
{
    /// Longer chains than this are taken for cycles.
    const MAX_DEPTH: usize = 64;
    let mut current = Some(err);
    for _ in 0..MAX_DEPTH {
        let err = current?;
        if let Some(found) = err.downcast_ref::<E>() {
            return Some(found);
        }
        current = match err.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::caused_by;
    use std::io;

    /// A wrapper that keeps its cause, as a `thiserror` `#[source]` does.
    #[derive(Debug, thiserror::Error)]
    #[error("outer: {source}")]
    struct Outer {
        #[source]
        source: Middle,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("middle")]
    struct Middle {
        #[source]
        source: io::Error,
    }

    fn chain() -> Outer {
        Outer {
            source: Middle {
                source: io::Error::new(io::ErrorKind::TimedOut, "slow"),
            },
        }
    }

    #[test]
    fn finds_the_error_itself_and_causes_any_depth_down() {
        let err = chain();
        assert!(caused_by::<Outer>(&err).is_some());
        assert!(caused_by::<Middle>(&err).is_some());
        assert_eq!(
            caused_by::<io::Error>(&err).map(io::Error::kind),
            Some(io::ErrorKind::TimedOut)
        );
    }

    #[test]
    fn an_error_not_in_the_chain_is_not_found() {
        let err = chain();
        assert!(caused_by::<tonic::Status>(&err).is_none());
        assert!(caused_by::<std::fmt::Error>(&io::Error::other("plain")).is_none());
    }

    #[test]
    fn the_outermost_match_wins() {
        let err = io::Error::other(io::Error::new(io::ErrorKind::TimedOut, "inner"));
        assert_eq!(
            caused_by::<io::Error>(&err).map(io::Error::kind),
            Some(io::ErrorKind::Other)
        );
    }

    #[test]
    fn looks_inside_io_errors_made_from_other_errors() {
        // io::Error::source() skips the wrapped error itself; the helper does not.
        let status = tonic::Status::unavailable("gone");
        let err = Middle {
            source: io::Error::other(status),
        };
        assert_eq!(
            caused_by::<tonic::Status>(&err).map(tonic::Status::code),
            Some(tonic::Code::Unavailable)
        );
    }

    #[test]
    fn works_through_a_boxed_error() {
        let boxed: crate::BoxError = Box::new(chain());
        assert!(caused_by::<Middle>(&*boxed).is_some());
    }

    /// An error that is its own cause.
    #[derive(Debug)]
    struct Cycle;
    impl std::fmt::Display for Cycle {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("cycle")
        }
    }
    impl std::error::Error for Cycle {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&Cycle)
        }
    }

    #[test]
    fn a_cyclic_chain_ends() {
        assert!(caused_by::<io::Error>(&Cycle).is_none());
    }
}
