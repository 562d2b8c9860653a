//! Stable chain names: the first characters of the base32 of the SHA-256 of an identity
//! string, as kube-proxy names its `KUBE-SVC-`/`KUBE-SEP-` chains.

use sha2::{Digest as _, Sha256};

use crate::desired::{Backend, Frontend};

const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// The first `len` (at most 51) characters of the base32 (RFC 4648, no padding) of
/// SHA-256(`identity`).
pub fn hash(identity: &str, len: usize) -> String {
    let digest = Sha256::digest(identity.as_bytes());
    let mut out = String::with_capacity(len);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for &byte in digest.iter() {
        acc = (acc << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
            if out.len() == len {
                return out;
            }
        }
    }
    out
}

/// The identity of a frontend: service port, kind, address, port, protocol.
pub fn frontend_identity(f: &Frontend) -> String {
    format!("{}|{:?}|{}:{}", f.service, f.kind, f.address, f.port)
}

/// The identity of one endpoint of a frontend.
pub fn endpoint_identity(f: &Frontend, b: &Backend) -> String {
    format!("{}|{}:{}", frontend_identity(f), b.address, b.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_of_sha256() {
        // sha256("") = e3b0c442 98fc1c14 ...; base32 = 4OYMIQUY7QOBJGX36TEJS35ZEQT24QPEMSNZGTFESWMRW6CSXBKQ
        assert_eq!(hash("", 16), "4OYMIQUY7QOBJGX3");
        assert_eq!(
            hash("", 51),
            "4OYMIQUY7QOBJGX36TEJS35ZEQT24QPEMSNZGTFESWMRW6CSXBK"
        );
    }
}
