//! The download `GET` ([`get_to`]): an installer's body streamed from a
//! relay into a file, resumable, never larger than the plan says.

use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::{connect, exchange, read_chunk_end, read_chunk_size, read_head, Connector, HttpError, HttpUrl, Timeouts};

/// How long a download's socket read waits before the caller's `tick` is
/// called again (stop requests, heartbeats, deadlines).
const DOWNLOAD_POLL: Duration = Duration::from_millis(250);
/// Bytes copied from a download's socket to its file at a time.
const DOWNLOAD_BUFFER_BYTES: usize = 64 * 1024;

/// What a download `GET` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GetRequest {
    /// Bytes the sink already holds: asked for from there on
    /// (`Range: bytes=N-`) when more than 0.
    pub offset: u64,
    /// The whole body's size (the plan's `size`); 0 when unknown. Nothing
    /// beyond it is ever written, whatever the peer announces or sends.
    pub size: u64,
    /// Send `Cache-Control: no-cache` (a relay then re-verifies its copy).
    pub no_cache: bool,
}

/// Where a download's body goes: a file, written in order, and emptied when
/// the answer starts again from the first byte.
pub trait Sink: Write {
    /// Drop everything written so far; the next write is byte 0.
    fn restart(&mut self) -> std::io::Result<()>;
}

impl Sink for std::fs::File {
    fn restart(&mut self) -> std::io::Result<()> {
        self.set_len(0)?;
        self.seek(SeekFrom::Start(0)).map(drop)
    }
}

impl Sink for Vec<u8> {
    fn restart(&mut self) -> std::io::Result<()> {
        self.clear();
        Ok(())
    }
}

/// How a download `GET` that got an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetOutcome {
    /// The body is complete (200, or 206 from the offset): the sink holds
    /// `total` bytes, `received` of them from this answer.
    Complete { status: u16, total: u64, received: u64 },
    /// 404 or 410: this source does not have it.
    NotFound { status: u16 },
    /// 416: the partial content cannot be resumed; the sink was emptied.
    RangeNotSatisfiable,
}

/// Why a download `GET` ended without a complete body. Except for
/// [`GetError::Sink`], worth another try: the sink keeps the bytes written
/// so far (or was emptied, when they cannot be trusted).
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    /// No (complete) answer: connection, timeout, malformed response,
    /// or the caller's `tick` said to end.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// Any status but 200, 206, 404, 410 and 416 (5xx above all).
    #[error("HTTP {0}")]
    Status(u16),
    /// The answer is larger than the plan's size; the sink was emptied.
    #[error("the answer is larger than the {size} bytes the plan gives ({what})")]
    TooLarge { size: u64, what: String },
    /// Writing the sink (the local file) failed.
    #[error("cannot write the download: {0}")]
    Sink(#[source] std::io::Error),
}

impl From<std::io::Error> for GetError {
    fn from(error: std::io::Error) -> Self {
        Self::Http(HttpError::Io(error))
    }
}

/// `GET` a download source and stream the body into `sink`, which already
/// holds `request.offset` bytes of it:
/// * 200: the whole body, written from byte 0 (the sink is emptied first);
/// * 206: the rest, when its `Content-Range` starts at the offset; else the
///   sink is emptied and the try fails (the next one starts from 0);
/// * 404, 410: [`GetOutcome::NotFound`]; 416: the sink is emptied,
///   [`GetOutcome::RangeNotSatisfiable`]; any other status:
///   [`GetError::Status`].
///
/// The body's length comes from `Content-Length` or chunked encoding (an
/// answer with neither is refused), and the sink never grows beyond
/// `request.size` when it is known. `timeouts.io` is how long the peer may
/// send nothing; `tick` is called before every read and at least every
/// 250 ms while waiting: an error from it (a stop, a deadline) ends the
/// request with that error.
pub fn get_to(
    url: &HttpUrl,
    connector: &Connector,
    request: GetRequest,
    timeouts: Timeouts,
    tick: &mut dyn FnMut() -> std::io::Result<()>,
    sink: &mut dyn Sink,
) -> Result<GetOutcome, GetError> {
    tick()?;
    let stream = connect(url, timeouts)?;
    let poll = DOWNLOAD_POLL.min(timeouts.io).max(Duration::from_millis(1));
    stream.set_read_timeout(Some(poll))?;
    stream.set_write_timeout(Some(timeouts.io))?;
    let _ = stream.set_nodelay(true);
    let watched = Watched { stream, tick, stall: timeouts.io, last_read: Instant::now() };
    exchange(url, connector, watched, &get_request_bytes(url, request), |reader| read_download(reader, request, sink))
}

