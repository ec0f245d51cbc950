//! Which DNS name each address a job was answered came from: the agent names flows with it.
//!
//! Sized for a million addresses over hundreds of jobs, and for a daemon that sees names
//! come and go for weeks:
//! - an address is 16 bytes (IPv4 mapped into IPv6, as the kernel's keys are) and points
//!   at its name by a 4-byte index into the job's name table, where each name is kept once
//!   however many addresses its answers gave (20 bytes instead of 40 with an `IpAddr` key
//!   and an `Arc<str>`);
//! - those 20 bytes are kept densely, in a `Vec`, and found through a hash table of 4-byte
//!   indexes: a hash table's buckets are 44–87% full (it doubles at 7/8), and a
//!   `HashMap<[u8; 16], u32>` paid the 21 bytes of a bucket for every empty one too. At
//!   1M addresses over 256 jobs (~3,900 a job, in 8,192 buckets) that was 44 bytes an
//!   address, where this is ~30;
//! - a name is forgotten, with its addresses, once its answers' TTLs have run out and no
//!   flow kept its addresses alive (see [`Names::keep`]), plus a margin; tables that were
//!   left mostly empty by an expiry are shrunk, so the memory follows the names alive, not
//!   the most there ever were.
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Arc;

/// A name's slot in the table.
type NameId = u32;

/// The addresses of one job's answers and the names they came from.
#[derive(Debug, Default)]
pub struct Names {
    /// The addresses kept and their names, in no order.
    addrs: Vec<([u8; 16], NameId)>,
    /// Indexes into `addrs` by address, looked up for every flow.
    by_addr: hashbrown::HashTable<u32>,
    /// The fast hasher (seeded: answers cannot aim at a bucket).
    hasher: crate::agent::FastHash,
    /// Indexed by [`NameId`]; a free slot has no name.
    slots: Vec<Slot>,
    free: Vec<NameId>,
    index: HashMap<Arc<str>, NameId>,
}

#[derive(Debug)]
struct Slot {
    name: Option<Arc<str>>,
    /// Addresses pointing here.
    refs: u32,
    /// CLOCK_BOOTTIME second until which the name and its addresses are kept.
    until_s: u32,
}

