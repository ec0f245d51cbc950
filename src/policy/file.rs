//! The TOML policy file, and finding where in it each endpoint was written.

use std::net::IpAddr;
use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use super::{endpoint, Endpoint, Location, Mode, PolicyBuilder, PolicyError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawPolicy {
    mode: Option<Spanned<String>>,
    allowed_endpoints: Option<Spanned<String>>,
    direct_ip: Option<Spanned<String>>,
    dns_resolvers: Option<Vec<Spanned<String>>>,
    dns_policy: Option<Spanned<String>>,
    dns_min_ttl: Option<Spanned<i64>>,
    dns_grace: Option<Spanned<i64>>,
    dns_exfil_max_label: Option<Spanned<i64>>,
    dns_exfil_entropy: Option<Spanned<f64>>,
    dns_exfil_entropy_min_length: Option<Spanned<i64>>,
    dns_exfil_max_names: Option<Spanned<i64>>,
    allowed_inbound: Option<Spanned<String>>,
    allowed_cidr_files: Option<Vec<Spanned<String>>>,
}

/// The same keys with any value: a first pass that finds each key's span, so that a type
/// error of the second pass can name the key it is about (toml's message does not).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct KeySpans {
    mode: Option<Spanned<toml::Value>>,
    allowed_endpoints: Option<Spanned<toml::Value>>,
    direct_ip: Option<Spanned<toml::Value>>,
    dns_resolvers: Option<Spanned<toml::Value>>,
    dns_policy: Option<Spanned<toml::Value>>,
    dns_min_ttl: Option<Spanned<toml::Value>>,
    dns_grace: Option<Spanned<toml::Value>>,
    dns_exfil_max_label: Option<Spanned<toml::Value>>,
    dns_exfil_entropy: Option<Spanned<toml::Value>>,
    dns_exfil_entropy_min_length: Option<Spanned<toml::Value>>,
    dns_exfil_max_names: Option<Spanned<toml::Value>>,
    allowed_inbound: Option<Spanned<toml::Value>>,
    allowed_cidr_files: Option<Spanned<toml::Value>>,
}

impl KeySpans {
    fn key_at(&self, offset: usize) -> Option<&'static str> {
        [
            ("mode", &self.mode),
            ("allowed-endpoints", &self.allowed_endpoints),
            ("direct-ip", &self.direct_ip),
            ("dns-resolvers", &self.dns_resolvers),
            ("dns-policy", &self.dns_policy),
            ("dns-min-ttl", &self.dns_min_ttl),
            ("dns-grace", &self.dns_grace),
            ("dns-exfil-max-label", &self.dns_exfil_max_label),
            ("dns-exfil-entropy", &self.dns_exfil_entropy),
            (
                "dns-exfil-entropy-min-length",
                &self.dns_exfil_entropy_min_length,
            ),
            ("dns-exfil-max-names", &self.dns_exfil_max_names),
            ("allowed-inbound", &self.allowed_inbound),
            ("allowed-cidr-files", &self.allowed_cidr_files),
        ]
        .into_iter()
        .find(|(_, v)| v.as_ref().is_some_and(|v| v.span().contains(&offset)))
        .map(|(key, _)| key)
    }
}

