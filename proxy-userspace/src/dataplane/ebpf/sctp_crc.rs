//! The table of SCTP CRC32c factors the device programs use to rewrite SCTP ports
//! (`proxy_common::crc32c`): one entry per SCTP length, computed here once because the
//! computation is too costly for the verifier, written at every load (the values never
//! change, so rewriting an adopted pin while programs read it is harmless).

use std::os::fd::AsFd as _;

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{Array, Map},
};
use proxy_common::{
    crc32c::{SHIFT_TABLE_FIRST_LEN, X0, sctp_crc_shift_table_next},
    maps::{SCTP_CRC_SHIFT, SCTP_CRC_SHIFT_MAX},
};

/// x^(8 * (len - 4)) modulo the CRC32c polynomial for every SCTP length `len` below
/// `SCTP_CRC_SHIFT_MAX` (0 below 4: no SCTP packet is that short).
pub fn sctp_crc_shift_table() -> Vec<u32> {
    let mut table = vec![0u32; SCTP_CRC_SHIFT_MAX as usize];
    let mut shift = X0;
    for entry in &mut table[SHIFT_TABLE_FIRST_LEN as usize..] {
        *entry = shift;
        shift = sctp_crc_shift_table_next(shift);
    }
    table
}

/// Writes [`sctp_crc_shift_table`] into the object's `SCTP_CRC_SHIFT` map (batched where the
/// kernel can).
pub fn write_sctp_crc_shifts(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let map = ebpf
        .map_mut(SCTP_CRC_SHIFT)
        .ok_or_else(|| anyhow!("the eBPF object has no map {SCTP_CRC_SHIFT}"))?;
    let Map::Array(data) = map else {
        anyhow::bail!("map {SCTP_CRC_SHIFT} is not an array");
    };
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .with_context(|| format!("duplicating the descriptor of {SCTP_CRC_SHIFT}"))?;
    let entries: Vec<(u32, u32)> = sctp_crc_shift_table()
        .into_iter()
        .enumerate()
        .map(|(len, shift)| (len as u32, shift))
        .collect();
    if super::maps::update_batch(&fd, &entries, SCTP_CRC_SHIFT)? {
        return Ok(());
    }
    let mut array: Array<_, u32> = Array::try_from(map)
        .with_context(|| format!("map {SCTP_CRC_SHIFT} has an unexpected type"))?;
    for (len, shift) in entries {
        array
            .set(len, shift, 0)
            .with_context(|| format!("writing {SCTP_CRC_SHIFT}[{len}]"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proxy_common::crc32c::{POLY, crc4_raw, mul_mod, sctp_crc_update};

    use super::*;

    /// The raw CRC32c (no initial value, no final xor) of `data`, bit by bit.
    fn crc_raw(data: &[u8]) -> u32 {
        let mut crc = 0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = (crc >> 1) ^ (POLY & 0u32.wrapping_sub(crc & 1));
            }
        }
        crc
    }

    /// CRC32c as SCTP computes it (RFC 9260 appendix B).
    fn crc32c(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = (crc >> 1) ^ (POLY & 0u32.wrapping_sub(crc & 1));
            }
        }
        !crc
    }

    #[test]
    fn crc32c_known_vectors() {
        // RFC 3720 B.4 (32 bytes of zeros, of ones) and the usual "123456789".
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    /// Each entry times the raw CRC of 4 bytes is the raw CRC of those bytes padded with
    /// zeros to the entry's length: checked by brute force on small, odd, MTU-sized, jumbo
    /// and the largest lengths.
    #[test]
    fn shift_table_matches_a_brute_force_crc_of_zero_padded_data() {
        let table = sctp_crc_shift_table();
        assert_eq!(table.len(), SCTP_CRC_SHIFT_MAX as usize);
        assert!(table[..4].iter().all(|&f| f == 0));
        assert!(table[4..].iter().all(|&f| f != 0), "0 marks unwritten");
        let head = [0x9cu8, 0x01, 0xff, 0x42];
        let mut buf = vec![0u8; SCTP_CRC_SHIFT_MAX as usize];
        buf[..4].copy_from_slice(&head);
        let lens = (4..=64).chain([255, 256, 257, 1452, 1480, 1481, 9000, 9216, 65_515, 65_535]);
        for len in lens {
            assert_eq!(
                mul_mod(table[len], crc4_raw(u32::from_le_bytes(head))),
                crc_raw(&buf[..len]),
                "len {len}"
            );
        }
    }

    /// The update the programs make equals a recomputation after rewriting the ports, on
    /// random packets of various lengths.
    #[test]
    fn port_rewrite_update_matches_a_recomputation() {
        let table = sctp_crc_shift_table();
        let mut seed = 0x2545_f491u32;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for len in [12usize, 13, 16, 31, 100, 1452, 1480, 9000, 65_515] {
            let mut pkt: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            let old = u32::from_le_bytes(pkt[..4].try_into().unwrap());
            let new = rnd();
            let before = crc32c(&pkt);
            pkt[..4].copy_from_slice(&new.to_le_bytes());
            assert_eq!(
                sctp_crc_update(before, old ^ new, table[len]),
                crc32c(&pkt),
                "len {len}"
            );
        }
    }
}
