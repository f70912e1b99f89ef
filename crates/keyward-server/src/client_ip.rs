//! The client's address. The socket peer, unless the peer is a configured trusted proxy: only then is
//! `X-Forwarded-For` read (walking from the right, past every trusted hop). Anyone else could write
//! any address into that header and slip past allow-lists and per-IP limits.

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;

pub fn client_ip(peer: Option<IpAddr>, headers: &HeaderMap, trusted_proxies: &[IpNet]) -> Option<IpAddr> {
    let peer = peer?.to_canonical();
    let trusted = |ip: &IpAddr| trusted_proxies.iter().any(|net| net.contains(ip));
    if !trusted(&peer) {
        return Some(peer);
    }
    // Every X-Forwarded-For header, in order, as one list; the rightmost entry was added last.
    let mut hops = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(value) = value.to_str() else { return Some(peer) };
        for hop in value.split(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => hops.push(ip.to_canonical()),
                // A malformed list is not evidence of anything: fall back to the proxy itself.
                Err(_) => return Some(peer),
            }
        }
    }
    let mut client = peer;
    for hop in hops.into_iter().rev() {
        client = hop;
        if !trusted(&hop) {
            break;
        }
    }
    Some(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn table() {
        let proxies: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        let cases: [(&str, &[&str], &str); 9] = [
            // An untrusted peer's header is ignored.
            ("203.0.113.9", &["1.2.3.4"], "203.0.113.9"),
            // No header: the proxy itself.
            ("10.0.0.1", &[], "10.0.0.1"),
            ("10.0.0.1", &["198.51.100.7"], "198.51.100.7"),
            // The client prepended a fake address; the rightmost untrusted hop wins.
            ("10.0.0.1", &["1.1.1.1, 198.51.100.7"], "198.51.100.7"),
            ("10.0.0.1", &["1.1.1.1, 198.51.100.7, 10.0.0.2"], "198.51.100.7"),
            ("10.0.0.1", &["1.1.1.1", "198.51.100.7"], "198.51.100.7"),
            // Only trusted hops: the leftmost.
            ("10.0.0.1", &["10.0.0.3, 10.0.0.2"], "10.0.0.3"),
            ("10.0.0.1", &["not-an-ip"], "10.0.0.1"),
            ("::ffff:10.0.0.1", &["2001:db8::1"], "2001:db8::1"),
        ];
        for (peer, xff, want) in cases {
            let mut headers = HeaderMap::new();
            for v in xff {
                headers.append("x-forwarded-for", v.parse().unwrap());
            }
            assert_eq!(client_ip(Some(ip(peer)), &headers, &proxies), Some(ip(want)), "{peer} {xff:?}");
        }
        assert_eq!(client_ip(None, &HeaderMap::new(), &proxies), None);
    }
}
