//! IP families: the address type an EndpointSlice carries (`addressType`) and the one a
//! family's endpoints, backends and frontends use. IPv4 and IPv6 are tracked side by side,
//! as kube-proxy's per-family proxiers do; code generic over the family takes an
//! [`IpFamilyAddr`].

use std::{
    fmt::{Debug, Display},
    hash::Hash,
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// An address of one IP family.
pub trait IpFamilyAddr:
    Copy + Ord + Eq + Hash + Debug + Display + FromStr + Send + Sync + 'static
{
    /// The EndpointSlice `addressType` of this family.
    const ADDRESS_TYPE: &'static str;
    /// The "any address" a nodePort frontend is keyed by.
    const UNSPECIFIED: Self;
}

impl IpFamilyAddr for Ipv4Addr {
    const ADDRESS_TYPE: &'static str = "IPv4";
    const UNSPECIFIED: Self = Ipv4Addr::UNSPECIFIED;
}

impl IpFamilyAddr for Ipv6Addr {
    const ADDRESS_TYPE: &'static str = "IPv6";
    const UNSPECIFIED: Self = Ipv6Addr::UNSPECIFIED;
}
