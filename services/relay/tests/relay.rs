//! The relay over HTTP, against a small upstream of the test's own
//! (`support::TestUpstream`) that counts what it is asked.

mod support;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use support::{bytes_on_disk, client, eventually, files, header, object, sha256, TestRelay, TestUpstream};

#[tokio::test]
async fn a_miss_is_fetched_once_then_served_from_the_cache() {
    let upstream = TestUpstream::start().await;
    let cache = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(&upstream.url, cache.path(), |_| {}).await;
    let data = object(1, 100_000);
    let sha = upstream.put(&data);

    let (status, headers, body) = relay.get(&sha, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, data);
    assert_eq!(header(&headers, "content-length"), "100000");
    assert_eq!(header(&headers, "transfer-encoding"), "", "a length, not chunks");
    assert_eq!(header(&headers, "accept-ranges"), "bytes");
    assert_eq!(header(&headers, "x-fleetpatch-relay-cache"), "miss");
    let (status, headers, body) = relay.get(&sha, &[]).await;
    assert_eq!((status, body == data), (StatusCode::OK, true));
    assert_eq!(header(&headers, "x-fleetpatch-relay-cache"), "hit");
    assert_eq!(upstream.requests_for(&sha), 1, "fetched once");
    assert_eq!(std::fs::read(cache.path().join(&sha)).unwrap(), data, "kept under its sha256");

    // HEAD: the length, no body; on a miss it fetches (and keeps) the object.
    let other = upstream.put(&object(2, 1_234));
    let response = client().head(relay.content_url(&other)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(response.headers(), "content-length"), "1234");
    assert!(response.bytes().await.unwrap().is_empty());
    assert_eq!(upstream.requests_for(&other), 1);

    let stats = relay.handle.stats();
    assert_eq!((stats.hits, stats.misses, stats.upstream_fetches), (1, 2, 2), "{stats:?}");
    assert_eq!(stats.upstream_bytes, 101_234);
    assert_eq!(stats.served_bytes, 200_000, "HEAD sends no body");
    assert_eq!((stats.cache_bytes, stats.cache_objects), (101_234, 2));
    let metrics = client().get(format!("{}/metrics", relay.url)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("fleetpatch_relay_requests_total{result=\"hit\"}"), "{metrics}");
    assert!(metrics.contains("fleetpatch_relay_upstream_fetches_total{result=\"ok\"}"), "{metrics}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_share_one_upstream_fetch() {
    let upstream = TestUpstream::start().await;
    let cache = tempfile::tempdir().unwrap();
    let relay = std::sync::Arc::new(TestRelay::start(&upstream.url, cache.path(), |_| {}).await);
    let data = object(3, 300_000);
    let sha = upstream.put(&data);
    // The upstream holds its answer until all ten requests wait for it.
    upstream.set_open(false);
    let requests: Vec<_> = (0..10)
        .map(|_| {
            let (relay, sha) = (relay.clone(), sha.clone());
            tokio::spawn(async move { relay.get(&sha, &[]).await })
        })
        .collect();
    eventually("ten requests wait for the upstream", || relay.handle.stats().misses == 10).await;
    upstream.set_open(true);
    for request in requests {
        let (status, _, body) = request.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(body == data, "every request gets the whole object");
    }
    assert_eq!(upstream.requests_for(&sha), 1, "one upstream fetch for ten misses");
    assert_eq!(relay.handle.stats().upstream_fetches, 1);
}

#[tokio::test]
async fn single_ranges_are_served_and_others_refused_or_ignored() {
    let upstream = TestUpstream::start().await;
    let cache = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(&upstream.url, cache.path(), |_| {}).await;
    let data = object(4, 1_000);
    let sha = upstream.put(&data);
    // On a miss: fetched whole, the range served.
    let (status, headers, body) = relay.get(&sha, &[("range", "bytes=10-19")]).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(header(&headers, "content-range"), "bytes 10-19/1000");
    assert_eq!(header(&headers, "content-length"), "10");
    assert_eq!(body, &data[10..20]);
    for (range, expected, content_range) in [
        ("bytes=990-", &data[990..], "bytes 990-999/1000"),
        ("bytes=-5", &data[995..], "bytes 995-999/1000"),
        ("bytes=0-5000", &data[..], "bytes 0-999/1000"),
    ] {
        let (status, headers, body) = relay.get(&sha, &[("range", range)]).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(header(&headers, "content-range"), content_range);
        assert_eq!(body, expected, "{range}");
    }
    let (status, headers, body) = relay.get(&sha, &[("range", "bytes=1000-")]).await;
    assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&headers, "content-range"), "bytes */1000");
    assert!(body.is_empty());
    let (status, headers, body) = relay.get(&sha, &[("range", "bytes=0-1,5-6")]).await;
    assert_eq!(status, StatusCode::OK, "several ranges: the whole object");
    assert_eq!((header(&headers, "content-length"), body == data), ("1000", true));
    assert_eq!(upstream.requests_for(&sha), 1);
    relay.stop().await;
}

