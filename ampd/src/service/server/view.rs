//! The server's view of what is served: for every physical table, its active revision (id, path,
//! files in order with their sizes, and the revision's [`RevisionMeta`]).
//!
//! The view is loaded whole at start and on every re-read ([`View::reload`]), and one table at a
//! time when a `revision_changes` notification names it or a request finds it missing or stale
//! ([`View::refresh`], [`View::find`]). Each read runs in one read-only `REPEATABLE READ`
//! transaction, so a table, its active revision and that revision's files come from one snapshot.
//!
//! Reads may overlap (the loop that follows the notifications, and requests), so each takes a
//! ticket before it starts and the view keeps, per table, what the read with the highest ticket
//! saw. A read that starts later has a snapshot at least as new as any change whose notification
//! triggered an earlier read, so a slower, older read never replaces a newer one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use entity::{file_metadata, physical_table_revisions, physical_tables};
use sea_orm::{AccessMode, ConnectionTrait, IsolationLevel, TransactionSession, TransactionTrait};

use crate::manifest::RevisionMeta;
use crate::metadata::{self, files, revisions};

/// What names a physical table in a request: the dataset, the manifest a reference resolved to, and
/// the table's name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TableKey {
    /// Dataset namespace.
    pub namespace: String,
    /// Dataset name.
    pub name: String,
    /// Hash of the manifest.
    pub manifest_hash: String,
    /// The table's name in the manifest.
    pub table: String,
}

impl TableKey {
    fn of(table: &physical_tables::Model) -> TableKey {
        TableKey {
            namespace: table.dataset_namespace.clone(),
            name: table.dataset_name.clone(),
            manifest_hash: table.manifest_hash.clone(),
            table: table.table_name.clone(),
        }
    }
}

impl std::fmt::Display for TableKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "table {} of {}/{}@{}",
            self.table, self.namespace, self.name, self.manifest_hash
        )
    }
}

/// A file of a revision, as registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// Its name in the revision's directory.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

/// The active revision of a table.
#[derive(Clone, Debug, PartialEq)]
pub struct Active {
    /// The table.
    pub table_id: i64,
    /// The revision.
    pub revision_id: i64,
    /// Its directory, relative to the data directory, as stored.
    pub path: String,
    /// Its files, in registration order: the order its rows are served in.
    pub files: Vec<FileEntry>,
    /// What its metadata says of its format and columns; `None` when it is not a
    /// [`RevisionMeta`] (not written by a materialization).
    pub meta: Option<RevisionMeta>,
}

/// A table as the view knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    /// What names it.
    pub key: TableKey,
    /// Its active revision, if it has one.
    pub active: Option<Arc<Active>>,
}

#[derive(Debug)]
struct Known {
    table: Table,
    /// The ticket of the read that saw it.
    ticket: u64,
}

#[derive(Debug, Default)]
struct Tables {
    by_id: HashMap<i64, Known>,
    by_key: HashMap<TableKey, i64>,
}

impl Tables {
    fn put(&mut self, id: i64, table: Table, ticket: u64) {
        if let Some(known) = self.by_id.get(&id)
            && known.ticket > ticket
        {
            return;
        }
        self.by_key.insert(table.key.clone(), id);
        if let Some(old) = self.by_id.insert(id, Known { table, ticket })
            && self.by_key.get(&old.table.key) != Some(&id)
        {
            self.by_key.remove(&old.table.key);
        }
    }

    fn remove(&mut self, id: i64, ticket: u64) {
        if let Some(known) = self.by_id.get(&id)
            && known.ticket <= ticket
            && let Some(old) = self.by_id.remove(&id)
            && self.by_key.get(&old.table.key) == Some(&id)
        {
            self.by_key.remove(&old.table.key);
        }
    }
}

/// The active revision of every table; see the module docs.
#[derive(Debug, Default)]
pub struct View {
    tables: RwLock<Tables>,
    tickets: AtomicU64,
}

/// The snapshot a read runs in.
async fn snapshot<C: TransactionTrait>(db: &C) -> metadata::Result<C::Transaction> {
    Ok(db
        .begin_with_config(
            Some(IsolationLevel::RepeatableRead),
            Some(AccessMode::ReadOnly),
        )
        .await?)
}

fn active_of(
    table: &physical_tables::Model,
    revision: physical_table_revisions::Model,
    files: Vec<file_metadata::Model>,
) -> Active {
    let meta = serde_json::from_value::<RevisionMeta>(revision.metadata).ok();
    Active {
        table_id: table.id,
        revision_id: revision.id,
        path: revision.path,
        files: files
            .into_iter()
            .map(|f| FileEntry {
                name: f.file_name,
                // The database refuses negative sizes.
                size: u64::try_from(f.object_size).unwrap_or(0),
            })
            .collect(),
        meta,
    }
}

/// Table `table` as of the snapshot `tx`.
async fn read_table<C: ConnectionTrait>(
    tx: &C,
    table: &physical_tables::Model,
) -> metadata::Result<Table> {
    let active = match revisions::active(tx, table.id).await? {
        Some(revision) => {
            let files = files::list(tx, revision.id).await?;
            Some(Arc::new(active_of(table, revision, files)))
        }
        None => None,
    };
    Ok(Table {
        key: TableKey::of(table),
        active,
    })
}

impl View {
    /// An empty view.
    pub fn new() -> View {
        View::default()
    }

