//! Upgrading a database that holds data: every row survives every migration after the one it was
//! written under, and data-changing migrations transform it correctly.
//!
//! Data-changing migrations so far: `m20261101_000007_backfill_jobs_idempotency_key`.

use ampd::migrate::{self, MigrationSet};
use entity::{file_metadata, job_events, jobs, manifest_files, physical_table_revisions, workers};
use migration::MigratorTrait;
use sea_orm::{ActiveModelTrait, DatabaseConnection, EntityTrait, NotSet, Set};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tests::TestDb;
use tests::rows;

const BEFORE_BACKFILL: &str = "m20261101_000006_add_jobs_idempotency_key";
const HASH_A: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const HASH_B: &str = "2222222222222222222222222222222222222222222222222222222222222222";

/// The schema's migrations up to and including `last`.
fn migrations_up_to(last: &str) -> MigrationSet {
    let mut migrations = migration::Migrator::migrations();
    let end = migrations
        .iter()
        .position(|m| m.name() == last)
        .expect("known migration");
    migrations.truncate(end + 1);
    MigrationSet::new(migrations, |name| {
        migration::checksum_of(name).map(str::to_owned)
    })
}

/// Every row of every metadata table as JSON, by table, in primary-key order.
async fn all_rows(db: &DatabaseConnection) -> Vec<(String, Vec<Value>)> {
    let tables = [
        ("workers", "id"),
        ("jobs", "id"),
        ("job_events", "id"),
        ("manifest_files", "hash"),
        ("dataset_manifests", "namespace, name, hash"),
        ("tags", "namespace, name, version"),
        ("physical_tables", "id"),
        ("physical_table_revisions", "id"),
        ("file_metadata", "id"),
        ("gc_manifest", "file_id"),
    ];
    let mut out = Vec::new();
    for (table, order) in tables {
        let sql = format!("SELECT row_to_json(t)::text FROM {table} t ORDER BY {order}");
        let rows: Vec<Value> = tests::sql::column::<String>(db, &sql)
            .await
            .iter()
            .map(|text| serde_json::from_str(text).unwrap())
            .collect();
        out.push((table.to_owned(), rows));
    }
    out
}

