//! `pod-identity-agent initialize`: give the node the link-local addresses pods call.
//!
//! Over rtnetlink (no `ip` binary needed in the image): get or create a `dummy` link, bring it
//! up, and add each address unless the link already has it, so running twice changes nothing.
//! IPv6 addresses are added with `IFA_F_NODAD`, so the server can bind them at once instead of
//! waiting out duplicate-address detection. Kernels without the `dummy` driver get the
//! addresses on `lo` instead, and the command says which it used.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::LinkMessage;
use rtnetlink::{Handle, LinkDummy, LinkUnspec};

/// Fallback link when the kernel cannot create `dummy` links.
const LOOPBACK: &str = "lo";

/// errno values this module tells apart.
const EPERM: i32 = 1;
const ENODEV: i32 = 19;
const EEXIST: i32 = 17;
const EOPNOTSUPP: i32 = 95;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("--addresses: '{0}' is not an address with a prefix length (e.g. 169.254.170.23/32)")]
    BadAddress(String),
    #[error(
        "--link-name: '{0}' is not a valid interface name (1-15 characters, no '/', ':' or spaces)"
    )]
    BadLinkName(String),
    #[error(
        "permission denied: initialize needs CAP_NET_ADMIN (run it as root or grant NET_ADMIN)"
    )]
    Permission,
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("cannot open a netlink socket: {0}")]
    Socket(std::io::Error),
}

impl NetlinkError {
    /// 64 for bad arguments, 77 (`EX_NOPERM`) for a missing capability, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            NetlinkError::BadAddress(_) | NetlinkError::BadLinkName(_) => crate::config::EXIT_USAGE,
            NetlinkError::Permission => 77,
            _ => 1,
        }
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

fn wrap(e: rtnetlink::Error) -> NetlinkError {
    if errno(&e) == Some(EPERM) {
        NetlinkError::Permission
    } else {
        NetlinkError::Netlink(e.to_string())
    }
}

/// `addr/prefix`, e.g. `169.254.170.23/32` or `fd00:ec2::23/128`.
pub fn parse_address(spec: &str) -> Result<(IpAddr, u8), NetlinkError> {
    let bad = || NetlinkError::BadAddress(spec.to_owned());
    let (ip, prefix) = spec.trim().split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(bad());
    }
    Ok((ip, prefix))
}

fn valid_link_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// What `initialize` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The link the addresses are on (the requested one, or `lo` as the fallback).
    pub link: String,
    pub link_created: bool,
    pub fell_back_to_loopback: bool,
    pub added: Vec<IpAddr>,
    pub already_present: Vec<IpAddr>,
}

/// Make sure `link_name` exists and carries `addresses`.
pub async fn initialize(link_name: &str, addresses: &[String]) -> Result<Report, NetlinkError> {
    if !valid_link_name(link_name) {
        return Err(NetlinkError::BadLinkName(link_name.to_owned()));
    }
    let wanted = addresses
        .iter()
        .filter(|a| !a.trim().is_empty())
        .map(|a| parse_address(a))
        .collect::<Result<Vec<_>, _>>()?;
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
    tokio::spawn(connection);

    let mut report = Report {
        link: link_name.to_owned(),
        ..Report::default()
    };
    let index = match find_link(&handle, link_name).await? {
        Some(index) => index,
        None => match handle
            .link()
            .add(LinkDummy::new(link_name).up().build())
            .execute()
            .await
        {
            Ok(()) => {
                report.link_created = true;
                find_link(&handle, link_name).await?.ok_or_else(|| {
                    NetlinkError::Netlink(format!(
                        "{link_name} vanished right after it was created"
                    ))
                })?
            }
            // Lost a race with another initializer: the link is there now.
            Err(e) if errno(&e) == Some(EEXIST) => {
                find_link(&handle, link_name).await?.ok_or_else(|| {
                    NetlinkError::Netlink(format!("{link_name} exists but cannot be read"))
                })?
            }
            Err(e) if errno(&e) == Some(EPERM) => return Err(NetlinkError::Permission),
            // No dummy driver: EOPNOTSUPP ("unknown link kind"), or ENODEV from some kernels.
            Err(e) if matches!(errno(&e), Some(EOPNOTSUPP) | Some(ENODEV)) => {
                tracing::warn!(link = link_name, error = %e, "cannot create a dummy link; putting the addresses on lo instead");
                report.link = LOOPBACK.to_owned();
                report.fell_back_to_loopback = true;
                find_link(&handle, LOOPBACK)
                    .await?
                    .ok_or_else(|| NetlinkError::Netlink("the loopback link is missing".into()))?
            }
            Err(e) => return Err(wrap(e)),
        },
    };
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(wrap)?;

    let present = link_addresses(&handle, index).await?;
    for (ip, prefix) in wanted {
        if present.contains(&ip) {
            report.already_present.push(ip);
            continue;
        }
        let mut request = handle.address().add(index, ip, prefix);
        if ip.is_ipv6() {
            request
                .message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match request.execute().await {
            Ok(()) => report.added.push(ip),
            Err(e) if errno(&e) == Some(EEXIST) => report.already_present.push(ip),
            Err(e) => return Err(wrap(e)),
        }
    }
    Ok(report)
}

async fn find_link(handle: &Handle, name: &str) -> Result<Option<u32>, NetlinkError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(LinkMessage { header, .. })) => Ok(Some(header.index)),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(wrap(e)),
    }
}

/// Every address on the link with this index.
pub async fn link_addresses(handle: &Handle, index: u32) -> Result<Vec<IpAddr>, NetlinkError> {
    let mut out = Vec::new();
    let mut stream = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Some(AddressMessage { attributes, .. }) = stream.try_next().await.map_err(wrap)? {
        for attr in attributes {
            if let AddressAttribute::Address(ip) | AddressAttribute::Local(ip) = attr {
                if !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_address_specs() {
        assert_eq!(
            parse_address("169.254.170.23/32").unwrap(),
            ("169.254.170.23".parse().unwrap(), 32)
        );
        assert_eq!(
            parse_address("fd00:ec2::23/128").unwrap(),
            ("fd00:ec2::23".parse().unwrap(), 128)
        );
        for bad in [
            "169.254.170.23",
            "169.254.170.23/33",
            "fd00::1/129",
            "x/32",
            "[fd00::1]/128",
        ] {
            assert!(parse_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn link_names() {
        assert!(valid_link_name("pod-id-link0"));
        for bad in ["", "a/b", "a:b", "has space", "sixteen-chars-xx"] {
            assert!(!valid_link_name(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn argument_errors_come_before_any_netlink_call() {
        let e = initialize("pod-id-link0", &["nonsense".into()])
            .await
            .unwrap_err();
        assert_eq!(e.exit_code(), 64);
        assert!(e.to_string().contains("--addresses"));
        let e = initialize("bad/name", &[]).await.unwrap_err();
        assert!(e.to_string().contains("--link-name"));
    }
}
