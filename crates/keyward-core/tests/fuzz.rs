//! Property-based fuzzing of the parsers that see untrusted input: the key format, scopes and IP
//! allow-lists. Every property runs thousands of cases from a fixed seed, so a run is reproducible and
//! CI never fails on a case no developer can replay; `KEYWARD_FUZZ_SEED=<u64>` explores another part
//! of the input space and `KEYWARD_FUZZ_SCALE=<n>` runs n times as many cases.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Debug;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use keyward_core::key::quote_if_not_key;
use keyward_core::{Environment, IpAllowList, IpListError, KeyPrefix, KeywardScope, PlainKey, Scope, ScopeSet};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

#[path = "support/seeded.rs"]
mod seeded;

/// Runs `test` on `cases` values of `strategy` from a fixed seed ([`seeded::runner`]).
fn check<S: Strategy>(cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: Debug,
{
    if let Err(e) = seeded::runner(cases, 4_096, 10_000).run(&strategy, test) {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------------------
// Key format
// ---------------------------------------------------------------------------------------------------

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The documented checksum, written again from the format's description (CRC32 of everything before
/// it, base62, six digits, left-padded with `0`), so the parser is checked against the spec and not
/// against itself.
fn spec_checksum(signed: &str) -> String {
    let mut n = crc32fast::hash(signed.as_bytes());
    let mut digits = [b'0'; 6];
    for d in digits.iter_mut().rev() {
        *d = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8(digits.to_vec()).unwrap()
}

/// A valid key built from the spec with a secret drawn by proptest (not by the OS), so cases replay.
fn valid_key() -> impl Strategy<Value = String> {
    ("[a-z0-9]{1,16}", prop_oneof![Just("live"), Just("test")], "[0-9A-Za-z]{43}").prop_map(|(prefix, env, secret)| {
        let signed = format!("{prefix}_{env}_{secret}");
        let sum = spec_checksum(&signed);
        format!("{signed}{sum}")
    })
}

#[derive(Debug, Clone)]
enum Edit {
    Replace(prop::sample::Index, char),
    Delete(prop::sample::Index),
    Insert(prop::sample::Index, char),
    SwapAdjacent(prop::sample::Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    // Characters a typo or an attacker would produce: the key's own alphabet most of the time.
    let c = prop_oneof![
        4 => proptest::char::ranges(vec!['0'..='9', 'A'..='Z', 'a'..='z'].into()),
        1 => prop_oneof![Just('_'), Just('-'), Just(' '), Just('\0'), Just('é'), Just('\u{200b}')],
        1 => any::<char>(),
    ];
    prop_oneof![
        (any::<prop::sample::Index>(), c.clone()).prop_map(|(i, c)| Edit::Replace(i, c)),
        any::<prop::sample::Index>().prop_map(Edit::Delete),
        (any::<prop::sample::Index>(), c).prop_map(|(i, c)| Edit::Insert(i, c)),
        any::<prop::sample::Index>().prop_map(Edit::SwapAdjacent),
    ]
}

/// The edited key, or `None` when the edit changes nothing (same character, equal neighbours).
fn apply(key: &str, edit: &Edit) -> Option<String> {
    let mut chars: Vec<char> = key.chars().collect();
    match edit {
        Edit::Replace(i, c) => {
            let at = i.index(chars.len());
            if chars[at] == *c {
                return None;
            }
            chars[at] = *c;
        }
        Edit::Delete(i) => {
            chars.remove(i.index(chars.len()));
        }
        Edit::Insert(i, c) => chars.insert(i.index(chars.len() + 1), *c),
        Edit::SwapAdjacent(i) => {
            let at = i.index(chars.len() - 1);
            if chars[at] == chars[at + 1] {
                return None;
            }
            chars.swap(at, at + 1);
        }
    }
    Some(chars.into_iter().collect())
}

#[test]
fn a_key_built_to_the_spec_parses_with_its_parts() {
    check(3_000, valid_key(), |key| {
        let parsed = PlainKey::parse(&key).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert_eq!(parsed.expose_secret(), key.as_str());
        let (prefix, rest) = key.split_once('_').unwrap();
        let env = rest.split('_').next().unwrap();
        prop_assert_eq!(parsed.prefix(), format!("{prefix}_{env}_"));
        prop_assert_eq!(parsed.environment().as_str(), env);
        prop_assert_eq!(parsed.hint(), &key[key.len() - 4..]);
        // What may be logged about a key never holds its secret.
        prop_assert!(!parsed.redacted().contains(&key[parsed.prefix().len()..key.len() - 4]));
        let debug = format!("{:?}", parsed);
        prop_assert!(!debug.contains(&key[parsed.prefix().len()..key.len() - 4]));
        Ok(())
    });
}

#[test]
fn any_one_character_edit_of_a_valid_key_is_refused() {
    // SECURITY: a substitution is always caught (CRC32 detects every burst of up to 32 bits); a
    // deletion, insertion or transposition changes the length or is caught with overwhelming
    // probability. Either way the key is refused before any storage lookup.
    check(10_000, (valid_key(), edit()), |(key, edit)| {
        let Some(changed) = apply(&key, &edit) else { return Ok(()) };
        prop_assert!(PlainKey::parse(&changed).is_err(), "{edit:?} of {key} gave {changed}, accepted");
        Ok(())
    });
}

/// Strings near a key's shape, where the parser's edge cases are: prefix lengths around 16, unknown
/// environments, bodies around 49 characters with separators and multi-byte characters.
fn key_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        ".{0,80}",
        "[a-z0-9_]{0,20}(_live_|_test_|_prod_|__|_)[0-9A-Za-z_é-]{0,60}",
        "[a-zA-Z0-9]{0,18}_(live|test|LIVE)_[0-9A-Za-z]{40,52}",
        valid_key().prop_map(|k| format!("{k}{k}")),
        (valid_key(), "[^\\x00]{0,3}").prop_map(|(k, tail)| format!("{k}{tail}")),
    ]
}

#[test]
fn arbitrary_strings_never_panic_and_only_the_key_shape_parses() {
    let shape = |s: &str| {
        let mut parts = s.splitn(3, '_');
        let (prefix, env, body) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        (1..=16).contains(&prefix.len())
            && prefix.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && (env == "live" || env == "test")
            && body.len() == 49
            && body.bytes().all(|b| b.is_ascii_alphanumeric())
            && spec_checksum(&s[..s.len() - 6]) == s[s.len() - 6..]
    };
    check(10_000, key_like(), |input| {
        let parsed = PlainKey::parse(&input);
        prop_assert_eq!(parsed.is_ok(), shape(&input), "{:?}", parsed);
        // An error never carries the input: the type is a fieldless enum.
        if let Err(e) = parsed {
            prop_assert!(input.len() < 8 || !e.to_string().contains(&input));
        }
        Ok(())
    });
}

#[test]
fn prefix_parse_accepts_exactly_short_lowercase_alphanumerics() {
    check(3_000, prop_oneof![any::<String>(), "[a-z0-9A-Z_-]{0,20}"], |input| {
        let want =
            (1..=16).contains(&input.len()) && input.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        prop_assert_eq!(KeyPrefix::parse(&input).is_ok(), want);
        if let Ok(p) = KeyPrefix::parse(&input) {
            prop_assert_eq!(
                PlainKey::generate(&p, Environment::Test).map(|k| k.prefix().len()).ok(),
                Some(input.len() + 6)
            );
        }
        Ok(())
    });
}

#[test]
fn a_value_that_could_be_a_key_is_never_quoted() {
    check(5_000, prop_oneof![key_like(), valid_key()], |input| {
        let quoted = quote_if_not_key(&input);
        if PlainKey::parse(&input).is_ok()
            || input.len() > 16 && !input.contains(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        {
            prop_assert!(!quoted.contains(&input), "{input} quoted as {quoted}");
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------------
// Scopes
// ---------------------------------------------------------------------------------------------------

/// Valid scopes over a tiny alphabet, so that wildcards and stems overlap often, plus keyward's own.
fn valid_scope() -> impl Strategy<Value = String> {
    let segment = "[ab][ab._-]{0,2}";
    prop_oneof![
        1 => Just("*".to_owned()),
        2 => proptest::sample::select(KeywardScope::ALL.map(KeywardScope::as_str).to_vec()).prop_map(str::to_owned),
        6 => (proptest::collection::vec(segment, 2..4), any::<bool>()).prop_map(|(segs, wild)| {
            let mut s = segs.join(":");
            if wild {
                s.push_str(":*");
            }
            s
        }),
        1 => (segment, any::<bool>()).prop_map(|(seg, wild)| format!("{seg}:{}", if wild { "*" } else { "x" })),
    ]
}

fn scope_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z:*_. é-]{0,12}",
        "keyward:[a-z:*]{0,14}",
        "(\\*|[a-z]{0,3})(:(\\*|[a-z]{0,3})){0,4}",
        "[a-z:]{120,135}",
        valid_scope(),
    ]
}

fn scope(s: &str) -> Scope {
    Scope::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

#[test]
fn scope_parse_never_panics_and_round_trips() {
    check(10_000, scope_like(), |input| {
        let Ok(parsed) = Scope::parse(&input) else { return Ok(()) };
        prop_assert_eq!(parsed.to_string(), input.clone());
        prop_assert_eq!(Scope::parse(&parsed.to_string()), Ok(parsed.clone()));
        let json = serde_json::to_string(&parsed).unwrap();
        prop_assert_eq!(serde_json::from_str::<Scope>(&json).ok(), Some(parsed.clone()));
        prop_assert!(input.len() <= 128 && input.is_ascii());
        prop_assert_eq!(parsed.is_reserved(), parsed.keyward().is_some(), "an unknown keyward: scope parsed");
        Ok(())
    });
}

#[test]
fn every_valid_scope_generated_parses() {
    check(3_000, valid_scope(), |input| {
        prop_assert!(Scope::parse(&input).is_ok(), "{input}");
        Ok(())
    });
}

#[test]
fn coverage_laws_hold() {
    check(10_000, (valid_scope(), valid_scope(), valid_scope()), |(a, b, c)| {
        let (a, b, c) = (scope(&a), scope(&b), scope(&c));
        prop_assert!(a.covers(&a), "not reflexive");
        if a.covers(&b) && b.covers(&c) {
            prop_assert!(a.covers(&c), "{a} covers {b} covers {c}, but not {c}");
        }
        // SECURITY: a keyward: scope is satisfied by itself only: no wildcard, not even `*`.
        if b.is_reserved() {
            prop_assert_eq!(a.covers(&b), a == b);
        }
        if !a.as_str().ends_with('*') {
            prop_assert_eq!(a.covers(&b), a == b, "a scope without a wildcard covers only itself");
        }
        if a.as_str() == "*" {
            prop_assert_eq!(a.covers(&b), !b.is_reserved());
        }
        if let Some(stem) = a.as_str().strip_suffix(":*")
            && !b.is_reserved()
            && b.as_str().starts_with(&format!("{stem}:"))
        {
            prop_assert!(a.covers(&b), "{a} does not cover {b}");
        }
        if a.covers(&b) && a != b {
            prop_assert!(!b.is_reserved());
            let stem = a.as_str().trim_end_matches('*');
            prop_assert!(b.as_str().starts_with(stem), "{a} covers {b} outside its stem");
        }
        Ok(())
    });
}

#[test]
fn scope_sets_cover_as_their_members_and_wildcards_never_grant_keyward_permissions() {
    let sets = proptest::collection::vec(valid_scope(), 0..6);
    check(5_000, (sets, valid_scope()), |(items, required)| {
        let set = ScopeSet::parse(&items).unwrap();
        let required = scope(&required);
        prop_assert_eq!(set.covers(&required), items.iter().any(|h| scope(h).covers(&required)));
        // Sorted, deduplicated, and parsing its own output changes nothing.
        let strings = set.to_strings();
        prop_assert!(strings.windows(2).all(|w| w[0] < w[1]));
        prop_assert_eq!(ScopeSet::parse(&strings).unwrap(), set.clone());
        for k in KeywardScope::ALL {
            let held = items.iter().any(|s| s == k.as_str());
            let admin = items.iter().any(|s| s == "keyward:admin");
            let write_implies_read = k == KeywardScope::KeysRead && items.iter().any(|s| s == "keyward:keys:write");
            prop_assert_eq!(set.permits(k), held || admin || write_implies_read, "{:?} permits {}", strings, k);
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------------
// IP allow-lists
// ---------------------------------------------------------------------------------------------------

fn ip_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9a-fA-F:./ %-]{0,45}",
        "[0-9]{1,4}\\.[0-9]{1,4}\\.[0-9]{1,4}\\.[0-9]{1,4}(/[0-9]{1,3})?",
        "(::ffff:)?[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}/[0-9]{1,3}",
        " ?[0-9a-f]{0,4}(:[0-9a-f]{0,4}){0,8}(/-?[0-9]{1,3})? ?",
        (any::<u32>(), 0u8..40).prop_map(|(a, p)| format!("{}/{p}", Ipv4Addr::from(a))),
        (any::<u128>(), 0u8..140).prop_map(|(a, p)| format!("{}/{p}", Ipv6Addr::from(a))),
    ]
}

#[test]
fn allow_list_parse_never_panics_and_its_output_parses_to_itself() {
    check(10_000, proptest::collection::vec(ip_like(), 0..5), |items| {
        match IpAllowList::parse(&items) {
            Ok(list) => {
                prop_assert!(list.nets().len() <= items.len());
                let again = IpAllowList::parse(&list.to_strings()).unwrap();
                prop_assert_eq!(&again, &list);
                // Order of entries does not matter.
                let reversed: Vec<String> = items.iter().rev().cloned().collect();
                prop_assert_eq!(IpAllowList::parse(&reversed).unwrap(), list);
            }
            Err(IpListError::Invalid(entry)) => {
                prop_assert!(items.iter().any(|i| i.trim() == entry), "{entry} is not one of the entries");
                // The error names the entry unless it could be a key.
                let message = IpListError::Invalid(entry.clone()).to_string();
                prop_assert!(
                    !(entry.len() > 16
                        && entry.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                        && message.contains(&entry))
                );
            }
            Err(IpListError::TooMany) => prop_assert!(items.len() > 256),
        }
        Ok(())
    });
}

fn net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<u32>(), 0u8..=32).prop_map(|(a, p)| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), p).unwrap())),
        // Not in ::ffff:0:0/96: those are v4 blocks and have a property of their own.
        (any::<u128>(), 0u8..=128).prop_map(|(a, p)| {
            let a = if Ipv6Addr::from(a).to_ipv4_mapped().is_some() { a ^ (1 << 100) } else { a };
            IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), p).unwrap())
        }),
    ]
}

