//! Parse the copies of DNS answers the kernel forwards for the audit trail.
//!
//! The kernel has already decided what to bind by the time a copy arrives here; this module
//! only has to describe the answer faithfully. Two choices follow from that:
//!
//! - Parsing is lenient past the question. The header and the first question are required
//!   (without them there is nothing to attribute the answer to); after that, records are read
//!   one at a time and reading stops at the first one that does not decode, keeping what came
//!   before. A copy the kernel cut at its buffer size, or an answer with one odd record, still
//!   shows the addresses it carried. [`DnsMessage::truncated`] says when the answer section is
//!   not complete.
//! - Only A, AAAA and CNAME record data is decoded (by hickory-proto); every other type is
//!   skipped by its RDLENGTH, exactly as the in-kernel parser skips it. Decoding record types
//!   we never use could only reject answers that the kernel accepted and bound, leaving
//!   bound addresses missing from the audit trail.
//!
//! All decoding goes through hickory-proto's `BinDecoder` and `Name` reader, which bound
//! every read by the buffer and only follow compression pointers backwards (so pointer loops
//! end in an error, not a hang). Nothing here preallocates by a count taken from the
//! message, so a header claiming 65,535 records costs nothing.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::error::ProtoError;
use hickory_proto::op::{Header, MessageType, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, Restrict};
use thiserror::Error;

const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;

/// Why a DNS message copy could not be parsed at all.
#[derive(Debug, Error)]
pub enum DnsError {
    /// The 12-byte header is missing or uses an opcode hickory-proto does not know
    /// (only QUERY, STATUS, NOTIFY and UPDATE are defined).
    #[error("bad DNS header ({len} bytes)")]
    Header {
        len: usize,
        #[source]
        source: ProtoError,
    },
    /// The header counts a question that does not decode.
    #[error("bad DNS question")]
    Question(#[source] ProtoError),
}

/// A parsed DNS message (normally an answer) as far as the audit trail needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsMessage {
    pub id: u16,
    pub is_response: bool,
    /// The full 12-bit response code: the header's low 4 bits, extended by an EDNS0 OPT
    /// record's high 8 bits when one could be read.
    pub rcode: u16,
    /// The answer section is incomplete: the server set the TC bit, or the bytes ended (or
    /// stopped decoding) before every answer record the header counts had been read.
    pub truncated: bool,
    /// The first question; `None` when the header counts no question.
    pub question: Option<Question>,
    /// The answer section, in message order, as far as it decoded. Authority and additional
    /// records are not included: they never answer the question.
    pub records: Vec<Record>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// Lowercase, without the trailing dot (the root is "."). Bytes outside letters, digits,
    /// `-`, `_` are escaped by hickory-proto's ASCII form, so a label that contains a dot
    /// cannot pass for two labels.
    pub name: String,
    pub qtype: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Owner name, normalised like [`Question::name`].
    pub name: String,
    /// Seconds. Values with the top bit set are read as 0 (RFC 2181 §8).
    pub ttl: u32,
    pub data: RecordData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// The target, normalised like [`Question::name`].
    Cname(String),
    /// Any other record type, by number; its data is not decoded.
    Other(u16),
}

