//! Request authentication between the agent and the collector, written once
//! for the agent, the simulated agents and the collector.
//!
//! The agent never sends its token. Like AWS SigV4 or a webhook signature,
//! each request carries a MAC over a canonical string of the request, keyed
//! from the token:
//!
//! ```text
//! token       = "<target id, 32 hex>." hex(HMAC-SHA256(token key, target id bytes ‖ attempt (u32 BE) ‖ nonce))
//! signing key = HMAC-SHA256(token, "fleetpatch report signing key v1")
//! canonical   = "FP1-HMAC-SHA256\n" METHOD "\n" PATH "\n" TARGET "\n" ATTEMPT "\n" TIMESTAMP_MS "\n" NONCE "\n" hex(sha256(body))
//! mac         = HMAC-SHA256(signing key, canonical)
//! header      = "Authorization: FP1-HMAC-SHA256 target=TARGET,attempt=ATTEMPT,ts=TIMESTAMP_MS,nonce=NONCE,mac=hex(mac)"
//! ```
//!
//! TARGET is the target's UUID as 32 lowercase hex digits, NONCE 16 random
//! bytes as 32 lowercase hex digits, fresh for every request. The token key
//! is shared by the workers (which derive the token and stage it in the
//! plan) and the collectors (which derive it again to verify); only
//! sha256(token) is stored on the target.
//!
//! What the collector checks beyond the MAC (the clock window, replays, the
//! target's state) needs a clock and memory, so it lives in the collector;
//! this module is pure: no I/O, no clock, no randomness.

use std::fmt::Write as _;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use uuid::Uuid;

type HmacSha256 = Hmac<Sha256>;

/// The scheme name: the first word of the `Authorization` header and the
/// first line of the canonical string.
pub const SCHEME: &str = "FP1-HMAC-SHA256";
/// The context the signing key is derived under (never the token itself).
const SIGNING_KEY_CONTEXT: &[u8] = b"fleetpatch report signing key v1";
/// Longest `Authorization` value accepted; a valid one is ~190 bytes.
pub const MAX_AUTHORIZATION_BYTES: usize = 256;

/// Why a request's authentication was refused. The collector answers every
/// kind but [`AuthError::Stale`] with the same 401 body, so a caller learns
/// nothing that would help it forge; [`AuthError::reason`] is for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no `Authorization: {SCHEME} …` header")]
    Missing,
    #[error("the `Authorization` header is not `{SCHEME} target=…,attempt=…,ts=…,nonce=…,mac=…`")]
    Malformed,
    #[error("the request's timestamp is outside the collector's clock window")]
    Stale,
    #[error("the request's MAC does not match")]
    BadMac,
}

impl AuthError {
    /// A low-cardinality label for `fleetpatch_collector_auth_refused_total{reason}`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::Stale => "stale",
            Self::BadMac => "bad_mac",
        }
    }
}

/// Derives a target's agent token from the installation's token key, the
/// target, its attempt and the nonce stored on the target:
/// `<target id>.<hex HMAC-SHA256>`. Workers stage it in the plan; collectors
/// derive it again to verify the agent's requests.
pub fn derive_token(key: &[u8], target_id: Uuid, attempt: u32, nonce: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(target_id.as_bytes());
    mac.update(&attempt.to_be_bytes());
    mac.update(nonce.as_bytes());
    format!("{}.{}", target_id.simple(), hex::encode(mac.finalize().into_bytes()))
}

/// The key requests are signed with, derived from the token so the token
/// itself is used for nothing else. Held as the HMAC state already keyed
/// with it, so a request's MAC costs no key setup (two SHA-256 blocks
/// fewer per request than keying afresh).
#[derive(Clone)]
pub struct SigningKey(HmacSha256);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(…)")
    }
}

impl SigningKey {
    pub fn from_token(token: &str) -> Self {
        let mut mac = HmacSha256::new_from_slice(token.as_bytes()).expect("HMAC takes keys of any length");
        mac.update(SIGNING_KEY_CONTEXT);
        let key = mac.finalize().into_bytes();
        Self(HmacSha256::new_from_slice(&key).expect("HMAC takes keys of any length"))
    }

    fn mac_of(&self, canonical: &str) -> HmacSha256 {
        let mut mac = self.0.clone();
        mac.update(canonical.as_bytes());
        mac
    }

    /// The MAC of one request.
    pub fn sign(&self, request: &SignedRequest<'_>) -> [u8; 32] {
        self.mac_of(&request.canonical_string()).finalize().into_bytes().into()
    }

