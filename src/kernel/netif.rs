//! Which interfaces carry a job's traffic, what link header each has, and which appear
//! while the job runs.
//!
//! `exec` attaches to every interface of its network namespace but lo (not only the routed
//! ones: a device without a route at start may get one later), and watches rtnetlink for
//! interfaces that appear afterwards. New interfaces are seen through a raw NETLINK_ROUTE
//! socket in the agent's mio loop rather than a netlink crate: all that is read is the fixed
//! `ifinfomsg` header of RTM_NEWLINK/RTM_DELLINK (index and link type), two stable C structs;
//! the crates (`rtnetlink`, `netlink-packet-route` + `netlink-sys`) bring an async runtime or
//! a full attribute model for that, and none of them is a dependency already.
use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Link types (ARPHRD_*, include/uapi/linux/if_arp.h) and the link header length the TC
/// programs see in front of the IP header on such a device.
pub const ARPHRD_ETHER: u16 = 1;
pub const ARPHRD_PPP: u16 = 512;
pub const ARPHRD_RAWIP: u16 = 519;
pub const ARPHRD_TUNNEL: u16 = 768;
pub const ARPHRD_TUNNEL6: u16 = 769;
pub const ARPHRD_LOOPBACK: u16 = 772;
pub const ARPHRD_SIT: u16 = 776;
pub const ARPHRD_NONE: u16 = 0xfffe;

/// `enum rf_link` in bpf/abi.h: bytes before the IP header, or unknown (fail closed).
pub fn link_header_len(arphrd: u16) -> u32 {
    use crate::kernel::skel::types::rf_link;
    match arphrd {
        ARPHRD_ETHER | ARPHRD_LOOPBACK => rf_link::RF_L2_ETHER.0,
        // tun (IFF_TUN) and WireGuard are ARPHRD_NONE; ipip, ip6tnl and sit have no
        // header_ops, so their packets start at the IP header at TC too.
        ARPHRD_NONE | ARPHRD_PPP | ARPHRD_RAWIP | ARPHRD_TUNNEL | ARPHRD_TUNNEL6 | ARPHRD_SIT => {
            rf_link::RF_L2_NONE.0
        }
        // GRE builds its outer header in header_ops, InfiniBand has its own...: unknown
        // headers are not guessed at, the job's packets there are unparsed (dropped in block
        // mode).
        _ => rf_link::RF_L2_UNKNOWN.0,
    }
}

/// The link type of `ifname` in this network namespace (SIOCGIFHWADDR's address family,
/// which is what /sys/class/net/IF/type shows, without depending on how /sys is mounted).
pub fn link_type(ifname: &str) -> io::Result<u16> {
    let sock = dgram_socket()?;
    let mut req = ifreq_for(ifname)?;
    // SAFETY: SIOCGIFHWADDR fills ifr_hwaddr of a valid ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ioctl wrote the hwaddr member of the union.
    Ok(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family })
}

/// Every interface of this network namespace except lo, by name.
pub fn all_interfaces() -> Vec<String> {
    let mut set = BTreeSet::new();
    if let Ok(list) = nix::net::if_::if_nameindex() {
        for i in list.iter() {
            set.insert(i.name().to_string_lossy().into_owned());
        }
    }
    set.remove("lo");
    set.into_iter().collect()
}

/// Whether `ifname` faces containers or network namespaces rather than the world: a bridge
/// or a veth (by driver, asked with ETHTOOL_GDRVINFO in this namespace), unless it carries a
/// default route — then it is the host's way out (a NIC enslaved to a bridge leaves through
/// the bridge, a runner in a namespace leaves through its veth). Everything else is an
/// uplink, where forwarded traffic no job judged is judged: a device wrongly taken for an
/// uplink blocks answers to a container (fails closed), never lets its outbound through.
/// tun/tap devices are uplinks here (a VPN's split tunnel is one); a microVM's tap that a
/// job starts is the job's link (see [`is_container_link`]), judged there.
pub fn faces_containers(ifname: &str) -> bool {
    let Ok(driver) = driver(ifname) else {
        return false;
    };
    matches!(driver.as_str(), "bridge" | "veth") && !default_route_devices().contains(ifname)
}