/// Addresses at and around the edges of a block, where an off-by-one in containment would show.
fn probes(net: &IpNet) -> Vec<IpAddr> {
    match net {
        IpNet::V4(n) => {
            let (lo, hi) = (u32::from(n.network()), u32::from(n.broadcast()));
            [lo.wrapping_sub(1), lo, lo.wrapping_add(1), hi.wrapping_sub(1), hi, hi.wrapping_add(1)]
                .map(|a| IpAddr::V4(Ipv4Addr::from(a)))
                .to_vec()
        }
        IpNet::V6(n) => {
            let (lo, hi) = (u128::from(n.network()), u128::from(n.broadcast()));
            [lo.wrapping_sub(1), lo, lo.wrapping_add(1), hi.wrapping_sub(1), hi, hi.wrapping_add(1)]
                .map(|a| IpAddr::V6(Ipv6Addr::from(a)))
                .to_vec()
        }
    }
}

fn any_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
    ]
}

#[test]
fn containment_agrees_with_ipnet() {
    let nets = proptest::collection::vec(net(), 0..4);
    check(10_000, (nets, proptest::collection::vec(any_ip(), 1..4)), |(nets, mut ips)| {
        // Written the way a user would: host bits set, single addresses without a length.
        let items: Vec<String> = nets
            .iter()
            .map(|n| if n.prefix_len() == n.max_prefix_len() { n.addr().to_string() } else { n.to_string() })
            .collect();
        let list = IpAllowList::parse(&items).unwrap();
        ips.extend(nets.iter().flat_map(probes));
        for ip in ips {
            if let IpAddr::V6(v6) = ip
                && v6.to_ipv4_mapped().is_some()
            {
                continue;
            }
            let want = nets.is_empty() || nets.iter().any(|n| n.trunc().contains(&ip));
            prop_assert_eq!(list.allows(ip), want, "{:?} allows {}", items, ip);
        }
        Ok(())
    });
}

