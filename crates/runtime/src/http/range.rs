//! `Range: bytes=…` requests (RFC 9110 §14) for the servers of content by
//! sha256 (the scheduler's content store and the relay): one range, or the
//! whole content. A download that stopped resumes with `bytes=N-`.
//!
//! Only single ranges are served. A header this server ignores (another
//! unit, several ranges, a malformed one) asks for the whole content, as the
//! RFC lets a server do; a well-formed range that starts at or past the end
//! is unsatisfiable (416).

/// What a `Range` header asks of content of a known length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// No range, or one that is ignored: the whole content (200).
    Full,
    /// Bytes `start..=end` (206 with `Content-Range: bytes start-end/length`);
    /// `end` is always below the length.
    Partial { start: u64, end: u64 },
    /// A well-formed range outside the content (416 with
    /// `Content-Range: bytes */length`).
    Unsatisfiable,
}

impl ByteRange {
    /// The first byte sent and how many are sent, for content of `length`
    /// bytes (`None` when unsatisfiable).
    pub fn span(&self, length: u64) -> Option<(u64, u64)> {
        match *self {
            Self::Full => Some((0, length)),
            Self::Partial { start, end } => Some((start, end - start + 1)),
            Self::Unsatisfiable => None,
        }
    }

    /// The `Content-Range` value of the answer (`None` for the whole content).
    pub fn content_range(&self, length: u64) -> Option<String> {
        match *self {
            Self::Full => None,
            Self::Partial { start, end } => Some(format!("bytes {start}-{end}/{length}")),
            Self::Unsatisfiable => Some(format!("bytes */{length}")),
        }
    }
}

/// A decimal number; one too large for a u64 is `u64::MAX` (it is past the
/// end of any content either way).
fn number(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.bytes().fold(0u64, |value, digit| value.saturating_mul(10).saturating_add(u64::from(digit - b'0'))))
}

/// Reads the `Range` header (`header`, when the request has one) against
/// content of `length` bytes: `bytes=N-`, `bytes=N-M` and `bytes=-S` (the
/// last S bytes).
pub fn parse_range(header: Option<&str>, length: u64) -> ByteRange {
    let Some(header) = header else { return ByteRange::Full };
    let header = header.trim();
    let Some((unit, spec)) = header.split_once('=') else { return ByteRange::Full };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return ByteRange::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return ByteRange::Full };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // bytes=-S: the last S bytes.
        let Some(suffix) = number(last) else { return ByteRange::Full };
        if suffix == 0 || length == 0 {
            return ByteRange::Unsatisfiable;
        }
        return ByteRange::Partial { start: length.saturating_sub(suffix), end: length - 1 };
    }
    let Some(start) = number(first) else { return ByteRange::Full };
    let end = if last.is_empty() {
        u64::MAX
    } else {
        match number(last) {
            Some(end) if end >= start => end,
            // bytes=5-2 is not a range at all: ignored.
            _ => return ByteRange::Full,
        }
    };
    if start >= length {
        return ByteRange::Unsatisfiable;
    }
    ByteRange::Partial { start, end: end.min(length - 1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_ranges_are_read_and_clamped_to_the_content() {
        let cases = [
            ("bytes=0-", ByteRange::Partial { start: 0, end: 99 }),
            ("bytes=10-", ByteRange::Partial { start: 10, end: 99 }),
            ("bytes=10-19", ByteRange::Partial { start: 10, end: 19 }),
            ("bytes=99-99", ByteRange::Partial { start: 99, end: 99 }),
            ("bytes=90-1000", ByteRange::Partial { start: 90, end: 99 }),
            ("bytes=90-99999999999999999999999", ByteRange::Partial { start: 90, end: 99 }),
            ("bytes=-10", ByteRange::Partial { start: 90, end: 99 }),
            ("bytes=-1000", ByteRange::Partial { start: 0, end: 99 }),
            (" Bytes = 5 - 6 ", ByteRange::Partial { start: 5, end: 6 }),
        ];
        for (header, expected) in cases {
            assert_eq!(parse_range(Some(header), 100), expected, "{header}");
        }
        assert_eq!(ByteRange::Partial { start: 10, end: 19 }.span(100), Some((10, 10)));
        assert_eq!(ByteRange::Full.span(100), Some((0, 100)));
        assert_eq!(ByteRange::Partial { start: 10, end: 19 }.content_range(100).as_deref(), Some("bytes 10-19/100"));
    }

    #[test]
    fn ranges_past_the_end_are_unsatisfiable() {
        for header in ["bytes=100-", "bytes=100-200", "bytes=-0", "bytes=99999999999999999999999-"] {
            assert_eq!(parse_range(Some(header), 100), ByteRange::Unsatisfiable, "{header}");
        }
        assert_eq!(parse_range(Some("bytes=0-"), 0), ByteRange::Unsatisfiable, "empty content has no byte 0");
        assert_eq!(parse_range(Some("bytes=-5"), 0), ByteRange::Unsatisfiable);
        assert_eq!(ByteRange::Unsatisfiable.content_range(100).as_deref(), Some("bytes */100"));
        assert_eq!(ByteRange::Unsatisfiable.span(100), None);
    }

    #[test]
    fn other_units_several_ranges_and_malformed_ones_ask_for_everything() {
        for header in [
            "",
            "bytes",
            "bytes=",
            "bytes=-",
            "bytes=a-",
            "bytes=1-b",
            "bytes=5-2",
            "bytes=+1-2",
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=1",
        ] {
            assert_eq!(parse_range(Some(header), 100), ByteRange::Full, "{header:?}");
        }
        assert_eq!(parse_range(None, 100), ByteRange::Full);
    }
}
