//! Webhook signatures: `Keyward-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">`, keyed
//! with the endpoint's secret. The timestamp is signed too, so a receiver can refuse replays of old
//! deliveries; comparison is constant-time.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::hex;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "Keyward-Signature";

/// Bytes of randomness in a webhook secret.
const SECRET_BYTES: usize = 32;

fn mac(secret: &str, t: i64, body: &[u8]) -> Vec<u8> {
    // HMAC takes a key of any length: `new_from_slice` cannot fail for it.
    let Ok(mut m) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else { return Vec::new() };
    m.update(t.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m.finalize().into_bytes().to_vec()
}

/// The header value for a delivery of `body` signed at `t`.
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    format!("t={t},v1={}", hex(&mac(secret, t, body)))
}

/// Checks a header value as a receiver would: the signature matches and `t` is within `tolerance_secs`
/// of `now`.
pub fn verify(secret: &str, header: &str, body: &[u8], now: i64, tolerance_secs: i64) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = value.parse::<i64>().ok(),
            Some(("v1", value)) => v1 = Some(value),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else { return false };
    if (now - t).abs() > tolerance_secs {
        return false;
    }
    let expected = hex(&mac(secret, t, body));
    expected.as_bytes().ct_eq(v1.as_bytes()).into()
}

/// A new signing secret: `whsec_` and 32 random bytes in hex.
pub fn generate_secret() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; SECRET_BYTES];
    getrandom::fill(&mut bytes)?;
    Ok(format!("whsec_{}", hex(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_timestamp_and_body() {
        // Known vector: HMAC-SHA256(key="whsec_test", "1700000000.{}").
        let header = sign("whsec_test", 1_700_000_000, b"{}");
        assert!(header.starts_with("t=1700000000,v1="), "{header}");
        assert_eq!(header, "t=1700000000,v1=35495024f4ef3f94e5a93e22221544c4b75e9a42300cd965ab81cb85cd994e91");
        assert!(verify("whsec_test", &header, b"{}", 1_700_000_010, 300));
        assert!(!verify("whsec_other", &header, b"{}", 1_700_000_010, 300), "another secret");
        assert!(!verify("whsec_test", &header, b"{ }", 1_700_000_010, 300), "another body");
        assert!(!verify("whsec_test", &header, b"{}", 1_700_001_000, 300), "too old");
        let moved = header.replace("t=1700000000", "t=1700000001");
        assert!(!verify("whsec_test", &moved, b"{}", 1_700_000_010, 300), "the timestamp is signed");
        assert!(!verify("whsec_test", "garbage", b"{}", 1_700_000_010, 300));
    }

    #[test]
    fn secrets_are_random_and_prefixed() {
        let (a, b) = (generate_secret().unwrap_or_default(), generate_secret().unwrap_or_default());
        assert!(a.starts_with("whsec_") && a.len() == 6 + 64, "{a}");
        assert_ne!(a, b);
    }
}
