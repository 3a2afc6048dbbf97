//! Datasets: content-addressed manifests, which manifests belong to a dataset, and its version
//! tags.
//!
//! # Tags
//! A dataset `namespace/name` has a tag per semver version (stored in canonical form, `1.2.0`),
//! plus two that this module moves itself:
//! - `latest` names the manifest of the highest version by semver precedence (a pre-release ranks
//!   below its release); it moves on every [`tag`], [`delete_version`] and [`unlink`], and is
//!   absent while the dataset has no version.
//! - `dev` names the manifest most recently [`link`]ed to the dataset (linking an already linked
//!   manifest again moves `dev` back to it). Registering a manifest does not move `dev`: a manifest
//!   belongs to no dataset until it is linked. When the manifest `dev` names is unlinked, `dev` is
//!   gone until the next link.
//!
//! A version names one manifest for good: tagging it again with the same manifest is a no-op, with
//! another one a `Conflict` (delete the version first).
//!
//! Operations that move `latest` lock the dataset's `dataset_manifests` rows (`FOR NO KEY UPDATE`,
//! which foreign key checks do not wait for) so that concurrent taggers of one dataset take turns.

use std::fmt;
use std::str::FromStr;

use entity::{dataset_manifests, manifest_files, tags};
use sea_orm::sea_query::{Expr, OnConflict, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Select, Set,
    TransactionSession, TransactionTrait, ValidatedDeleteOne,
};
use sha2::{Digest, Sha256};

use super::{Error, Result, validate_dataset};

/// The tag of the highest version.
pub const LATEST: &str = "latest";
/// The tag of the last linked manifest.
pub const DEV: &str = "dev";

/// The hash of a manifest: hex sha256 of its bytes.
pub fn manifest_hash(content: &[u8]) -> String {
    hex::encode(Sha256::digest(content))
}

fn validate_hash(hash: &str) -> Result<()> {
    if is_hash(hash) {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "manifest hash {hash:?} is invalid: use 64 lowercase hex characters"
        )))
    }
}

fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn parse_version(version: &str) -> Result<semver::Version> {
    semver::Version::parse(version).map_err(|e| {
        Error::InvalidInput(format!(
            "version {version:?} is not a semantic version like 1.2.3 ({e}); `latest` and `dev` \
             are managed by ampd"
        ))
    })
}

/// Registers manifest `content` of `kind`, stored at `path`, and returns its hash. Registering the
/// same bytes again changes nothing (the first kind and path stay) and returns the same hash.
#[tracing::instrument(skip(db, content), fields(len = content.len()), err)]
pub async fn register_manifest<C>(db: &C, kind: &str, content: &[u8], path: &str) -> Result<String>
where
    C: ConnectionTrait,
{
    if kind.is_empty() || path.is_empty() {
        return Err(Error::InvalidInput(
            "a manifest needs a non-empty kind and path".into(),
        ));
    }
    let hash = manifest_hash(content);
    manifest_files::Entity::insert(manifest_files::ActiveModel {
        hash: Set(hash.clone()),
        kind: Set(kind.to_owned()),
        path: Set(path.to_owned()),
        ..Default::default()
    })
    .on_conflict_do_nothing()
    .exec(db)
    .await?;
    Ok(hash)
}

/// The manifest `hash`, if registered.
pub async fn get_manifest<C>(db: &C, hash: &str) -> Result<Option<manifest_files::Model>>
where
    C: ConnectionTrait,
{
    Ok(manifest_files::Entity::find_by_id(hash.to_owned())
        .one(db)
        .await?)
}

/// Links manifest `hash` to dataset `namespace/name` (a no-op if it is linked) and moves the
/// dataset's `dev` tag to it. `NotFound` for an unregistered manifest.
#[tracing::instrument(skip(db), err)]
pub async fn link<C>(db: &C, namespace: &str, name: &str, hash: &str) -> Result<()>
where
    C: ConnectionTrait + TransactionTrait,
{
    validate_dataset(namespace, name)?;
    validate_hash(hash)?;
    let tx = db.begin().await?;
    dataset_manifests::Entity::insert(dataset_manifests::ActiveModel {
        namespace: Set(namespace.to_owned()),
        name: Set(name.to_owned()),
        hash: Set(hash.to_owned()),
        ..Default::default()
    })
    .on_conflict_do_nothing()
    .exec(&tx)
    .await
    .map_err(|e| Error::from(e).missing_if("dataset_manifests_hash_fkey", "manifest", hash))?;
    upsert_tag(&tx, namespace, name, DEV, hash).await?;
    tx.commit().await?;
    Ok(())
}

