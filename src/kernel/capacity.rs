//! How many entries the dataplane's maps hold: settings of the daemon's config and of
//! `exec`, applied to the maps before they are created (`set_max_entries` on the open
//! skeleton), and the check that a policy — or, in the daemon, every running job's policy
//! plus the new one — fits them *before* anything is loaded or attached.
//!
//! | setting | map | key + value | bytes per entry (kernel) | allocated |
//! |---|---|---|---|---|
//! | `max-static-addresses` | `allow` (host entries: hash, no prealloc) and `allow_cidrs` (CIDRs: LPM trie) | 24 + 56 | hash: 48 + 80 per entry + 16 per slot; trie: ~100 accounted, 128–192 in slabs | per entry (hash buckets up front) |
//! | `max-learned-addresses` | `allow` (the same hash) | 24 + 56 | as above | per entry |
//! | `max-names` | `names` (hash, no prealloc) | 16 + 952 | ~1 KiB per entry + 16 per slot | per entry (buckets up front) |
//! | `max-inbound` | `inbound` (LPM trie) | 24 + 24 | ~70 accounted, 96–160 in slabs | per entry |
//! | `max-flows` | `flows` (LRU hash, preallocated) | 28 + 24 | ~120 | all up front |
//! | `max-jobs` | `jobs`, `ifjobs` (hash, preallocated; at least 1024 each: claimed containers) | 8 + 8, 4 + 8 | ~80 each | all up front |
//!
//! A hash element is the kernel's 48-byte `htab_elem` header plus key and value rounded to
//! 8 bytes, and each slot of the bucket array is 16 bytes; a trie node is a 24-byte header
//! plus the key's 20 data bytes and the value, and an intermediate (valueless) node may be
//! added per entry where prefixes branch. `bpftool map show` (`memlock`) reports the
//! accounted figure: README's "Map sizes" has them measured.
//!
//! The allow map holds static entries (the policies' addresses and networks) and learned
//! ones (addresses bound from DNS answers) alike, in two halves by prefix length (host
//! entries in a hash, CIDRs in a trie: see bpf/maps.h); each half's size is the sum of both
//! settings. Policies
//! are checked against `max-static-addresses`, so the learned share stays free for answers.
//! When learned addresses overflow it anyway, the kernel's insert fails: the answer's
//! address is not bound, so a connection to it is judged as direct-ip (blocked in block
//! mode) and the failure is counted and reported per job.

use std::fmt;

/// The settings, each the most entries of one kind the maps hold at once (across jobs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub static_addresses: u32,
    pub learned_addresses: u32,
    pub names: u32,
    pub inbound: u32,
    pub flows: u32,
    /// Jobs at once: the `jobs` and `ifjobs` maps hold one more (the host policy's entry).
    pub jobs: u32,
}

impl Default for Capacity {
    /// Sized for a busy runner host: a thousand jobs whose policies list a few hundred
    /// addresses each, or a few with a provider's published ranges (GitHub's, a cloud's
    /// service tags: tens of thousands of networks), and a quarter of a million learned
    /// addresses. The tries and `names` cost memory only for what they hold.
    fn default() -> Capacity {
        Capacity {
            static_addresses: 262_144,
            learned_addresses: 262_144,
            names: 65_536,
            inbound: 16_384,
            flows: 262_144,
            jobs: 1024,
        }
    }
}

/// One kind of entry: its setting's name, its map, and what the map's entries are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    StaticAddresses,
    Names,
    Inbound,
}

impl Kind {
    /// The setting, as spelled in the daemon's config; `exec --<setting>` is the flag.
    pub fn setting(self) -> &'static str {
        match self {
            Kind::StaticAddresses => "max-static-addresses",
            Kind::Names => "max-names",
            Kind::Inbound => "max-inbound",
        }
    }

    pub fn map(self) -> &'static str {
        match self {
            Kind::StaticAddresses => "allow",
            Kind::Names => "names",
            Kind::Inbound => "inbound",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Kind::StaticAddresses => "static address entries (addresses and networks)",
            Kind::Names => "name entries (distinct names and wildcard parents)",
            Kind::Inbound => "inbound peer entries",
        }
    }
}

/// Entries a compiled policy (or a set of them) takes in the capacity-checked maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub static_addresses: u64,
    pub names: u64,
    pub inbound: u64,
}

impl Usage {
    pub fn of(c: &crate::policy::Compiled) -> Usage {
        Usage {
            static_addresses: c.prefixes.len() as u64,
            names: c.names.len() as u64,
            inbound: c.inbound.len() as u64,
        }
    }
}

impl std::ops::Add for Usage {
    type Output = Usage;
    fn add(self, o: Usage) -> Usage {
        Usage {
            static_addresses: self.static_addresses + o.static_addresses,
            names: self.names + o.names,
            inbound: self.inbound + o.inbound,
        }
    }
}

/// A policy, or a job start, that does not fit the maps. Input, not the machine: exit 2.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct CapacityError {
    pub kind: Kind,
    /// Entries asked for: the policy's, or every running job's plus the new one's.
    pub needed: u64,
    /// Of which the running jobs already hold (the daemon); 0 for `exec`.
    pub in_use: u64,
    pub capacity: u32,
}

impl fmt::Display for CapacityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = self.kind;
        if self.in_use == 0 {
            write!(f, "policy needs {} {}", self.needed, k.what())?;
        } else {
            write!(
                f,
                "this job's policy needs {} {} and the running jobs hold {} ({} in all)",
                self.needed - self.in_use,
                k.what(),
                self.in_use,
                self.needed
            )?;
        }
        write!(
            f,
            "; map {} holds {}: raise {} (exec --{}, daemon config {})",
            k.map(),
            self.capacity,
            k.setting(),
            k.setting(),
            k.setting()
        )
    }
}

