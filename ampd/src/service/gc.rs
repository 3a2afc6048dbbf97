//! Garbage collection of table revisions' files in a data directory: the worker runs
//! [`collect`] on a timer.
//!
//! A pass:
//! 1. schedules the files of abandoned revisions (the partial output of an attempt that failed,
//!    stopped or was fenced off) for deletion at once;
//! 2. deletes expired files, a batch at a time, each batch in one transaction: list the expired
//!    entries (which locks their revisions against activation), delete the files, forget their rows,
//!    commit. A pass that dies half-way leaves the rows; the next pass deletes again (a file already
//!    gone counts as deleted) and forgets them, so no file is ever left without a row naming it;
//! 3. removes what is left of revisions whose files are all gone, each in one transaction that
//!    locks the revision and checks it again (a roll back may have cancelled its schedule since it
//!    was listed): the revision's directory (with any file a writer never registered), then its row.
//!
//! Every file and directory is deleted through [`Storage`], the interface the workers create
//! revisions' directories through (see there why none is left without a row naming it); paths come
//! from the database and each is checked to be a plain relative path (no `..`, no root) before
//! anything under the data directory is touched.

use std::path::Path;

use sea_orm::{DatabaseConnection, TransactionTrait};

use super::storage::{Storage, StorageError};
use crate::metadata::{self, files, revisions};

/// Entries and revisions handled per batch.
const BATCH: u64 = 100;

/// What a pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Abandoned revisions scheduled for deletion.
    pub abandoned: u64,
    /// Files deleted and forgotten.
    pub files: u64,
    /// Revisions removed (directory and row).
    pub revisions: u64,
}

/// Why a pass stopped.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// A data-access call failed.
    #[error(transparent)]
    Metadata(#[from] metadata::Error),
    /// A file or directory could not be deleted (other than for being gone already), or its path
    /// from the database is not a plain relative path (then it is never touched).
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// One garbage collection pass over `data_dir` (see the module docs).
pub async fn collect(db: &DatabaseConnection, data_dir: &Path) -> Result<Collected, GcError> {
    let storage = Storage::new(data_dir);
    let mut done = Collected::default();
    for revision in revisions::list_abandoned(db, BATCH).await? {
        files::schedule_gc(db, revision.id, std::time::Duration::ZERO).await?;
        tracing::info!(revision_id = revision.id, path = %revision.path, "scheduled an abandoned revision for deletion");
        done.abandoned += 1;
    }
    loop {
        let tx = db.begin().await.map_err(metadata::Error::from)?;
        let expired = files::list_expired(&tx, BATCH).await?;
        for entry in &expired {
            storage.remove_file(&entry.file_path).await?;
        }
        let ids: Vec<i64> = expired.iter().map(|e| e.file_id).collect();
        let forgotten = files::forget(&tx, &ids).await?;
        tx.commit().await.map_err(metadata::Error::from)?;
        crate::metrics::collected(forgotten, 0);
        done.files += forgotten;
        if (expired.len() as u64) < BATCH {
            break;
        }
    }
    for listed in revisions::list_emptied(db, BATCH).await? {
        // Locked and checked again before anything is removed: a roll back may have cancelled its
        // schedule since it was listed, or another collector may be removing it.
        let tx = db.begin().await.map_err(metadata::Error::from)?;
        let Some(revision) = revisions::lock_emptied(&tx, listed.id).await? else {
            tx.rollback().await.map_err(metadata::Error::from)?;
            continue;
        };
        storage.remove_dir(&revision.path).await?;
        revisions::delete(&tx, revision.id).await?;
        tx.commit().await.map_err(metadata::Error::from)?;
        crate::metrics::collected(0, 1);
        done.revisions += 1;
    }
    if done != Collected::default() {
        tracing::info!(
            abandoned = done.abandoned,
            files = done.files,
            revisions = done.revisions,
            "garbage collected"
        );
    }
    Ok(done)
}