/// Parse one DNS message. Never panics; see the module documentation for what is lenient.
pub fn parse(bytes: &[u8]) -> Result<DnsMessage, DnsError> {
    let mut d = BinDecoder::new(bytes);
    let header = Header::read(&mut d).map_err(|source| DnsError::Header {
        len: bytes.len(),
        source,
    })?;

    let mut msg = DnsMessage {
        id: header.id(),
        is_response: header.message_type() == MessageType::Response,
        rcode: u16::from(header.response_code()),
        truncated: header.truncated(),
        question: None,
        records: Vec::new(),
    };

    if header.query_count() > 0 {
        let (name, qtype) = read_question(&mut d).map_err(DnsError::Question)?;
        msg.question = Some(Question { name, qtype });
    }
    // More than one question does not occur in practice; the extra ones only need to be
    // stepped over to reach the answers.
    for _ in 1..header.query_count() {
        if read_question(&mut d).is_err() {
            msg.truncated |= header.answer_count() > 0;
            return Ok(msg);
        }
    }

    for _ in 0..header.answer_count() {
        match read_record(&mut d) {
            Ok(raw) => msg.records.push(raw.record),
            Err(_) => {
                msg.truncated = true;
                return Ok(msg);
            }
        }
    }

    // Authority and additional records are read only to find the OPT record, whose TTL
    // field carries the high bits of the response code (RFC 6891 §6.1.3).
    let rest = u32::from(header.name_server_count()) + u32::from(header.additional_count());
    for _ in 0..rest {
        let Ok(raw) = read_record(&mut d) else { break };
        if raw.rtype == TYPE_OPT {
            let high = (raw.raw_ttl >> 24) as u8;
            msg.rcode = u16::from(ResponseCode::from(high, header.response_code().low()));
            break;
        }
    }
    Ok(msg)
}

fn read_question(d: &mut BinDecoder<'_>) -> Result<(String, u16), ProtoError> {
    let name = Name::read(d)?;
    let qtype = d.read_u16()?.unverified(/* any type is representable */);
    let _class = d.read_u16()?.unverified(/* not used */);
    Ok((name_string(&name), qtype))
}

struct RawRecord {
    record: Record,
    rtype: u16,
    /// The TTL field as sent: OPT records use it for flags, not seconds.
    raw_ttl: u32,
}

fn read_record(d: &mut BinDecoder<'_>) -> Result<RawRecord, ProtoError> {
    let name = Name::read(d)?;
    let rtype = d.read_u16()?.unverified(/* any type is representable */);
    // The class is not checked: the audit trail reports what the server said.
    let _class = d.read_u16()?.unverified();
    let raw_ttl = d.read_u32()?.unverified(/* clamped below */);
    let rdlength = d.read_u16()?.unverified(/* bounded by the reads below */);

    let data = match rtype {
        TYPE_A | TYPE_AAAA | TYPE_CNAME => {
            // RData::read checks that exactly `rdlength` bytes were consumed.
            match RData::read(d, RecordType::from(rtype), Restrict::new(rdlength))? {
                RData::A(a) => RecordData::A(a.0),
                RData::AAAA(a) => RecordData::Aaaa(a.0),
                RData::CNAME(c) => RecordData::Cname(name_string(&c.0)),
                _ => RecordData::Other(rtype),
            }
        }
        _ => {
            d.read_slice(usize::from(rdlength))?;
            RecordData::Other(rtype)
        }
    };
    let ttl = if raw_ttl > i32::MAX as u32 {
        0
    } else {
        raw_ttl
    };
    Ok(RawRecord {
        record: Record {
            name: name_string(&name),
            ttl,
            data,
        },
        rtype,
        raw_ttl,
    })
}

/// Lowercase ASCII form without the trailing dot, so names compare as plain strings
/// whatever 0x20 case randomisation the resolver applied.
fn name_string(name: &Name) -> String {
    let mut s = name.to_lowercase().to_ascii();
    if s.len() > 1 && s.ends_with('.') {
        s.pop();
    }
    s
}

impl DnsMessage {
    /// The question name followed by the CNAME targets reached from it, in chain order.
    fn chain_names(&self) -> Vec<&str> {
        let Some(q) = &self.question else {
            return Vec::new();
        };
        let mut names = vec![q.name.as_str()];
        // Each step adds a new name, so the chain is at most one longer than the records;
        // the `contains` check ends CNAME loops.
        for _ in 0..self.records.len() {
            let current = names[names.len() - 1];
            // A name has at most one CNAME (RFC 2181 §10.1); if a server sends several, the
            // first one is the chain and the others count as off-chain.
            let next = self.records.iter().find_map(|r| match &r.data {
                RecordData::Cname(target) if r.name == current => Some(target.as_str()),
                _ => None,
            });
            match next {
                Some(target) if !names.contains(&target) => names.push(target),
                _ => break,
            }
        }
        names
    }