/// Points tag `version` of the dataset at `hash`, creating it or moving it.
async fn upsert_tag<C>(db: &C, namespace: &str, name: &str, version: &str, hash: &str) -> Result<()>
where
    C: ConnectionTrait,
{
    tags::Entity::insert(tags::ActiveModel {
        namespace: Set(namespace.to_owned()),
        name: Set(name.to_owned()),
        version: Set(version.to_owned()),
        hash: Set(hash.to_owned()),
        ..Default::default()
    })
    .on_conflict(
        OnConflict::columns([
            tags::Column::Namespace,
            tags::Column::Name,
            tags::Column::Version,
        ])
        .update_column(tags::Column::Hash)
        .value(tags::Column::UpdatedAt, Expr::current_timestamp())
        .to_owned(),
    )
    .exec(db)
    .await?;
    Ok(())
}

/// Opens the transaction of a write that may move `latest` ([`tag`], [`delete_version`],
/// [`unlink`]) and locks the dataset's links in it, so that whoever moves `latest` next waits for
/// this transaction. [`commit_moving_latest`] ends it.
async fn begin_locked<C>(db: &C, namespace: &str, name: &str) -> Result<C::Transaction>
where
    C: TransactionTrait,
{
    let tx = db.begin().await?;
    dataset_manifests::Entity::find()
        .filter(dataset_manifests::Column::Namespace.eq(namespace))
        .filter(dataset_manifests::Column::Name.eq(name))
        .order_by_asc(dataset_manifests::Column::Hash)
        .lock(sea_orm::sea_query::LockType::NoKeyUpdate)
        .all(&tx)
        .await?;
    Ok(tx)
}

/// Moves `latest` to the highest version and commits a transaction of [`begin_locked`].
async fn commit_moving_latest<T>(tx: T, namespace: &str, name: &str) -> Result<()>
where
    T: ConnectionTrait + TransactionSession,
{
    update_latest(&tx, namespace, name).await?;
    tx.commit().await?;
    Ok(())
}

/// Runs `delete` (of a row of dataset `namespace/name`) with the dataset locked and moves `latest`;
/// `missing()` when it deleted nothing.
async fn delete_moving_latest<C, E>(
    db: &C,
    namespace: &str,
    name: &str,
    delete: ValidatedDeleteOne<E>,
    missing: impl FnOnce() -> Error,
) -> Result<()>
where
    C: ConnectionTrait + TransactionTrait,
    E: EntityTrait,
{
    let tx = begin_locked(db, namespace, name).await?;
    if delete.exec(&tx).await?.rows_affected == 0 {
        return Err(missing());
    }
    commit_moving_latest(tx, namespace, name).await
}

/// The tags of dataset `namespace/name`, as a query to finish.
fn tags_of(namespace: &str, name: &str) -> Select<tags::Entity> {
    tags::Entity::find()
        .filter(tags::Column::Namespace.eq(namespace))
        .filter(tags::Column::Name.eq(name))
}

/// Points `latest` at the highest version, or removes it when there is none. Call with the dataset
/// locked.
async fn update_latest<C>(db: &C, namespace: &str, name: &str) -> Result<()>
where
    C: ConnectionTrait,
{
    let all = tags_of(namespace, name).all(db).await?;
    let current = all.iter().find(|t| t.version == LATEST).map(|t| &t.hash);
    let highest = all
        .iter()
        .filter_map(|t| {
            semver::Version::parse(&t.version)
                .ok()
                .map(|v| (v, &t.hash))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, hash)| hash);
    match (highest, current) {
        (Some(new), Some(old)) if new == old => {}
        (Some(new), _) => upsert_tag(db, namespace, name, LATEST, new).await?,
        (None, Some(_)) => {
            tags::Entity::delete_many()
                .filter(tags::Column::Namespace.eq(namespace))
                .filter(tags::Column::Name.eq(name))
                .filter(tags::Column::Version.eq(LATEST))
                .exec(db)
                .await?;
        }
        (None, None) => {}
    }
    Ok(())
}

