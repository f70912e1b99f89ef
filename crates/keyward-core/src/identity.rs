//! The signed identity (`x-keyward-identity`): a short-lived token that tells an upstream which key a
//! request was allowed for, so that an upstream reachable around the proxy cannot be fed forged
//! `x-keyward-*` headers. `base64url(JSON claims) "." base64url(HMAC-SHA256(secret, first part))`,
//! without padding; the upstream checks it with the shared secret in three lines of any language.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// What the token says. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityClaims {
    pub key_id: String,
    pub org: String,
    pub owner: Option<String>,
    pub env: String,
    pub scopes: Vec<String>,
    pub iat: i64,
    pub exp: i64,
    /// The request it was issued for: canonical method and path.
    pub method: String,
    pub path: String,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("not a token")]
    Malformed,
    #[error("the signature does not match")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
}

fn mac(secret: &[u8], body: &str) -> [u8; 32] {
    // HMAC takes a key of any length: `new_from_slice` cannot fail for it.
    let Ok(mut m) = Hmac::<Sha256>::new_from_slice(secret) else { return [0; 32] };
    m.update(body.as_bytes());
    m.finalize().into_bytes().into()
}

/// The token for `claims`.
pub fn sign(secret: &[u8], claims: &IdentityClaims) -> String {
    let json = serde_json::to_vec(claims).unwrap_or_default();
    let body = base64url(&json);
    let signature = base64url(&mac(secret, &body));
    format!("{body}.{signature}")
}

/// The claims of `token`, when its signature matches (compared in constant time) and `now` is before
/// its `exp`.
pub fn verify(secret: &[u8], token: &str, now: i64) -> Result<IdentityClaims, IdentityError> {
    let (body, signature) = token.split_once('.').ok_or(IdentityError::Malformed)?;
    let expected = base64url(&mac(secret, body));
    if !bool::from(expected.as_bytes().ct_eq(signature.as_bytes())) {
        return Err(IdentityError::BadSignature);
    }
    let json = from_base64url(body).ok_or(IdentityError::Malformed)?;
    let claims: IdentityClaims = serde_json::from_slice(&json).map_err(|_| IdentityError::Malformed)?;
    if now >= claims.exp {
        return Err(IdentityError::Expired);
    }
    Ok(claims)
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// RFC 4648 §5, without padding.
fn base64url(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

fn from_base64url(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.as_bytes().chunks(4) {
        if chunk.len() == 1 {
            return None;
        }
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            let v = ALPHABET.iter().position(|a| a == c)?;
            n |= u32::try_from(v).ok()? << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push(u8::try_from((n >> (16 - 8 * i)) & 255).ok()?);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> IdentityClaims {
        IdentityClaims {
            key_id: "k".into(),
            org: "o".into(),
            owner: None,
            env: "live".into(),
            scopes: vec!["read:projects".into()],
            iat: 100,
            exp: 160,
            method: "GET".into(),
            path: "/v1/projects".into(),
        }
    }

    #[test]
    fn base64url_round_trips_and_matches_rfc_4648() {
        for (raw, encoded) in
            [("", ""), ("f", "Zg"), ("fo", "Zm8"), ("foo", "Zm9v"), ("foob", "Zm9vYg"), ("\u{ff}\u{fe}", "w7_Dvg")]
        {
            assert_eq!(base64url(raw.as_bytes()), encoded);
            assert_eq!(from_base64url(encoded).as_deref(), Some(raw.as_bytes()));
        }
        assert_eq!(from_base64url("Z"), None);
        assert_eq!(from_base64url("Z+=="), None);
    }

    /// Made by the README's Python lines' counterpart (`base64.urlsafe_b64encode`, `hmac.new`), so a
    /// token from here checks there.
    #[test]
    fn a_token_is_what_python_makes() {
        let python = "eyJrZXlfaWQiOiJrIiwib3JnIjoibyIsIm93bmVyIjpudWxsLCJlbnYiOiJsaXZlIiwic2NvcGVzIjpbInJlYWQ6cHJvamVjdHMiXSwiaWF0IjoxMDAsImV4cCI6MTYwLCJtZXRob2QiOiJHRVQiLCJwYXRoIjoiL3YxL3Byb2plY3RzIn0.-GbNSfjo_jXFViTilElLLUMZYsvsgtu6sE9poTHSIws";
        assert_eq!(sign(b"0123456789abcdef0123456789abcdef", &claims()), python);
    }

    #[test]
    fn a_token_verifies_until_it_expires_and_not_with_another_secret() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let token = sign(secret, &claims());
        assert_eq!(verify(secret, &token, 159), Ok(claims()));
        assert_eq!(verify(secret, &token, 160), Err(IdentityError::Expired));
        assert_eq!(verify(b"another secret of thirty-two b.", &token, 100), Err(IdentityError::BadSignature));
        let (body, signature) = token.split_once('.').unwrap();
        let mut forged = claims();
        forged.scopes.push("admin:all".into());
        let forged_body = sign(secret, &forged).split_once('.').unwrap().0.to_owned();
        assert_eq!(verify(secret, &format!("{forged_body}.{signature}"), 100), Err(IdentityError::BadSignature));
        assert_eq!(verify(secret, body, 100), Err(IdentityError::Malformed));
    }
}
