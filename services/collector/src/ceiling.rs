//! The HTTP ceiling, for `fleetpatch bench`: the collector's own server
//! stack (axum on hyper, the same route, body limit and protobuf decoding)
//! answering every report request at once with its acknowledgement, with
//! nothing stored. What a load generator gets out of it on a machine is the
//! most requests per second any collector could accept there; the real
//! collector's rate is reported as a fraction of it.
//!
//! With a token key it also authenticates every request as the collector
//! does (header, clock window, the target's signing key from a cache, MAC
//! over the body, replay cache), so the bench can put the MAC's CPU per
//! request next to the collector's CPU per report. Its targets' tokens are
//! derived with [`BARE_TOKEN_NONCE`] and attempt 1.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use fleetpatch_proto::limits::{MAX_REPORTS_PER_BATCH, MAX_REPORT_BODY_BYTES};
use fleetpatch_proto::report_auth::{self, Authorization, SigningKey};
use fleetpatch_proto::v1;
use fleetpatch_proto::Message;
use fleetpatch_runtime::tokens::TokenKey;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{Error, ReplayCache, ReplayVerdict};

/// The nonce the bare server derives its targets' tokens with.
pub const BARE_TOKEN_NONCE: &str = "bare-server";
/// The clock window of the bare server's checks (the collector's default).
const BARE_MAX_SKEW_MS: i64 = 300_000;

/// What the bare server checks when it authenticates.
struct Verifier {
    token_key: TokenKey,
    keys: Mutex<HashMap<Uuid, SigningKey>>,
    replays: Mutex<ReplayCache>,
}

/// A running bare server; it stops when `stop` is cancelled.
pub struct BareServer {
    pub local_addr: SocketAddr,
    pub stop: CancellationToken,
    pub join: tokio::task::JoinHandle<Result<(), Error>>,
}

/// Serves `POST /v1/targets/{target_id}/reports` on `listen`: the body is
/// read and decoded as a `ReportBatch`, and the answer is the `ReportAck`
/// the collector would give for it (every report accepted). A body that is
/// not a batch gets 400, as from the collector.
pub async fn serve_bare(listen: &str, verify_with: Option<TokenKey>) -> Result<BareServer, Error> {
    let listener = fleetpatch_runtime::ops::bind(listen).await?;
    let local_addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let verifier = verify_with.map(|token_key| {
        Arc::new(Verifier { token_key, keys: Mutex::default(), replays: Mutex::new(ReplayCache::new(10_000_000)) })
    });
    let app = Router::new().route("/v1/targets/{target_id}/reports", post(acknowledge)).with_state(verifier);
    let join = tokio::spawn({
        let stop = stop.clone();
        async move {
            let options = fleetpatch_runtime::http::ServerOptions::default();
            fleetpatch_runtime::http::serve(listener, app, options, stop.cancelled_owned()).await?;
            Ok(())
        }
    });
    Ok(BareServer { local_addr, stop, join })
}

async fn acknowledge(
    State(verifier): State<Option<Arc<Verifier>>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let authorization = match &verifier {
        None => None,
        Some(verifier) => match verifier.authorize(&headers) {
            Ok(authorization) => Some(authorization),
            Err(status) => return status.into_response(),
        },
    };
    let Ok(bytes) = axum::body::to_bytes(body, MAX_REPORT_BODY_BYTES).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    if let (Some(verifier), Some(authorization)) = (&verifier, authorization) {
        if let Err(status) = verifier.verify(&authorization, uri.path(), &bytes) {
            return status.into_response();
        }
    }
    match v1::ReportBatch::decode(bytes) {
        Ok(batch) if !batch.reports.is_empty() && batch.reports.len() <= MAX_REPORTS_PER_BATCH => {
            let highest_seq = batch.reports.iter().map(|r| r.seq).max().unwrap_or(0);
            let ack = v1::ReportAck { accepted: batch.reports.len() as u64, duplicates: 0, highest_seq };
            ([(header::CONTENT_TYPE, "application/x-protobuf")], ack.encode_to_vec()).into_response()
        }
        _ => StatusCode::BAD_REQUEST.into_response(),
    }
}