/// Tags manifest `hash` (which must be linked to the dataset) as `version` of `namespace/name`,
/// and moves `latest` if this is now the highest version. `version` is semver (`1.2.3`,
/// `1.0.0-rc.1`), stored in canonical form. Tagging a version with the manifest it already names is
/// a no-op; with another manifest, `Conflict`. `NotFound` when the manifest is not linked.
#[tracing::instrument(skip(db), err)]
pub async fn tag<C>(
    db: &C,
    namespace: &str,
    name: &str,
    version: &str,
    hash: &str,
) -> Result<tags::Model>
where
    C: ConnectionTrait + TransactionTrait,
{
    validate_dataset(namespace, name)?;
    validate_hash(hash)?;
    let version = parse_version(version)?.to_string();
    let tx = begin_locked(db, namespace, name).await?;
    let existing =
        tags::Entity::find_by_id((namespace.to_owned(), name.to_owned(), version.clone()))
            .one(&tx)
            .await?;
    if let Some(existing) = existing {
        if existing.hash == hash {
            return Ok(existing);
        }
        return Err(Error::Conflict(format!(
            "version {version} of {namespace}/{name} already names manifest {}; delete the version \
             to tag another manifest",
            existing.hash
        )));
    }
    let tagged = tags::Entity::insert(tags::ActiveModel {
        namespace: Set(namespace.to_owned()),
        name: Set(name.to_owned()),
        version: Set(version),
        hash: Set(hash.to_owned()),
        ..Default::default()
    })
    .exec_with_returning(&tx)
    .await
    .map_err(|e| {
        Error::from(e).missing_if(
            "tags_dataset_manifest_fkey",
            "manifest linked to the dataset",
            format!("{hash} ({namespace}/{name})"),
        )
    })?;
    commit_moving_latest(tx, namespace, name).await?;
    Ok(tagged)
}

/// Deletes version `version` of `namespace/name` (the manifest stays linked) and moves `latest` to
/// the highest remaining version. `NotFound` when there is no such version.
#[tracing::instrument(skip(db), err)]
pub async fn delete_version<C>(db: &C, namespace: &str, name: &str, version: &str) -> Result<()>
where
    C: ConnectionTrait + TransactionTrait,
{
    validate_dataset(namespace, name)?;
    let version = parse_version(version)?.to_string();
    let delete =
        tags::Entity::delete_by_id((namespace.to_owned(), name.to_owned(), version.clone()));
    delete_moving_latest(db, namespace, name, delete, || {
        Error::not_found("version", format!("{namespace}/{name}@{version}"))
    })
    .await
}

/// Unlinks manifest `hash` from `namespace/name`; its tags (versions, and `dev` if it named it) go
/// with it and `latest` moves to the highest remaining version. `NotFound` when it is not linked.
#[tracing::instrument(skip(db), err)]
pub async fn unlink<C>(db: &C, namespace: &str, name: &str, hash: &str) -> Result<()>
where
    C: ConnectionTrait + TransactionTrait,
{
    validate_dataset(namespace, name)?;
    validate_hash(hash)?;
    let delete = dataset_manifests::Entity::delete_by_id((
        namespace.to_owned(),
        name.to_owned(),
        hash.to_owned(),
    ));
    delete_moving_latest(db, namespace, name, delete, || {
        Error::not_found(
            "manifest linked to the dataset",
            format!("{hash} ({namespace}/{name})"),
        )
    })
    .await
}

