//! API keys and the audit log.

use super::*;

pub async fn api_keys_are_shown_once_stored_hashed_and_checked(db: &dyn TestDatabase) {
    use sea_orm::EntityTrait;
    let store = db.store();
    let issued = store.create_api_key("ci", Role::Operator, None).await.expect("create");
    let secret = issued.expose_secret().to_owned();
    let parsed = ParsedApiKey::parse(&secret).expect("an issued key has the documented shape");
    assert_eq!(parsed.key_id(), issued.key.key_id);
    assert!(!format!("{issued:?}").contains(&secret), "Debug never shows the secret");
    match store.check_api_key(&parsed, chrono::Utc::now()).await.expect("check") {
        KeyCheck::Valid(key) => assert_eq!((key.name.as_str(), key.role), ("ci", Role::Operator)),
        other => panic!("a fresh key is valid, got {other:?}"),
    }
    // Only a hash is stored: the secret is nowhere in the row.
    let rows = crate::entity::api_keys::Entity::find().all(store.connection()).await.expect("rows");
    assert_eq!(rows.len(), 1);
    assert_ne!(rows[0].secret_hash, secret);
    assert!(!rows[0].secret_hash.contains(&secret[secret.len() - 64..]));
    // The same id with another secret, and an unknown id, are both unknown.
    let mut forged = secret.clone();
    let last = if forged.ends_with('0') { "1" } else { "0" };
    forged.replace_range(forged.len() - 1.., last);
    let forged = ParsedApiKey::parse(&forged).expect("shape");
    assert_eq!(store.check_api_key(&forged, chrono::Utc::now()).await.expect("check"), KeyCheck::Unknown);
    let other = format!("fpk_{}_{}", "0".repeat(16), "0".repeat(64));
    let other = ParsedApiKey::parse(&other).expect("shape");
    assert_eq!(store.check_api_key(&other, chrono::Utc::now()).await.expect("check"), KeyCheck::Unknown);
    // Names are unique; a second key gets a different id and secret.
    let error = store.create_api_key("ci", Role::Viewer, None).await.expect_err("duplicate name");
    assert!(matches!(error, Error::Conflict(_)) && error.to_string().contains("\"ci\""), "{error}");
    let error = store.create_api_key("bad name", Role::Viewer, None).await.expect_err("bad name");
    assert!(matches!(error, Error::Invalid(_)), "{error}");
    let second = store.create_api_key("grafana", Role::Viewer, None).await.expect("create");
    assert_ne!(second.key.key_id, issued.key.key_id);
    assert_ne!(second.expose_secret(), secret);
    let names: Vec<(String, Role)> =
        store.list_api_keys().await.expect("list").into_iter().map(|k| (k.name, k.role)).collect();
    assert_eq!(names, vec![("ci".to_owned(), Role::Operator), ("grafana".to_owned(), Role::Viewer)]);
}

pub async fn expired_and_revoked_api_keys_are_refused(db: &dyn TestDatabase) {
    let store = db.store();
    let now = chrono::Utc::now();
    let error = store.create_api_key("old", Role::Admin, Some(now - chrono::Duration::seconds(1))).await;
    assert!(matches!(error, Err(Error::Invalid(_))), "an expiry in the past is refused");
    let expiring =
        store.create_api_key("expiring", Role::Admin, Some(now + chrono::Duration::hours(1))).await.expect("create");
    let parsed = ParsedApiKey::parse(expiring.expose_secret()).expect("shape");
    assert!(matches!(store.check_api_key(&parsed, now).await.expect("check"), KeyCheck::Valid(_)));
    let later = now + chrono::Duration::hours(2);
    assert!(matches!(store.check_api_key(&parsed, later).await.expect("check"), KeyCheck::Expired(_)));

    let revoked = store.create_api_key("leaked", Role::Operator, None).await.expect("create");
    let parsed = ParsedApiKey::parse(revoked.expose_secret()).expect("shape");
    let first = store.revoke_api_key("leaked").await.expect("revoke");
    let revoked_at = first.revoked_at.expect("revoked");
    assert!(matches!(store.check_api_key(&parsed, chrono::Utc::now()).await.expect("check"), KeyCheck::Revoked(_)));
    tokio::time::sleep(Duration::from_millis(5)).await;
    let again = store.revoke_api_key("leaked").await.expect("revoking again is harmless");
    assert_eq!(again.revoked_at, Some(revoked_at), "the first revocation time stays");
    let error = store.revoke_api_key("nobody").await.expect_err("unknown name");
    assert!(matches!(error, Error::NotFound { what: "API key", .. }), "{error}");
}

pub async fn the_audit_log_pages_filters_and_refuses_rewrites(db: &dyn TestDatabase) {
    use sea_orm::ConnectionTrait;
    let store = db.store();
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    let entry = |i: u16, rollout_id: Option<Uuid>| NewAuditEntry {
        at: chrono::Utc::now(),
        actor: format!("actor-{i}"),
        actor_kind: if i.is_multiple_of(2) { ActorKind::ApiKey } else { ActorKind::Jwt },
        role: Role::Operator,
        method: "POST".into(),
        route: "/v1/rollouts/{id}/pause".into(),
        rollout_id,
        source: "127.0.0.1:5000".into(),
        status: 200 + i,
    };
    let mut ids = Vec::new();
    for i in 0..5u16 {
        let rollout = match i {
            0 | 2 | 4 => Some(first),
            1 => Some(second),
            _ => None,
        };
        ids.push(store.append_audit(entry(i, rollout)).await.expect("append"));
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids grow: {ids:?}");
    let all = store.audit_entries(AuditQuery { limit: 100, ..Default::default() }).await.expect("read");
    assert_eq!(all.iter().map(|e| e.status).collect::<Vec<_>>(), vec![204, 203, 202, 201, 200], "newest first");
    assert_eq!(all[4].actor, "actor-0");
    assert_eq!(all[4].actor_kind, ActorKind::ApiKey);
    assert_eq!(all[3].actor_kind, ActorKind::Jwt);
    assert_eq!(all[4].route, "/v1/rollouts/{id}/pause");
    assert_eq!(all[4].source, "127.0.0.1:5000");
    let of_first = store
        .audit_entries(AuditQuery { rollout_id: Some(first), limit: 2, ..Default::default() })
        .await
        .expect("page 1");
    assert_eq!(of_first.iter().map(|e| e.status).collect::<Vec<_>>(), vec![204, 202]);
    let next = store
        .audit_entries(AuditQuery { rollout_id: Some(first), before: Some(of_first[1].id), limit: 2 })
        .await
        .expect("page 2");
    assert_eq!(next.iter().map(|e| e.status).collect::<Vec<_>>(), vec![200]);
    // Append-only, whatever issues the statement.
    for statement in ["UPDATE audit_log SET actor = 'someone else'", "DELETE FROM audit_log"] {
        let error = store.connection().execute_unprepared(statement).await.expect_err(statement);
        assert!(error.to_string().contains("append-only"), "{statement}: {error}");
    }
    assert_eq!(store.audit_entries(AuditQuery { limit: 100, ..Default::default() }).await.expect("read"), all);
}