impl Verifier {
    /// What the collector checks before it reads the body.
    fn authorize(&self, headers: &HeaderMap) -> Result<(Authorization, SigningKey), StatusCode> {
        let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).ok_or(StatusCode::UNAUTHORIZED)?;
        let authorization = Authorization::parse(value).map_err(|_| StatusCode::UNAUTHORIZED)?;
        let now_ms = chrono::Utc::now().timestamp_millis();
        report_auth::check_clock(authorization.timestamp_ms, now_ms, BARE_MAX_SKEW_MS)
            .map_err(|_| StatusCode::UNAUTHORIZED)?;
        let mut keys = self.keys.lock().expect("key cache lock");
        let key = keys
            .entry(authorization.target_id)
            .or_insert_with(|| {
                let token =
                    report_auth::derive_token(self.token_key.as_bytes(), authorization.target_id, 1, BARE_TOKEN_NONCE);
                SigningKey::from_token(&token)
            })
            .clone();
        Ok((authorization, key))
    }

    /// What the collector checks once it has the body.
    fn verify(
        &self,
        (authorization, key): &(Authorization, SigningKey),
        path: &str,
        body: &[u8],
    ) -> Result<(), StatusCode> {
        key.verify(&authorization.request("POST", path, body), &authorization.mac)
            .map_err(|_| StatusCode::UNAUTHORIZED)?;
        let now_ms = chrono::Utc::now().timestamp_millis();
        let forget_at = authorization.timestamp_ms.saturating_add(BARE_MAX_SKEW_MS);
        match self.replays.lock().expect("replay cache lock").check_and_insert(
            authorization.target_id,
            authorization.nonce,
            forget_at,
            now_ms,
        ) {
            ReplayVerdict::Fresh => Ok(()),
            ReplayVerdict::Replayed => Err(StatusCode::UNAUTHORIZED),
            ReplayVerdict::Full => Err(StatusCode::SERVICE_UNAVAILABLE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn post(addr: SocketAddr, body: Vec<u8>) -> (u16, Vec<u8>) {
        post_as(addr, Uuid::new_v4(), None, body).await
    }

    async fn post_as(addr: SocketAddr, target: Uuid, authorization: Option<&str>, body: Vec<u8>) -> (u16, Vec<u8>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let authorization = authorization.map(|value| format!("authorization: {value}\r\n")).unwrap_or_default();
        let head = format!(
            "POST /v1/targets/{target}/reports HTTP/1.1\r\nhost: bench\r\ncontent-type: application/x-protobuf\r\n\
             {authorization}content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.expect("write");
        stream.write_all(&body).await.expect("write");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.expect("read");
        let text = String::from_utf8_lossy(&answer);
        let status = text[9..12].parse().expect("status");
        let split = answer.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
        (status, answer[split..].to_vec())
    }

    #[tokio::test]
    async fn the_bare_server_acknowledges_every_report_and_refuses_what_is_not_a_batch() {
        let server = serve_bare("127.0.0.1:0", None).await.expect("serve");
        let report = |seq| v1::AgentReport {
            seq,
            sent_at_unix_ms: 1,
            agent_instance: 1,
            kind: Some(v1::agent_report::Kind::Heartbeat(v1::Heartbeat { patch_index: None })),
        };
        let batch = v1::ReportBatch { reports: vec![report(4), report(9), report(7)] }.encode_to_vec();
        let (status, body) = post(server.local_addr, batch).await;
        assert_eq!(status, 200);
        let ack = v1::ReportAck::decode(body.as_slice()).expect("an ack");
        assert_eq!(ack, v1::ReportAck { accepted: 3, duplicates: 0, highest_seq: 9 });
        let (status, _) = post(server.local_addr, vec![0xff, 0xff, 0xff]).await;
        assert_eq!(status, 400);
        let (status, _) = post(server.local_addr, v1::ReportBatch { reports: vec![] }.encode_to_vec()).await;
        assert_eq!(status, 400);
        server.stop.cancel();
        server.join.await.expect("join").expect("served");
    }

    #[tokio::test]
    async fn the_verifying_bare_server_checks_macs_and_replays_as_the_collector_does() {
        let token_key = TokenKey::random();
        let server = serve_bare("127.0.0.1:0", Some(token_key.clone())).await.expect("serve");
        let target = Uuid::new_v4();
        let key = SigningKey::from_token(&report_auth::derive_token(token_key.as_bytes(), target, 1, BARE_TOKEN_NONCE));
        let body = v1::ReportBatch {
            reports: vec![v1::AgentReport {
                seq: 1,
                sent_at_unix_ms: 1,
                agent_instance: 1,
                kind: Some(v1::agent_report::Kind::Heartbeat(v1::Heartbeat { patch_index: None })),
            }],
        }
        .encode_to_vec();
        let path = format!("/v1/targets/{target}/reports");
        let now = chrono::Utc::now().timestamp_millis();
        let signed = key.authorization(&report_auth::SignedRequest::new("POST", &path, target, 1, now, [7; 16], &body));
        assert_eq!(post_as(server.local_addr, target, Some(&signed), body.clone()).await.0, 200);
        assert_eq!(post_as(server.local_addr, target, Some(&signed), body.clone()).await.0, 401, "replayed");
        assert_eq!(post_as(server.local_addr, target, None, body.clone()).await.0, 401, "unsigned");
        let other = key.authorization(&report_auth::SignedRequest::new("POST", &path, target, 1, now, [8; 16], b"x"));
        assert_eq!(post_as(server.local_addr, target, Some(&other), body).await.0, 401, "another body");
        server.stop.cancel();
        server.join.await.expect("join").expect("served");
    }
}
