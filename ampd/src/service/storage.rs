//! The data directory that holds the revisions' files: the one interface through which a worker
//! creates a revision's directory and the garbage collector ([`super::gc`]) deletes files and
//! directories, so that no directory is ever left on disk without a row that names it:
//! - a revision's directory is created only inside a transaction that holds the revision's row
//!   `FOR SHARE` while it accepts files ([`files::hold_writable`]); a revision that was abandoned,
//!   scheduled for collection or collected meanwhile gets no directory. Scheduling a revision for
//!   collection locks its row `FOR UPDATE`, so it waits for such a creation, and the collector
//!   removes the directory only after that;
//! - a file is only ever written inside its revision's directory, which the writer never creates
//!   again: once the collector has removed it, a late write fails instead of leaving a file behind;
//! - every path comes from the database and is used only when it is a plain relative path (no
//!   `..`, no root).

use std::path::{Component, Path, PathBuf};

use sea_orm::{ConnectionTrait, TransactionSession, TransactionTrait};

use crate::metadata::{self, files};

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The metadata database refused or failed (the revision no longer accepts files, say).
    #[error(transparent)]
    Metadata(#[from] metadata::Error),
    /// A file or directory could not be created or deleted (other than for being gone already).
    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        /// What was being done: `create`, `delete`.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A path from the database is not a plain relative path: it is never touched.
    #[error("refusing to touch {path:?}: not a plain relative path under the data directory")]
    UnsafePath {
        /// The path as stored.
        path: String,
    },
}

/// A data directory.
#[derive(Clone, Debug)]
pub struct Storage {
    root: PathBuf,
}

impl Storage {
    /// The data directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Storage {
        Storage { root: root.into() }
    }

    /// `relative` under the data directory, if it is a plain relative path (only normal
    /// components).
    pub fn path(&self, relative: &str) -> Result<PathBuf, StorageError> {
        let path = Path::new(relative);
        let plain =
            !relative.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)));
        if plain {
            Ok(self.root.join(path))
        } else {
            Err(StorageError::UnsafePath {
                path: relative.to_owned(),
            })
        }
    }

    /// Creates the directory of revision `revision_id` (at `relative`, its path) while its row
    /// accepts files, holding the row meanwhile (see the module docs); returns the directory.
    /// `Metadata(NotFound | Conflict)` when the revision no longer exists or accepts files: then
    /// nothing is created.
    pub async fn create_revision_dir<C>(
        &self,
        db: &C,
        revision_id: i64,
        relative: &str,
    ) -> Result<PathBuf, StorageError>
    where
        C: ConnectionTrait + TransactionTrait,
    {
        let dir = self.path(relative)?;
        let tx = db.begin().await.map_err(metadata::Error::from)?;
        files::hold_writable(&tx, revision_id).await?;
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|source| StorageError::Io {
                action: "create",
                path: dir.clone(),
                source,
            })?;
        tx.commit().await.map_err(metadata::Error::from)?;
        Ok(dir)
    }

    /// Deletes file `relative`; one already gone counts as deleted.
    pub async fn remove_file(&self, relative: &str) -> Result<(), StorageError> {
        let path = self.path(relative)?;
        let removed = tokio::fs::remove_file(&path).await;
        gone_is_fine(path, removed)
    }

    /// Deletes directory `relative` with everything in it; one already gone counts as deleted.
    pub async fn remove_dir(&self, relative: &str) -> Result<(), StorageError> {
        let path = self.path(relative)?;
        let removed = tokio::fs::remove_dir_all(&path).await;
        gone_is_fine(path, removed)
    }
}

fn gone_is_fine(path: PathBuf, result: std::io::Result<()>) -> Result<(), StorageError> {
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StorageError::Io {
            action: "delete",
            path,
            source: e,
        }),
        _ => Ok(()),
    }
}