/// Container links (a veth's or tap's host side) and container cgroups that jobs may hold
/// claimed at once, each kind: one host's worth of containers.
pub const CONTAINER_CLAIMS: u32 = 1024;

impl Capacity {
    /// `max_entries` of the `allow` hash and of the `allow_cidrs` trie: static and learned
    /// entries share them.
    pub fn allow_entries(&self) -> u32 {
        self.static_addresses.saturating_add(self.learned_addresses)
    }

    /// `max_entries` of `jobs` and `ifjobs`: every job, and the host policy's entry.
    pub fn job_entries(&self) -> u32 {
        self.jobs.saturating_add(1)
    }

    /// `max_entries` of `jobs` and `ifjobs`: jobs, and the container cgroups and links jobs
    /// claim (job::containers), at least [`CONTAINER_CLAIMS`] whatever `max-jobs` says.
    pub fn job_map_entries(&self) -> u32 {
        self.job_entries().max(CONTAINER_CLAIMS)
    }

    /// Whether `usage` (the running jobs' `in_use` included) fits.
    pub fn check(&self, usage: Usage, in_use: Usage) -> Result<(), CapacityError> {
        for (kind, needed, held, cap) in [
            (
                Kind::StaticAddresses,
                usage.static_addresses,
                in_use.static_addresses,
                self.static_addresses,
            ),
            (Kind::Names, usage.names, in_use.names, self.names),
            (Kind::Inbound, usage.inbound, in_use.inbound, self.inbound),
        ] {
            if needed > u64::from(cap) {
                return Err(CapacityError {
                    kind,
                    needed,
                    in_use: held,
                    capacity: cap,
                });
            }
        }
        Ok(())
    }

    /// Every setting must be at least 1, and the trie's sum must fit a u32.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("max-static-addresses", self.static_addresses),
            ("max-learned-addresses", self.learned_addresses),
            ("max-names", self.names),
            ("max-inbound", self.inbound),
            ("max-flows", self.flows),
            ("max-jobs", self.jobs),
        ] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self
            .static_addresses
            .checked_add(self.learned_addresses)
            .is_none()
        {
            return Err(
                "max-static-addresses + max-learned-addresses must be below 2^32".to_string(),
            );
        }
        Ok(())
    }
}

/// The capacity flags of `exec` (the daemon takes the same keys from its config).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct CapacityArgs {
    /// Addresses and networks the policies may list, across jobs (the allow trie's static
    /// share). Default 262144; README "Map sizes" has the memory each setting costs.
    #[arg(long = "max-static-addresses", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub static_addresses: Option<u32>,
    /// Addresses learned from DNS answers held at once (the allow trie's learned share).
    /// Default 262144.
    #[arg(long = "max-learned-addresses", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub learned_addresses: Option<u32>,
    /// Distinct names and wildcard parents the policies may list. Default 65536.
    #[arg(long = "max-names", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub names: Option<u32>,
    /// allowed-inbound entries. Default 16384.
    #[arg(long = "max-inbound", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub inbound: Option<u32>,
    /// Flows in the verdict cache (preallocated: ~120 bytes each). Default 262144.
    #[arg(long = "max-flows", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub flows: Option<u32>,
}

impl CapacityArgs {
    pub fn capacity(&self) -> Capacity {
        let d = Capacity::default();
        Capacity {
            static_addresses: self.static_addresses.unwrap_or(d.static_addresses),
            learned_addresses: self.learned_addresses.unwrap_or(d.learned_addresses),
            names: self.names.unwrap_or(d.names),
            inbound: self.inbound.unwrap_or(d.inbound),
            flows: self.flows.unwrap_or(d.flows),
            // One job, and the host entry no exec has: the smallest map will do.
            jobs: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_map_capacity_need_and_setting() {
        let c = Capacity {
            static_addresses: 65536,
            ..Capacity::default()
        };
        let e = c
            .check(
                Usage {
                    static_addresses: 120_000,
                    ..Usage::default()
                },
                Usage::default(),
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "policy needs 120000 static address entries (addresses and networks); map allow \
             holds 65536: raise max-static-addresses (exec --max-static-addresses, daemon \
             config max-static-addresses)"
        );
        let e = c
            .check(
                Usage {
                    names: 70_000,
                    ..Usage::default()
                },
                Usage {
                    names: 60_000,
                    ..Usage::default()
                },
            )
            .unwrap_err();
        assert!(
            e.to_string().starts_with(
                "this job's policy needs 10000 name entries (distinct names and wildcard \
                 parents) and the running jobs hold 60000 (70000 in all); map names holds 65536"
            ),
            "{e}"
        );
        assert!(c.check(Usage::default(), Usage::default()).is_ok());
        let full = Usage {
            static_addresses: 65536,
            names: 65536,
            inbound: 16384,
        };
        assert!(c.check(full, Usage::default()).is_ok());
    }

    #[test]
    fn derived_sizes_and_validation() {
        let c = Capacity::default();
        assert_eq!(c.allow_entries(), 524_288);
        assert_eq!(c.job_entries(), 1025);
        assert!(c.validate().is_ok());
        let bad = Capacity { names: 0, ..c };
        assert_eq!(bad.validate().unwrap_err(), "max-names must be at least 1");
        let big = Capacity {
            static_addresses: u32::MAX,
            ..c
        };
        assert!(big.validate().is_err());
    }
}
