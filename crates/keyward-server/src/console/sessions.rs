//! Console sessions, held in this node's memory: a random 256-bit id in the cookie, only its SHA-256
//! here, so a dump of this map opens no session. A session holds the id and hash of the key that signed
//! in (never the key) and a CSRF token; it ends when unused for `idle`, or `absolute` after sign-in.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, Utc};
use keyward_core::{Clock, KeyHash, KeyId, hex};

use crate::settings::ConsoleSettings;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The console's settings and this node's sessions.
#[derive(Clone, Debug)]
pub struct Console {
    pub settings: Arc<ConsoleSettings>,
    pub sessions: Sessions,
}

impl Console {
    pub fn new(settings: ConsoleSettings, clock: Arc<dyn Clock>) -> Self {
        let sessions = Sessions::new(clock, settings.session_idle_seconds, settings.session_absolute_seconds);
        Self { settings: Arc::new(settings), sessions }
    }
}

/// Most sessions one node keeps; past it, signing in ends the oldest.
const MAX_SESSIONS: usize = 100_000;

/// What a session knows: which key signed in (looked up again on every request) and its CSRF token.
#[derive(Clone)]
pub struct Session {
    pub key_id: KeyId,
    /// The stored hash of the key, to look it up through the verify cache as the API does.
    pub key_hash: KeyHash,
    csrf: [u8; 32],
    created: DateTime<Utc>,
    last_seen: DateTime<Utc>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl Session {
    /// The token every state-changing form of this session carries.
    pub fn csrf_token(&self) -> String {
        hex(&self.csrf)
    }

    /// SECURITY: compared in constant time.
    pub fn csrf_matches(&self, presented: &str) -> bool {
        presented.len() == 64 && bool::from(presented.as_bytes().ct_eq(hex(&self.csrf).as_bytes()))
    }
}

/// The sessions of this node, on an injected clock.
#[derive(Clone)]
pub struct Sessions {
    clock: Arc<dyn Clock>,
    idle: Duration,
    absolute: Duration,
    map: Arc<Mutex<HashMap<[u8; 32], Session>>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").field("idle", &self.idle).field("absolute", &self.absolute).finish_non_exhaustive()
    }
}

/// A new session's cookie value (256 random bits, hex): shown to the browser once, kept here hashed.
pub struct SessionId(String);

impl SessionId {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Sessions {
    pub fn new(clock: Arc<dyn Clock>, idle_seconds: u64, absolute_seconds: u64) -> Self {
        let seconds = |s: u64| Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX / 1_000_000));
        Self {
            clock,
            idle: seconds(idle_seconds),
            absolute: seconds(absolute_seconds),
            map: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Starts a session for the key `key_id` (stored under `key_hash`); `None` when the system's random
    /// source fails.
    pub fn start(&self, key_id: KeyId, key_hash: KeyHash) -> Option<SessionId> {
        let mut id = [0u8; 32];
        let mut csrf = [0u8; 32];
        getrandom::fill(&mut id).ok()?;
        getrandom::fill(&mut csrf).ok()?;
        let now = self.clock.now();
        let session = Session { key_id, key_hash, csrf, created: now, last_seen: now };
        let mut map = self.lock();
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, s| self.alive(s, now));
        }
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map.iter().min_by_key(|(_, s)| s.created).map(|(k, _)| *k)
        {
            map.remove(&oldest);
        }
        map.insert(digest(&hex(&id)), session);
        Some(SessionId(hex(&id)))
    }

    /// The live session the cookie value `id` names, its idle time restarted; an expired one is
    /// removed.
    pub fn touch(&self, id: &str) -> Option<Session> {
        let now = self.clock.now();
        let key = digest(id);
        let mut map = self.lock();
        let session = map.get_mut(&key)?;
        if !self.alive(session, now) {
            map.remove(&key);
            return None;
        }
        session.last_seen = now;
        Some(session.clone())
    }

    pub fn end(&self, id: &str) {
        self.lock().remove(&digest(id));
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn alive(&self, s: &Session, now: DateTime<Utc>) -> bool {
        now - s.last_seen < self.idle && now - s.created < self.absolute
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        // A panic while holding the lock cannot leave the map half-changed: every change is one call.
        self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyward_core::ManualClock;

    fn sessions(clock: &ManualClock) -> Sessions {
        Sessions::new(Arc::new(clock.clone()), 1800, 43_200)
    }

    fn start(s: &Sessions) -> SessionId {
        s.start(KeyId(uuid::Uuid::nil()), KeyHash([7; 32])).unwrap()
    }

    #[test]
    fn a_session_ends_when_idle_and_at_its_absolute_limit() {
        let clock = ManualClock::new(chrono::DateTime::UNIX_EPOCH);
        let s = sessions(&clock);
        let id = start(&s);
        assert_eq!(id.expose().len(), 64);
        clock.advance(Duration::seconds(1799));
        assert!(s.touch(id.expose()).is_some(), "used within the idle time");
        clock.advance(Duration::seconds(1800));
        assert!(s.touch(id.expose()).is_none(), "idle for 30 minutes");
        assert!(s.is_empty(), "an expired session is removed");

        let id = start(&s);
        for _ in 0..24 {
            clock.advance(Duration::seconds(1790));
            assert!(s.touch(id.expose()).is_some());
        }
        clock.advance(Duration::seconds(1000));
        assert!(s.touch(id.expose()).is_none(), "past 12 hours however busy");
    }

    #[test]
    fn ids_are_kept_hashed_and_csrf_tokens_compared_whole() {
        let clock = ManualClock::new(chrono::DateTime::UNIX_EPOCH);
        let s = sessions(&clock);
        let id = start(&s);
        let other = start(&s);
        assert_ne!(id.expose(), other.expose());
        assert!(!s.lock().contains_key(&{
            let mut raw = [0u8; 32];
            raw.copy_from_slice(&id.expose().as_bytes()[..32]);
            raw
        }));
        let session = s.touch(id.expose()).unwrap();
        let token = session.csrf_token();
        assert!(session.csrf_matches(&token));
        assert!(!session.csrf_matches(&token[..63]));
        assert!(!session.csrf_matches(""));
        assert!(!session.csrf_matches(&s.touch(other.expose()).unwrap().csrf_token()));
        assert!(!format!("{session:?}").contains(&token));
        s.end(id.expose());
        assert!(s.touch(id.expose()).is_none());
    }
}
