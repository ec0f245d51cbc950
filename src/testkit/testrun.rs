//! BPF_PROG_TEST_RUN for the TC programs, and frame builders: shared by the packet tests
//! (tests/bpf_prog.rs) and the per-packet benchmarks (bench/).
use std::net::IpAddr;

use anyhow::{Context, Result};
use libbpf_rs::ProgramInput;

use crate::kernel::skel::types::__sk_buff;

/// What a TC program returned: -1 = pass on (TC_ACT_UNSPEC / TCX_NEXT), 2 = drop.
pub const PASS: i32 = -1;
pub const DROP: i32 = 2;

/// Runs `prog` once (or `repeat` times) on `frame` as if it arrived on `ifindex`.
/// Returns the program's return value and the mean run time.
pub fn run_tc(
    prog: &libbpf_rs::ProgramMut<'_>,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
) -> Result<(i32, std::time::Duration)> {
    let mut ctx = skb_ctx(ifindex);
    let input = ProgramInput {
        data_in: Some(frame),
        context_in: Some(&mut ctx[..]),
        repeat,
        ..Default::default()
    };
    let out = prog.test_run(input).context("BPF_PROG_TEST_RUN")?;
    Ok((out.return_value as i32, out.duration))
}

/// Runs `prog` once on `frame` and also returns the packet as the program left it (for
/// programs that rewrite packets).
pub fn run_tc_output(
    prog: &libbpf_rs::ProgramMut<'_>,
    frame: &[u8],
    ifindex: u32,
) -> Result<(i32, Vec<u8>)> {
    let mut ctx = skb_ctx(ifindex);
    let mut out = vec![0u8; frame.len() + 256];
    let input = ProgramInput {
        data_in: Some(frame),
        context_in: Some(&mut ctx[..]),
        data_out: Some(&mut out[..]),
        ..Default::default()
    };
    let o = prog.test_run(input).context("BPF_PROG_TEST_RUN")?;
    let n = o.data.map(|d| d.len()).unwrap_or(0);
    let rc = o.return_value as i32;
    out.truncate(n);
    Ok((rc, out))
}

/// What a test run may set in the packet's metadata besides the interface.
#[derive(Debug, Default, Clone, Copy)]
pub struct SkbMeta {
    pub mark: u32,
    pub gso_size: u32,
    pub gso_segs: u32,
    /// The device the packet came in on (0: sent from this host).
    pub ingress_ifindex: u32,
}

/// Runs `prog` once on `frame` with `meta` in its `__sk_buff`. Returns the program's return
/// value and the mark the packet left with.
pub fn run_tc_meta(
    prog: &libbpf_rs::ProgramMut<'_>,
    frame: &[u8],
    ifindex: u32,
    meta: SkbMeta,
) -> Result<(i32, u32)> {
    let mut ctx = skb_ctx(ifindex);
    let mark = std::mem::offset_of!(__sk_buff, mark);
    ctx[mark..mark + 4].copy_from_slice(&meta.mark.to_ne_bytes());
    let at = std::mem::offset_of!(__sk_buff, gso_size);
    ctx[at..at + 4].copy_from_slice(&meta.gso_size.to_ne_bytes());
    let at = std::mem::offset_of!(__sk_buff, gso_segs);
    ctx[at..at + 4].copy_from_slice(&meta.gso_segs.to_ne_bytes());
    let at = std::mem::offset_of!(__sk_buff, ingress_ifindex);
    ctx[at..at + 4].copy_from_slice(&meta.ingress_ifindex.to_ne_bytes());
    let mut ctx_out = vec![0u8; ctx.len()];
    let input = ProgramInput {
        data_in: Some(frame),
        context_in: Some(&mut ctx[..]),
        context_out: Some(&mut ctx_out[..]),
        ..Default::default()
    };
    let rc = prog
        .test_run(input)
        .context("BPF_PROG_TEST_RUN")?
        .return_value as i32;
    let mark_out = u32::from_ne_bytes(ctx_out[mark..mark + 4].try_into().unwrap());
    Ok((rc, mark_out))
}