    fn ticket(&self) -> u64 {
        self.tickets.fetch_add(1, Ordering::Relaxed)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Tables> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters
        // (each update is a few inserts and removes), so a poisoned lock is used as it is.
        self.tables.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The table `key` names and its active revision, if the view knows the table.
    pub fn get(&self, key: &TableKey) -> Option<Table> {
        let tables = self.tables.read().unwrap_or_else(|p| p.into_inner());
        let id = tables.by_key.get(key)?;
        tables.by_id.get(id).map(|known| known.table.clone())
    }

    /// How many tables the view knows, and how many of them have an active revision.
    pub fn counts(&self) -> (usize, usize) {
        let tables = self.tables.read().unwrap_or_else(|p| p.into_inner());
        let active = tables
            .by_id
            .values()
            .filter(|k| k.table.active.is_some())
            .count();
        (tables.by_id.len(), active)
    }

    /// Re-reads every table, in one snapshot, and replaces the view with what it saw (tables gone
    /// from the database leave the view).
    pub async fn reload<C: TransactionTrait>(&self, db: &C) -> metadata::Result<()> {
        let ticket = self.ticket();
        let tx = snapshot(db).await?;
        let tables = revisions::list_tables_with_active(&tx).await?;
        let mut files_of: HashMap<i64, Vec<file_metadata::Model>> = HashMap::new();
        for file in files::list_active(&tx).await? {
            files_of.entry(file.revision_id).or_default().push(file);
        }
        tx.commit().await?;
        let mut seen = HashMap::with_capacity(tables.len());
        for (table, revision) in tables {
            let active = revision.map(|revision| {
                let files = files_of.remove(&revision.id).unwrap_or_default();
                Arc::new(active_of(&table, revision, files))
            });
            let key = TableKey::of(&table);
            seen.insert(table.id, Table { key, active });
        }
        let mut view = self.write();
        let gone: Vec<i64> = (view.by_id.keys())
            .filter(|id| !seen.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            view.remove(id, ticket);
        }
        for (id, table) in seen {
            view.put(id, table, ticket);
        }
        Ok(())
    }

    /// Re-reads table `table_id` and returns what the view now holds for it (`None`: the table no
    /// longer exists).
    pub async fn refresh<C: TransactionTrait>(
        &self,
        db: &C,
        table_id: i64,
    ) -> metadata::Result<Option<Table>> {
        let ticket = self.ticket();
        let tx = snapshot(db).await?;
        let read = match revisions::get_table(&tx, table_id).await? {
            Some(table) => Some(read_table(&tx, &table).await?),
            None => None,
        };
        tx.commit().await?;
        let mut view = self.write();
        match read {
            Some(table) => {
                view.put(table_id, table, ticket);
                Ok(view.by_id.get(&table_id).map(|k| k.table.clone()))
            }
            None => {
                view.remove(table_id, ticket);
                Ok(None)
            }
        }
    }

    /// Reads the table `key` names from the database (for a request that did not find it in the
    /// view, or found it without an active revision) and returns what the view now holds for it
    /// (`None`: there is no such table).
    pub async fn find<C: TransactionTrait>(
        &self,
        db: &C,
        key: &TableKey,
    ) -> metadata::Result<Option<Table>> {
        let ticket = self.ticket();
        let tx = snapshot(db).await?;
        let tables =
            revisions::list_tables_of_manifest(&tx, &key.namespace, &key.name, &key.manifest_hash)
                .await?;
        let read = match tables.iter().find(|t| t.table_name == key.table) {
            Some(table) => Some((table.id, read_table(&tx, table).await?)),
            None => None,
        };
        tx.commit().await?;
        let Some((id, table)) = read else {
            return Ok(None);
        };
        let mut view = self.write();
        view.put(id, table, ticket);
        Ok(view.by_id.get(&id).map(|k| k.table.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(table: &str) -> TableKey {
        TableKey {
            namespace: "eth".into(),
            name: "mainnet".into(),
            manifest_hash: "a".repeat(64),
            table: table.into(),
        }
    }

    fn table(name: &str, revision_id: Option<i64>) -> Table {
        Table {
            key: key(name),
            active: revision_id.map(|revision_id| {
                Arc::new(Active {
                    table_id: 1,
                    revision_id,
                    path: format!("eth/mainnet/{name}/{revision_id}"),
                    files: Vec::new(),
                    meta: None,
                })
            }),
        }
    }

    fn revision(tables: &Tables, name: &str) -> Option<i64> {
        let id = tables.by_key.get(&key(name))?;
        tables.by_id[id]
            .table
            .active
            .as_ref()
            .map(|a| a.revision_id)
    }

    #[test]
    fn a_read_that_started_earlier_never_replaces_a_later_one() {
        let mut t = Tables::default();
        t.put(1, table("blocks", Some(10)), 5);
        t.put(1, table("blocks", Some(9)), 4);
        assert_eq!(revision(&t, "blocks"), Some(10));
        t.remove(1, 3);
        assert_eq!(revision(&t, "blocks"), Some(10));
        t.put(1, table("blocks", Some(11)), 6);
        assert_eq!(revision(&t, "blocks"), Some(11));
        t.remove(1, 7);
        assert_eq!(revision(&t, "blocks"), None);
        assert!(t.by_key.is_empty() && t.by_id.is_empty());
    }
}
