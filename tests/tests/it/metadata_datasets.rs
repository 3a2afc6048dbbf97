//! `metadata::datasets`: content-addressed manifests, links, semver tags, `latest` and `dev`.

use ampd::metadata::Error;
use ampd::metadata::datasets::{self, Reference, Revision};
use entity::manifest_files;
use sea_orm::{DatabaseConnection, EntityTrait, PaginatorTrait};
use sha2::{Digest, Sha256};
use tests::TestDb;

async fn manifest(db: &DatabaseConnection, content: &str) -> String {
    datasets::register_manifest(db, "static", content.as_bytes(), &format!("{content}.json"))
        .await
        .expect("register manifest")
}

async fn resolve(db: &DatabaseConnection, reference: &str) -> String {
    datasets::resolve(db, reference)
        .await
        .unwrap_or_else(|e| panic!("{reference}: {e}"))
        .hash
}

async fn tag(db: &DatabaseConnection, version: &str, hash: &str) {
    datasets::tag(db, "eth", "blocks", version, hash)
        .await
        .unwrap_or_else(|e| panic!("tag {version}: {e}"));
}

/// Registers and links one manifest per content, in order.
async fn linked(db: &DatabaseConnection, contents: &[&str]) -> Vec<String> {
    let mut hashes = Vec::new();
    for content in contents {
        let hash = manifest(db, content).await;
        datasets::link(db, "eth", "blocks", &hash).await.unwrap();
        hashes.push(hash);
    }
    hashes
}

#[tokio::test]
async fn register_manifest_returns_the_sha256_of_its_bytes_and_registers_them_once() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let content = br#"{"kind":"static","tables":{}}"#;

    let hash = datasets::register_manifest(&conn, "static", content, "a.json")
        .await
        .unwrap();
    let again = datasets::register_manifest(&conn, "static", content, "b.json")
        .await
        .unwrap();

    assert_eq!(hash, hex::encode(Sha256::digest(content)));
    assert_eq!(again, hash);
    assert_eq!(
        manifest_files::Entity::find().count(&conn).await.unwrap(),
        1
    );
    let stored = datasets::get_manifest(&conn, &hash).await.unwrap().unwrap();
    assert_eq!(
        stored.path, "a.json",
        "the second registration changed nothing"
    );
}

#[tokio::test]
async fn link_refuses_invalid_names_and_hashes() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let hash = manifest(&conn, "m1").await;
    for (namespace, name) in [
        ("Eth", "blocks"),
        ("1eth", "blocks"),
        ("eth", "bl-ocks"),
        ("", "x"),
    ] {
        let err = datasets::link(&conn, namespace, name, &hash)
            .await
            .expect_err("invalid name");
        assert!(
            matches!(err, Error::InvalidInput(_)),
            "{namespace}/{name}: {err:?}"
        );
    }
    let err = datasets::link(&conn, "eth", "blocks", "not-a-hash")
        .await
        .expect_err("malformed hash");
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    datasets::link(&conn, "eth_2", "blocks_v1", &hash)
        .await
        .expect("valid names");
}

#[tokio::test]
async fn link_needs_a_registered_manifest() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let unknown = "b".repeat(64);
    let err = datasets::link(&conn, "eth", "blocks", &unknown)
        .await
        .expect_err("unregistered manifest");
    assert!(
        matches!(&err, Error::NotFound { entity: "manifest", key } if *key == unknown),
        "{err:?}"
    );
}

#[tokio::test]
async fn latest_follows_the_highest_semver_version_when_versions_come_out_of_order() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let m = linked(&conn, &["m0", "m1", "m2", "m3", "m4"]).await;

    tag(&conn, "1.0.0", &m[0]).await;
    assert_eq!(resolve(&conn, "eth/blocks@latest").await, m[0]);
    tag(&conn, "10.0.0", &m[1]).await;
    assert_eq!(resolve(&conn, "eth/blocks@latest").await, m[1]);
    tag(&conn, "9.0.0", &m[2]).await;
    assert_eq!(
        resolve(&conn, "eth/blocks@latest").await,
        m[1],
        "semver order, not text order: 10.0.0 > 9.0.0"
    );
    tag(&conn, "10.0.1-rc.1", &m[3]).await;
    assert_eq!(
        resolve(&conn, "eth/blocks@latest").await,
        m[3],
        "10.0.1-rc.1 > 10.0.0"
    );
    tag(&conn, "10.0.1", &m[4]).await;
    assert_eq!(resolve(&conn, "eth/blocks@latest").await, m[4]);

    let versions: Vec<String> = datasets::list_versions(&conn, "eth", "blocks")
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.version)
        .collect();
    assert_eq!(
        versions,
        ["1.0.0", "9.0.0", "10.0.0", "10.0.1-rc.1", "10.0.1"]
    );
}

