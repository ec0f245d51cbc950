//! Policy-level tests: TOML errors and their positions, matching, merging, and the
//! compiled tables checked against a model of the kernel's lookup.

use std::net::IpAddr;
use std::path::Path;

use super::*;

/// Parses with explicit resolvers so tests never depend on the host's /etc/resolv.conf.
fn parse(text: &str) -> Result<Policy, PolicyError> {
    PolicyBuilder::from_toml_str(text, "policy.toml")?
        .build_with_resolv_conf(Path::new("/nonexistent/resolv.conf"))
}

fn err(text: &str) -> PolicyError {
    match parse(text) {
        Ok(p) => panic!("{text:?} parsed: {p:?}"),
        Err(e) => e,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn full_file() {
    let p = parse(
        "mode = \"block\"\n\
         allowed-endpoints = \"\"\"\n\
         github.com:443\n\
         \t*.npmjs.org  productionresultssa*.blob.core.windows.net:443\n\
         198.51.100.0/24\n\
         2001:db8::/32:443\n\
         \"\"\"\n\
         direct-ip = \"audit\"\n\
         dns-resolvers = [\"127.0.0.53\", \"2001:db8::53\"]\n",
    )
    .unwrap();
    assert_eq!((p.mode, p.direct_ip), (Mode::Block, Mode::Audit));
    assert_eq!(p.dns_resolvers, vec![ip("127.0.0.53"), ip("2001:db8::53")]);
    let at: Vec<(&str, usize, usize)> = p
        .endpoints
        .iter()
        .map(|e| (e.text.as_str(), e.location.line, e.location.column))
        .collect();
    assert_eq!(
        at,
        vec![
            ("github.com:443", 3, 1),
            ("*.npmjs.org", 4, 2),
            ("productionresultssa*.blob.core.windows.net:443", 4, 15),
            ("198.51.100.0/24", 5, 1),
            ("2001:db8::/32:443", 6, 1),
        ]
    );
    assert!(p
        .endpoints
        .iter()
        .all(|e| e.location.source_name == "policy.toml"));
}

#[test]
fn defaults() {
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 198.51.100.53\n").unwrap();
    let p = PolicyBuilder::from_toml_str("", "policy.toml")
        .unwrap()
        .build_with_resolv_conf(&resolv)
        .unwrap();
    assert_eq!((p.mode, p.direct_ip), (Mode::Audit, Mode::Block));
    assert_eq!(p.dns_resolvers, vec![ip("198.51.100.53")]);
    assert!(p.endpoints.is_empty());
    // Resolvers given in the file win, even an empty list (no DNS at all).
    let p = PolicyBuilder::from_toml_str("dns-resolvers = []", "policy.toml")
        .unwrap()
        .build_with_resolv_conf(&resolv)
        .unwrap();
    assert!(p.dns_resolvers.is_empty());
}

#[test]
fn toml_errors_point_at_line_and_column() {
    let cases: &[(&str, usize, usize, &str, &str)] = &[
        // (document, line, column, token, message or a part of it)
        (
            "mode = \"block\"\nallowed-endpoints = \"\"\"\ngithub.com:443\n  api.github.com:44x\n\"\"\"\n",
            4,
            3,
            "api.github.com:44x",
            "bad port \"44x\" in endpoint \"api.github.com:44x\": ports are 1-65535 or *",
        ),
        (
            "allowed-endpoints = \"github.com 198.51.100.7/24\"",
            1,
            33,
            "198.51.100.7/24",
            "host bits set in endpoint \"198.51.100.7/24\": 198.51.100.7 has 0.0.0.7 set",
        ),
        (
            "allowed-endpoints = '''\n\n   a.com b.com 198.51.100.0/40'''",
            3,
            16,
            "198.51.100.0/40",
            "bad prefix length \"40\"",
        ),
        (
            "allowed-endpoints = 'x.com  *.*.com'",
            1,
            29,
            "*.*.com",
            "only allowed in the leftmost label",
        ),
        // Escapes take more source characters than they produce.
        (
            "allowed-endpoints = \"a.com\\tb.com\\u0020c.com:0\"",
            1,
            40,
            "c.com:0",
            "bad port \"0\"",
        ),
        (
            "allowed-endpoints = \"\"\"a.com \\\n     b.com:x\"\"\"",
            2,
            6,
            "b.com:x",
            "bad port \"x\"",
        ),
        (
            "mode = \"block\"\n\ncolour = \"blue\"\n",
            3,
            1,
            "colour",
            "unknown field `colour`",
        ),
        ("mode = 1\n", 1, 8, "1", "mode: invalid type: integer `1`, expected a string"),
        (
            "allowed-endpoints = [\"github.com\"]",
            1,
            21,
            "[\"github.com\"]",
            "allowed-endpoints: invalid type: sequence, expected a string",
        ),
        (
            "# policy\nmode = \"blok\"\n",
            2,
            8,
            "\"blok\"",
            "bad mode \"blok\": expected \"audit\" or \"block\"",
        ),
        (
            "direct-ip = \"Block\"",
            1,
            13,
            "\"Block\"",
            "bad direct-ip \"Block\": expected \"block\" or \"audit\"",
        ),
        (
            "dns-resolvers = [\n  \"127.0.0.53\",\n  \"1.2.3\",\n]",
            3,
            3,
            "\"1.2.3\"",
            "bad dns-resolvers address \"1.2.3\": expected an IPv4 or IPv6 address",
        ),
        (
            "dns-resolvers = \"127.0.0.53\"",
            1,
            17,
            "\"127.0.0.53\"",
            "dns-resolvers: invalid type: string \"127.0.0.53\", expected a sequence",
        ),
        (
            "dns-resolvers = [\"127.0.0.53\",\n 53]",
            2,
            2,
            "53",
            "dns-resolvers: invalid type: integer `53`, expected a string",
        ),
        ("[mode]\nx = 1", 1, 1, "[mode]", "mode: invalid type: map, expected a string"),
        ("mode = \"block\"\nmode = \"audit\"\n", 2, 1, "mode", "duplicate key"),
        ("mode = \"block\n", 1, 14, "", "invalid basic string"),
    ];
    for &(doc, line, column, token, message) in cases {
        let e = err(doc);
        assert_eq!(
            (e.source_name.as_str(), e.line, e.column, e.token.as_str()),
            ("policy.toml", line, column, token),
            "{doc:?}: {e}"
        );
        assert!(e.message.contains(message), "{doc:?}: {e}");
        assert!(
            e.to_string()
                .starts_with(&format!("policy.toml:{line}:{column}: ")),
            "{e}"
        );
    }
}

#[test]
fn display_of_an_endpoint_error() {
    let e = err(
        "mode = \"block\"\nallowed-endpoints = \"\"\"\ngithub.com:443\n  github.com:44x\n\"\"\"",
    );
    assert_eq!(
        e.to_string(),
        "policy.toml:4:3: bad port \"44x\" in endpoint \"github.com:44x\": ports are 1-65535 or *"
    );
}

#[test]
fn command_line_positions() {
    let e = Policy::parse_endpoints("github.com:443  *.npmjs.org:44x", "--allow").unwrap_err();
    assert_eq!(
        e.to_string(),
        "--allow:1:17: bad port \"44x\" in endpoint \"*.npmjs.org:44x\": ports are 1-65535 or *"
    );
    assert_eq!(e.token, "*.npmjs.org:44x");
    assert_eq!(
        Policy::parse_endpoints(" \n\t ", "--allow").unwrap(),
        vec![]
    );
}

#[test]
fn files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(
        &path,
        "mode = \"block\"\ndns-resolvers = [\"127.0.0.53\"]\n",
    )
    .unwrap();
    let p = Policy::from_file(&path).unwrap();
    assert_eq!(p.mode, Mode::Block);

    std::fs::write(&path, "mode = \"block\"\nallowed-endpoints = \"a..b\"\n").unwrap();
    let e = Policy::from_file(&path).unwrap_err();
    assert_eq!(e.source_name, path.display().to_string());
    assert_eq!((e.line, e.column), (2, 22));

    let missing = dir.path().join("missing.toml");
    let e = Policy::from_file(&missing).unwrap_err();
    assert_eq!(e.line, 0);
    assert!(
        e.to_string().starts_with(&format!(
            "{}: cannot read the policy file: ",
            missing.display()
        )),
        "{e}"
    );
}

#[test]
fn command_line_overrides_the_file() {
    let mut b = PolicyBuilder::from_toml_str(
        "mode = \"audit\"\ndirect-ip = \"audit\"\nallowed-endpoints = \"github.com\"",
        "policy.toml",
    )
    .unwrap();
    let mut cli = PolicyBuilder {
        mode: Some(Mode::Block),
        ..PolicyBuilder::new()
    };
    cli.allow("*.npmjs.org:*", "--allow").unwrap();
    b.merge(cli);
    let p = b
        .build_with_resolv_conf(Path::new("/nonexistent/resolv.conf"))
        .unwrap();
    assert_eq!(p.mode, Mode::Block, "flag overrides the file");
    assert_eq!(
        p.direct_ip,
        Mode::Audit,
        "the file's value stays when no flag is given"
    );
    let origins: Vec<(&str, &str)> = p
        .endpoints
        .iter()
        .map(|e| (e.text.as_str(), e.location.source_name.as_str()))
        .collect();
    assert_eq!(
        origins,
        vec![("github.com", "policy.toml"), ("*.npmjs.org:*", "--allow")]
    );
    // The default resolver of a missing resolv.conf.
    assert_eq!(p.dns_resolvers, vec![ip("127.0.0.1")]);
}

#[test]
fn mode_strings() {
    assert_eq!("audit".parse(), Ok(Mode::Audit));
    assert_eq!("block".parse(), Ok(Mode::Block));
    let e = "BLOCK".parse::<Mode>().unwrap_err();
    assert_eq!(
        e.to_string(),
        "bad mode \"BLOCK\": expected \"audit\" or \"block\""
    );
    assert_eq!(Mode::Block.to_string(), "block");
}

fn policy(endpoints: &str) -> Policy {
    Policy {
        endpoints: Policy::parse_endpoints(endpoints, "--allow").unwrap(),
        ..Policy::default()
    }
}

/// The kernel's lookup, modelled on the compiled tables alone: hash the wire name from its
/// last byte to its first, and at each label start look the running hash up, confirm the
/// suffix byte by byte, then check the exact ports (whole name), the wildcard ports
/// (something below) and the globs (exactly one label below).
fn kernel_allows(c: &Compiled, name: &str, port: u16) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.split('.').any(|l| l.is_empty() || l.len() > 63) {
        return false;
    }
    let wire = wire_name(name);
    let mut starts = Vec::new();
    let mut i = 0;
    while i < wire.len() {
        starts.push(i);
        i += 1 + usize::from(wire[i]);
    }
    let mut h: u64 = 0xcbf29ce484222325;
    for i in (0..wire.len()).rev() {
        h = (h ^ u64::from(wire[i].to_ascii_lowercase())).wrapping_mul(0x100000001b3);
        let Some(pos) = starts.iter().position(|&s| s == i) else {
            continue;
        };
        let Some(e) = c.names.iter().find(|e| e.hash == h) else {
            continue;
        };
        if e.wire != wire[i..] {
            continue;
        }
        if i == 0 {
            if e.exact.contains(port) {
                return true;
            }
            continue;
        }
        if e.wildcard.contains(port) {
            return true;
        }
        if pos == 1 {
            let label = &wire[1..i];
            if e.globs.iter().any(|g| {
                g.ports.contains(port)
                    && label.len() >= g.prefix.len() + g.suffix.len()
                    && label.starts_with(&g.prefix)
                    && label.ends_with(&g.suffix)
            }) {
                return true;
            }
        }
    }
    false
}