/// An address as the kernel keys it: IPv4 mapped into IPv6.
fn key(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn secs(ns: u64) -> u32 {
    u32::try_from(ns.div_ceil(1_000_000_000)).unwrap_or(u32::MAX)
}

/// Tables are shrunk when an expiry leaves them at most a quarter full (and they hold more
/// than this many slots: small ones are not worth the rehash).
const SHRINK_ABOVE: usize = 256;

impl Names {
    /// Addresses kept.
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        self.find(&key(addr)).is_some()
    }

    /// Where `k` is in `addrs`.
    fn find(&self, k: &[u8; 16]) -> Option<usize> {
        let addrs = &self.addrs;
        self.by_addr
            .find(self.hasher.hash_one(k), |&i| addrs[i as usize].0 == *k)
            .map(|&i| i as usize)
    }

    /// Indexes `addrs[i]` (not indexed yet).
    fn index_at(&mut self, i: usize) {
        let (addrs, hasher) = (&self.addrs, &self.hasher);
        self.by_addr
            .insert_unique(hasher.hash_one(addrs[i].0), i as u32, |&j| {
                hasher.hash_one(addrs[j as usize].0)
            });
    }

    /// Distinct names kept.
    pub fn names(&self) -> usize {
        self.index.len()
    }

    /// The name `addr` was answered for.
    pub fn get(&self, addr: IpAddr) -> Option<&Arc<str>> {
        let i = self.find(&key(addr))?;
        self.slots[self.addrs[i].1 as usize].name.as_ref()
    }

    /// Remembers that `addr` came from an answer for `name`, until `until_ns`
    /// (CLOCK_BOOTTIME; a name is kept until the latest of its answers' times). An address
    /// answered for another name since is that name's now.
    pub fn insert(&mut self, addr: IpAddr, name: &str, until_ns: u64) {
        let id = self.intern(name, secs(until_ns));
        let k = key(addr);
        match self.find(&k) {
            Some(i) => {
                let old = std::mem::replace(&mut self.addrs[i].1, id);
                self.release(old);
            }
            None => {
                self.addrs.push((k, id));
                self.index_at(self.addrs.len() - 1);
            }
        }
    }

    /// Keeps `addr`'s name (and so its other addresses) until at least `until_ns`: the
    /// kernel keeps an address while flows use it, and their events must still be named.
    pub fn keep(&mut self, addr: IpAddr, until_ns: u64) {
        if let Some(i) = self.find(&key(addr)) {
            let s = &mut self.slots[self.addrs[i].1 as usize];
            s.until_s = s.until_s.max(secs(until_ns));
        }
    }

    /// Forgets the names whose time ran out by `now_ns`, and their addresses; shrinks the
    /// tables they leave mostly empty. Returns the addresses forgotten.
    pub fn expire(&mut self, now_ns: u64) -> usize {
        let now = u32::try_from(now_ns / 1_000_000_000).unwrap_or(u32::MAX);
        if !self
            .slots
            .iter()
            .any(|s| s.name.is_some() && s.until_s <= now)
        {
            return 0;
        }
        let before = self.addrs.len();
        let slots = &self.slots;
        self.addrs
            .retain(|(_, id)| slots[*id as usize].until_s > now);
        // The survivors moved: indexed again (as a rehash would, once per expiry pass).
        self.by_addr.clear();
        if self.by_addr.capacity() > SHRINK_ABOVE && self.addrs.len() * 4 <= self.by_addr.capacity()
        {
            self.by_addr = hashbrown::HashTable::with_capacity(self.addrs.len() * 2);
        }
        if self.addrs.capacity() > SHRINK_ABOVE && self.addrs.len() * 4 <= self.addrs.capacity() {
            self.addrs.shrink_to(self.addrs.len() * 2);
        }
        for i in 0..self.addrs.len() {
            self.index_at(i);
        }
        for (i, s) in self.slots.iter_mut().enumerate() {
            if s.name.is_some() && s.until_s <= now {
                let name = s.name.take().expect("checked");
                self.index.remove(&name);
                s.refs = 0;
                self.free.push(i as NameId);
            }
        }
        // Trailing free slots go, so the table follows the names alive.
        while self.slots.last().is_some_and(|s| s.name.is_none()) {
            self.slots.pop();
        }
        let n = self.slots.len() as NameId;
        self.free.retain(|&i| i < n);
        shrink_map(&mut self.index);
        if self.slots.capacity() > SHRINK_ABOVE && self.slots.len() * 4 <= self.slots.capacity() {
            self.slots.shrink_to(self.slots.len() * 2);
            self.free.shrink_to(self.free.len() * 2);
        }
        before - self.addrs.len()
    }

    fn intern(&mut self, name: &str, until_s: u32) -> NameId {
        if let Some(&id) = self.index.get(name) {
            let s = &mut self.slots[id as usize];
            s.refs += 1;
            s.until_s = s.until_s.max(until_s);
            return id;
        }
        let name: Arc<str> = name.into();
        let slot = Slot {
            name: Some(name.clone()),
            refs: 1,
            until_s,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = slot;
                id
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as NameId
            }
        };
        self.index.insert(name, id);
        id
    }

    /// One address less points at `id`: the name goes with its last address.
    fn release(&mut self, id: NameId) {
        let s = &mut self.slots[id as usize];
        s.refs -= 1;
        if s.refs == 0 {
            if let Some(name) = s.name.take() {
                self.index.remove(&name);
            }
            self.free.push(id);
        }
    }
}

