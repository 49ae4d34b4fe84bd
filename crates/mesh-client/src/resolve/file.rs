use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, time::Duration};

use tokio::sync::mpsc;
use tower::discover::Change;

use super::{next_backoff, parse_addrs, publish};

/// How often the file is read. Polling a small file needs no inotify
/// dependency and also sees Kubernetes' symlink-swap updates of a mounted
/// ConfigMap, which inotify watches on the old inode miss.
const POLL: Duration = Duration::from_secs(1);

pub(super) async fn watch_forever(path: PathBuf, tx: mpsc::Sender<Change<SocketAddr, ()>>) {
    let mut current = BTreeSet::new();
    let mut last_text = None;
    let mut backoff = Duration::ZERO;
    loop {
        let wait = match tokio::fs::read_to_string(&path).await {
            Ok(text) if last_text.as_ref() == Some(&text) => POLL,
            Ok(text) => match parse_addrs(&text) {
                Ok(addrs) => {
                    backoff = Duration::ZERO;
                    if !publish(&mut current, addrs.into_iter().collect(), &tx).await {
                        return;
                    }
                    last_text = Some(text);
                    POLL
                }
                Err(e) => {
                    backoff = next_backoff(backoff);
                    tracing::warn!(path = %path.display(), "endpoint file is invalid, keeping {} endpoints: {e}", current.len());
                    last_text = Some(text);
                    POLL.max(backoff)
                }
            },
            Err(e) => {
                backoff = next_backoff(backoff);
                tracing::warn!(path = %path.display(), "cannot read endpoint file, keeping {} endpoints: {e}", current.len());
                backoff
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = tx.closed() => return,
        }
    }
}