    /// Signs `request` and returns the `Authorization` header value.
    pub fn authorization(&self, request: &SignedRequest<'_>) -> String {
        let mac = self.sign(request);
        Authorization {
            target_id: request.target_id,
            attempt: request.attempt,
            timestamp_ms: request.timestamp_ms,
            nonce: request.nonce,
            mac,
        }
        .to_header_value()
    }

    /// Checks `mac` against `request` in constant time.
    pub fn verify(&self, request: &SignedRequest<'_>, mac: &[u8; 32]) -> Result<(), AuthError> {
        self.mac_of(&request.canonical_string()).verify_slice(mac).map_err(|_| AuthError::BadMac)
    }
}

/// Everything the MAC covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedRequest<'a> {
    pub method: &'a str,
    /// The request path as sent (`/v1/targets/<id>/reports`), without the query.
    pub path: &'a str,
    pub target_id: Uuid,
    pub attempt: u32,
    /// Milliseconds since the Unix epoch, from the agent's clock.
    pub timestamp_ms: i64,
    /// Fresh random bytes per request; the collector refuses a nonce twice.
    pub nonce: [u8; 16],
    pub body_sha256: [u8; 32],
}

impl<'a> SignedRequest<'a> {
    /// A request for `body`, hashing it.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        method: &'a str,
        path: &'a str,
        target_id: Uuid,
        attempt: u32,
        timestamp_ms: i64,
        nonce: [u8; 16],
        body: &[u8],
    ) -> Self {
        Self { method, path, target_id, attempt, timestamp_ms, nonce, body_sha256: Sha256::digest(body).into() }
    }

    /// The string the MAC is computed over (see the module docs).
    pub fn canonical_string(&self) -> String {
        let mut text = String::with_capacity(200 + self.path.len());
        let _ = write!(
            text,
            "{SCHEME}\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
            self.method.to_ascii_uppercase(),
            self.path,
            self.target_id.simple(),
            self.attempt,
            self.timestamp_ms,
            hex::encode(self.nonce),
            hex::encode(self.body_sha256),
        );
        text
    }
}

/// The parsed `Authorization` header of a signed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authorization {
    pub target_id: Uuid,
    pub attempt: u32,
    pub timestamp_ms: i64,
    pub nonce: [u8; 16],
    pub mac: [u8; 32],
}

impl Authorization {
    /// Parses `FP1-HMAC-SHA256 target=…,attempt=…,ts=…,nonce=…,mac=…`
    /// (fields in this order, no spaces): cheap, and strict, so that a
    /// malformed header is refused before any database work.
    pub fn parse(value: &str) -> Result<Self, AuthError> {
        if value.len() > MAX_AUTHORIZATION_BYTES {
            return Err(AuthError::Malformed);
        }
        let rest = value.strip_prefix(SCHEME).and_then(|rest| rest.strip_prefix(' ')).ok_or(AuthError::Malformed)?;
        let mut fields = rest.split(',');
        let mut field = |name: &str| -> Result<&str, AuthError> {
            fields
                .next()
                .and_then(|field| field.strip_prefix(name))
                .and_then(|field| field.strip_prefix('='))
                .ok_or(AuthError::Malformed)
        };
        let target = field("target")?;
        let attempt = field("attempt")?;
        let timestamp = field("ts")?;
        let nonce = field("nonce")?;
        let mac = field("mac")?;
        if fields.next().is_some() || target.len() != 32 {
            return Err(AuthError::Malformed);
        }
        let decimal = |text: &str| !text.is_empty() && text.len() <= 19 && text.bytes().all(|b| b.is_ascii_digit());
        if !decimal(attempt) || !decimal(timestamp) {
            return Err(AuthError::Malformed);
        }
        Ok(Self {
            target_id: Uuid::try_parse(target).map_err(|_| AuthError::Malformed)?,
            attempt: attempt.parse().map_err(|_| AuthError::Malformed)?,
            timestamp_ms: timestamp.parse().map_err(|_| AuthError::Malformed)?,
            nonce: lower_hex(nonce)?,
            mac: lower_hex(mac)?,
        })
    }

    pub fn to_header_value(&self) -> String {
        format!(
            "{SCHEME} target={},attempt={},ts={},nonce={},mac={}",
            self.target_id.simple(),
            self.attempt,
            self.timestamp_ms,
            hex::encode(self.nonce),
            hex::encode(self.mac)
        )
    }