#[test]
fn name_matching_agrees_with_the_compiled_tables() {
    let p = policy(
        "github.com *.npmjs.org:* productionresultssa*.blob.core.windows.net \
         *-cache.example.com:8080 ab*cd.example.org a.b.example.net:22 *.EXAMPLE.net:80 \
         x*.example.org",
    );
    let c = p.compile().unwrap();
    let cases: &[(&str, u16, bool)] = &[
        ("github.com", 443, true),
        ("GitHub.Com.", 443, true),
        ("github.com", 80, false),
        ("api.github.com", 443, false),
        ("thegithub.com", 443, false),
        ("com", 443, false),
        // "*.x" is strictly below x, at any depth, any port here.
        ("npmjs.org", 443, false),
        ("registry.npmjs.org", 1, true),
        ("a.b.c.registry.npmjs.org", 65535, true),
        ("REGISTRY.NPMJS.ORG.", 443, true),
        ("xnpmjs.org", 443, false),
        // A label glob: one label, any characters (possibly none) at the '*'.
        ("productionresultssa.blob.core.windows.net", 443, true),
        ("productionresultssa12.blob.core.windows.net", 443, true),
        ("ProductionResultsSA12.blob.core.windows.net", 443, true),
        ("productionresultssa12.blob.core.windows.net", 80, false),
        ("x.productionresultssa12.blob.core.windows.net", 443, false),
        ("productionresults.blob.core.windows.net", 443, false),
        ("blob.core.windows.net", 443, false),
        ("productionresultssa1.x.blob.core.windows.net", 443, false),
        ("build-cache.example.com", 8080, true),
        ("-cache.example.com", 8080, true),
        ("cache.example.com", 8080, false),
        ("a.build-cache.example.com", 8080, false),
        // prefix and suffix must not overlap: "abcd" fits "ab*cd", "abcd" is 4 >= 4.
        ("abcd.example.org", 443, true),
        ("ab-cd.example.org", 443, true),
        ("abd.example.org", 443, false),
        ("acd.example.org", 443, false),
        ("x.example.org", 443, true),
        ("example.org", 443, false),
        // An exact name below a wildcard's parent, with different ports.
        ("a.b.example.net", 22, true),
        ("a.b.example.net", 80, true),
        ("a.b.example.net", 443, false),
        ("example.net", 80, false),
        // Garbage is allowed by nothing.
        ("", 443, false),
        (".", 443, false),
        ("github..com", 443, false),
        (".github.com", 443, false),
    ];
    for &(name, port, want) in cases {
        assert_eq!(p.allows(name, port), want, "allows({name:?}, {port})");
        assert_eq!(
            kernel_allows(&c, name, port),
            want,
            "kernel model ({name:?}, {port})"
        );
    }
}