#[tokio::test]
async fn latest_moves_back_to_the_highest_remaining_version_after_delete_version() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let m = linked(&conn, &["m0", "m1", "m2"]).await;
    tag(&conn, "2.0.0", &m[2]).await;
    tag(&conn, "1.0.0", &m[0]).await;
    tag(&conn, "1.1.0", &m[1]).await;
    assert_eq!(resolve(&conn, "eth/blocks@latest").await, m[2]);

    datasets::delete_version(&conn, "eth", "blocks", "2.0.0")
        .await
        .unwrap();
    assert_eq!(resolve(&conn, "eth/blocks@latest").await, m[1]);
    datasets::delete_version(&conn, "eth", "blocks", "1.0.0")
        .await
        .unwrap();
    assert_eq!(resolve(&conn, "eth/blocks@latest").await, m[1], "unchanged");
    datasets::delete_version(&conn, "eth", "blocks", "1.1.0")
        .await
        .unwrap();
    let err = datasets::resolve(&conn, "eth/blocks@latest")
        .await
        .expect_err("no version left, no latest");
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");

    let err = datasets::delete_version(&conn, "eth", "blocks", "1.1.0")
        .await
        .expect_err("already deleted");
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    let err = datasets::delete_version(&conn, "eth", "blocks", "latest")
        .await
        .expect_err("latest is not a version");
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
}

#[tokio::test]
async fn dev_follows_the_last_linked_manifest() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let m = linked(&conn, &["m0", "m1"]).await;
    assert_eq!(resolve(&conn, "eth/blocks@dev").await, m[1]);

    let unlinked = manifest(&conn, "m2").await;
    assert_eq!(
        resolve(&conn, "eth/blocks@dev").await,
        m[1],
        "registering alone does not move dev"
    );
    datasets::link(&conn, "eth", "blocks", &unlinked)
        .await
        .unwrap();
    assert_eq!(resolve(&conn, "eth/blocks@dev").await, unlinked);

    datasets::link(&conn, "eth", "blocks", &m[0]).await.unwrap();
    assert_eq!(
        resolve(&conn, "eth/blocks@dev").await,
        m[0],
        "linking again moves dev back"
    );
    tag(&conn, "1.0.0", &m[1]).await;
    assert_eq!(
        resolve(&conn, "eth/blocks@dev").await,
        m[0],
        "tagging does not move dev"
    );
}

#[tokio::test]
async fn tag_takes_semver_versions_of_linked_manifests_and_never_moves_a_version() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let m = linked(&conn, &["m0", "m1"]).await;
    for bad in ["latest", "dev", "1.0", "v1.0.0", ""] {
        let err = datasets::tag(&conn, "eth", "blocks", bad, &m[0])
            .await
            .expect_err(bad);
        assert!(matches!(err, Error::InvalidInput(_)), "{bad:?}: {err:?}");
    }
    let stray = manifest(&conn, "stray").await;
    let err = datasets::tag(&conn, "eth", "blocks", "1.0.0", &stray)
        .await
        .expect_err("not linked to eth/blocks");
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");

    let first = datasets::tag(&conn, "eth", "blocks", "1.0.0", &m[0])
        .await
        .unwrap();
    let again = datasets::tag(&conn, "eth", "blocks", "1.0.0", &m[0])
        .await
        .expect("same manifest: no-op");
    assert_eq!(again, first);
    let err = datasets::tag(&conn, "eth", "blocks", "1.0.0", &m[1])
        .await
        .expect_err("a version names one manifest");
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    assert_eq!(resolve(&conn, "eth/blocks@1.0.0").await, m[0]);
}

