//! IP allow-lists: single addresses and CIDR blocks, v4 and v6. An empty list allows every address.
//! IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) are treated as the IPv4 address they carry, on both
//! sides, so a dual-stack listener cannot slip past a v4 rule.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

use crate::key::quote_if_not_key;

const MAX_ENTRIES: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpListError {
    #[error("{} is not an IP address or CIDR block", quote_if_not_key(.0))]
    Invalid(String),
    #[error("at most {MAX_ENTRIES} entries are allowed")]
    TooMany,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IpAllowList(Vec<IpNet>);

impl IpAllowList {
    /// Any address.
    pub const EMPTY: IpAllowList = IpAllowList(Vec::new());

    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, IpListError> {
        if items.len() > MAX_ENTRIES {
            return Err(IpListError::TooMany);
        }
        let mut nets = items.iter().map(|item| parse_entry(item.as_ref().trim())).collect::<Result<Vec<_>, _>>()?;
        nets.sort();
        nets.dedup();
        Ok(Self(nets))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn nets(&self) -> &[IpNet] {
        &self.0
    }

    /// Canonical string forms (`10.0.0.0/8`, `2001:db8::1/128`), for storage and the API.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }

    /// Whether `ip` may use the key. An empty list allows everyone.
    pub fn allows(&self, ip: IpAddr) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

fn parse_entry(s: &str) -> Result<IpNet, IpListError> {
    let net = match s.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => s.parse::<IpAddr>().map(IpNet::from).map_err(|_| IpListError::Invalid(s.to_owned()))?,
    };
    Ok(canonical(net.trunc()))
}

/// `::ffff:a.b.c.d/n` with n >= 96 is the v4 block `a.b.c.d/(n-96)`.
fn canonical(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
        && let Ok(v4net) = Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(v4net);
    }
    net
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[&str]) -> IpAllowList {
        IpAllowList::parse(items).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn allows_table() {
        let table: [(&[&str], &str, bool); 16] = [
            (&[], "203.0.113.9", true),
            (&["203.0.113.9"], "203.0.113.9", true),
            (&["203.0.113.9"], "203.0.113.10", false),
            (&["10.0.0.0/8"], "10.255.1.2", true),
            (&["10.0.0.0/8"], "11.0.0.1", false),
            (&["192.168.1.0/24", "10.0.0.0/8"], "192.168.1.77", true),
            (&["0.0.0.0/0"], "8.8.8.8", true),
            (&["2001:db8::/32"], "2001:db8:1::5", true),
            (&["2001:db8::/32"], "2001:db9::5", false),
            (&["::1"], "::1", true),
            (&["::1"], "127.0.0.1", false),
            // v4-mapped v6 client against a v4 rule, and a v4-mapped rule against a v4 client.
            (&["10.0.0.0/8"], "::ffff:10.1.2.3", true),
            (&["10.0.0.0/8"], "::ffff:11.1.2.3", false),
            (&["::ffff:10.0.0.0/104"], "10.9.9.9", true),
            (&["::ffff:192.0.2.1"], "192.0.2.1", true),
            (&["10.0.0.0/8"], "2001:db8::a00:1", false),
        ];
        for (entries, client, want) in table {
            assert_eq!(list(entries).allows(ip(client)), want, "{entries:?} allows {client}");
        }
    }

    #[test]
    fn entries_are_canonical() {
        let l = list(&["10.1.2.3/8", " 192.0.2.1 ", "::ffff:10.0.0.0/104", "2001:DB8::1"]);
        assert_eq!(l.to_strings(), vec!["10.0.0.0/8", "192.0.2.1/32", "2001:db8::1/128"]);
    }

    #[test]
    fn bad_entries_are_named() {
        for bad in ["10.0.0.256", "10.0.0.0/33", "example.com", "", "1.2.3.4/-1", "::1/129"] {
            assert_eq!(IpAllowList::parse(&[bad]), Err(IpListError::Invalid(bad.to_owned())), "{bad}");
        }
        let many: Vec<String> = (0..300).map(|i| format!("10.0.{}.{}", i / 256, i % 256)).collect();
        assert_eq!(IpAllowList::parse(&many), Err(IpListError::TooMany));
    }
}