#[test]
fn a_v4_mapped_address_is_the_v4_address_on_both_sides() {
    let v4nets = proptest::collection::vec((any::<u32>(), 0u8..=32), 1..4);
    check(5_000, (v4nets, any::<u32>()), |(nets, client)| {
        let plain: Vec<String> = nets.iter().map(|(a, p)| format!("{}/{p}", Ipv4Addr::from(*a))).collect();
        let mapped: Vec<String> =
            nets.iter().map(|(a, p)| format!("{}/{}", Ipv4Addr::from(*a).to_ipv6_mapped(), p + 96)).collect();
        let (plain, mapped) = (IpAllowList::parse(&plain).unwrap(), IpAllowList::parse(&mapped).unwrap());
        prop_assert_eq!(&plain, &mapped);
        let mut probes_v4: Vec<Ipv4Addr> = vec![Ipv4Addr::from(client)];
        for (a, p) in &nets {
            let n = Ipv4Net::new(Ipv4Addr::from(*a), *p).unwrap();
            for probe in probes(&IpNet::V4(n)) {
                if let IpAddr::V4(v4) = probe {
                    probes_v4.push(v4);
                }
            }
        }
        for v4 in probes_v4 {
            prop_assert_eq!(plain.allows(IpAddr::V4(v4)), plain.allows(IpAddr::V6(v4.to_ipv6_mapped())), "{}", v4);
        }
        Ok(())
    });
}