/// Deletes manifest `hash` (and, by cascade, the physical tables built from it). `Conflict` while
/// it is linked to any dataset (unlink it first); `NotFound` when it is not registered.
#[tracing::instrument(skip(db), err)]
pub async fn delete_manifest<C>(db: &C, hash: &str) -> Result<()>
where
    C: ConnectionTrait + TransactionTrait,
{
    let tx = db.begin().await?;
    // FOR UPDATE makes a concurrent `link` (whose foreign key check needs FOR KEY SHARE on this
    // row) wait for us, so no link appears between the check below and the delete.
    let manifest = manifest_files::Entity::find_by_id(hash.to_owned())
        .lock_exclusive()
        .one(&tx)
        .await?;
    if manifest.is_none() {
        return Err(Error::not_found("manifest", hash));
    }
    let links = dataset_manifests::Entity::find()
        .filter(dataset_manifests::Column::Hash.eq(hash))
        .order_by_asc(dataset_manifests::Column::Namespace)
        .order_by_asc(dataset_manifests::Column::Name)
        .all(&tx)
        .await?;
    if !links.is_empty() {
        let datasets = links
            .iter()
            .map(|l| format!("{}/{}", l.namespace, l.name))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(Error::Conflict(format!(
            "manifest {hash} is linked to {datasets}; unlink it first"
        )));
    }
    manifest_files::Entity::delete_by_id(hash.to_owned())
        .exec(&tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Which manifest of a dataset a [`Reference`] names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Revision {
    /// A semver version tag.
    Version(semver::Version),
    /// The highest version.
    Latest,
    /// The last linked manifest.
    Dev,
    /// A manifest hash (64 lowercase hex characters), which must be linked to the dataset.
    Hash(String),
}

/// `namespace/name@version`, `namespace/name@latest`, `namespace/name@dev` or
/// `namespace/name@<64-hex hash>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// Dataset namespace.
    pub namespace: String,
    /// Dataset name.
    pub name: String,
    /// Which manifest.
    pub revision: Revision,
}

impl FromStr for Reference {
    type Err = Error;

    fn from_str(s: &str) -> Result<Reference> {
        let invalid = |why: &str| {
            Error::InvalidInput(format!(
                "dataset reference {s:?} {why}: use namespace/name@version, @latest, @dev or \
                 @<manifest hash>"
            ))
        };
        let (dataset, revision) = s.split_once('@').ok_or_else(|| invalid("has no '@'"))?;
        let (namespace, name) = dataset
            .split_once('/')
            .ok_or_else(|| invalid("has no '/'"))?;
        validate_dataset(namespace, name)?;
        let revision = match revision {
            LATEST => Revision::Latest,
            DEV => Revision::Dev,
            hash if is_hash(hash) => Revision::Hash(hash.to_owned()),
            version => Revision::Version(
                semver::Version::parse(version)
                    .map_err(|_| invalid("names neither a version, latest, dev nor a hash"))?,
            ),
        };
        Ok(Reference {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            revision,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@", self.namespace, self.name)?;
        match &self.revision {
            Revision::Version(v) => write!(f, "{v}"),
            Revision::Latest => f.write_str(LATEST),
            Revision::Dev => f.write_str(DEV),
            Revision::Hash(h) => f.write_str(h),
        }
    }
}

/// The manifest a reference (`namespace/name@version|latest|dev|<hash>`) names. `InvalidInput`
/// when it does not parse; `NotFound` when the dataset has no such version or manifest.
#[tracing::instrument(skip(db), err)]
pub async fn resolve<C>(db: &C, reference: &str) -> Result<manifest_files::Model>
where
    C: ConnectionTrait,
{
    let parsed: Reference = reference.parse()?;
    let hashes = match &parsed.revision {
        Revision::Hash(hash) => Query::select()
            .column(dataset_manifests::Column::Hash)
            .from(dataset_manifests::Entity)
            .and_where(dataset_manifests::Column::Namespace.eq(&parsed.namespace))
            .and_where(dataset_manifests::Column::Name.eq(&parsed.name))
            .and_where(dataset_manifests::Column::Hash.eq(hash))
            .to_owned(),
        revision => {
            let version = match revision {
                Revision::Version(v) => v.to_string(),
                Revision::Dev => DEV.to_owned(),
                _ => LATEST.to_owned(),
            };
            Query::select()
                .column(tags::Column::Hash)
                .from(tags::Entity)
                .and_where(tags::Column::Namespace.eq(&parsed.namespace))
                .and_where(tags::Column::Name.eq(&parsed.name))
                .and_where(tags::Column::Version.eq(version))
                .to_owned()
        }
    };
    manifest_files::Entity::find()
        .filter(manifest_files::Column::Hash.in_subquery(hashes))
        .one(db)
        .await?
        .ok_or_else(|| Error::not_found("dataset manifest", parsed))
}

/// A dataset: a namespace and a name with at least one linked manifest.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dataset {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// Every dataset with a linked manifest, by namespace and name.
pub async fn list_datasets<C>(db: &C) -> Result<Vec<Dataset>>
where
    C: ConnectionTrait,
{
    let rows: Vec<(String, String)> = dataset_manifests::Entity::find()
        .select_only()
        .column(dataset_manifests::Column::Namespace)
        .column(dataset_manifests::Column::Name)
        .distinct()
        .order_by_asc(dataset_manifests::Column::Namespace)
        .order_by_asc(dataset_manifests::Column::Name)
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(namespace, name)| Dataset { namespace, name })
        .collect())
}

/// Whether dataset `namespace/name` exists: whether a manifest is linked to it.
pub async fn exists<C>(db: &C, namespace: &str, name: &str) -> Result<bool>
where
    C: ConnectionTrait,
{
    Ok(dataset_manifests::Entity::find()
        .filter(dataset_manifests::Column::Namespace.eq(namespace))
        .filter(dataset_manifests::Column::Name.eq(name))
        .one(db)
        .await?
        .is_some())
}

/// The semver version tags of `namespace/name`, lowest to highest (without `latest` and `dev`).
pub async fn list_versions<C>(db: &C, namespace: &str, name: &str) -> Result<Vec<tags::Model>>
where
    C: ConnectionTrait,
{
    let all = tags_of(namespace, name).all(db).await?;
    let mut versions: Vec<(semver::Version, tags::Model)> = all
        .into_iter()
        .filter_map(|t| semver::Version::parse(&t.version).ok().map(|v| (v, t)))
        .collect();
    versions.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(versions.into_iter().map(|(_, t)| t).collect())
}

/// The tags of `namespace/name`, versions and `latest`/`dev` alike, by version name.
pub async fn list_tags<C>(db: &C, namespace: &str, name: &str) -> Result<Vec<tags::Model>>
where
    C: ConnectionTrait,
{
    Ok(tags_of(namespace, name)
        .order_by_asc(tags::Column::Version)
        .all(db)
        .await?)
}
