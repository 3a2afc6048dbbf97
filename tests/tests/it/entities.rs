//! Every entity round-trips a row against the migrated schema; the database enforces statuses.

use chrono::{DateTime, FixedOffset, TimeZone, Utc};
use entity::{
    JobStatus, dataset_manifests, file_metadata, gc_manifest, job_events, jobs, manifest_files,
    physical_table_revisions, physical_tables, tags, workers,
};
use sea_orm::{ActiveModelTrait, DatabaseConnection, EntityTrait, IntoActiveModel};
use serde_json::json;
use tests::TestDb;

/// A timestamp PostgreSQL stores exactly (microseconds) in a non-UTC offset, to show the offset
/// survives as the same instant.
fn instant(seconds: i64) -> DateTime<FixedOffset> {
    FixedOffset::east_opt(2 * 3600)
        .expect("offset")
        .timestamp_opt(1_790_000_000 + seconds, 123_456_000)
        .single()
        .expect("timestamp")
}

const HASH: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

#[tokio::test]
async fn every_entity_round_trips_a_row() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;

    let worker = workers::Model {
        id: 7,
        node_id: "worker-1.a_b".into(),
        info: json!({"version": "1.2.3", "commit": "abc", "build_date": "2026-11-01"}),
        heartbeat_at: instant(1),
        created_at: instant(0),
        registered_at: instant(0),
        claim_epoch: 3,
    };
    let inserted = worker
        .clone()
        .into_active_model()
        .insert(&conn)
        .await
        .expect("insert");
    assert_eq!(inserted, worker);
    let read = workers::Entity::find_by_id(7)
        .one(&conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read, worker);
    assert_eq!(
        read.heartbeat_at.with_timezone(&Utc),
        worker.heartbeat_at.with_timezone(&Utc)
    );

    let job = jobs::Model {
        id: 11,
        kind: "materialize-static".into(),
        node_id: Some(worker.node_id.clone()),
        status: JobStatus::StopRequested.to_string(),
        descriptor: json!({"namespace": "eth", "name": "blocks", "manifest_hash": HASH}),
        detail: Some(json!({"error": "boom", "nested": [1, 2, {"x": null}]})),
        attempt: 3,
        created_at: instant(2),
        updated_at: instant(3),
        idempotency_key: "ab".repeat(32),
        claim_epoch: Some(3),
    };
    assert_eq!(
        job.clone()
            .into_active_model()
            .insert(&conn)
            .await
            .expect("insert"),
        job
    );
    let read = jobs::Entity::find_by_id(11)
        .one(&conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read, job);
    assert_eq!(read.job_status(), Ok(JobStatus::StopRequested));

    let event = job_events::Model {
        id: 5,
        job_id: job.id,
        node_id: None,
        event_type: JobStatus::Scheduled.to_string(),
        detail: Some(job.descriptor.clone()),
        created_at: instant(4),
    };
    assert_eq!(
        event
            .clone()
            .into_active_model()
            .insert(&conn)
            .await
            .expect("insert"),
        event
    );
    assert_eq!(
        job_events::Entity::find_by_id(5).one(&conn).await.unwrap(),
        Some(event)
    );

    let manifest = manifest_files::Model {
        hash: HASH.into(),
        kind: "evm-rpc".into(),
        path: "manifests/0f1e.json".into(),
        created_at: instant(5),
    };
    assert_eq!(
        manifest
            .clone()
            .into_active_model()
            .insert(&conn)
            .await
            .expect("insert"),
        manifest
    );
    assert_eq!(
        manifest_files::Entity::find_by_id(HASH.to_owned())
            .one(&conn)
            .await
            .unwrap(),
        Some(manifest.clone())
    );

    let link = dataset_manifests::Model {
        namespace: "eth".into(),
        name: "blocks".into(),
        hash: HASH.into(),
        created_at: instant(6),
    };
    assert_eq!(
        link.clone()
            .into_active_model()
            .insert(&conn)
            .await
            .expect("insert"),
        link
    );
    assert_eq!(
        dataset_manifests::Entity::find_by_id((
            "eth".to_owned(),
            "blocks".to_owned(),
            HASH.to_owned()
        ))
        .one(&conn)
        .await
        .unwrap(),
        Some(link)
    );

    let tag = tags::Model {
        namespace: "eth".into(),
        name: "blocks".into(),
        version: "1.0.0".into(),
        hash: HASH.into(),
        created_at: instant(7),
        updated_at: instant(8),
    };
    assert_eq!(
        tag.clone()
            .into_active_model()
            .insert(&conn)
            .await
            .expect("insert"),
        tag
    );
    assert_eq!(
        tags::Entity::find_by_id(("eth".to_owned(), "blocks".to_owned(), "1.0.0".to_owned()))
            .one(&conn)
            .await
            .unwrap(),
        Some(tag)
    );

    let table = physical_tables::Model {
        id: 21,
        dataset_namespace: "eth".into(),
        dataset_name: "blocks".into(),
        manifest_hash: HASH.into(),
        table_name: "blocks".into(),
        active_revision_id: None,
        created_at: instant(9),
        updated_at: instant(10),
    };
    assert_eq!(
        table
            .clone()
            .into_active_model()
            .insert(&conn)
            .await
            .expect("insert"),
        table
    );

    let revision = physical_table_revisions::Model {
        id: 31,
        physical_table_id: table.id,
        path: "eth/blocks/blocks/01934b1c-7c2a-7def-8000-000000000001".into(),
        writer: Some(job.id),
        metadata: json!({"rows": 1000, "format": "parquet"}),
        created_at: instant(11),
        updated_at: instant(12),
    };
    assert_eq!(
        revision
            .clone()
            .into_active_model()
            .insert(&conn)
            .await
            .expect("insert"),
        revision
    );
    assert_eq!(
        physical_table_revisions::Entity::find_by_id(31)
            .one(&conn)
            .await
            .unwrap(),
        Some(revision.clone())
    );

    let mut active = table.clone().into_active_model();
    active.active_revision_id = sea_orm::Set(Some(revision.id));
    let updated = active.update(&conn).await.expect("activate");
    assert_eq!(updated.active_revision_id, Some(31));
    assert_eq!(
        physical_tables::Entity::find_by_id(21)
            .one(&conn)
            .await
            .unwrap(),
        Some(updated)
    );

    let file = file_metadata::Model {
        id: 41,
        revision_id: revision.id,
        file_name: "00000001.parquet".into(),
        object_size: 9_876_543_210,
        object_e_tag: Some("\"etag-1\"".into()),
        object_version: None,
        metadata: json!({"row_count": 1000, "checksum": "sha256:00"}),
        created_at: instant(13),
    };
    assert_eq!(
        file.clone()
            .into_active_model()
            .insert(&conn)
            .await
            .expect("insert"),
        file
    );
    assert_eq!(
        file_metadata::Entity::find_by_id(41)
            .one(&conn)
            .await
            .unwrap(),
        Some(file.clone())
    );

    let gc = gc_manifest::Model {
        file_id: file.id,
        revision_id: revision.id,
        file_path: "eth/blocks/blocks/x/00000001.parquet".into(),
        expiration: instant(14),
    };
    assert_eq!(
        gc.clone()
            .into_active_model()
            .insert(&conn)
            .await
            .expect("insert"),
        gc
    );
    assert_eq!(
        gc_manifest::Entity::find_by_id(41)
            .one(&conn)
            .await
            .unwrap(),
        Some(gc)
    );
}