fn key(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// A job as an old ampd wrote it, returned as (id, node_id). (Inserted without RETURNING: the
/// current model cannot hold the NULL key this version allows.)
async fn job(
    db: &DatabaseConnection,
    kind: &str,
    status: &str,
    node: Option<&str>,
    descriptor: Value,
) -> (i64, Option<String>) {
    let model = jobs::ActiveModel {
        kind: Set(kind.into()),
        status: Set(status.into()),
        node_id: Set(node.map(str::to_owned)),
        descriptor: Set(descriptor),
        attempt: Set(1),
        // The column exists but is still nullable at this version: old ampd did not set it.
        idempotency_key: NotSet,
        ..Default::default()
    };
    let id = jobs::Entity::insert(model)
        .exec(db)
        .await
        .expect("insert job")
        .last_insert_id;
    (id, node.map(str::to_owned))
}

/// Realistic rows in every table, written through the entities.
async fn fill(db: &DatabaseConnection) -> Vec<i64> {
    // Inserted without reading the row back: the schema is older than the entity (its later
    // columns do not exist yet).
    for node in ["worker-a", "worker-b"] {
        workers::Entity::insert(workers::ActiveModel {
            node_id: Set(node.into()),
            info: Set(json!({"version": "0.9.0", "commit": "abc123"})),
            ..Default::default()
        })
        .exec(db)
        .await
        .expect("worker");
    }
    let d = |name: &str, hash: &str| json!({"namespace": "eth", "name": name, "manifest_hash": hash, "options": {"start": 0}});
    // Two jobs for the same work (an older failed attempt and a newer run), and others.
    let old = job(
        db,
        "materialize-static",
        "ERROR",
        Some("worker-a"),
        d("blocks", HASH_A),
    )
    .await;
    let new = job(
        db,
        "materialize-static",
        "RUNNING",
        Some("worker-b"),
        d("blocks", HASH_A),
    )
    .await;
    let other = job(
        db,
        "materialize-static",
        "COMPLETED",
        None,
        d("logs", HASH_B),
    )
    .await;
    let other_kind = job(db, "dump", "SCHEDULED", None, d("blocks", HASH_A)).await;
    let partial = job(
        db,
        "materialize-static",
        "FATAL",
        None,
        json!({"name": "odd"}),
    )
    .await;
    for (j, status) in [
        (&old, "SCHEDULED"),
        (&old, "ERROR"),
        (&new, "SCHEDULED"),
        (&new, "RUNNING"),
    ] {
        job_events::ActiveModel {
            job_id: Set(j.0),
            node_id: Set(j.1.clone()),
            event_type: Set(status.into()),
            detail: Set(Some(json!({"attempt": 1}))),
            ..Default::default()
        }
        .insert(db)
        .await
        .expect("event");
    }
    for hash in [HASH_A, HASH_B] {
        manifest_files::ActiveModel {
            hash: Set(hash.into()),
            kind: Set("evm-rpc".into()),
            path: Set(format!("manifests/{hash}.json")),
            ..Default::default()
        }
        .insert(db)
        .await
        .expect("manifest");
    }
    for (name, hash) in [("blocks", HASH_A), ("logs", HASH_B)] {
        rows::insert_link(db, "eth", name, hash).await;
        for version in ["1.0.0", "latest", "dev"] {
            rows::insert_tag(db, "eth", name, version, hash).await;
        }
    }
    let table = rows::insert_blocks_table(db, HASH_A).await;
    let revision = physical_table_revisions::ActiveModel {
        physical_table_id: Set(table.id),
        path: Set("eth/blocks/blocks/01936f4e-0000-7000-8000-000000000001".into()),
        writer: Set(Some(new.0)),
        metadata: Set(json!({"rows": 12345})),
        ..Default::default()
    }
    .insert(db)
    .await
    .expect("revision");
    rows::set_active(db, table, revision.id).await;
    let file = file_metadata::ActiveModel {
        revision_id: Set(revision.id),
        file_name: Set("000001.parquet".into()),
        object_size: Set(1 << 20),
        object_e_tag: Set(Some("\"e1\"".into())),
        metadata: Set(json!({"row_count": 12345})),
        ..Default::default()
    }
    .insert(db)
    .await
    .expect("file");
    rows::insert_gc_entry(db, &file, "eth/blocks/blocks/x/000001.parquet").await;
    vec![old.0, new.0, other.0, other_kind.0, partial.0]
}

#[tokio::test]
async fn backfill_of_idempotency_keys_keeps_every_row_and_keys_every_job() {
    let db = TestDb::empty().await;
    let config = tests::metadata_config(db.url());

    let report = migrate::migrate(&config, &migrations_up_to(BEFORE_BACKFILL))
        .await
        .expect("migrate to the version before the backfill");
    assert_eq!(report.version.as_deref(), Some(BEFORE_BACKFILL));
    let conn = db.connect().await;
    let ids = fill(&conn).await;
    let before = all_rows(&conn).await;

    let report = migrate::migrate(&config, &MigrationSet::ampd())
        .await
        .expect("migrate to head");
    let applied: Vec<String> = report.applied.iter().map(|a| a.name.clone()).collect();
    let schema = tests::schema_migrations();
    let from_backfill = schema
        .iter()
        .position(|name| name == "m20261101_000007_backfill_jobs_idempotency_key")
        .expect("the backfill is a migration of the schema");
    assert_eq!(
        applied,
        schema[from_backfill..],
        "the backfill and the migrations after it were pending"
    );
    let after = all_rows(&conn).await;

    // Every row survived unchanged, except for the key the backfill adds to jobs (columns added by
    // later migrations are not compared: they did not exist before).
    for ((table, rows_before), (_, rows_after)) in before.iter().zip(&after) {
        assert_eq!(rows_before.len(), rows_after.len(), "{table}: row count");
        for (b, a) in rows_before.iter().zip(rows_after) {
            let mut a = a.clone();
            let mut b = b.clone();
            if let (Some(a), Some(b)) = (a.as_object_mut(), b.as_object()) {
                a.retain(|column, _| b.contains_key(column) || column == "idempotency_key");
            }
            if table == "jobs" {
                assert!(b["idempotency_key"].is_null());
                a.as_object_mut().unwrap().remove("idempotency_key");
                b.as_object_mut().unwrap().remove("idempotency_key");
            }
            assert_eq!(a, b, "{table}: row unchanged");
        }
    }

    // The keys: the newest job of a work item has its plain key, older ones a key of their own.
    let jobs = &after[1].1;
    let key_of = |id: i64| {
        jobs.iter()
            .find(|j| j["id"] == id)
            .and_then(|j| j["idempotency_key"].as_str())
            .expect("keyed")
            .to_owned()
    };
    let [old, new, other, other_kind, partial] = ids[..] else {
        panic!("five jobs")
    };
    let blocks = format!("materialize-static:eth/blocks@{HASH_A}");
    assert_eq!(key_of(new), key(&blocks));
    assert_eq!(key_of(old), key(&format!("{blocks}#{old}")));
    assert_eq!(
        key_of(other),
        key(&format!("materialize-static:eth/logs@{HASH_B}"))
    );
    assert_eq!(
        key_of(other_kind),
        key(&format!("dump:eth/blocks@{HASH_A}"))
    );
    assert_eq!(key_of(partial), key("materialize-static:/odd@"));

    // And the schema now requires a unique key.
    let err = jobs::ActiveModel {
        kind: Set("k".into()),
        descriptor: Set(json!({})),
        idempotency_key: Set(key(&blocks)),
        ..Default::default()
    }
    .insert(&conn)
    .await
    .expect_err("duplicate key refused");
    assert!(
        err.to_string().contains("jobs_idempotency_key_key"),
        "{err}"
    );
}
