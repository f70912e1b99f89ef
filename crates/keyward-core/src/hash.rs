//! Key hashing. Only a hash is ever stored: SHA-256 by default, HMAC-SHA256 with a server-side pepper
//! when one is configured. The algorithm is stored per key, so both kinds verify side by side.

use std::fmt;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::key::PlainKey;

/// SECURITY: a pepper shorter than this adds little against an attacker who has the database.
pub const MIN_PEPPER_LEN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashAlgorithm {
    Sha256,
    HmacSha256,
}

impl HashAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::HmacSha256 => "hmac_sha256",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sha256" => Some(Self::Sha256),
            "hmac_sha256" => Some(Self::HmacSha256),
            _ => None,
        }
    }
}

/// The 32-byte hash a key is stored and looked up under.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn to_hex(&self) -> String {
        crate::hex(&self.0)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(out))
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(Self)
    }

    /// SECURITY: constant-time, so a lookup that matched by index cannot be timed byte by byte.
    pub fn ct_eq(&self, other: &KeyHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHash(..)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the pepper must be at least {MIN_PEPPER_LEN} bytes, got {0}")]
pub struct PepperError(pub usize);

/// Hashes keys with the configured algorithm; holds the pepper, if any.
#[derive(Clone, Default)]
pub struct KeyHasher {
    /// HMAC-SHA-256 keyed with the pepper, ready to clone: keying it anew costs two more compressions.
    pepper: Option<Hmac<Sha256>>,
}

impl fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyHasher").field("peppered", &self.pepper.is_some()).finish()
    }
}

impl KeyHasher {
    pub fn new(pepper: Option<&[u8]>) -> Result<Self, PepperError> {
        match pepper {
            Some(p) if p.len() < MIN_PEPPER_LEN => Err(PepperError(p.len())),
            Some(p) => match Hmac::<Sha256>::new_from_slice(p) {
                Ok(mac) => Ok(Self { pepper: Some(mac) }),
                Err(_) => Err(PepperError(p.len())),
            },
            None => Ok(Self { pepper: None }),
        }
    }

    /// The algorithm new keys are stored with.
    pub fn algorithm(&self) -> HashAlgorithm {
        if self.pepper.is_some() { HashAlgorithm::HmacSha256 } else { HashAlgorithm::Sha256 }
    }

    /// The hash a new key is stored under.
    pub fn hash(&self, key: &PlainKey) -> (HashAlgorithm, KeyHash) {
        let algorithm = self.algorithm();
        (algorithm, self.hash_str(algorithm, key.expose_secret()))
    }

    /// Every hash a presented key may be stored under, the configured algorithm first; each computed
    /// only when asked for (a found key stops the search after one).
    pub fn candidates<'a>(&'a self, key: &'a str) -> impl Iterator<Item = (HashAlgorithm, KeyHash)> + 'a {
        let plain = self.pepper.is_some().then_some(HashAlgorithm::Sha256);
        std::iter::once(self.algorithm()).chain(plain).map(move |algorithm| (algorithm, self.hash_str(algorithm, key)))
    }

    /// Hash any string (also legacy keys that are not in keyward's format).
    pub fn hash_str(&self, algorithm: HashAlgorithm, key: &str) -> KeyHash {
        match (algorithm, &self.pepper) {
            (HashAlgorithm::HmacSha256, Some(pepper)) => {
                let mut mac = pepper.clone();
                mac.update(key.as_bytes());
                KeyHash(mac.finalize().into_bytes().into())
            }
            // Without a pepper an HMAC-stored key cannot be checked; hashing plainly makes it
            // simply not match.
            _ => KeyHash(Sha256::digest(key.as_bytes()).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_a_known_vector() {
        let h = KeyHasher::default().hash_str(HashAlgorithm::Sha256, "abc");
        assert_eq!(h.to_hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(KeyHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(KeyHash::from_hex("zz"), None);
        assert_eq!(KeyHash::from_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn short_pepper_is_refused() {
        assert_eq!(KeyHasher::new(Some(b"short")).err(), Some(PepperError(5)));
        assert!(KeyHasher::new(Some(&[7u8; 32])).is_ok());
    }

    #[test]
    fn peppered_hasher_tries_hmac_then_plain_sha256() {
        let plain = KeyHasher::default();
        let peppered = KeyHasher::new(Some(&[7u8; 32])).unwrap_or_default();
        assert_eq!(peppered.algorithm(), HashAlgorithm::HmacSha256);
        let c: Vec<_> = peppered.candidates("k").collect();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].0, HashAlgorithm::HmacSha256);
        assert_ne!(c[0].1, c[1].1);
        assert_eq!(c[1].1, plain.hash_str(HashAlgorithm::Sha256, "k"));
        assert_eq!(plain.candidates("k").count(), 1);
        // The same HMAC as keying it afresh.
        let mut fresh = Hmac::<Sha256>::new_from_slice(&[7u8; 32]).unwrap_or_else(|e| panic!("{e}"));
        fresh.update(b"k");
        assert_eq!(c[0].1, KeyHash(fresh.finalize().into_bytes().into()));
    }

    #[test]
    fn debug_reveals_nothing() {
        let h = KeyHasher::new(Some(&[9u8; 40])).unwrap_or_default();
        assert_eq!(format!("{h:?}"), "KeyHasher { peppered: true }");
        assert_eq!(format!("{:?}", h.hash_str(HashAlgorithm::Sha256, "x")), "KeyHash(..)");
    }
}