async fn insert_job(
    conn: &DatabaseConnection,
    status: &str,
) -> Result<jobs::Model, sea_orm::DbErr> {
    jobs::ActiveModel {
        kind: sea_orm::Set("materialize-static".into()),
        status: sea_orm::Set(status.into()),
        descriptor: sea_orm::Set(json!({})),
        idempotency_key: sea_orm::Set(format!("key-{status}")),
        ..Default::default()
    }
    .insert(conn)
    .await
}

#[tokio::test]
async fn a_status_outside_the_allowed_set_is_rejected_by_the_database() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    for status in JobStatus::ALL {
        insert_job(&conn, status.as_str())
            .await
            .expect("a known status is accepted");
    }
    for bad in ["running", "PAUSED", ""] {
        let err = insert_job(&conn, bad)
            .await
            .expect_err("unknown status is rejected");
        assert!(
            err.to_string().contains("jobs_status_check"),
            "{bad:?}: {err}"
        );
    }

    let duplicate = insert_job(&conn, "SCHEDULED")
        .await
        .expect_err("duplicate key");
    assert!(
        duplicate.to_string().contains("jobs_idempotency_key_key"),
        "{duplicate}"
    );

    let event = job_events::ActiveModel {
        job_id: sea_orm::Set(1),
        event_type: sea_orm::Set("DONE".into()),
        ..Default::default()
    }
    .insert(&conn)
    .await
    .expect_err("unknown event type is rejected");
    assert!(
        event.to_string().contains("job_events_event_type_check"),
        "{event}"
    );
}

#[tokio::test]
async fn defaults_of_the_schema_fill_omitted_columns() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let before = Utc::now();
    let job = jobs::ActiveModel {
        kind: sea_orm::Set("materialize-static".into()),
        descriptor: sea_orm::Set(json!({"namespace": "eth"})),
        idempotency_key: sea_orm::Set("k".into()),
        ..Default::default()
    }
    .insert(&conn)
    .await
    .expect("insert with defaults");
    assert_eq!(job.status, "SCHEDULED");
    assert_eq!(job.attempt, 0);
    assert_eq!(job.detail, None);
    assert!(job.created_at.with_timezone(&Utc) >= before - chrono::Duration::seconds(5));

    let worker = workers::ActiveModel {
        node_id: sea_orm::Set("w1".into()),
        ..Default::default()
    }
    .insert(&conn)
    .await
    .expect("insert worker with defaults");
    assert_eq!(worker.info, json!({}));
    assert_eq!(worker.created_at, worker.registered_at);
}