pub(super) fn parse_toml(text: &str, source: &str) -> Result<PolicyBuilder, PolicyError> {
    let lines = LineIndex::new(text);
    let at_span = |span: Range<usize>, message: String| {
        let (line, column) = lines.line_col(span.start);
        PolicyError {
            source_name: source.to_owned(),
            line,
            column,
            token: token_at(text, span),
            message,
        }
    };
    let toml_error = |e: toml::de::Error, keys: Option<&KeySpans>| {
        let mut message = e.message().trim_end().to_owned();
        match e.span() {
            Some(span) => {
                if let Some(key) = keys.and_then(|k| k.key_at(span.start)) {
                    message = format!("{key}: {message}");
                }
                at_span(span, message)
            }
            None => PolicyError::whole(source, message),
        }
    };
    // Syntax errors, unknown and duplicate keys surface in the first pass.
    let keys: KeySpans = toml::from_str(text).map_err(|e| toml_error(e, None))?;
    let raw: RawPolicy = toml::from_str(text).map_err(|e| toml_error(e, Some(&keys)))?;

    let mode = |key: &str, v: Option<Spanned<String>>, expected: &str| match v {
        None => Ok(None),
        Some(v) => v.get_ref().parse::<Mode>().map(Some).map_err(|_| {
            at_span(
                v.span(),
                format!("bad {key} {:?}: expected {expected}", v.get_ref()),
            )
        }),
    };
    let mut builder = PolicyBuilder {
        mode: mode("mode", raw.mode, "\"audit\" or \"block\"")?,
        direct_ip: mode("direct-ip", raw.direct_ip, "\"block\" or \"audit\"")?,
        ..PolicyBuilder::default()
    };
    // Lifetimes of learned addresses, in seconds: at most a day, so a typo cannot keep an
    // address allowed for the rest of the runner's life.
    let seconds = |key: &str, v: Option<Spanned<i64>>| match v {
        None => Ok(None),
        Some(v) if (0..=86_400).contains(v.get_ref()) => {
            Ok(Some(std::time::Duration::from_secs(*v.get_ref() as u64)))
        }
        Some(v) => Err(at_span(
            v.span(),
            format!(
                "bad {key} {}: expected seconds from 0 to 86400",
                v.get_ref()
            ),
        )),
    };
    builder.dns_min_ttl = seconds("dns-min-ttl", raw.dns_min_ttl)?;
    builder.dns_grace = seconds("dns-grace", raw.dns_grace)?;
    if let Some(v) = raw.dns_policy {
        builder.dns_filter = Some(super::parse_dns_policy(v.get_ref()).ok_or_else(|| {
            at_span(
                v.span(),
                format!(
                    "bad dns-policy {:?}: expected \"allowed-only\" or \"any\"",
                    v.get_ref()
                ),
            )
        })?);
    }
    let int = |key: &str, v: Option<Spanned<i64>>, max: u32| match v {
        None => Ok(None),
        Some(v) => u32::try_from(*v.get_ref())
            .ok()
            .filter(|n| (1..=max).contains(n))
            .map(Some)
            .ok_or_else(|| {
                at_span(
                    v.span(),
                    format!("bad {key} {}: expected 1 to {max}", v.get_ref()),
                )
            }),
    };
    builder.dns_exfil_max_label = int(
        "dns-exfil-max-label",
        raw.dns_exfil_max_label,
        crate::trail::exfil::MAX_LABEL_LIMIT,
    )?;
    builder.dns_exfil_entropy_min_length = int(
        "dns-exfil-entropy-min-length",
        raw.dns_exfil_entropy_min_length,
        crate::trail::exfil::MAX_LABEL_LIMIT,
    )?;
    builder.dns_exfil_max_names = int(
        "dns-exfil-max-names",
        raw.dns_exfil_max_names,
        crate::trail::exfil::MAX_NAMES_LIMIT,
    )?;
    if let Some(v) = raw.dns_exfil_entropy {
        let h = *v.get_ref();
        // NaN fails the range test too.
        if !(h > 0.0 && h <= crate::trail::exfil::ENTROPY_LIMIT) {
            return Err(at_span(
                v.span(),
                format!(
                    "bad dns-exfil-entropy {h}: expected bits per character above 0 and at most {}",
                    crate::trail::exfil::ENTROPY_LIMIT
                ),
            ));
        }
        builder.dns_exfil_entropy = Some(h);
    }
    if let Some(resolvers) = raw.dns_resolvers {
        let parsed = resolvers
            .into_iter()
            .map(|r| {
                r.get_ref().parse::<IpAddr>().map_err(|_| {
                    at_span(
                        r.span(),
                        format!(
                            "bad dns-resolvers address {:?}: expected an IPv4 or IPv6 address",
                            r.get_ref()
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        builder.dns_resolvers = Some(parsed);
    }
    if let Some(eps) = raw.allowed_endpoints {
        let span = eps.span();
        let value = eps.into_inner();
        // Offsets within the value map to offsets in the document when the raw string can
        // be decoded here; if not (a form this decoder does not know), point at the string.
        let offsets = string_offsets(text, span.clone(), &value);
        builder.endpoints = parse_endpoint_list(&value, source, |i| {
            let in_doc = offsets.as_ref().map_or(span.start, |o| o[i]);
            lines.line_col(in_doc)
        })?;
    }
    if let Some(peers) = raw.allowed_inbound {
        let span = peers.span();
        let value = peers.into_inner();
        let offsets = string_offsets(text, span.clone(), &value);
        builder.inbound = parse_list(&value, source, super::inbound::parse_token, |i| {
            let in_doc = offsets.as_ref().map_or(span.start, |o| o[i]);
            lines.line_col(in_doc)
        })?;
    }
    if let Some(files) = raw.allowed_cidr_files {
        builder.cidr_files = files
            .into_iter()
            .map(|f| {
                let (line, column) = lines.line_col(f.span().start);
                super::cidr_file::CidrFileRef {
                    path: f.into_inner(),
                    location: Location {
                        source_name: source.to_owned(),
                        line,
                        column,
                    },
                }
            })
            .collect();
    }
    Ok(builder)
}

/// Only the `allowed-cidr-files` of a policy file's text, for a client that reads them to
/// send along (the full parse comes later, and reports what is wrong with the text).
pub fn cidr_files_of(text: &str) -> Vec<String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "kebab-case")]
    struct Only {
        allowed_cidr_files: Option<Vec<String>>,
    }
    toml::from_str::<Only>(text)
        .ok()
        .and_then(|o| o.allowed_cidr_files)
        .unwrap_or_default()
}

/// Parses whitespace-separated endpoints; `locate` gives the line and column of a byte
/// offset of `list`.
pub(super) fn parse_endpoint_list(
    list: &str,
    source: &str,
    locate: impl Fn(usize) -> (usize, usize),
) -> Result<Vec<Endpoint>, PolicyError> {
    parse_list(list, source, endpoint::parse_token, locate)
}

/// Parses whitespace-separated tokens with `parse` (the endpoint or the inbound grammar).
pub(super) fn parse_list(
    list: &str,
    source: &str,
    parse: impl Fn(&str) -> Result<(super::HostPattern, super::PortSpec), String>,
    locate: impl Fn(usize) -> (usize, usize),
) -> Result<Vec<Endpoint>, PolicyError> {
    tokens(list)
        .map(|(offset, tok)| {
            let (line, column) = locate(offset);
            let location = Location {
                source_name: source.to_owned(),
                line,
                column,
            };
            match parse(tok) {
                Ok((host, port)) => Ok(Endpoint {
                    host,
                    port,
                    text: tok.to_owned(),
                    location,
                }),
                Err(message) => Err(PolicyError {
                    source_name: location.source_name,
                    line,
                    column,
                    token: tok.to_owned(),
                    message,
                }),
            }
        })
        .collect()
}

/// Whitespace-separated tokens with their byte offsets.
fn tokens(s: &str) -> impl Iterator<Item = (usize, &str)> {
    s.split(char::is_whitespace)
        .filter(|t| !t.is_empty())
        .map(move |t| (t.as_ptr() as usize - s.as_ptr() as usize, t))
}

/// 1-based line and column (in characters) of byte `offset` of `text`. Scans `text` up to
/// `offset`: for one position. Many positions of one text go through a [`LineIndex`].
#[cfg(test)]
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    LineIndex::new(text).line_col(offset)
}

/// Where each line of a text starts, so that the position of every token of a policy with
/// 100k entries is found in O(log lines), not by rescanning the text before it (which made
/// parsing quadratic in the policy's size).
pub(super) struct LineIndex<'a> {
    text: &'a str,
    /// Byte offset of each line's start; the first is 0.
    starts: Vec<usize>,
    /// Whether each line is ASCII: then a column is a byte count, with no characters to
    /// count (an `--allow` of 100k endpoints is one long line).
    ascii: Vec<bool>,
}

impl<'a> LineIndex<'a> {
    pub(super) fn new(text: &'a str) -> LineIndex<'a> {
        let mut starts = vec![0];
        starts.extend(newlines(text).map(|i| i + 1));
        let ascii = starts
            .iter()
            .enumerate()
            .map(|(n, &s)| {
                let end = starts.get(n + 1).copied().unwrap_or(text.len());
                text.as_bytes()[s..end].is_ascii()
            })
            .collect();
        LineIndex {
            text,
            starts,
            ascii,
        }
    }

    /// 1-based line and column (in characters) of byte `offset`.
    pub(super) fn line_col(&self, offset: usize) -> (usize, usize) {
        let line = self.starts.partition_point(|&s| s <= offset) - 1;
        let start = self.starts[line];
        let column = if self.ascii[line] {
            offset - start
        } else {
            self.text[start..offset].chars().count()
        };
        (line + 1, column + 1)
    }
}

fn newlines(text: &str) -> impl Iterator<Item = usize> + '_ {
    text.bytes()
        .enumerate()
        .filter(|&(_, b)| b == b'\n')
        .map(|(i, _)| i)
}

/// The text of a span for an error's `token`: its first line, cut short if long (the span
/// of a table or array can cover much of the file).
fn token_at(text: &str, span: Range<usize>) -> String {
    const MAX: usize = 80;
    let mut span = span;
    // Some toml errors (duplicate key) span one character: widen it to the bare key there.
    if span.len() <= 1 {
        let key = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        let rest = text.get(span.start..).unwrap_or_default();
        let len = rest.find(|c: char| !key(c)).unwrap_or(rest.len());
        span.end = span.end.max(span.start + len);
    }
    let s = text.get(span).unwrap_or_default();
    let first = s.lines().next().unwrap_or_default();
    match first.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &first[..cut]),
        None => first.to_owned(),
    }
}