/// Whether `ifname`, appearing while a job runs, is a link of something the job started: a
/// veth's host end (its peer moved into a container's namespace) or a tap (a microVM's),
/// not carrying a default route. Bridges are where many links meet, not a link.
pub fn is_container_link(ifname: &str) -> bool {
    let Ok(driver) = driver(ifname) else {
        return false;
    };
    matches!(driver.as_str(), "veth" | "tun") && !default_route_devices().contains(ifname)
}

/// The kernel driver behind `ifname` ("veth", "bridge", "tun", "e1000", …).
pub fn driver(ifname: &str) -> io::Result<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    /// struct ethtool_drvinfo (include/uapi/linux/ethtool.h).
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 32 * 4 + 12 + 4 * 5],
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 32 * 4 + 12 + 4 * 5],
    };
    let mut req = ifreq_for(ifname)?;
    req.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
    let sock = dgram_socket()?;
    // SAFETY: ifr_data points at a live ethtool_drvinfo for the duration of the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// The devices holding a default route (IPv4 or IPv6) in this network namespace, from
/// /proc/self/net (the reader's namespace, unlike /sys, which shows the mounter's).
pub fn default_route_devices() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Ok(t) = std::fs::read_to_string("/proc/self/net/route") {
        for l in t.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            if f.len() > 7 && f[1] == "00000000" && f[7] == "00000000" {
                out.insert(f[0].to_string());
            }
        }
    }
    if let Ok(t) = std::fs::read_to_string("/proc/self/net/ipv6_route") {
        for l in t.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            // dest destlen src srclen nexthop metric refcnt use flags iface; the kernel's
            // own unreachable defaults sit on lo.
            if f.len() == 10 && f[1] == "00" && f[0].bytes().all(|b| b == b'0') && f[9] != "lo" {
                out.insert(f[9].to_string());
            }
        }
    }
    out
}

/// The networks of the addresses on `ifname` (link-local ones left out: they name a link,
/// not a network the job shares with its containers).
pub fn networks(ifname: &str) -> Vec<ipnet::IpNet> {
    let mut out = Vec::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return out;
    };
    for a in addrs.filter(|a| a.interface_name == ifname) {
        let (Some(addr), Some(mask)) = (a.address, a.netmask) else {
            continue;
        };
        let net = if let (Some(a4), Some(m4)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
            let ip = a4.ip();
            if ip.is_link_local() {
                continue;
            }
            let len = u32::from(m4.ip()).count_ones() as u8;
            ipnet::Ipv4Net::new(ip, len).map(ipnet::IpNet::from).ok()
        } else if let (Some(a6), Some(m6)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
            let ip = a6.ip();
            if (ip.segments()[0] & 0xffc0) == 0xfe80 {
                continue;
            }
            let len = u128::from(m6.ip()).count_ones() as u8;
            ipnet::Ipv6Net::new(ip, len).map(ipnet::IpNet::from).ok()
        } else {
            None
        };
        if let Some(n) = net {
            out.push(n.trunc());
        }
    }
    out
}

fn dgram_socket() -> io::Result<OwnedFd> {
    // SAFETY: a plain datagram socket, owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq_for(ifname: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain data; zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = ifname.as_bytes();
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {ifname:?} is too long"),
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    Ok(req)
}

/// An interface appearing or going away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkChange {
    /// `peer_elsewhere`: the link's other end is in another network namespace
    /// (IFLA_LINK_NETNSID: a veth whose peer is a container's).
    New {
        ifindex: u32,
        arphrd: u16,
        peer_elsewhere: bool,
    },
    Gone {
        ifindex: u32,
    },
}

/// A NETLINK_ROUTE socket subscribed to link events (RTMGRP_LINK), nonblocking, for the
/// event loop. Open it before listing the interfaces, so none can appear unseen between.
pub struct LinkWatcher {
    fd: OwnedFd,
}

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const NLMSG_HDRLEN: usize = 16;
/// struct ifinfomsg: family u8, pad u8, type u16, index i32, flags u32, change u32.
const IFINFOMSG_LEN: usize = 16;

