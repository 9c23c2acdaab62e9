//! The HTTP ceiling, for `fleetpatch bench`: the collector's own server
//! stack (axum on hyper, the same route, body limit and protobuf decoding)
//! answering every report request at once with its acknowledgement, with no
//! token check and nothing stored. What a load generator gets out of it on a
//! machine is the most requests per second any collector could accept there;
//! the real collector's rate is reported as a fraction of it.

use std::net::SocketAddr;

use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use fleetpatch_proto::limits::{MAX_REPORTS_PER_BATCH, MAX_REPORT_BODY_BYTES};
use fleetpatch_proto::v1;
use fleetpatch_proto::Message;
use tokio_util::sync::CancellationToken;

use crate::Error;

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
pub async fn serve_bare(listen: &str) -> Result<BareServer, Error> {
    let listener = fleetpatch_runtime::ops::bind(listen).await?;
    let local_addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let app = Router::new().route("/v1/targets/{target_id}/reports", post(acknowledge));
    let join = tokio::spawn({
        let stop = stop.clone();
        async move {
            axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await?;
            Ok(())
        }
    });
    Ok(BareServer { local_addr, stop, join })
}

async fn acknowledge(body: Body) -> Response {
    let Ok(bytes) = axum::body::to_bytes(body, MAX_REPORT_BODY_BYTES).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    match v1::ReportBatch::decode(bytes) {
        Ok(batch) if !batch.reports.is_empty() && batch.reports.len() <= MAX_REPORTS_PER_BATCH => {
            let highest_seq = batch.reports.iter().map(|r| r.seq).max().unwrap_or(0);
            let ack = v1::ReportAck { accepted: batch.reports.len() as u64, duplicates: 0, highest_seq };
            ([(header::CONTENT_TYPE, "application/x-protobuf")], ack.encode_to_vec()).into_response()
        }
        _ => StatusCode::BAD_REQUEST.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn post(addr: SocketAddr, body: Vec<u8>) -> (u16, Vec<u8>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "POST /v1/targets/{}/reports HTTP/1.1\r\nhost: bench\r\ncontent-type: application/x-protobuf\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            uuid::Uuid::new_v4(),
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
        let server = serve_bare("127.0.0.1:0").await.expect("serve");
        let report = |seq| v1::AgentReport {
            seq,
            sent_at_unix_ms: 1,
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
}
