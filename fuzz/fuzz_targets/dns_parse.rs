//! `cargo fuzz run dns_parse`: DNS answer copies come from the network, through the kernel,
//! so `dns::parse` and everything built on its result must survive any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringfence::trail::dns;
use ringfence::trail::events::DnsEvent;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = dns::parse(data) else { return };
    let addrs = msg.addresses();
    let chain = msg.cname_chain();
    // Every address returned must come from a record in the message.
    assert!(addrs.len() <= msg.records.len());
    assert!(chain.len() <= msg.records.len());
    if let Some(ev) = DnsEvent::from_message(
        &msg,
        std::time::SystemTime::UNIX_EPOCH,
        "fuzz",
        None,
        std::net::Ipv4Addr::LOCALHOST.into(),
        false,
    ) {
        // The event must serialise: it goes straight into the audit trail.
        serde_json::to_string(&ringfence::trail::events::Event::Dns(ev)).expect("serialises");
    }
});
