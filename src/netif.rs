//! Which interfaces carry a job's traffic: those of the current network namespace that have
//! routes (read from /proc/net, which is per-namespace), loopback excluded.
use std::collections::BTreeSet;
use std::fs;

pub fn routed_interfaces() -> Vec<String> {
    let mut set = BTreeSet::new();
    if let Ok(t) = fs::read_to_string("/proc/net/route") {
        set.extend(parse_route_v4(&t));
    }
    if let Ok(t) = fs::read_to_string("/proc/net/ipv6_route") {
        set.extend(parse_route_v6(&t));
    }
    set.remove("lo");
    set.into_iter().collect()
}

fn parse_route_v4(t: &str) -> Vec<String> {
    t.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect()
}

fn parse_route_v6(t: &str) -> Vec<String> {
    t.lines()
        .filter_map(|l| l.split_whitespace().nth(9).map(String::from))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_routes() {
        let v4 =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth0\t00000000\t0164A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  veth1\t0064A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(parse_route_v4(v4), vec!["eth0", "veth1"]);
        let v6 = "20010db8000100000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001   veth1\n\
                  00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001       lo\n";
        assert_eq!(parse_route_v6(v6), vec!["veth1", "lo"]);
    }
}