#[test]
fn address_matching() {
    let p = policy(
        "198.51.100.0/24 203.0.113.7:* [2001:db8::1]:22 2001:db8:1::/48:* github.com:* \
         169.254.169.254:80",
    );
    let cases: &[(&str, u16, bool)] = &[
        ("198.51.100.1", 443, true),
        ("198.51.100.255", 443, true),
        ("198.51.100.1", 80, false),
        ("198.51.101.1", 443, false),
        ("::ffff:198.51.100.1", 443, true),
        ("203.0.113.7", 1, true),
        ("203.0.113.8", 1, false),
        ("2001:db8::1", 22, true),
        ("2001:db8::1", 443, false),
        ("2001:db8::2", 22, false),
        ("2001:db8:1:ffff::9", 9, true),
        ("2001:db8:2::9", 9, false),
        // Loopback always; metadata only as listed.
        ("127.0.0.1", 9, true),
        ("::1", 9, true),
        ("169.254.169.254", 80, true),
        ("169.254.169.254", 443, false),
        ("fd00:ec2::254", 80, false),
        // A name endpoint allows no address by itself.
        ("140.82.112.3", 443, false),
    ];
    for &(a, port, want) in cases {
        assert_eq!(p.allows_addr(ip(a), port), want, "allows_addr({a}, {port})");
    }
    assert!(!p.allows("198.51.100.1", 443), "addresses are not names");
}