    /// The request this header claims to sign, given what the server saw.
    pub fn request<'a>(&self, method: &'a str, path: &'a str, body: &[u8]) -> SignedRequest<'a> {
        SignedRequest::new(method, path, self.target_id, self.attempt, self.timestamp_ms, self.nonce, body)
    }
}

/// Exactly `2 × N` lowercase hex digits.
fn lower_hex<const N: usize>(text: &str) -> Result<[u8; N], AuthError> {
    if text.len() != 2 * N || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(AuthError::Malformed);
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).map_err(|_| AuthError::Malformed)?;
    Ok(out)
}

/// Whether a request's timestamp is within `max_skew_ms` of the server's
/// clock (either side).
pub fn check_clock(timestamp_ms: i64, now_ms: i64, max_skew_ms: i64) -> Result<(), AuthError> {
    if timestamp_ms.abs_diff(now_ms) > max_skew_ms.unsigned_abs() {
        return Err(AuthError::Stale);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"test token key";
    const TARGET: &str = "0b3f7e2c-4a8d-4e6f-9a1b-2c3d4e5f6a7b";
    const NONCE: [u8; 16] = *b"0123456789abcdef";

    fn target() -> Uuid {
        Uuid::parse_str(TARGET).unwrap()
    }

    fn request(body: &[u8]) -> SignedRequest<'_> {
        SignedRequest::new(
            "POST",
            "/v1/targets/0b3f7e2c-4a8d-4e6f-9a1b-2c3d4e5f6a7b/reports",
            target(),
            2,
            1_764_000_000_000,
            NONCE,
            body,
        )
    }

    #[test]
    fn token_derivation_vector() {
        // Pinned (computed independently with Python's hmac module): workers,
        // collectors and agents of different versions must agree.
        let token = derive_token(KEY, target(), 2, "nonce-1");
        assert_eq!(
            token,
            "0b3f7e2c4a8d4e6f9a1b2c3d4e5f6a7b.db9a7b0458a8445a95c93b88c7b7c70a16ce7f6b74ca5a855eefb6b4e852516c"
        );
        assert_ne!(token, derive_token(KEY, target(), 3, "nonce-1"));
        assert_ne!(token, derive_token(KEY, target(), 2, "nonce-2"));
        assert_ne!(token, derive_token(KEY, Uuid::new_v4(), 2, "nonce-1"));
        assert_ne!(token, derive_token(b"other key", target(), 2, "nonce-1"));
    }

    #[test]
    fn canonical_string_vector() {
        let canonical = request(b"body").canonical_string();
        assert_eq!(
            canonical,
            "FP1-HMAC-SHA256\nPOST\n/v1/targets/0b3f7e2c-4a8d-4e6f-9a1b-2c3d4e5f6a7b/reports\n\
             0b3f7e2c4a8d4e6f9a1b2c3d4e5f6a7b\n2\n1764000000000\n30313233343536373839616263646566\n\
             230d8358dc8e8890b4c58deeb62912ee2f20357ae92a5cc861b98e68fe31acb5"
        );
    }

    #[test]
    fn signature_vector() {
        let token = derive_token(KEY, target(), 2, "nonce-1");
        let header = SigningKey::from_token(&token).authorization(&request(b"body"));
        assert_eq!(
            header,
            "FP1-HMAC-SHA256 target=0b3f7e2c4a8d4e6f9a1b2c3d4e5f6a7b,attempt=2,ts=1764000000000,\
             nonce=30313233343536373839616263646566,\
             mac=bcf66ac2a21d12c2036cf747aa69d38382349950013e45189f88817bb68acdc2"
        );
    }

    #[test]
    fn a_signed_request_verifies_and_every_altered_field_fails() {
        let key = SigningKey::from_token(&derive_token(KEY, target(), 2, "nonce-1"));
        let body = b"report batch".as_slice();
        let header = Authorization::parse(&key.authorization(&request(body))).expect("own header parses");
        let path = "/v1/targets/0b3f7e2c-4a8d-4e6f-9a1b-2c3d4e5f6a7b/reports";
        assert_eq!(key.verify(&header.request("POST", path, body), &header.mac), Ok(()));

        let refused = |request: SignedRequest<'_>| key.verify(&request, &header.mac);
        assert_eq!(refused(header.request("PUT", path, body)), Err(AuthError::BadMac), "method");
        assert_eq!(
            refused(header.request("POST", "/v1/targets/1b3f7e2c-4a8d-4e6f-9a1b-2c3d4e5f6a7b/reports", body)),
            Err(AuthError::BadMac),
            "path"
        );
        assert_eq!(refused(header.request("POST", path, b"report batcH")), Err(AuthError::BadMac), "body");
        assert_eq!(
            refused(SignedRequest { timestamp_ms: header.timestamp_ms + 1, ..header.request("POST", path, body) }),
            Err(AuthError::BadMac),
            "timestamp"
        );
        assert_eq!(
            refused(SignedRequest { attempt: 3, ..header.request("POST", path, body) }),
            Err(AuthError::BadMac),
            "attempt"
        );
        assert_eq!(
            refused(SignedRequest { nonce: [0; 16], ..header.request("POST", path, body) }),
            Err(AuthError::BadMac),
            "nonce"
        );
        assert_eq!(
            refused(SignedRequest { target_id: Uuid::new_v4(), ..header.request("POST", path, body) }),
            Err(AuthError::BadMac),
            "target"
        );
        let other_attempt = SigningKey::from_token(&derive_token(KEY, target(), 3, "nonce-1"));
        assert_eq!(other_attempt.verify(&header.request("POST", path, body), &header.mac), Err(AuthError::BadMac));
    }

    #[test]
    fn malformed_headers_are_refused_by_shape() {
        let good = "FP1-HMAC-SHA256 target=0b3f7e2c4a8d4e6f9a1b2c3d4e5f6a7b,attempt=2,ts=1764000000000,\
                    nonce=30313233343536373839616263646566,\
                    mac=bcf66ac2a21d12c2036cf747aa69d38382349950013e45189f88817bb68acdc2";
        let parsed = Authorization::parse(good).expect("parses");
        assert_eq!(parsed.to_header_value(), good);
        for bad in [
            "",
            "Bearer 0b3f7e2c4a8d4e6f9a1b2c3d4e5f6a7b.abc",
            &good.replace("FP1-HMAC-SHA256 ", "FP1-HMAC-SHA256  "),
            &good.replace("target=", "tarjet="),
            &good.replace(",attempt=2", ",attempt=-2"),
            &good.replace(",attempt=2", ",attempt=99999999999"),
            &good.replace("ts=1764000000000", "ts=1764e9"),
            &good.replace("nonce=3031", "nonce=3O31"),
            &good.replace("nonce=3031", "nonce=3031ab"),
            &good.replace("mac=bcf6", "mac=BCF6"),
            &good.replace("mac=bcf6", "mac=bc"),
            &format!("{good},extra=1"),
            &format!("{good}{}", "0".repeat(300)),
            &good.replace("0b3f7e2c4a8d4e6f9a1b2c3d4e5f6a7b", "0b3f7e2c-4a8d-4e6f-9a1b-2c3d4e5f6a7b"),
        ] {
            assert_eq!(Authorization::parse(bad), Err(AuthError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn the_clock_window_is_symmetric_and_inclusive() {
        assert_eq!(check_clock(1_000, 1_000, 300_000), Ok(()));
        assert_eq!(check_clock(1_000 - 300_000, 1_000, 300_000), Ok(()));
        assert_eq!(check_clock(1_000 + 300_000, 1_000, 300_000), Ok(()));
        assert_eq!(check_clock(1_000 - 300_001, 1_000, 300_000), Err(AuthError::Stale));
        assert_eq!(check_clock(1_000 + 300_001, 1_000, 300_000), Err(AuthError::Stale));
        assert_eq!(check_clock(i64::MIN, i64::MAX, 300_000), Err(AuthError::Stale));
    }

    #[test]
    fn the_signing_key_is_not_the_token() {
        let token = derive_token(KEY, target(), 2, "nonce-1");
        let key = SigningKey::from_token(&token);
        // A MAC keyed with the token (or its secret half) directly is not the request's MAC.
        let request = SignedRequest::new("POST", "/v1/targets/x/reports", target(), 2, 1_000, [7; 16], b"body");
        for raw in [token.as_str(), token.split_once('.').unwrap().1] {
            let mut direct = HmacSha256::new_from_slice(raw.as_bytes()).unwrap();
            direct.update(request.canonical_string().as_bytes());
            let direct: [u8; 32] = direct.finalize().into_bytes().into();
            assert_ne!(direct, key.sign(&request));
        }
        assert_eq!(format!("{key:?}"), "SigningKey(…)", "debug output never shows the key");
    }
}