impl LinkWatcher {
    pub fn open() -> io::Result<LinkWatcher> {
        // SAFETY: plain socket call; the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; zero is valid.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // Address changes too: they carry no link change (the reader skips them) but wake
        // the loop, which re-reads the networks shared with containers.
        sa.nl_groups =
            (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
        // SAFETY: sa is a valid sockaddr_nl of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(LinkWatcher { fd })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Every link change queued on the socket. An overrun (ENOBUFS: events were lost) is
    /// returned as an error: the caller then rescans the interfaces.
    pub fn read(&self) -> io::Result<Vec<LinkChange>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is writable for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    return Ok(out);
                }
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            out.extend(parse_link_messages(&buf[..n as usize]));
        }
    }
}

const IFLA_LINK_NETNSID: u16 = 37;

const IFLA_LINK: u16 = 5;

/// The payload of the first route attribute of type `ty` in `b` (struct rtattr: len u16,
/// type u16, then the payload, each 4-byte aligned).
fn attr(mut b: &[u8], ty: u16) -> Option<&[u8]> {
    while b.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let t = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff; // without NLA_F_NESTED/NET_BYTEORDER
        if len < 4 || len > b.len() {
            return None;
        }
        if t == ty {
            return Some(&b[4..len]);
        }
        let next = (len + 3) & !3;
        if next >= b.len() {
            return None;
        }
        b = &b[next..];
    }
    None
}

fn has_attr(b: &[u8], ty: u16) -> bool {
    attr(b, ty).is_some()
}

/// A u32 attribute's value (IFLA_LINK's: the peer's ifindex).
fn attr_u32(b: &[u8], ty: u16) -> Option<u32> {
    Some(u32::from_ne_bytes(attr(b, ty)?.get(..4)?.try_into().ok()?))
}

/// The links of one RTM_GETLINK dump datagram whose other end is in another network
/// namespace: (ifindex here, the peer's ifindex there — IFLA_LINK). NLMSG_DONE ends it.
fn parse_peer_links(mut b: &[u8], out: &mut Vec<(u32, u32)>) -> bool {
    while b.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(b[0..4].try_into().expect("4 bytes")) as usize;
        let ty = u16::from_ne_bytes(b[4..6].try_into().expect("2 bytes"));
        if len < NLMSG_HDRLEN || len > b.len() || ty == libc::NLMSG_DONE as u16 {
            return true;
        }
        if ty == libc::NLMSG_ERROR as u16 {
            return true;
        }
        let body = &b[NLMSG_HDRLEN..len];
        if ty == RTM_NEWLINK && body.len() >= IFINFOMSG_LEN {
            let index = i32::from_ne_bytes(body[4..8].try_into().expect("4 bytes"));
            let attrs = &body[IFINFOMSG_LEN..];
            if let (Ok(i), Some(peer), true) = (
                u32::try_from(index),
                attr_u32(attrs, IFLA_LINK),
                has_attr(attrs, IFLA_LINK_NETNSID),
            ) {
                out.push((i, peer));
            }
        }
        let next = (len + 3) & !3;
        if next >= b.len() {
            return false;
        }
        b = &b[next..];
    }
    false
}

/// The links of the network namespace `netns` (an open /proc/PID/ns/net) whose peer is in
/// another namespace, as (ifindex there, peer ifindex): a pod's eth0 and the index of its
/// host-side veth. Asked from a thread that enters the namespace (a netlink socket talks
/// to the namespace it was made in); the calling thread stays where it is. Needs
/// CAP_SYS_ADMIN.
pub fn peer_links_in(netns: std::fs::File) -> io::Result<Vec<(u32, u32)>> {
    std::thread::spawn(move || -> io::Result<Vec<(u32, u32)>> {
        nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let fd = send_getlink((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16, 0)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is writable for its length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 || parse_peer_links(&buf[..n as usize], &mut out) {
                return Ok(out);
            }
        }
    })
    .join()
    .map_err(|_| io::Error::other("the netlink thread panicked"))?
}