#[test]
fn extend_endpoints_adds() {
    let mut p = policy("github.com");
    p.extend_endpoints(Policy::parse_endpoints("gitlab.com:22", "--allow").unwrap());
    assert!(p.allows("github.com", 443) && p.allows("gitlab.com", 22));
    assert!(!p.allows("gitlab.com", 443));
}

#[test]
fn dns_lifetimes_and_policy_parse_and_are_checked() {
    let p = Policy::from_toml_str(
        "dns-min-ttl = 60\ndns-grace = 5\ndns-policy = \"any\"\ndns-resolvers = [\"198.51.100.53\"]\n",
        "p.toml",
    )
    .unwrap();
    assert_eq!(p.dns_min_ttl, std::time::Duration::from_secs(60));
    assert_eq!(p.dns_grace, std::time::Duration::from_secs(5));
    assert!(!p.dns_filter);
    let d = Policy::from_toml_str("dns-resolvers = [\"198.51.100.53\"]\n", "p.toml").unwrap();
    assert_eq!(
        (d.dns_min_ttl, d.dns_grace, d.dns_filter),
        (DEFAULT_DNS_MIN_TTL, DEFAULT_DNS_GRACE, true)
    );
    let e = Policy::from_toml_str("dns-resolvers = []\ndns-grace = 90000\n", "p.toml").unwrap_err();
    assert_eq!((e.line, e.column), (2, 13), "{e}");
    assert!(e.to_string().contains("dns-grace"), "{e}");
    let e = Policy::from_toml_str("dns-policy = \"some\"\n", "p.toml").unwrap_err();
    assert_eq!(e.line, 1, "{e}");
    assert!(e.to_string().contains("allowed-only"), "{e}");
}

