//! `allowed-cidr-files`: long address lists kept out of the policy, e.g. a saved copy of a
//! provider's published ranges (GitHub's `meta` API, a cloud's service tags).
//!
//! ```text
//! # GitHub Actions, saved 2026-12-01
//! 198.51.100.0/24
//! 203.0.113.7            # one address
//! 2001:db8::/32:*        # any port
//! ```
//!
//! One entry a line, in the `allowed-endpoints` grammar restricted to addresses and
//! networks: no port means 443, `:PORT` or `:*` as there. `#` starts a comment; blank lines
//! are skipped. An error names the file, the line and the column of the offending token.
//! Relative paths are taken from the policy file's directory.

use std::path::{Path, PathBuf};

use super::{endpoint, Endpoint, HostPattern, Location, PolicyError};

/// An `allowed-cidr-files` entry as written, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrFileRef {
    pub path: String,
    pub location: Location,
}

impl CidrFileRef {
    /// The file this entry names, a relative path taken from `policy_dir`.
    pub fn resolve(&self, policy_dir: &Path) -> PathBuf {
        policy_dir.join(&self.path)
    }

    pub(super) fn error(&self, message: String) -> PolicyError {
        PolicyError {
            source_name: self.location.source_name.clone(),
            line: self.location.line,
            column: self.location.column,
            token: self.path.clone(),
            message,
        }
    }
}

/// The directory a policy file's relative `allowed-cidr-files` are taken from.
pub fn policy_dir(policy_source: &str) -> &Path {
    match Path::new(policy_source).parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Parses a CIDR file's text; `source` (its path) names it in errors.
pub fn parse(text: &str, source: &str) -> Result<Vec<Endpoint>, PolicyError> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let content = line.split('#').next().unwrap_or_default();
        let mut toks = content
            .split(char::is_whitespace)
            .filter(|t| !t.is_empty())
            .map(|t| (t.as_ptr() as usize - line.as_ptr() as usize, t));
        let Some((at, tok)) = toks.next() else {
            continue;
        };
        let location = |at: usize| Location {
            source_name: source.to_owned(),
            line: n + 1,
            column: line[..at].chars().count() + 1,
        };
        let error = |at: usize, tok: &str, message: String| {
            let l = location(at);
            PolicyError {
                source_name: l.source_name,
                line: l.line,
                column: l.column,
                token: tok.to_owned(),
                message,
            }
        };
        if let Some((at2, tok2)) = toks.next() {
            return Err(error(
                at2,
                tok2,
                format!("a second entry {tok2:?} on the line: a CIDR file takes one entry a line"),
            ));
        }
        let (host, port) = endpoint::parse_token(tok).map_err(|m| error(at, tok, m))?;
        if !matches!(host, HostPattern::Net(_)) {
            return Err(error(
                at,
                tok,
                format!(
                    "{tok:?} is a name: a CIDR file lists addresses and networks (names go in \
                     allowed-endpoints)"
                ),
            ));
        }
        out.push(Endpoint {
            host,
            port,
            text: tok.to_owned(),
            location: location(at),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PortSpec;

    #[test]
    fn entries_comments_and_ports() {
        let eps = parse(
            "# ranges\n\n198.51.100.0/24\n  203.0.113.7   # one\n2001:db8::/32:*\n[2001:db8::1]:22\n",
            "r.txt",
        )
        .unwrap();
        let got: Vec<(String, PortSpec, usize, usize)> = eps
            .iter()
            .map(|e| {
                (
                    e.host.to_string(),
                    e.port,
                    e.location.line,
                    e.location.column,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("198.51.100.0/24".into(), PortSpec::Port(443), 3, 1),
                ("203.0.113.7/32".into(), PortSpec::Port(443), 4, 3),
                ("2001:db8::/32".into(), PortSpec::Any, 5, 1),
                ("2001:db8::1/128".into(), PortSpec::Port(22), 6, 1),
            ]
        );
    }

    #[test]
    fn errors_name_file_line_column_and_token() {
        let e = parse("198.51.100.0/24\n\n 203.0.113.0/33\n", "r.txt").unwrap_err();
        assert_eq!(
            (e.line, e.column, e.token.as_str()),
            (3, 2, "203.0.113.0/33")
        );
        assert!(e.to_string().starts_with("r.txt:3:2: "), "{e}");
        let e = parse("github.com\n", "r.txt").unwrap_err();
        assert!(e.message.contains("is a name"), "{e}");
        let e = parse("198.51.100.1 198.51.100.2\n", "r.txt").unwrap_err();
        assert_eq!((e.line, e.column), (1, 14));
        assert!(e.message.contains("one entry a line"), "{e}");
    }

    #[test]
    fn policy_files_read_their_cidr_files_and_clients_send_them() {
        use crate::job::spec::PolicyArgs;
        use crate::policy::{Policy, PolicyBuilder};
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("lists")).unwrap();
        std::fs::write(
            dir.path().join("lists/a.txt"),
            "198.51.100.0/24:* # all ports
",
        )
        .unwrap();
        let policy = dir.path().join("p.toml");
        std::fs::write(
            &policy,
            "dns-resolvers = [\"127.0.0.53\"]\nallowed-cidr-files = [\"lists/a.txt\"]\n",
        )
        .unwrap();
        let check = |p: &Policy| {
            assert!(p.allows_addr("198.51.100.9".parse().unwrap(), 22));
            assert!(!p.allows_addr("203.0.113.9".parse().unwrap(), 443));
        };
        // From the disk (exec, the daemon's host-policy)…
        check(&Policy::from_file(&policy).unwrap());
        // …and as a client sends it: the file's text travels, the daemon reads no path.
        let args = PolicyArgs {
            policy: Some(policy.clone()),
            ..Default::default()
        };
        let mut spec = args.to_spec().unwrap();
        assert_eq!(spec.cidr_files.len(), 1);
        std::fs::remove_file(dir.path().join("lists/a.txt")).unwrap();
        check(&spec.build().unwrap());
        // Text that was not sent is an error at the key, never a silent empty list.
        spec.cidr_files.clear();
        let e = spec.build().unwrap_err().to_string();
        assert!(
            e.contains("p.toml:2:23: allowed-cidr-files: cannot read"),
            "{e}"
        );
        // A missing file: the client says which.
        let e = args.to_spec().unwrap_err().to_string();
        assert!(
            e.contains("lists/a.txt") && e.contains("cannot read"),
            "{e}"
        );
        // Text with no path to start from cannot use the key.
        let e = PolicyBuilder::from_toml_str("allowed-cidr-files = [\"x.txt\"]", "t.toml")
            .unwrap()
            .build()
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("t.toml:1:23: allowed-cidr-files \"x.txt\" was not read"),
            "{e}"
        );
    }

    #[test]
    fn relative_paths_from_the_policy_directory() {
        assert_eq!(policy_dir("/etc/rf/p.toml"), Path::new("/etc/rf"));
        assert_eq!(policy_dir("p.toml"), Path::new("."));
    }
}