#[tokio::test]
async fn concurrent_tags_of_one_dataset_leave_latest_on_the_highest_version() {
    let db = TestDb::migrated().await;
    let conn = tests::connect(db.url(), 8).await;
    let contents: Vec<String> = (0..8).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = contents.iter().map(String::as_str).collect();
    let m = linked(&conn, &refs).await;
    let mut tasks = Vec::new();
    for (i, hash) in m.iter().enumerate() {
        let conn = conn.clone();
        let hash = hash.clone();
        tasks.push(tokio::spawn(async move {
            datasets::tag(&conn, "eth", "blocks", &format!("1.{i}.0"), &hash).await
        }));
    }
    for task in tasks {
        task.await.expect("task").expect("tag");
    }
    assert_eq!(resolve(&conn, "eth/blocks@latest").await, m[7]);
}

#[tokio::test]
async fn resolve_parses_every_form_of_reference() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let m = linked(&conn, &["m0", "m1"]).await;
    tag(&conn, "1.0.0", &m[0]).await;

    assert_eq!(resolve(&conn, "eth/blocks@1.0.0").await, m[0]);
    assert_eq!(resolve(&conn, "eth/blocks@latest").await, m[0]);
    assert_eq!(resolve(&conn, "eth/blocks@dev").await, m[1]);
    assert_eq!(resolve(&conn, &format!("eth/blocks@{}", m[1])).await, m[1]);

    let parsed: Reference = "eth/blocks@1.2.3-rc.1".parse().unwrap();
    assert_eq!(
        parsed.revision,
        Revision::Version(semver::Version::parse("1.2.3-rc.1").unwrap())
    );
    assert_eq!(parsed.to_string(), "eth/blocks@1.2.3-rc.1");

    for bad in [
        "eth/blocks",
        "eth@1.0.0",
        "Eth/blocks@1.0.0",
        "eth/blocks@1.0",
        "eth/blocks@",
        "eth/blocks@ABCDEF",
        "",
    ] {
        let err = datasets::resolve(&conn, bad).await.expect_err(bad);
        assert!(matches!(err, Error::InvalidInput(_)), "{bad:?}: {err:?}");
    }
    for missing in [
        "eth/blocks@2.0.0".to_owned(),
        "eth/other@latest".to_owned(),
        format!("eth/other@{}", m[0]),
        format!("eth/blocks@{}", "c".repeat(64)),
    ] {
        let err = datasets::resolve(&conn, &missing)
            .await
            .expect_err(&missing);
        assert!(matches!(err, Error::NotFound { .. }), "{missing}: {err:?}");
    }
}

#[tokio::test]
async fn list_datasets_lists_each_linked_dataset_once() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let a = manifest(&conn, "a").await;
    let b = manifest(&conn, "b").await;
    datasets::link(&conn, "eth", "logs", &a).await.unwrap();
    datasets::link(&conn, "eth", "blocks", &a).await.unwrap();
    datasets::link(&conn, "eth", "blocks", &b).await.unwrap();
    datasets::link(&conn, "base", "blocks", &b).await.unwrap();

    let names: Vec<String> = datasets::list_datasets(&conn)
        .await
        .unwrap()
        .into_iter()
        .map(|d| format!("{}/{}", d.namespace, d.name))
        .collect();
    assert_eq!(names, ["base/blocks", "eth/blocks", "eth/logs"]);
}

#[tokio::test]
async fn delete_manifest_is_refused_while_linked_and_works_once_unlinked() {
    let db = TestDb::migrated().await;
    let conn = db.connect().await;
    let m = linked(&conn, &["m0", "m1"]).await;
    tag(&conn, "1.0.0", &m[0]).await;
    tag(&conn, "2.0.0", &m[1]).await;

    let err = datasets::delete_manifest(&conn, &m[1])
        .await
        .expect_err("linked");
    assert!(
        matches!(&err, Error::Conflict(msg) if msg.contains("eth/blocks")),
        "{err:?}"
    );
    assert!(
        datasets::get_manifest(&conn, &m[1])
            .await
            .unwrap()
            .is_some()
    );

    datasets::unlink(&conn, "eth", "blocks", &m[1])
        .await
        .unwrap();
    assert_eq!(
        resolve(&conn, "eth/blocks@latest").await,
        m[0],
        "its versions went with the link"
    );
    assert!(datasets::resolve(&conn, "eth/blocks@dev").await.is_err());
    datasets::delete_manifest(&conn, &m[1])
        .await
        .expect("unlinked");
    assert!(
        datasets::get_manifest(&conn, &m[1])
            .await
            .unwrap()
            .is_none()
    );

    let err = datasets::delete_manifest(&conn, &m[1])
        .await
        .expect_err("gone");
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
}
