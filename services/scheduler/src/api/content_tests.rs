//! `GET /v1/content/{sha256}` through the real router and server, on
//! SQLite: who may read, whole and ranged downloads, and the refusals.

use axum::http::StatusCode;
use sha2::Digest;

use super::test_api::start_api;

#[tokio::test]
async fn a_viewer_downloads_content_whole_or_by_range() {
    let api = start_api(crate::api::InputPolicy::default()).await;
    let http = reqwest::Client::new();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let sha256 = hex::encode(sha2::Sha256::digest(&data));
    let url = format!("{}/v1/content/{sha256}", api.url);
    let uploaded = http.put(&url).bearer_auth(&api.operator_key).body(data.clone()).send().await.unwrap();
    assert_eq!(uploaded.status(), StatusCode::CREATED);

    let get = |range: Option<&'static str>| {
        let mut request = http.get(&url).bearer_auth(&api.viewer_key);
        if let Some(range) = range {
            request = request.header("range", range);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            let header =
                |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
            let headers = (header("content-length"), header("content-range"), header("accept-ranges"));
            let transfer_encoding = header("transfer-encoding");
            assert_eq!(transfer_encoding, "", "a length, not chunks");
            (status, headers, response.bytes().await.unwrap().to_vec())
        }
    };
    let (status, (length, _, accept_ranges), body) = get(None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((length.as_str(), accept_ranges.as_str()), ("200000", "bytes"));
    assert!(body == data, "the whole installer");

    let (status, (length, content_range, _), body) = get(Some("bytes=100000-")).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!((length.as_str(), content_range.as_str()), ("100000", "bytes 100000-199999/200000"));
    assert!(body == data[100_000..], "the rest, for a resumed download");
    let (status, (_, content_range, _), body) = get(Some("bytes=10-19")).await;
    assert_eq!((status, content_range.as_str()), (StatusCode::PARTIAL_CONTENT, "bytes 10-19/200000"));
    assert_eq!(body, &data[10..20]);
    let (status, (_, content_range, _), _) = get(Some("bytes=200000-")).await;
    assert_eq!((status, content_range.as_str()), (StatusCode::RANGE_NOT_SATISFIABLE, "bytes */200000"));
    api.stop.trigger();
}

#[tokio::test]
async fn content_needs_a_credential_a_sha256_and_an_upload() {
    let api = start_api(crate::api::InputPolicy::default()).await;
    let http = reqwest::Client::new();
    let unknown = hex::encode(sha2::Sha256::digest(b"never uploaded"));
    let url = |name: &str| format!("{}/v1/content/{name}", api.url);

    let anonymous = http.get(url(&unknown)).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    let missing = http.get(url(&unknown)).bearer_auth(&api.viewer_key).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(missing.headers()["content-type"], "application/problem+json");
    let problem: serde_json::Value = missing.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("upload it first (PUT /v1/content/"), "{problem}");

    let bad = http.get(url(&unknown.to_uppercase())).bearer_auth(&api.viewer_key).send().await.unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let problem: serde_json::Value = bad.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("is not a sha256"), "{problem}");
    api.stop.trigger();
}