    /// The answer records that answer the question: those owned by the question name or by a
    /// name on its CNAME chain, in message order.
    ///
    /// Records owned by any other name are left out. They are still in [`DnsMessage::records`]
    /// for whoever wants to look, but a name the client never asked about tells us nothing
    /// about what it will connect to, and it is what a cache-poisoning attempt looks like.
    pub fn chain_records(&self) -> Vec<&Record> {
        let names: HashSet<&str> = self.chain_names().into_iter().collect();
        let on_chain = |r: &&Record| -> bool {
            match &r.data {
                // Only the chain's own CNAMEs: a second CNAME for a chain name is off-chain.
                RecordData::Cname(target) => {
                    names.contains(r.name.as_str()) && names.contains(target.as_str())
                }
                _ => names.contains(r.name.as_str()),
            }
        };
        self.records.iter().filter(on_chain).collect()
    }

    /// The A and AAAA addresses that answer the question (see [`DnsMessage::chain_records`]),
    /// each with its record's TTL, in message order.
    pub fn addresses(&self) -> Vec<(IpAddr, u32)> {
        self.chain_records()
            .into_iter()
            .filter_map(|r| match r.data {
                RecordData::A(a) => Some((IpAddr::V4(a), r.ttl)),
                RecordData::Aaaa(a) => Some((IpAddr::V6(a), r.ttl)),
                _ => None,
            })
            .collect()
    }

    /// The CNAME targets followed from the question name, in order; the question name itself
    /// is not included. Empty when the name has no CNAME.
    pub fn cname_chain(&self) -> Vec<String> {
        self.chain_names()
            .into_iter()
            .skip(1)
            .map(str::to_owned)
            .collect()
    }

    /// The smallest TTL among the records that answer the question (CNAMEs included: the
    /// answer is only as fresh as its weakest link). `None` when nothing answers it.
    pub fn min_ttl(&self) -> Option<u32> {
        self.chain_records().into_iter().map(|r| r.ttl).min()
    }
}

/// The mnemonic of a record type ("A", "AAAA", "HTTPS"…), or `TYPEnnn` (RFC 3597) when
/// hickory-proto does not know it.
pub fn qtype_name(qtype: u16) -> String {
    match RecordType::from(qtype) {
        RecordType::Unknown(n) => format!("TYPE{n}"),
        known => <&'static str>::from(known).to_owned(),
    }
}

