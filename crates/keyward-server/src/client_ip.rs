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
    // Every X-Forwarded-For header, in order, as one list, read from the right: the rightmost entry
    // was added last, by the peer.
    // SECURITY: only what trusted hops wrote is parsed. Everything left of the first untrusted hop
    // is the client's to write, so it is never read, and a malformed entry ends the walk at the last
    // address a trusted hop vouched for: were the whole list refused for it instead, a client could
    // write `x` to be taken for the proxy itself, inside allow-lists written for the proxy's network.
    let values: Vec<&[u8]> = headers.get_all("x-forwarded-for").iter().map(|v| v.as_bytes()).collect();
    let mut client = peer;
    for hop in values.iter().rev().flat_map(|value| value.rsplit(|b| *b == b',')) {
        let Some(ip) = std::str::from_utf8(hop).ok().and_then(|hop| hop.trim().parse::<IpAddr>().ok()) else {
            break;
        };
        client = ip.to_canonical();
        if !trusted(&client) {
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
        let cases: [(&str, &[&str], &str); 15] = [
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
            // What the client wrote left of the address its proxy appended is never read.
            ("10.0.0.1", &["x, 198.51.100.7"], "198.51.100.7"),
            ("10.0.0.1", &["x", "198.51.100.7"], "198.51.100.7"),
            ("10.0.0.1", &["unknown, 1.1.1.1, 198.51.100.7"], "198.51.100.7"),
            // A malformed entry ends the walk at the last address a trusted hop vouched for.
            ("10.0.0.1", &["x, 10.0.0.2"], "10.0.0.2"),
            ("10.0.0.1", &["198.51.100.7, x, 10.0.0.2"], "10.0.0.2"),
            ("10.0.0.1", &["198.51.100.7,"], "10.0.0.1"),
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