#[test]
fn dns_exfil_thresholds() {
    let d = crate::trail::exfil::Thresholds::default();
    assert_eq!(parse("").unwrap().dns_exfil, d);
    let p = parse(
        "dns-exfil-max-label = 40\n\
         dns-exfil-entropy = 4\n\
         dns-exfil-entropy-min-length = 16\n\
         dns-exfil-max-names = 200\n",
    )
    .unwrap();
    assert_eq!(
        p.dns_exfil,
        crate::trail::exfil::Thresholds {
            max_label: 40,
            entropy: 4.0,
            entropy_min_length: 16,
            max_names: 200,
        }
    );
    // A later source overrides single keys and keeps the rest.
    let mut b = PolicyBuilder::from_toml_str("dns-exfil-max-names = 7", "a.toml").unwrap();
    b.merge(PolicyBuilder::from_toml_str("dns-exfil-entropy = 3.5", "b.toml").unwrap());
    let p = b
        .build_with_resolv_conf(Path::new("/nonexistent/resolv.conf"))
        .unwrap();
    assert_eq!((p.dns_exfil.max_names, p.dns_exfil.entropy), (7, 3.5));
    assert_eq!(p.dns_exfil.max_label, d.max_label);
}

#[test]
fn dns_exfil_bad_values_point_at_them() {
    let cases: &[(&str, &str)] = &[
        (
            "mode = \"audit\"\ndns-exfil-max-label = 64\n",
            "policy.toml:2:23: bad dns-exfil-max-label 64: expected 1 to 63",
        ),
        (
            "dns-exfil-max-label = 0",
            "policy.toml:1:23: bad dns-exfil-max-label 0: expected 1 to 63",
        ),
        (
            "dns-exfil-max-names = -5",
            "policy.toml:1:23: bad dns-exfil-max-names -5: expected 1 to 10000",
        ),
        (
            "dns-exfil-entropy-min-length = 100",
            "policy.toml:1:32: bad dns-exfil-entropy-min-length 100: expected 1 to 63",
        ),
        (
            "dns-exfil-entropy = 9.5",
            "policy.toml:1:21: bad dns-exfil-entropy 9.5: expected bits per character \
             above 0 and at most 8",
        ),
        (
            "dns-exfil-entropy = nan",
            "policy.toml:1:21: bad dns-exfil-entropy NaN: expected bits per character \
             above 0 and at most 8",
        ),
        (
            "dns-exfil-entropy = 0",
            "policy.toml:1:21: bad dns-exfil-entropy 0: expected bits per character \
             above 0 and at most 8",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(err(text).to_string(), *expected, "{text:?}");
    }
    // Wrong types name the key, like the other keys' type errors.
    let e = err("\n dns-exfil-max-names = \"50\"");
    assert_eq!((e.line, e.column), (2, 24), "{e}");
    assert!(e.message.starts_with("dns-exfil-max-names: "), "{e}");
}