/// The mnemonic of a response code as dig prints it ("NOERROR", "NXDOMAIN"…), or
/// `RCODEnnn` for codes without one.
pub fn rcode_name(rcode: u16) -> String {
    let name = match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        16 => "BADVERS",
        _ => return format!("RCODE{rcode}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, Query};
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, TXT};
    use hickory_proto::rr::Record as HRecord;
    use std::str::FromStr;

    fn name(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    fn answer(qname: &str, qtype: RecordType, records: Vec<HRecord>) -> Message {
        let mut m = Message::new();
        m.set_id(0x1234)
            .set_message_type(MessageType::Response)
            .set_recursion_desired(true)
            .set_recursion_available(true)
            .add_query(Query::query(name(qname), qtype))
            .add_answers(records);
        m
    }

    fn a(owner: &str, ttl: u32, ip: [u8; 4]) -> HRecord {
        HRecord::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::from(ip))))
    }

    fn aaaa(owner: &str, ttl: u32, ip: &str) -> HRecord {
        HRecord::from_rdata(name(owner), ttl, RData::AAAA(AAAA(ip.parse().unwrap())))
    }

    fn cname(owner: &str, ttl: u32, target: &str) -> HRecord {
        HRecord::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
    }

    fn txt(owner: &str, ttl: u32) -> HRecord {
        HRecord::from_rdata(
            name(owner),
            ttl,
            RData::TXT(TXT::new(vec!["v=spf1 -all".into()])),
        )
    }

    fn bytes(m: &Message) -> Vec<u8> {
        m.to_vec().unwrap()
    }

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_answer() {
        let m = parse(&bytes(&answer(
            "github.com.",
            RecordType::A,
            vec![a("github.com.", 60, [140, 82, 112, 3])],
        )))
        .unwrap();
        assert_eq!(m.id, 0x1234);
        assert!(m.is_response);
        assert_eq!(m.rcode, 0);
        assert!(!m.truncated);
        assert_eq!(
            m.question,
            Some(Question {
                name: "github.com".into(),
                qtype: 1
            })
        );
        assert_eq!(
            m.records,
            vec![Record {
                name: "github.com".into(),
                ttl: 60,
                data: RecordData::A(Ipv4Addr::new(140, 82, 112, 3))
            }]
        );
        assert_eq!(m.addresses(), vec![(v4("140.82.112.3"), 60)]);
        assert!(m.cname_chain().is_empty());
        assert_eq!(m.min_ttl(), Some(60));
    }

    #[test]
    fn aaaa_answer() {
        let m = parse(&bytes(&answer(
            "example.com.",
            RecordType::AAAA,
            vec![
                aaaa("example.com.", 300, "2001:db8::1"),
                aaaa("example.com.", 200, "2001:db8::2"),
            ],
        )))
        .unwrap();
        assert_eq!(m.question.as_ref().unwrap().qtype, 28);
        assert_eq!(
            m.addresses(),
            vec![
                ("2001:db8::1".parse().unwrap(), 300),
                ("2001:db8::2".parse().unwrap(), 200)
            ]
        );
        assert_eq!(m.min_ttl(), Some(200));
    }

    #[test]
    fn cname_chain_is_followed_and_strangers_are_left_out() {
        // Deliberately out of order: the chain is followed by name, not by position.
        let m = parse(&bytes(&answer(
            "www.example.com.",
            RecordType::A,
            vec![
                a("edge.cdn.test.", 20, [192, 0, 2, 7]),
                cname("www.example.com.", 3600, "example.cdn.test."),
                a("unrelated.test.", 5, [203, 0, 113, 9]),
                cname("example.cdn.test.", 300, "edge.cdn.test."),
                a("edge.cdn.test.", 40, [192, 0, 2, 8]),
            ],
        )))
        .unwrap();
        assert_eq!(m.cname_chain(), vec!["example.cdn.test", "edge.cdn.test"]);
        assert_eq!(
            m.addresses(),
            vec![(v4("192.0.2.7"), 20), (v4("192.0.2.8"), 40)]
        );
        // The stranger's TTL of 5 does not count; the chain's smallest does.
        assert_eq!(m.min_ttl(), Some(20));
        // ...but it is still reported as part of the message.
        assert_eq!(m.records.len(), 5);
    }

    #[test]
    fn cname_loop_ends() {
        let m = parse(&bytes(&answer(
            "a.test.",
            RecordType::A,
            vec![
                cname("a.test.", 60, "b.test."),
                cname("b.test.", 60, "a.test."),
                a("b.test.", 60, [192, 0, 2, 1]),
            ],
        )))
        .unwrap();
        assert_eq!(m.cname_chain(), vec!["b.test"]);
        assert_eq!(m.addresses(), vec![(v4("192.0.2.1"), 60)]);
    }

    #[test]
    fn second_cname_for_a_chain_name_is_off_chain() {
        let m = parse(&bytes(&answer(
            "a.test.",
            RecordType::A,
            vec![
                cname("a.test.", 60, "b.test."),
                cname("a.test.", 60, "evil.test."),
                a("b.test.", 60, [192, 0, 2, 1]),
                a("evil.test.", 60, [192, 0, 2, 66]),
            ],
        )))
        .unwrap();
        assert_eq!(m.cname_chain(), vec!["b.test"]);
        assert_eq!(m.addresses(), vec![(v4("192.0.2.1"), 60)]);
        assert_eq!(m.chain_records().len(), 2);
    }

    #[test]
    fn compression_pointers() {
        // hickory compresses by default; make sure it did, so this test tests pointers.
        let wire = bytes(&answer(
            "www.example.com.",
            RecordType::A,
            vec![
                cname("www.example.com.", 60, "cdn.example.com."),
                a("cdn.example.com.", 60, [192, 0, 2, 1]),
            ],
        ));
        assert!(wire.windows(2).any(|w| w[0] & 0xc0 == 0xc0 && w[1] == 12));
        let m = parse(&wire).unwrap();
        assert_eq!(m.cname_chain(), vec!["cdn.example.com"]);
        assert_eq!(m.addresses(), vec![(v4("192.0.2.1"), 60)]);
    }

    /// Header with one question and `an` answers.
    fn header(an: u16) -> Vec<u8> {
        let mut h = vec![0xab, 0xcd, 0x81, 0x80, 0, 1];
        h.extend_from_slice(&an.to_be_bytes());
        h.extend_from_slice(&[0, 0, 0, 0]);
        h
    }

    /// Question "x.test" type A class IN, at offset 12.
    const QUESTION: &[u8] = b"\x01x\x04test\x00\x00\x01\x00\x01";

    #[test]
    fn hand_written_pointer_to_question() {
        let mut wire = header(1);
        wire.extend_from_slice(QUESTION);
        // owner: pointer to offset 12, A IN, ttl 7, 4 bytes
        wire.extend_from_slice(b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x07\x00\x04\xc0\x00\x02\x05");
        let m = parse(&wire).unwrap();
        assert_eq!(m.addresses(), vec![(v4("192.0.2.5"), 7)]);
        assert!(!m.truncated);
    }

    #[test]
    fn pointer_loops_and_forward_pointers_fail_cleanly() {
        // An owner name that points at itself (offset 24), one that points forward, one past the
        // end.
        for ptr in [[0xc0, 24], [0xc0, 40], [0xff, 0xff]] {
            let mut wire = header(1);
            wire.extend_from_slice(QUESTION);
            wire.extend_from_slice(&ptr);
            wire.extend_from_slice(b"\x00\x01\x00\x01\x00\x00\x00\x07\x00\x04\xc0\x00\x02\x05");
            let m = parse(&wire).unwrap();
            assert!(m.records.is_empty(), "{ptr:?}");
            assert!(m.truncated, "{ptr:?}");
        }
        // A question name that points at itself is fatal: there is nothing to attribute.
        let mut wire = header(0);
        wire.extend_from_slice(b"\xc0\x0c\x00\x01\x00\x01");
        assert!(matches!(parse(&wire), Err(DnsError::Question(_))));
    }

    #[test]
    fn mixed_case_0x20_is_normalised() {
        let m = parse(&bytes(&answer(
            "GiThUb.CoM.",
            RecordType::A,
            vec![a("gItHuB.cOm.", 60, [140, 82, 112, 3])],
        )))
        .unwrap();
        assert_eq!(m.question.as_ref().unwrap().name, "github.com");
        assert_eq!(m.records[0].name, "github.com");
        // The owner differs in case from the question and still answers it.
        assert_eq!(m.addresses(), vec![(v4("140.82.112.3"), 60)]);
    }

    #[test]
    fn label_with_a_dot_is_escaped() {
        // One label "github.com" under "evil.test": must not read as github.com.evil.test.
        let mut wire = header(0);
        wire.extend_from_slice(b"\x0agithub.com\x04evil\x04test\x00\x00\x01\x00\x01");
        let m = parse(&wire).unwrap();
        let q = m.question.unwrap().name;
        assert_ne!(q, "github.com.evil.test");
        assert_eq!(q, "github\\.com.evil.test");
    }

    #[test]
    fn truncated_copy_keeps_what_was_read() {
        let wire = bytes(&answer(
            "example.com.",
            RecordType::A,
            vec![
                a("example.com.", 60, [192, 0, 2, 1]),
                a("example.com.", 60, [192, 0, 2, 2]),
            ],
        ));
        // Cut inside the second record's address.
        let m = parse(&wire[..wire.len() - 2]).unwrap();
        assert!(m.truncated);
        assert_eq!(m.addresses(), vec![(v4("192.0.2.1"), 60)]);
        // Cut inside the question: fatal.
        assert!(matches!(parse(&wire[..15]), Err(DnsError::Question(_))));
        // Cut inside the header: fatal.
        assert!(matches!(
            parse(&wire[..11]),
            Err(DnsError::Header { len: 11, .. })
        ));
        assert!(matches!(parse(&[]), Err(DnsError::Header { len: 0, .. })));
    }

    #[test]
    fn tc_bit_is_reported() {
        let mut m = answer("example.com.", RecordType::A, vec![]);
        m.set_truncated(true);
        let m = parse(&bytes(&m)).unwrap();
        assert!(m.truncated);
    }

    #[test]
    fn zero_answers() {
        let mut msg = answer("nope.example.", RecordType::A, vec![]);
        msg.set_response_code(ResponseCode::NXDomain);
        let m = parse(&bytes(&msg)).unwrap();
        assert_eq!(m.rcode, 3);
        assert!(!m.truncated);
        assert!(m.records.is_empty());
        assert!(m.addresses().is_empty());
        assert!(m.cname_chain().is_empty());
        assert_eq!(m.min_ttl(), None);
    }

    #[test]
    fn other_types_between_a_records_are_skipped() {
        let m = parse(&bytes(&answer(
            "example.com.",
            RecordType::A,
            vec![
                a("example.com.", 60, [192, 0, 2, 1]),
                txt("example.com.", 30),
                a("example.com.", 60, [192, 0, 2, 2]),
            ],
        )))
        .unwrap();
        assert_eq!(m.records[1].data, RecordData::Other(16));
        assert_eq!(
            m.addresses(),
            vec![(v4("192.0.2.1"), 60), (v4("192.0.2.2"), 60)]
        );
        // The TXT record answers the same name, so its TTL counts.
        assert_eq!(m.min_ttl(), Some(30));
    }

    #[test]
    fn undecodable_record_of_a_type_we_skip_is_not_an_error() {
        // An HTTPS record with garbage data: hickory's own HTTPS parser would reject the
        // message; skipping by RDLENGTH keeps the A record after it.
        let mut wire = header(2);
        wire.extend_from_slice(QUESTION);
        wire.extend_from_slice(b"\xc0\x0c\x00\x41\x00\x01\x00\x00\x00\x07\x00\x03\xff\xff\xff");
        wire.extend_from_slice(b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x07\x00\x04\xc0\x00\x02\x05");
        let m = parse(&wire).unwrap();
        assert_eq!(m.records[0].data, RecordData::Other(65));
        assert_eq!(m.addresses(), vec![(v4("192.0.2.5"), 7)]);
    }

    #[test]
    fn a_record_with_wrong_length_stops_parsing() {
        let mut wire = header(1);
        wire.extend_from_slice(QUESTION);
        wire.extend_from_slice(
            b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x07\x00\x05\xc0\x00\x02\x05\x00",
        );
        let m = parse(&wire).unwrap();
        assert!(m.records.is_empty());
        assert!(m.truncated);
    }

    #[test]
    fn ttl_with_top_bit_is_zero() {
        let mut wire = header(1);
        wire.extend_from_slice(QUESTION);
        wire.extend_from_slice(b"\xc0\x0c\x00\x01\x00\x01\x80\x00\x00\x07\x00\x04\xc0\x00\x02\x05");
        assert_eq!(
            parse(&wire).unwrap().addresses(),
            vec![(v4("192.0.2.5"), 0)]
        );
    }

    #[test]
    fn edns0_opt_record() {
        let mut msg = answer(
            "example.com.",
            RecordType::A,
            vec![a("example.com.", 60, [192, 0, 2, 1])],
        );
        let mut edns = Edns::new();
        edns.set_max_payload(1232).set_dnssec_ok(true);
        msg.set_edns(edns);
        let wire = bytes(&msg);
        let m = parse(&wire).unwrap();
        assert_eq!(m.rcode, 0);
        assert_eq!(m.addresses(), vec![(v4("192.0.2.1"), 60)]);
        // The OPT record is in the additional section, not among the answers.
        assert_eq!(m.records.len(), 1);

        // BADVERS is 16: high bits 1 in the OPT TTL, low bits 0 in the header.
        let mut msg = answer("example.com.", RecordType::A, vec![]);
        msg.set_response_code(ResponseCode::BADVERS);
        msg.set_edns(Edns::new());
        let m = parse(&bytes(&msg)).unwrap();
        assert_eq!(m.rcode, 16);
        assert_eq!(rcode_name(m.rcode), "BADVERS");
    }

    #[test]
    fn names_for_types_and_rcodes() {
        assert_eq!(qtype_name(1), "A");
        assert_eq!(qtype_name(28), "AAAA");
        assert_eq!(qtype_name(65), "HTTPS");
        assert_eq!(qtype_name(65280), "TYPE65280");
        assert_eq!(rcode_name(0), "NOERROR");
        assert_eq!(rcode_name(3), "NXDOMAIN");
        assert_eq!(rcode_name(23), "RCODE23");
    }

    #[test]
    fn query_without_question() {
        let m = parse(&[0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        assert!(!m.is_response);
        assert_eq!(m.question, None);
        assert!(m.addresses().is_empty());
    }

    #[test]
    fn huge_counts_do_not_hurt() {
        let mut wire = vec![
            0, 1, 0x81, 0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ];
        wire.extend_from_slice(QUESTION);
        let m = parse(&wire).unwrap();
        assert!(m.truncated);
        assert!(m.records.is_empty());
    }

    /// splitmix64: deterministic, so a failure reproduces from the printed iteration.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn exercise(bytes: &[u8]) {
        if let Ok(m) = parse(bytes) {
            let _ = (m.addresses(), m.cname_chain(), m.min_ttl());
        }
    }

    #[test]
    fn never_panics_on_random_or_mutated_input() {
        let mut edns_msg = answer(
            "www.example.com.",
            RecordType::A,
            vec![
                cname("www.example.com.", 60, "cdn.example.com."),
                txt("cdn.example.com.", 60),
                a("cdn.example.com.", 60, [192, 0, 2, 1]),
                aaaa("cdn.example.com.", 60, "2001:db8::1"),
            ],
        );
        edns_msg.set_edns(Edns::new());
        let seeds = [
            bytes(&edns_msg),
            bytes(&answer(
                "github.com.",
                RecordType::A,
                vec![a("github.com.", 60, [140, 82, 112, 3])],
            )),
        ];
        let mut rng = Rng(0x5eed);
        let mut parsed_with_records = 0;
        for i in 0..100_000 {
            let buf: Vec<u8> = if i % 2 == 0 {
                let len = rng.below(600);
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                let mut b = seeds[rng.below(seeds.len())].clone();
                for _ in 0..=rng.below(4) {
                    let at = rng.below(b.len());
                    match rng.below(5) {
                        0 => b[at] = rng.next() as u8,
                        1 => b[at] ^= 1 << rng.below(8),
                        // A compression pointer anywhere, to anywhere.
                        2 if at + 1 < b.len() => {
                            b[at] = 0xc0 | (rng.next() as u8 & 0x3f);
                            b[at + 1] = rng.next() as u8;
                        }
                        3 => b.truncate(at),
                        _ => b.insert(at, rng.next() as u8),
                    }
                    if b.is_empty() {
                        break;
                    }
                }
                b
            };
            exercise(&buf);
            if parse(&buf).is_ok_and(|m| !m.records.is_empty()) {
                parsed_with_records += 1;
            }
        }
        // The mutations must leave many messages readable, or this loop only tests the header
        // check.
        assert!(parsed_with_records > 10_000, "{parsed_with_records}");
    }
}