#[tokio::test]
async fn a_name_that_is_not_a_sha256_is_refused() {
    let upstream = TestUpstream::start().await;
    let cache = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(&upstream.url, cache.path(), |_| {}).await;
    let upper = sha256(b"x").to_uppercase();
    for name in ["abc", upper.as_str(), &"a".repeat(65), "..%2f..%2fetc%2fpasswd"] {
        let (status, headers, body) = relay.get(name, &[]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}");
        assert_eq!(header(&headers, "content-type"), "application/problem+json");
        let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(problem["detail"].as_str().unwrap().contains("is not a sha256"), "{problem}");
    }
    assert!(upstream.seen().is_empty(), "nothing reaches the upstream");
    assert_eq!(relay.handle.stats().bad_requests, 4);
    relay.stop().await;
}

#[tokio::test]
async fn content_that_does_not_match_is_refused_and_not_cached() {
    let upstream = TestUpstream::start().await;
    let cache = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(&upstream.url, cache.path(), |_| {}).await;
    let data = object(5, 5_000);
    let sha = upstream.put(&data);
    upstream.set_corrupt(true);
    let (status, _, body) = relay.get(&sha, &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let detail = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["detail"].as_str().unwrap().to_owned();
    let mut corrupted = data.clone();
    corrupted[0] ^= 0xff;
    assert!(detail.contains(&sha) && detail.contains(&sha256(&corrupted)), "{detail}");
    assert!(detail.contains(&upstream.url), "names the upstream: {detail}");
    // Asked twice, the second time with no-cache (a parent relay would heal its copy).
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!((seen[0].cache_control.as_deref(), seen[1].cache_control.as_deref()), (None, Some("no-cache")));
    assert!(files(cache.path()).is_empty(), "nothing cached, no temporary file left");
    let stats = relay.handle.stats();
    assert_eq!((stats.upstream_mismatches, stats.upstream_errors, stats.cache_objects), (2, 1, 0));
    // Not remembered as bad: once the upstream is right, it is served.
    upstream.set_corrupt(false);
    let (status, _, body) = relay.get(&sha, &[]).await;
    assert_eq!((status, body == data), (StatusCode::OK, true));
    relay.stop().await;
}

#[tokio::test]
async fn unknown_content_is_not_found() {
    let upstream = TestUpstream::start().await;
    let cache = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(&upstream.url, cache.path(), |_| {}).await;
    let (status, headers, body) = relay.get(&sha256(b"nobody has this"), &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(header(&headers, "content-type"), "application/problem+json");
    assert!(String::from_utf8_lossy(&body).contains("has no content"));
    assert_eq!(relay.handle.stats().not_found, 1);
    relay.stop().await;
}

#[tokio::test]
async fn a_relay_whose_upstream_is_down_still_serves_its_cache() {
    let mut upstream = TestUpstream::start().await;
    let cache = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(&upstream.url, cache.path(), |_| {}).await;
    let cached = object(6, 2_000);
    let cached_sha = upstream.put(&cached);
    let missing_sha = upstream.put(&object(7, 2_000));
    assert_eq!(relay.get(&cached_sha, &[]).await.0, StatusCode::OK);
    upstream.stop().await;

    let (status, _, body) = relay.get(&cached_sha, &[]).await;
    assert_eq!((status, body == cached), (StatusCode::OK, true));
    let (status, _, body) = relay.get(&missing_sha, &[]).await;
    assert!(status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::BAD_GATEWAY, "{status}");
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(problem["detail"].as_str().unwrap().contains(&upstream.url), "names the upstream: {problem}");
    assert_eq!(relay.handle.stats().upstream_errors, 1);
    // Readiness does not follow the upstream.
    let ready = client().get(format!("{}/readyz", relay.url)).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    relay.stop().await;
}

#[tokio::test]
async fn readiness_follows_the_cache_directory() {
    let upstream = TestUpstream::start().await;
    let parent = tempfile::tempdir().unwrap();
    let cache = parent.path().join("cache");
    let relay = TestRelay::start(&upstream.url, &cache, |_| {}).await;
    let readyz = || async { client().get(format!("{}/readyz", relay.url)).send().await.unwrap() };
    assert_eq!(readyz().await.status(), StatusCode::OK);
    std::fs::remove_dir_all(&cache).unwrap();
    let response = readyz().await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.text().await.unwrap().contains("cache_dir"));
    relay.stop().await;
}

#[tokio::test]
async fn the_cache_stays_under_its_bound_and_evicts_the_least_recently_used() {
    let upstream = TestUpstream::start().await;
    let cache = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(&upstream.url, cache.path(), |options| options.cache_max_bytes = 3_000).await;
    let objects: Vec<Vec<u8>> = (10..14).map(|seed| object(seed, 1_000)).collect();
    let shas: Vec<String> = objects.iter().map(|data| upstream.put(data)).collect();
    let check_bound = || {
        assert!(bytes_on_disk(cache.path()) <= 3_000, "{:?}", files(cache.path()));
        assert!(relay.handle.stats().cache_bytes <= 3_000);
    };
    for sha in &shas[..3] {
        assert_eq!(relay.get(sha, &[]).await.0, StatusCode::OK);
        check_bound();
    }
    // a is used again: b is now the least recently used.
    assert_eq!(relay.get(&shas[0], &[]).await.0, StatusCode::OK);
    let (status, _, body) = relay.get(&shas[3], &[]).await;
    assert_eq!((status, body == objects[3]), (StatusCode::OK, true));
    check_bound();
    let mut expected = vec![shas[0].clone(), shas[2].clone(), shas[3].clone()];
    expected.sort();
    assert_eq!(files(cache.path()), expected, "b was evicted");
    assert_eq!(relay.handle.stats().evictions, 1);
    // b again: fetched again.
    assert_eq!(relay.get(&shas[1], &[]).await.0, StatusCode::OK);
    assert_eq!(upstream.requests_for(&shas[1]), 2);
    check_bound();

    // Larger than the bound: served whole, never kept, nothing evicted for it.
    let large = object(20, 3_001);
    let large_sha = upstream.put(&large);
    let before = relay.handle.stats();
    for _ in 0..2 {
        let (status, _, body) = relay.get(&large_sha, &[]).await;
        assert_eq!((status, body == large), (StatusCode::OK, true));
    }
    assert_eq!(upstream.requests_for(&large_sha), 2, "not kept: fetched each time");
    assert!(!files(cache.path()).contains(&large_sha));
    assert_eq!(relay.handle.stats().evictions, before.evictions);
    assert_eq!(files(cache.path()).len(), 3, "no temporary file left");
    check_bound();
    relay.stop().await;
}

#[tokio::test]
async fn a_restarted_relay_keeps_its_cache_and_removes_temporary_files() {
    let upstream = TestUpstream::start().await;
    let cache = tempfile::tempdir().unwrap();
    let data = object(30, 4_000);
    let sha = upstream.put(&data);
    let relay = TestRelay::start(&upstream.url, cache.path(), |_| {}).await;
    assert_eq!(relay.get(&sha, &[]).await.0, StatusCode::OK);
    relay.stop().await;

    // What a crash mid-download leaves, and a file that is none of the relay's.
    std::fs::write(cache.path().join(format!(".partial-{sha}-999-0")), &data[..100]).unwrap();
    std::fs::write(cache.path().join("notes.txt"), b"mine").unwrap();
    let relay = TestRelay::start(&upstream.url, cache.path(), |_| {}).await;
    assert_eq!((relay.handle.stats().cache_objects, relay.handle.stats().cache_bytes), (1, 4_000));
    assert_eq!(files(cache.path()), vec![sha.clone(), "notes.txt".to_owned()]);
    let (status, headers, body) = relay.get(&sha, &[]).await;
    assert_eq!((status, body == data), (StatusCode::OK, true));
    assert_eq!(header(&headers, "x-fleetpatch-relay-cache"), "hit");
    assert_eq!(upstream.requests_for(&sha), 1, "served from the cache it found");
    relay.stop().await;
}

#[tokio::test]
async fn no_cache_hashes_the_cached_copy_again_and_heals_a_corrupt_one() {
    let upstream = TestUpstream::start().await;
    let cache = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(&upstream.url, cache.path(), |_| {}).await;
    let data = object(40, 10_000);
    let sha = upstream.put(&data);
    assert_eq!(relay.get(&sha, &[]).await.0, StatusCode::OK);
    // An intact copy: checked, served, not fetched again.
    let (status, _, body) = relay.get(&sha, &[("cache-control", "no-cache")]).await;
    assert_eq!((status, body == data), (StatusCode::OK, true));
    assert_eq!(upstream.requests_for(&sha), 1);

    // The disk rots: a plain request gets the rotten bytes (the agent's check catches them) ...
    let mut rotten = data.clone();
    rotten[5_000] ^= 0x01;
    std::fs::write(cache.path().join(&sha), &rotten).unwrap();
    let (_, _, body) = relay.get(&sha, &[]).await;
    assert!(body == rotten, "the relay trusts its cache until asked to check");
    // ... and the agent's no-cache request gets a healed copy.
    let (status, headers, body) = relay.get(&sha, &[("cache-control", "no-cache")]).await;
    assert_eq!((status, body == data), (StatusCode::OK, true));
    assert_eq!(header(&headers, "x-fleetpatch-relay-cache"), "miss");
    assert_eq!(upstream.requests_for(&sha), 2);
    assert_eq!(std::fs::read(cache.path().join(&sha)).unwrap(), data, "healed on disk");
    let stats = relay.handle.stats();
    assert_eq!((stats.revalidations, stats.revalidations_corrupt), (2, 1));
    assert_eq!(stats.cache_bytes, 10_000);
    relay.stop().await;
}

#[tokio::test]
async fn relays_cascade_and_the_origin_is_fetched_once() {
    let upstream = TestUpstream::start().await;
    let (cache_a, cache_b, cache_c) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let parent = TestRelay::start(&upstream.url, cache_a.path(), |_| {}).await;
    let site_b = TestRelay::start(&parent.url, cache_b.path(), |_| {}).await;
    let site_c = TestRelay::start(&format!("{}/", parent.url), cache_c.path(), |_| {}).await;
    let data = object(50, 50_000);
    let sha = upstream.put(&data);
    for relay in [&site_b, &site_b, &site_c] {
        let (status, _, body) = relay.get(&sha, &[]).await;
        assert_eq!((status, body == data), (StatusCode::OK, true));
    }
    assert_eq!(upstream.requests_for(&sha), 1, "the origin sends it once");
    assert_eq!(parent.handle.stats().upstream_fetches, 1);
    assert_eq!((parent.handle.stats().misses, parent.handle.stats().hits), (1, 1));
    assert_eq!((site_b.handle.stats().upstream_fetches, site_b.handle.stats().hits), (1, 1));
    assert_eq!(site_c.handle.stats().upstream_fetches, 1);
    // A miss at the parent for unknown content is a 404 all the way down.
    assert_eq!(site_b.get(&sha256(b"unknown"), &[]).await.0, StatusCode::NOT_FOUND);
    for relay in [site_b, site_c, parent] {
        relay.stop().await;
    }
}

#[tokio::test]
async fn the_upstream_key_is_sent_as_a_bearer_credential_from_its_reference() {
    let upstream = TestUpstream::start().await;
    upstream.require_authorization("Bearer fpk_relay_test_key");
    let cache = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let secret = secrets.path().join("relay.key");
    std::fs::write(&secret, "fpk_relay_test_key\n").unwrap();
    let data = object(60, 3_000);
    let sha = upstream.put(&data);
    let reference = format!("file:{}", secret.display());
    let relay = TestRelay::start(&upstream.url, cache.path(), |options| options.upstream_token_ref = reference).await;
    let (status, _, body) = relay.get(&sha, &[]).await;
    assert_eq!((status, body == data), (StatusCode::OK, true));
    assert_eq!(upstream.seen()[0].authorization.as_deref(), Some("Bearer fpk_relay_test_key"));
    relay.stop().await;

    // Without the key: 502 saying which setting to fix, and never the key.
    let cache = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(&upstream.url, cache.path(), |_| {}).await;
    let (status, _, body) = relay.get(&sha, &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("answered 401") && text.contains("relay.upstream_token_ref"), "{text}");
    relay.stop().await;
}

/// A parent relay served over TLS by a CA of the test's own: a relay
/// configured with that CA fetches from it; one that trusts the built-in
/// roots refuses its certificate.
#[tokio::test]
async fn an_https_upstream_is_trusted_through_the_configured_ca_only() {
    let upstream = TestUpstream::start().await;
    let tls = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "fleetpatch relay test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca, &ca_key)
        .unwrap();
    let (cert_file, key_file, ca_file) =
        (tls.path().join("tls.crt"), tls.path().join("tls.key"), tls.path().join("ca.pem"));
    std::fs::write(&cert_file, server.pem()).unwrap();
    std::fs::write(&key_file, server_key.serialize_pem()).unwrap();
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let caches: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let parent = TestRelay::start(&upstream.url, caches[0].path(), |options| {
        options.http.tls = Some(fleetpatch_runtime::http::TlsOptions { cert_file, key_file, reload_check_seconds: 10 })
    })
    .await;
    let https = format!("https://localhost:{}", parent.handle.local_addr.port());
    let data = object(90, 20_000);
    let sha = upstream.put(&data);

    let trusting = TestRelay::start(&https, caches[1].path(), |options| options.upstream_ca_file = Some(ca_file)).await;
    let (status, _, body) = trusting.get(&sha, &[]).await;
    assert_eq!((status, body == data), (StatusCode::OK, true));

    let untrusting = TestRelay::start(&https, caches[2].path(), |_| {}).await;
    let (status, _, body) = untrusting.get(&sha, &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let detail = String::from_utf8_lossy(&body).to_lowercase();
    assert!(detail.contains(&https) && detail.contains("certificate"), "{detail}");
    assert_eq!(parent.handle.stats().served_bytes, 20_000, "only the trusting relay got the content");
    for relay in [untrusting, trusting, parent] {
        relay.stop().await;
    }
}

/// Two downloads at once through a limit of 100,000 B/s: 80,000 bytes in
/// total take about 0.8 s (a per-response limit would take half of that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bandwidth_limit_holds_for_all_responses_together() {
    let upstream = TestUpstream::start().await;
    let cache = tempfile::tempdir().unwrap();
    let relay = std::sync::Arc::new(
        TestRelay::start(&upstream.url, cache.path(), |options| options.max_rate_bytes_per_second = Some(100_000))
            .await,
    );
    let data = object(70, 40_000);
    let sha = upstream.put(&data);
    assert_eq!(relay.get(&sha, &[("range", "bytes=0-0")]).await.0, StatusCode::PARTIAL_CONTENT, "cached first");
    let started = Instant::now();
    let downloads: Vec<_> = (0..2)
        .map(|_| {
            let (relay, sha) = (relay.clone(), sha.clone());
            tokio::spawn(async move { relay.get(&sha, &[]).await })
        })
        .collect();
    for download in downloads {
        assert!(download.await.unwrap().2 == data);
    }
    let elapsed = started.elapsed();
    // (80,000 - one chunk of 6,250 bytes) / 100,000 B/s = 0.74 s at the least.
    assert!(elapsed >= Duration::from_millis(700), "too fast for the limit: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_download_in_flight_finish_then_stops() {
    let upstream = TestUpstream::start().await;
    let cache = tempfile::tempdir().unwrap();
    let relay =
        TestRelay::start(&upstream.url, cache.path(), |options| options.max_rate_bytes_per_second = Some(50_000)).await;
    let data = object(80, 25_000);
    let sha = upstream.put(&data);
    let mut response = client().get(relay.content_url(&sha)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.chunk().await.unwrap().expect("a first chunk").to_vec();
    assert!(body.len() < data.len(), "still sending");

    relay.shutdown.trigger();
    eventually("the relay drains", || relay.health.is_draining()).await;
    while let Some(chunk) = response.chunk().await.expect("the download is not cut") {
        body.extend_from_slice(&chunk);
    }
    assert!(body == data, "the download in flight finished whole");
    let address = relay.handle.local_addr;
    tokio::time::timeout(Duration::from_secs(10), relay.handle.join).await.expect("drained in time").unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(address).await.is_err(), "no longer listening");
}
