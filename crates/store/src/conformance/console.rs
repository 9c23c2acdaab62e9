//! The console's reads: targets filtered and paged in SQL, failures grouped
//! by reason, a target's state changes paged.

use super::*;

pub async fn console_reads_filter_and_page_targets_group_failures_and_page_a_timeline(db: &dyn TestDatabase) {
    let store = db.store();
    let mut spec = Spec::new(30, 1, 30);
    spec.waves = vec![WaveSpec::new("canary", Some(10), 100.0), WaveSpec::new("rest", None, 100.0)];
    let id = create(store, spec).await;
    let page = |filter: TargetFilter, after: Option<u32>, limit: u64| async move {
        store.targets_page(id, &filter, after, limit).await.expect("targets_page")
    };
    let hosts = |targets: &[Target]| targets.iter().map(|t| t.host.clone()).collect::<Vec<_>>();

    // Keyset paging in dispatch order: pages neither overlap nor skip.
    let first = page(TargetFilter::default(), None, 12).await;
    let second = page(TargetFilter::default(), first.last().map(|t| t.ordinal), 12).await;
    let third = page(TargetFilter::default(), second.last().map(|t| t.ordinal), 12).await;
    assert_eq!((first.len(), second.len(), third.len()), (12, 12, 6));
    let all: Vec<String> = [first, second, third].iter().flat_map(|p| hosts(p)).collect();
    assert_eq!(all, (0..30).map(|i| format!("host-{i:04}")).collect::<Vec<_>>());

    // Each filter narrows, and they combine.
    let wave_one = page(TargetFilter { wave: Some(1), ..Default::default() }, None, 100).await;
    assert_eq!(wave_one.len(), 20);
    assert!(wave_one.iter().all(|t| t.wave == 1));
    let site = TargetFilter { label: Some(("site".into(), "s1".into())), ..Default::default() };
    let s1 = page(site.clone(), None, 100).await;
    assert_eq!(s1.len(), 10, "every third host is in site s1");
    assert!(s1.iter().all(|t| t.labels.get("site").map(String::as_str) == Some("s1")));
    let combined = page(TargetFilter { wave: Some(0), ..site }, None, 100).await;
    assert_eq!(hosts(&combined), ["host-0001", "host-0004", "host-0007"]);
    let unknown_label = TargetFilter { label: Some(("rack".into(), "s1".into())), ..Default::default() };
    assert!(page(unknown_label, None, 100).await.is_empty());
    let search = TargetFilter { host_contains: Some("HOST-002".into()), ..Default::default() };
    assert_eq!(hosts(&page(search, None, 100).await), (20..30).map(|i| format!("host-{i:04}")).collect::<Vec<_>>());
    let wildcard = TargetFilter { host_contains: Some("%".into()), ..Default::default() };
    assert!(page(wildcard, None, 100).await.is_empty(), "a LIKE wildcard in a search is a plain character");

    // Failures grouped by reason, the most frequent first.
    let queued = store.dispatch(id).await.expect("dispatch");
    assert!(queued.dispatched >= 5, "dispatch queued targets");
    let targets = in_state(store, id, TargetState::Queued).await;
    for (target, reason) in targets.iter().take(5).zip(["disk full", "disk full", "no route", "disk full", "no route"])
    {
        assert!(store.fail_target(target, reason, false).await.expect("fail_target"));
    }
    let failed = TargetFilter { state: Some(TargetState::Failed), ..Default::default() };
    assert_eq!(page(failed, None, 100).await.len(), 5);
    let reasons = store.failure_reasons(id, 10).await.expect("failure_reasons");
    assert_eq!(
        reasons,
        vec![
            FailureReason { reason: Some("disk full".into()), targets: 3 },
            FailureReason { reason: Some("no route".into()), targets: 2 },
        ]
    );
    assert_eq!(store.failure_reasons(id, 1).await.expect("failure_reasons").len(), 1);

    // A target's state changes, paged by entry.
    let target = &targets[0];
    let moves = store.transitions_page(target.id, None, 100).await.expect("transitions_page");
    let everything = store.transitions(target.id).await.expect("transitions");
    assert_eq!(moves.iter().map(|m| m.transition.clone()).collect::<Vec<_>>(), everything);
    assert!(moves.len() >= 2, "queued, then failed");
    let first = store.transitions_page(target.id, None, 1).await.expect("first page");
    let rest = store.transitions_page(target.id, first.last().map(|m| m.id), 100).await.expect("next page");
    assert_eq!(first.len() + rest.len(), moves.len());
    assert_eq!(rest.first().map(|m| m.id), moves.get(1).map(|m| m.id));
}