fn shrink_map<K: std::hash::Hash + Eq, V, S: std::hash::BuildHasher>(m: &mut HashMap<K, V, S>) {
    if m.capacity() > SHRINK_ABOVE && m.len() * 4 <= m.capacity() {
        m.shrink_to(m.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn v4(i: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0xc633_6400 + i))
    }

    #[test]
    fn names_addresses_once_per_name() {
        let mut n = Names::default();
        for i in 0..10 {
            n.insert(v4(i), "a.test", 100 * S);
        }
        n.insert("2001:db8::1".parse().unwrap(), "b.test", 100 * S);
        assert_eq!((n.len(), n.names()), (11, 2));
        assert_eq!(n.get(v4(3)).map(|s| &**s), Some("a.test"));
        // The mapped form of an IPv4 address is its own key: v4 and v6 do not mix.
        assert!(n.get("::1".parse().unwrap()).is_none());
        // Answered again for another name: renamed; the old name goes with its last address.
        n.insert("2001:db8::1".parse().unwrap(), "c.test", 100 * S);
        assert_eq!(n.names(), 2);
        assert_eq!(
            n.get("2001:db8::1".parse().unwrap()).map(|s| &**s),
            Some("c.test")
        );
    }

    #[test]
    fn expiry_forgets_and_shrinks() {
        let mut n = Names::default();
        // 5000 names of 4 addresses, expiring at 10 s; one of them kept alive by a flow.
        for i in 0..20_000 {
            n.insert(v4(i), &format!("n{}.test", i / 4), 10 * S);
        }
        n.keep(v4(8), 500 * S);
        let cap = n.by_addr.capacity();
        assert!(n.addrs.capacity() >= 20_000);
        assert_eq!(n.expire(9 * S), 0);
        assert_eq!(n.expire(10 * S), 20_000 - 4);
        assert_eq!((n.len(), n.names()), (4, 1));
        assert_eq!(n.get(v4(9)).map(|s| &**s), Some("n2.test"));
        assert!(n.by_addr.capacity() < cap / 8, "{}", n.by_addr.capacity());
        assert!(n.addrs.capacity() < 64, "{}", n.addrs.capacity());
        assert!(n.slots.len() <= 3 && n.index.capacity() < 64);
        // The freed slots are used again.
        n.insert(v4(1), "again.test", 20 * S);
        assert!(n.slots.len() <= 3);
        assert_eq!(n.expire(1000 * S), 5);
        assert!(n.is_empty() && n.slots.is_empty() && n.free.is_empty());
    }

    /// Free slots past the end of the table (the tail dropped by an expiry) are not used
    /// again: a name freed by a rename just before the tail, then the tail expiring.
    #[test]
    fn free_slots_past_the_end_are_dropped() {
        let mut n = Names::default();
        for i in 0..10 {
            n.insert(v4(i), &format!("n{i}.test"), 100 * S);
        }
        n.insert(v4(10), "n10.test", 5 * S);
        n.insert(v4(9), "n0.test", 100 * S); // n9.test's slot is free now
        assert_eq!(n.expire(6 * S), 1);
        assert_eq!(n.slots.len(), 9);
        for i in 20..30 {
            n.insert(v4(i), &format!("m{i}.test"), 100 * S);
        }
        assert_eq!((n.len(), n.names()), (20, 19));
        assert_eq!(n.get(v4(25)).map(|s| &**s), Some("m25.test"));
        assert_eq!(n.get(v4(9)).map(|s| &**s), Some("n0.test"));
    }

    /// An expiry moves the addresses that stay (they are kept densely): each is still
    /// found, under its own name, and the forgotten ones are not; the table then takes
    /// new addresses and renames as before.
    #[test]
    fn survivors_are_found_after_an_expiry_moves_them() {
        let mut n = Names::default();
        let v6 = |i: u32| {
            IpAddr::from(std::net::Ipv6Addr::new(
                0x2001,
                0xdb8,
                0,
                0,
                0,
                0,
                (i >> 16) as u16,
                i as u16,
            ))
        };
        // 1000 names of 4 addresses, v4 and v6; odd names live to 20 s, even ones to 10 s.
        for i in 0..4000u32 {
            let until = if (i / 4) % 2 == 1 { 20 * S } else { 10 * S };
            let a = if i % 2 == 0 { v4(i) } else { v6(i) };
            n.insert(a, &format!("n{}.test", i / 4), until);
        }
        assert_eq!((n.len(), n.names()), (4000, 1000));
        assert_eq!(n.expire(10 * S), 2000);
        for i in 0..4000u32 {
            let a = if i % 2 == 0 { v4(i) } else { v6(i) };
            let want = ((i / 4) % 2 == 1).then(|| format!("n{}.test", i / 4));
            assert_eq!(n.get(a).map(|s| s.to_string()), want, "address {i}");
            assert_eq!(n.contains(a), (i / 4) % 2 == 1);
        }
        // New addresses, and one renamed, after the move.
        n.insert(v4(9_000), "new.test", 30 * S);
        n.insert(v6(5), "renamed.test", 30 * S);
        assert_eq!(n.len(), 2001);
        assert_eq!(n.get(v4(9_000)).map(|s| &**s), Some("new.test"));
        assert_eq!(n.get(v6(5)).map(|s| &**s), Some("renamed.test"));
        assert_eq!(n.get(v6(7)).map(|s| &**s), Some("n1.test"));
        assert_eq!(n.expire(21 * S), 1999);
        assert_eq!((n.len(), n.names()), (2, 2));
    }
}
