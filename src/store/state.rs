//! Small durable state beside the logs (bridge and subscription cursors, subscription
//! definitions): one sled tree per namespace, opaque values, each write flushed before it
//! returns.

use std::future::Future;

use super::writer::{Command, Position};
use super::{Error, LogId, SledLog, Store, blocking};

/// Small durable state beside the logs: bridge and subscription cursors, subscription
/// definitions. One sled tree per namespace; values are opaque bytes. The futures own what they
/// need (they run on the blocking pool), so the [`super::LogBackend`] impl can return them as is.
impl SledLog {
    /// The value under `key` in `namespace`.
    pub(super) fn state_get_owned(
        &self,
        namespace: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, Error>> + Send + 'static {
        let db = self.db();
        let (tree, key) = (state_tree(namespace), key.to_owned());
        async move {
            let db = db?;
            blocking(&tree.clone(), move || {
                let t = db.open_tree(&tree)?;
                Ok(t.get(key.as_bytes())?.map(|v| v.to_vec()))
            })
            .await
        }
    }

    /// Stores `value` under `key` and flushes it to disk before completing.
    pub(super) fn state_put_owned(
        &self,
        namespace: &str,
        key: &str,
        value: Vec<u8>,
    ) -> impl Future<Output = Result<(), Error>> + Send + 'static {
        let db = self.db();
        let (tree, key) = (state_tree(namespace), key.to_owned());
        async move {
            let db = db?;
            blocking(&tree.clone(), move || {
                db.open_tree(&tree)?.insert(key.as_bytes(), value)?;
                db.flush()?;
                Ok(())
            })
            .await
        }
    }

    /// A cursor write through the writer's queue (see [`super::LogBackend::put_cursor`]).
    pub(super) fn put_cursor_owned(
        &self,
        namespace: &str,
        key: &str,
        next: Option<u64>,
        durable: bool,
    ) -> impl Future<Output = Result<(), Error>> + Send + 'static {
        let commands = self.commands.clone();
        let (done, completed) = if durable {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let position = Position {
            tree: state_tree(namespace),
            key: key.to_owned(),
            next,
            done,
        };
        async move {
            match completed {
                Some(completed) => {
                    commands
                        .send(Command::Position(position))
                        .await
                        .map_err(|_| Error::Closed)?;
                    completed.await.unwrap_or(Err(Error::Closed)).map(drop)
                }
                // A full queue drops it: the writer is busy, and a later position (or the
                // reader's next durable one) supersedes it.
                None => match commands.try_send(Command::Position(position)) {
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => Err(Error::Closed),
                    _ => Ok(()),
                },
            }
        }
    }

    /// Removes `key`; whether it was there.
    pub(super) fn state_remove_owned(
        &self,
        namespace: &str,
        key: &str,
    ) -> impl Future<Output = Result<bool, Error>> + Send + 'static {
        let db = self.db();
        let (tree, key) = (state_tree(namespace), key.to_owned());
        async move {
            let db = db?;
            blocking(&tree.clone(), move || {
                let removed = db.open_tree(&tree)?.remove(key.as_bytes())?.is_some();
                db.flush()?;
                Ok(removed)
            })
            .await
        }
    }

    /// Every key and value of `namespace`, in key order.
    pub(super) fn state_list_owned(
        &self,
        namespace: &str,
    ) -> impl Future<Output = Result<Vec<(String, Vec<u8>)>, Error>> + Send + 'static {
        let db = self.db();
        let tree = state_tree(namespace);
        async move {
            let db = db?;
            blocking(&tree.clone(), move || {
                let mut out = Vec::new();
                for item in db.open_tree(&tree)?.iter() {
                    let (k, v) = item?;
                    out.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
                }
                Ok(out)
            })
            .await
        }
    }
}

/// A durable reader's position in a log (a bridge lane, a call trigger): the next offset it will
/// take, kept under `key` in `namespace`.
impl Store {
    pub async fn cursor(&self, namespace: &str, key: &str) -> Result<Option<u64>, Error> {
        Ok(self
            .state_get(namespace, key)
            .await?
            .and_then(|v| v.try_into().ok().map(u64::from_be_bytes)))
    }

    /// Records the cursor; durable when this returns (it rides the log's group commit).
    pub async fn set_cursor(&self, namespace: &str, key: &str, next: u64) -> Result<(), Error> {
        self.backend
            .put_cursor(namespace, key, Some(next), true)
            .await
    }

    /// Records the cursor without waiting for the disk: it is durable with the log's next group
    /// commit (milliseconds while messages flow) or sled's periodic flush. A crash loses at most
    /// that much progress, which the reader then repeats; a [`Store::set_cursor`] after it is
    /// never overtaken by it.
    pub async fn advance_cursor(&self, namespace: &str, key: &str, next: u64) -> Result<(), Error> {
        self.backend
            .put_cursor(namespace, key, Some(next), false)
            .await
    }

    /// Removes the cursor after every write queued before it; durable when this returns.
    pub async fn remove_cursor(&self, namespace: &str, key: &str) -> Result<(), Error> {
        self.backend.put_cursor(namespace, key, None, true).await
    }

    /// The cursor, created first when there is none: at `log`'s oldest message when
    /// `earliest`, else after its newest.
    pub async fn cursor_or_create(
        &self,
        namespace: &str,
        key: &str,
        log: &LogId,
        earliest: bool,
    ) -> Result<u64, Error> {
        if let Some(next) = self.cursor(namespace, key).await? {
            return Ok(next);
        }
        let stats = self.log_stats(log);
        let next = if earliest {
            stats.first_offset.unwrap_or(1)
        } else {
            stats.last_offset.map_or(1, |o| o + 1)
        };
        self.set_cursor(namespace, key, next).await?;
        Ok(next)
    }
}

fn state_tree(namespace: &str) -> String {
    format!("s:{namespace}")
}