/// For each byte of `value`, the byte offset in `doc` of the source character it was
/// decoded from, given the span of the TOML string that produced `value`. `None` when the
/// raw text does not decode to `value` here, so a wrong position is never reported.
fn string_offsets(doc: &str, span: Range<usize>, value: &str) -> Option<Vec<usize>> {
    let raw = doc.get(span.clone())?;
    let delim = ["\"\"\"", "'''", "\"", "'"]
        .into_iter()
        .find(|d| raw.starts_with(d))?;
    if raw.len() < 2 * delim.len() || !raw.ends_with(delim) {
        return None;
    }
    let multiline = delim.len() == 3;
    let literal = delim.starts_with('\'');
    let mut start = span.start + delim.len();
    let end = span.end - delim.len();
    // A newline right after the opening delimiter of a multi-line string is not content.
    if multiline {
        if doc[start..end].starts_with("\r\n") {
            start += 2;
        } else if doc[start..end].starts_with('\n') {
            start += 1;
        }
    }
    let body = &doc[start..end];
    let mut decoded = String::with_capacity(body.len());
    let mut offsets = Vec::with_capacity(body.len());
    let mut push = |c: char, at: usize, decoded: &mut String| {
        decoded.push(c);
        offsets.extend(std::iter::repeat_n(at, c.len_utf8()));
    };
    let mut chars = body.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let at = start + i;
        // toml normalises a CRLF inside a multi-line string to LF.
        if multiline && c == '\r' && chars.next_if(|&(_, n)| n == '\n').is_some() {
            push('\n', at, &mut decoded);
            continue;
        }
        if literal || c != '\\' {
            push(c, at, &mut decoded);
            continue;
        }
        let (_, e) = chars.next()?;
        let c = match e {
            'b' => '\u{8}',
            't' => '\t',
            'n' => '\n',
            'f' => '\u{c}',
            'r' => '\r',
            'e' => '\u{1b}',
            '"' => '"',
            '\\' => '\\',
            'u' | 'U' => {
                let n = if e == 'u' { 4 } else { 8 };
                let hex: String = (0..n)
                    .filter_map(|_| chars.next().map(|(_, h)| h))
                    .collect();
                char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?
            }
            // A line-ending backslash swallows all whitespace up to the next content.
            ' ' | '\t' | '\r' | '\n' if multiline => {
                while chars.next_if(|(_, w)| w.is_ascii_whitespace()).is_some() {}
                continue;
            }
            _ => return None,
        };
        push(c, at, &mut decoded);
    }
    (decoded == value).then_some(offsets)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finds the one string value in `doc` and checks that every byte of the decoded value
    /// maps to a source character that produced it.
    fn offsets(doc: &str) -> Option<(String, Vec<usize>)> {
        #[derive(Deserialize)]
        struct One {
            s: Spanned<String>,
        }
        let one: One = toml::from_str(doc).unwrap();
        let span = one.s.span();
        let value = one.s.into_inner();
        string_offsets(doc, span, &value).map(|o| (value, o))
    }

    #[test]
    fn offsets_of_every_string_form() {
        let cases: &[(&str, &str, &str)] = &[
            // (document, token, the source text the token starts at)
            ("s = \"a b\"", "b", "b\""),
            ("s = 'a b'", "b", "b'"),
            ("s = '''\na\n  b'''", "b", "b'''"),
            ("s = \"\"\"\na\n  b\"\"\"", "b", "b\"\"\""),
            ("s = \"\"\"\r\na\r\n  b\"\"\"", "b", "b\"\"\""),
            ("s = \"\\tx \\u00e9y z\"", "z", "z\""),
            ("s = \"\\tx \\u00e9y z\"", "\u{e9}y", "\\u00e9y"),
            ("s = \"\\U0001F600 q\"", "q", "q\""),
            ("s = \"\"\"a \\\n    \n   b c\"\"\"", "c", "c\"\"\""),
            ("s = \"\"\"a \\   \n b c\"\"\"", "b", "b c"),
            ("s = \"\"\"x\ny\"\"\"\"", "y\"", "y\"\"\"\""),
            ("s = '\u{e9}t\u{e9} w'", "w", "w'"),
        ];
        for (doc, tok, at) in cases {
            let (value, offs) = offsets(doc).unwrap_or_else(|| panic!("{doc:?} not decoded"));
            let i = value
                .find(tok)
                .unwrap_or_else(|| panic!("{tok:?} in {value:?}"));
            assert!(
                doc[offs[i]..].starts_with(at),
                "{doc:?}: {tok:?} at {}",
                offs[i]
            );
        }
    }

    #[test]
    fn tokens_and_positions() {
        let s = "a  b\n\tc\u{e9}  d\n";
        assert_eq!(
            tokens(s).collect::<Vec<_>>(),
            vec![(0, "a"), (3, "b"), (6, "c\u{e9}"), (11, "d")]
        );
        // Many tokens of one text share one index: the same answers.
        let index = LineIndex::new(s);
        for (off, want) in [(0, (1, 1)), (3, (1, 4)), (6, (2, 2)), (11, (2, 6))] {
            assert_eq!(index.line_col(off), want, "{off}");
        }
        assert_eq!(line_col(s, 0), (1, 1));
        assert_eq!(line_col(s, 3), (1, 4));
        assert_eq!(line_col(s, 6), (2, 2));
        // Columns count characters, not bytes.
        assert_eq!(line_col(s, 11), (2, 6));
    }
}