/// A NETLINK_ROUTE socket (of the calling thread's namespace) that has sent RTM_GETLINK for
/// `ifindex` (0 with NLM_F_DUMP: every link), ready for the replies.
fn send_getlink(flags: u16, ifindex: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket call; the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = Vec::with_capacity(NLMSG_HDRLEN + IFINFOMSG_LEN);
    req.extend_from_slice(&((NLMSG_HDRLEN + IFINFOMSG_LEN) as u32).to_ne_bytes());
    req.extend_from_slice(&18u16.to_ne_bytes()); // RTM_GETLINK
    req.extend_from_slice(&flags.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel's
    req.extend_from_slice(&[0u8; 4]); // family, pad, type
    req.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    req.extend_from_slice(&[0u8; 8]); // flags, change
                                      // SAFETY: req is readable for its length.
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// RTM_GETLINK of `ifindex`: the reply's body (ifinfomsg and attributes).
fn get_link(ifindex: u32) -> io::Result<Vec<u8>> {
    let fd = send_getlink(libc::NLM_F_REQUEST as u16, ifindex)?;
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: buf is writable for its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let b = &buf[..n as usize];
    if b.len() < NLMSG_HDRLEN + IFINFOMSG_LEN {
        return Err(io::Error::from_raw_os_error(libc::ENODEV));
    }
    let len = (u32::from_ne_bytes(b[0..4].try_into().expect("4 bytes")) as usize).min(b.len());
    let ty = u16::from_ne_bytes(b[4..6].try_into().expect("2 bytes"));
    if ty != RTM_NEWLINK || len < NLMSG_HDRLEN + IFINFOMSG_LEN {
        return Err(io::Error::from_raw_os_error(libc::ENODEV)); // NLMSG_ERROR: no such link
    }
    Ok(b[NLMSG_HDRLEN..len].to_vec())
}

/// Whether the other end of link `ifindex` is in another network namespace, asked with
/// RTM_GETLINK (see [`LinkChange::New`]).
pub fn peer_elsewhere(ifindex: u32) -> io::Result<bool> {
    let body = get_link(ifindex)?;
    Ok(has_attr(&body[IFINFOMSG_LEN..], IFLA_LINK_NETNSID))
}

/// The index of link `ifindex`'s other end in the namespace it is in (IFLA_LINK), when that
/// is another namespace (a veth whose peer moved into a container).
pub fn peer_index(ifindex: u32) -> io::Result<Option<u32>> {
    let body = get_link(ifindex)?;
    let attrs = &body[IFINFOMSG_LEN..];
    Ok(if has_attr(attrs, IFLA_LINK_NETNSID) {
        attr_u32(attrs, IFLA_LINK)
    } else {
        None
    })
}

/// The bridge link `ifindex` is a port of (IFLA_MASTER), if any.
pub fn master_of(ifindex: u32) -> io::Result<Option<u32>> {
    const IFLA_MASTER: u16 = 10;
    let body = get_link(ifindex)?;
    Ok(attr_u32(&body[IFINFOMSG_LEN..], IFLA_MASTER))
}

/// The link changes in one netlink datagram (several messages, each 4-byte aligned).
fn parse_link_messages(mut b: &[u8]) -> Vec<LinkChange> {
    let mut out = Vec::new();
    while b.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(b[0..4].try_into().expect("4 bytes")) as usize;
        let ty = u16::from_ne_bytes(b[4..6].try_into().expect("2 bytes"));
        if len < NLMSG_HDRLEN || len > b.len() {
            break;
        }
        let body = &b[NLMSG_HDRLEN..len];
        if (ty == RTM_NEWLINK || ty == RTM_DELLINK) && body.len() >= IFINFOMSG_LEN {
            let arphrd = u16::from_ne_bytes(body[2..4].try_into().expect("2 bytes"));
            let index = i32::from_ne_bytes(body[4..8].try_into().expect("4 bytes"));
            if let Ok(ifindex) = u32::try_from(index) {
                out.push(if ty == RTM_NEWLINK {
                    LinkChange::New {
                        ifindex,
                        arphrd,
                        peer_elsewhere: has_attr(&body[IFINFOMSG_LEN..], IFLA_LINK_NETNSID),
                    }
                } else {
                    LinkChange::Gone { ifindex }
                });
            }
        }
        let next = (len + 3) & !3;
        if next >= b.len() {
            break;
        }
        b = &b[next..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(ty: u16, arphrd: u16, index: i32, extra: usize) -> Vec<u8> {
        let len = NLMSG_HDRLEN + IFINFOMSG_LEN + extra;
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[0, 0]);
        m.extend_from_slice(&arphrd.to_ne_bytes());
        m.extend_from_slice(&index.to_ne_bytes());
        m.extend_from_slice(&[0; 8]);
        m.extend(std::iter::repeat_n(0xaa, extra));
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    #[test]
    fn parses_link_messages() {
        let mut d = msg(RTM_NEWLINK, ARPHRD_NONE, 7, 5);
        d.extend(msg(RTM_DELLINK, ARPHRD_ETHER, 3, 0));
        d.extend(msg(20 /* RTM_NEWADDR */, 0, 9, 0));
        assert_eq!(
            parse_link_messages(&d),
            vec![
                LinkChange::New {
                    ifindex: 7,
                    arphrd: ARPHRD_NONE,
                    peer_elsewhere: false
                },
                LinkChange::Gone { ifindex: 3 }
            ]
        );
        // A length that runs past the datagram ends parsing, without a panic.
        let mut bad = msg(RTM_NEWLINK, 1, 2, 0);
        bad[0] = 200;
        assert!(parse_link_messages(&bad).is_empty());
    }

    fn attr_bytes(ty: u16, val: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + val.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(val);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    #[test]
    fn reads_peer_links() {
        let mut attrs = attr_bytes(3 /* IFLA_IFNAME */, b"eth0\0");
        attrs.extend(attr_bytes(IFLA_LINK, &25u32.to_ne_bytes()));
        attrs.extend(attr_bytes(IFLA_LINK_NETNSID, &0i32.to_ne_bytes()));
        assert_eq!(attr_u32(&attrs, IFLA_LINK), Some(25));
        assert_eq!(attr_u32(&attrs, 99), None);
        // A short payload is no value.
        assert_eq!(attr_u32(&attr_bytes(IFLA_LINK, &[1, 2]), IFLA_LINK), None);
        let with = |a: &[u8], index: i32| {
            let mut m = msg(RTM_NEWLINK, ARPHRD_ETHER, index, 0);
            m.extend_from_slice(a);
            let len = m.len() as u32;
            m[0..4].copy_from_slice(&len.to_ne_bytes());
            m
        };
        let mut d = with(&attrs, 3);
        // lo: no peer; a veth whose peer is here: IFLA_LINK without IFLA_LINK_NETNSID.
        d.extend(with(&[], 1));
        d.extend(with(&attr_bytes(IFLA_LINK, &7u32.to_ne_bytes()), 6));
        let mut out = Vec::new();
        assert!(!parse_peer_links(&d, &mut out));
        assert_eq!(out, vec![(3, 25)]);
        let mut done = msg(libc::NLMSG_DONE as u16, 0, 0, 0);
        done.truncate(NLMSG_HDRLEN + 4);
        assert!(parse_peer_links(&done, &mut out));
    }

    #[test]
    fn link_header_lengths() {
        assert_eq!(link_header_len(ARPHRD_ETHER), 14);
        assert_eq!(link_header_len(ARPHRD_LOOPBACK), 14);
        assert_eq!(link_header_len(ARPHRD_NONE), 0);
        assert_eq!(link_header_len(ARPHRD_PPP), 0);
        assert_eq!(link_header_len(778 /* GRE */), 255);
    }
}