/// A `__sk_buff` context, built as bytes rather than as a struct value: the kernel refuses
/// a context whose padding is not zero, and Rust promises nothing about padding bytes.
fn skb_ctx(ifindex: u32) -> Vec<u8> {
    let mut ctx = vec![0u8; std::mem::size_of::<__sk_buff>()];
    let at = std::mem::offset_of!(__sk_buff, ifindex);
    ctx[at..at + 4].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// An Ethernet frame carrying IPv4 or IPv6 and a TCP or UDP header plus payload.
/// Checksums are left zero: TC programs do not look at them.
pub fn frame(
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    sport: u16,
    dport: u16,
    tcp_flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    if proto == 6 {
        return tcp_frame(src, dst, sport, dport, 1, 0, tcp_flags, &[], payload);
    }
    let mut l4 = Vec::new();
    if proto == 17 {
        l4.extend_from_slice(&sport.to_be_bytes());
        l4.extend_from_slice(&dport.to_be_bytes());
        l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
    }
    l4.extend_from_slice(payload);
    ip_frame(src, dst, proto, &l4, 0)
}

/// A TCP segment with sequence numbers and options (`options.len()` a multiple of 4).
#[allow(clippy::too_many_arguments)]
pub fn tcp_frame(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&seq.to_be_bytes());
    l4.extend_from_slice(&ack.to_be_bytes());
    l4.push(((5 + options.len() / 4) as u8) << 4);
    l4.push(flags);
    l4.extend_from_slice(&64240u16.to_be_bytes());
    l4.extend_from_slice(&[0, 0, 0, 0]);
    l4.extend_from_slice(options);
    l4.extend_from_slice(payload);
    ip_frame(src, dst, 6, &l4, 0)
}

/// A DNS message with TCP's 2-byte length prefix.
pub fn tcp_dns(msg: &[u8]) -> Vec<u8> {
    let mut v = (msg.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(msg);
    v
}

/// An IP packet in an Ethernet frame; `frag` is the IPv4 fragment field (flags+offset).
pub fn ip_frame(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8], frag: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            f.push(0x45);
            f.push(0);
            f.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            f.extend_from_slice(&[0x12, 0x34]);
            f.extend_from_slice(&frag.to_be_bytes());
            f.push(64);
            f.push(proto);
            f.extend_from_slice(&[0, 0]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&0x86ddu16.to_be_bytes());
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            f.push(proto);
            f.push(64);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed address families"),
    }
    f.extend_from_slice(l4);
    f
}

/// A DNS query for `name` (type 1 = A, 28 = AAAA).
pub fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(&wire(name));
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m
}

/// The wire form of `name` without the terminating zero.
pub fn wire(name: &str) -> Vec<u8> {
    let mut w = Vec::new();
    for label in name.trim_end_matches('.').split('.') {
        w.push(label.len() as u8);
        w.extend_from_slice(label.as_bytes());
    }
    w
}

/// One answer record for a DNS answer under construction.
#[derive(Clone, Copy)]
pub enum Rr<'a> {
    A(&'a str, u32, [u8; 4]),
    Aaaa(&'a str, u32, [u8; 16]),
    Cname(&'a str, u32, &'a str),
    Txt(&'a str, u32, &'a [u8]),
}

/// A DNS answer: the question `name`/`qtype`, then `rrs`. Owner names equal to the
/// question are written as a compression pointer to offset 12, like real servers do.
pub fn dns_answer(id: u16, name: &str, qtype: u16, rrs: &[Rr<'_>]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x81, 0x80, 0, 1]);
    m.extend_from_slice(&(rrs.len() as u16).to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(&wire(name));
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    let owner = |m: &mut Vec<u8>, o: &str| {
        if o.eq_ignore_ascii_case(name) {
            m.extend_from_slice(&[0xc0, 12]);
        } else {
            m.extend_from_slice(&wire(o));
            m.push(0);
        }
    };
    for rr in rrs {
        let (o, ty, ttl, data): (&str, u16, u32, Vec<u8>) = match rr {
            Rr::A(o, t, a) => (o, 1, *t, a.to_vec()),
            Rr::Aaaa(o, t, a) => (o, 28, *t, a.to_vec()),
            Rr::Cname(o, t, target) => {
                let mut d = wire(target);
                d.push(0);
                (o, 5, *t, d)
            }
            Rr::Txt(o, t, d) => (o, 16, *t, d.to_vec()),
        };
        owner(&mut m, o);
        m.extend_from_slice(&ty.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m.extend_from_slice(&ttl.to_be_bytes());
        m.extend_from_slice(&(data.len() as u16).to_be_bytes());
        m.extend_from_slice(&data);
    }
    m
}