fn get_request_bytes(url: &HttpUrl, request: GetRequest) -> Vec<u8> {
    let mut head = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: fleetpatch-agent/{}\r\n\
         Accept-Encoding: identity\r\n",
        if url.base_path.is_empty() { "/" } else { &url.base_path },
        url.host_header(),
        env!("CARGO_PKG_VERSION"),
    );
    if request.offset > 0 {
        head.push_str(&format!("Range: bytes={}-\r\n", request.offset));
    }
    if request.no_cache {
        head.push_str("Cache-Control: no-cache\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// A download's socket: reads wait at most the poll interval, calling the
/// caller's `tick` between waits, and fail once nothing came for `stall`.
struct Watched<'a> {
    stream: TcpStream,
    tick: &'a mut dyn FnMut() -> std::io::Result<()>,
    stall: Duration,
    last_read: Instant,
}

impl Read for Watched<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        loop {
            (self.tick)()?;
            match self.stream.read(buffer) {
                Ok(read) => {
                    self.last_read = Instant::now();
                    return Ok(read);
                }
                // A read timeout is WouldBlock on Unix, TimedOut on Windows.
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    if self.last_read.elapsed() >= self.stall {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("nothing received for {} s", self.stall.as_secs_f32()),
                        ));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Write for Watched<'_> {
    fn write(&mut self, buffer: &[u8]) -> std::io::Result<usize> {
        self.stream.write(buffer)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`).
fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let (unit, rest) = value.trim().split_once(' ')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let (start, end) = (start.trim().parse::<u64>().ok()?, end.trim().parse::<u64>().ok()?);
    let total = match total.trim() {
        "*" => None,
        total => Some(total.parse::<u64>().ok()?),
    };
    (start <= end && total.is_none_or(|total| end < total)).then_some((start, end, total))
}

/// Read a download's answer into `sink` (see [`get_to`]); exposed to the
/// unit tests through any `BufRead`.
fn read_download(reader: &mut dyn BufRead, request: GetRequest, sink: &mut dyn Sink) -> Result<GetOutcome, GetError> {
    let head = read_head(reader)?;
    let size = request.size;
    let malformed = |message: String| GetError::Http(HttpError::Malformed(message));
    let restart = |sink: &mut dyn Sink| sink.restart().map_err(GetError::Sink);
    let (start, length) = match head.status {
        200 => {
            restart(sink)?;
            (0, head.content_length)
        }
        206 => {
            let value = head.content_range.as_deref().unwrap_or_default();
            let (start, end, total) = parse_content_range(value)
                .ok_or_else(|| malformed(format!("206 answer with Content-Range {value:?}")))?;
            if start != request.offset {
                restart(sink)?;
                if start != 0 {
                    return Err(malformed(format!(
                        "206 answer from byte {start}, asked for byte {}; starting again from 0",
                        request.offset
                    )));
                }
            }
            if let Some(total) = total.filter(|total| size > 0 && *total != size) {
                restart(sink)?;
                return Err(if total > size {
                    GetError::TooLarge { size, what: format!("Content-Range {value:?}") }
                } else {
                    malformed(format!("Content-Range {value:?}: the plan gives {size} bytes"))
                });
            }
            if size > 0 && end >= size {
                restart(sink)?;
                return Err(GetError::TooLarge { size, what: format!("Content-Range {value:?}") });
            }
            let length = end - start + 1;
            if head.content_length.is_some_and(|announced| announced != length) {
                return Err(malformed(format!("Content-Length does not match Content-Range {value:?}")));
            }
            (start, Some(length))
        }
        404 | 410 => return Ok(GetOutcome::NotFound { status: head.status }),
        416 => {
            restart(sink)?;
            return Ok(GetOutcome::RangeNotSatisfiable);
        }
        status => return Err(GetError::Status(status)),
    };
    // The most this answer may add to the sink.
    let room = if size > 0 { size - start } else { u64::MAX };
    let received = if head.chunked {
        copy_chunked(reader, room, size, sink)?
    } else {
        let length = head
            .content_length
            .ok_or_else(|| malformed("the answer has neither Content-Length nor chunked encoding".into()))?;
        if length > room {
            restart(sink)?;
            return Err(GetError::TooLarge { size, what: format!("Content-Length {length} from byte {start}") });
        }
        if head.status == 200 && size > 0 && length != size {
            return Err(malformed(format!("Content-Length {length}: the plan gives {size} bytes")));
        }
        copy_exact(reader, length, sink)?;
        length
    };
    if let Some(length) = length.filter(|length| *length != received) {
        return Err(malformed(format!("the chunked answer has {received} bytes, its Content-Range says {length}")));
    }
    Ok(GetOutcome::Complete { status: head.status, total: start + received, received })
}

/// Copy exactly `length` bytes from `reader` to `sink`.
fn copy_exact(reader: &mut dyn BufRead, length: u64, sink: &mut dyn Sink) -> Result<(), GetError> {
    let mut buffer = vec![0u8; DOWNLOAD_BUFFER_BYTES];
    let mut copied = 0;
    while copied < length {
        let want = (length - copied).min(buffer.len() as u64) as usize;
        let read = reader.read(&mut buffer[..want])?;
        if read == 0 {
            return Err(GetError::Http(HttpError::Malformed(format!(
                "the connection closed after {copied} of {length} bytes"
            ))));
        }
        sink.write_all(&buffer[..read]).map_err(GetError::Sink)?;
        copied += read as u64;
    }
    Ok(())
}

/// Copy a chunked body to `sink`, at most `room` bytes.
fn copy_chunked(reader: &mut dyn BufRead, room: u64, size: u64, sink: &mut dyn Sink) -> Result<u64, GetError> {
    let mut received = 0u64;
    loop {
        let chunk = read_chunk_size(reader)?;
        if chunk == 0 {
            return Ok(received);
        }
        if chunk > room - received {
            sink.restart().map_err(GetError::Sink)?;
            return Err(GetError::TooLarge { size, what: format!("more than {room} bytes, chunked") });
        }
        copy_exact(reader, chunk, sink)?;
        received += chunk;
        read_chunk_end(reader)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_requests_ask_for_the_rest_and_past_the_cache() {
        let url = HttpUrl::parse_source("http://relay:1073/v1/content/abc").unwrap();
        let plain =
            String::from_utf8(get_request_bytes(&url, GetRequest { offset: 0, size: 9, no_cache: false })).unwrap();
        assert!(plain.starts_with("GET /v1/content/abc HTTP/1.1\r\nHost: relay:1073\r\n"), "{plain}");
        assert!(!plain.contains("Range") && !plain.contains("Cache-Control"), "{plain}");
        let resumed =
            String::from_utf8(get_request_bytes(&url, GetRequest { offset: 5, size: 9, no_cache: true })).unwrap();
        assert!(resumed.contains("\r\nRange: bytes=5-\r\n"), "{resumed}");
        assert!(resumed.contains("\r\nCache-Control: no-cache\r\n") && resumed.ends_with("\r\n\r\n"), "{resumed}");
    }

    fn download(answer: &[u8], offset: u64, size: u64, sink: &mut Vec<u8>) -> Result<GetOutcome, GetError> {
        read_download(&mut &answer[..], GetRequest { offset, size, no_cache: false }, sink)
    }

    #[test]
    fn download_answers_fill_restart_or_resume_the_sink() {
        let mut sink = Vec::new();
        let outcome = download(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 0, 5, &mut sink).unwrap();
        assert_eq!(
            (outcome, sink.as_slice()),
            (GetOutcome::Complete { status: 200, total: 5, received: 5 }, &b"hello"[..])
        );
        // A 200 to a range request: the whole body, from byte 0.
        let mut sink = b"xx".to_vec();
        download(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 2, 5, &mut sink).unwrap();
        assert_eq!(sink, b"hello");
        // A 206 from the offset: the rest is appended.
        let mut sink = b"he".to_vec();
        let answer = b"HTTP/1.1 206 Partial\r\nContent-Range: bytes 2-4/5\r\nContent-Length: 3\r\n\r\nllo";
        let outcome = download(answer, 2, 5, &mut sink).unwrap();
        assert_eq!(
            (outcome, sink.as_slice()),
            (GetOutcome::Complete { status: 206, total: 5, received: 3 }, &b"hello"[..])
        );
        // Chunked, size unknown.
        let mut sink = Vec::new();
        download(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n",
            0,
            0,
            &mut sink,
        )
        .unwrap();
        assert_eq!(sink, b"hello");
        // A 206 from elsewhere: start again from 0.
        let mut sink = b"he".to_vec();
        let answer = b"HTTP/1.1 206 Partial\r\nContent-Range: bytes 1-4/5\r\nContent-Length: 4\r\n\r\nello";
        let error = download(answer, 2, 5, &mut sink).unwrap_err().to_string();
        assert!(error.contains("from byte 1, asked for byte 2"), "{error}");
        assert!(sink.is_empty());
        // 416: the partial content is wrong.
        let mut sink = b"he".to_vec();
        assert_eq!(download(b"HTTP/1.1 416 No\r\n\r\n", 2, 5, &mut sink).unwrap(), GetOutcome::RangeNotSatisfiable);
        assert!(sink.is_empty());
        for status in [404, 410] {
            let answer = format!("HTTP/1.1 {status} Gone\r\nContent-Length: 0\r\n\r\n");
            let outcome = download(answer.as_bytes(), 0, 5, &mut Vec::new()).unwrap();
            assert_eq!(outcome, GetOutcome::NotFound { status });
        }
        let error = download(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n", 0, 5, &mut Vec::new()).unwrap_err();
        assert!(matches!(error, GetError::Status(503)), "{error}");
    }

    #[test]
    fn a_download_never_grows_beyond_the_plans_size() {
        let mut sink = Vec::new();
        let error = download(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello!", 0, 5, &mut sink).unwrap_err();
        assert!(matches!(error, GetError::TooLarge { size: 5, .. }), "{error}");
        assert!(sink.is_empty());
        let answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n3\r\nlo!\r\n0\r\n\r\n";
        let error = download(answer, 0, 5, &mut sink).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the answer is larger than the 5 bytes the plan gives (more than 5 bytes, chunked)"
        );
        assert!(sink.is_empty(), "what came before the excess is dropped too");
        let mut sink = b"he".to_vec();
        let answer = b"HTTP/1.1 206 Partial\r\nContent-Range: bytes 2-9/10\r\nContent-Length: 8\r\n\r\nllo12345";
        assert!(matches!(download(answer, 2, 5, &mut sink).unwrap_err(), GetError::TooLarge { .. }));
        assert!(sink.is_empty());
    }

    #[test]
    fn incomplete_download_answers_keep_what_came() {
        let mut sink = Vec::new();
        let error = download(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", 0, 5, &mut sink).unwrap_err();
        assert_eq!(error.to_string(), "malformed response: the connection closed after 3 of 5 bytes");
        assert_eq!(sink, b"hel", "a resume goes on from here");
        let error = download(b"HTTP/1.1 200 OK\r\n\r\nhello", 0, 5, &mut Vec::new()).unwrap_err().to_string();
        assert!(error.contains("neither Content-Length nor chunked"), "{error}");
        let error = download(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nhell", 0, 5, &mut Vec::new()).unwrap_err();
        assert!(error.to_string().contains("Content-Length 4: the plan gives 5 bytes"), "{error}");
    }
}
