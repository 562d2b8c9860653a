//! Maglev lookup tables (Eisenbud et al., NSDI 2016, section 3.4), computed in userspace.
//!
//! Every backend gets a permutation of the table positions from two hashes of its identity
//! (`address:port`): `offset = h1 % M`, `skip = h2 % (M - 1) + 1`, position j =
//! `(offset + j * skip) % M`. Backends take turns claiming their next free position until the
//! table is full. The hashes depend only on the identity, and backends are ordered by it, so
//! every node computes the same table for the same backend set whatever ids its maps use.

use std::net::Ipv4Addr;

use proxy_common::maglev::MAGLEV_TABLE_SIZE_MAX;

/// Checks a `--maglev-table-size`: a prime in 3..=131071 (a prime M makes every skip a
/// generator, so each permutation visits every position).
pub fn validate_table_size(m: u32) -> Result<u32, String> {
    if !(3..=MAGLEV_TABLE_SIZE_MAX).contains(&m) {
        return Err(format!(
            "--maglev-table-size {m}: must be a prime between 3 and {MAGLEV_TABLE_SIZE_MAX} (e.g. 251, 1021, 4093, 16381, 65521, 131071)"
        ));
    }
    if !is_prime(m) {
        return Err(format!(
            "--maglev-table-size {m}: not a prime (Maglev needs a prime table size; e.g. 251, 1021, 4093, 16381, 65521, 131071)"
        ));
    }
    Ok(m)
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// FNV-1a (64 bit) with a seed folded into the offset basis, then a 64-bit finaliser
/// (splitmix64) so that identities differing in one byte get unrelated hashes.
fn identity_hash(identity: &[u8], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in identity {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The identity a backend is hashed by: its address and port, the same on every node.
pub fn backend_identity(address: Ipv4Addr, port: u16) -> [u8; 6] {
    let a = address.octets();
    let p = port.to_be_bytes();
    [a[0], a[1], a[2], a[3], p[0], p[1]]
}

/// The table for `backends` (identities, in any order; duplicates are the caller's bug):
/// entry i is the index into `backends` of the backend at position i. Empty for no backends.
pub fn table(backends: &[[u8; 6]], m: u32) -> Vec<u32> {
    if backends.is_empty() {
        return Vec::new();
    }
    let m_us = m as usize;
    // Order by identity so the table does not depend on the caller's order.
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|&i| backends[i]);
    let perms: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let offset = identity_hash(&backends[i], 0x6d61_676c_6576_3031) % u64::from(m);
            let skip = identity_hash(&backends[i], 0x736b_6970_7365_6564) % u64::from(m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; order.len()];
    let mut entry = vec![u32::MAX; m_us];
    let mut filled = 0usize;
    'fill: loop {
        for (turn, &(offset, skip)) in perms.iter().enumerate() {
            // The backend's next position it has not tried yet that is still free.
            let mut pos = ((offset + next[turn] * skip) % u64::from(m)) as usize;
            while entry[pos] != u32::MAX {
                next[turn] += 1;
                pos = ((offset + next[turn] * skip) % u64::from(m)) as usize;
            }
            entry[pos] = order[turn] as u32;
            next[turn] += 1;
            filled += 1;
            if filled == m_us {
                break 'fill;
            }
        }
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u32) -> Vec<[u8; 6]> {
        (0..n)
            .map(|i| backend_identity(Ipv4Addr::from(0x0af4_0000 + i), 8080))
            .collect()
    }

    #[test]
    fn sizes_are_checked_for_primality_and_range() {
        assert_eq!(validate_table_size(16381), Ok(16381));
        assert_eq!(validate_table_size(251), Ok(251));
        let err = validate_table_size(16384).unwrap_err();
        assert!(err.contains("not a prime"), "{err}");
        assert!(
            validate_table_size(131_101)
                .unwrap_err()
                .contains("between")
        );
        assert!(validate_table_size(1).is_err());
    }

    #[test]
    fn each_backend_gets_close_to_m_over_n_slots() {
        let m = 16381;
        for n in [3u32, 10, 100] {
            let t = table(&backends(n), m);
            assert_eq!(t.len(), m as usize);
            let mut counts = vec![0usize; n as usize];
            for &b in &t {
                counts[b as usize] += 1;
            }
            let ideal = f64::from(m) / f64::from(n);
            for (b, &c) in counts.iter().enumerate() {
                let dev = (c as f64 - ideal).abs() / ideal;
                // Maglev guarantees each backend floor(M/N) or ceil(M/N) positions +- the
                // rounds it ran out of free positions in; within 2% at M/N >= 160.
                assert!(dev < 0.02, "n={n} backend {b}: {c} slots, ideal {ideal:.1}");
            }
        }
    }

    #[test]
    fn removing_one_of_n_backends_moves_about_one_nth_of_the_other_slots() {
        let m = 16381;
        let n = 20u32;
        let all = backends(n);
        let before = table(&all, m);
        let removed = 7usize;
        let rest: Vec<[u8; 6]> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != removed)
            .map(|(_, b)| *b)
            .collect();
        let after = table(&rest, m);
        let mut own = 0usize;
        let mut moved = 0usize;
        for (pos, &b) in before.iter().enumerate() {
            let before_id = all[b as usize];
            let after_id = rest[after[pos] as usize];
            if b as usize == removed {
                own += 1;
            } else if before_id != after_id {
                moved += 1;
            }
        }
        // The removed backend's own positions (~M/N) must move; of the others, Maglev moves
        // only a small share (the paper: well under 1/N for M >> N).
        let share = moved as f64 / f64::from(m);
        assert!(own > 0);
        assert!(
            share < 1.0 / f64::from(n),
            "{moved} of {m} positions of remaining backends moved ({share:.4})"
        );
    }

    #[test]
    fn the_table_does_not_depend_on_the_input_order() {
        let mut bs = backends(5);
        let a: Vec<[u8; 6]> = table(&bs, 251).iter().map(|&i| bs[i as usize]).collect();
        bs.reverse();
        let b: Vec<[u8; 6]> = table(&bs, 251).iter().map(|&i| bs[i as usize]).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn no_backends_no_table_and_one_backend_fills_it() {
        assert!(table(&[], 251).is_empty());
        assert!(table(&backends(1), 251).iter().all(|&i| i == 0));
    }
}
