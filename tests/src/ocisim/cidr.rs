//! IP CIDR blocks in a subnet: which aligned power-of-two ranges are free, and claiming or
//! releasing one as a whole. A single address is the /32 case of the same rules.
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::config::CidrConfig;
use super::state::{ApiError, Subnet};

/// What a create asks for: a single address (`prefix` 32) or a block, at `at` or anywhere.
#[derive(Debug, Clone, Copy)]
pub struct Want {
    pub at: Option<Ipv4Addr>,
    pub prefix: u8,
}

impl Want {
    /// Reads `ipAddress` and `cidrPrefixLength` as `CreatePrivateIpDetails` (and
    /// `BulkCreatePrivateIpItem`) carry them, checking the prefix against the allowed sizes.
    pub fn parse(body: &serde_json::Value, cfg: &CidrConfig) -> Result<Self, ApiError> {
        let at = match body["ipAddress"].as_str() {
            Some(text) => Some(text.parse().map_err(|_| {
                ApiError::new(400, "InvalidParameter", format!("invalid ipAddress {text}"))
            })?),
            None => None,
        };
        let prefix = match &body["cidrPrefixLength"] {
            serde_json::Value::Null => return Ok(Self { at, prefix: 32 }),
            v => v
                .as_u64()
                .and_then(|p| u8::try_from(p).ok())
                .ok_or_else(|| {
                    ApiError::new(
                        400,
                        "InvalidParameter",
                        format!("cidrPrefixLength {v} is not an integer"),
                    )
                })?,
        };
        if !(cfg.largest_prefix..=cfg.smallest_prefix).contains(&prefix) {
            return Err(ApiError::new(
                400,
                "InvalidParameter",
                format!(
                    "cidrPrefixLength {prefix} is outside the allowed /{}–/{}",
                    cfg.largest_prefix, cfg.smallest_prefix
                ),
            ));
        }
        if at.is_none() && !cfg.pick_block_without_address {
            return Err(ApiError::new(
                400,
                "MissingParameter",
                "ipAddress is required with cidrPrefixLength",
            ));
        }
        Ok(Self { at, prefix })
    }

    pub fn is_block(self) -> bool {
        self.prefix < 32
    }

    /// Addresses the request takes.
    pub fn size(self) -> u32 {
        1 << (32 - u32::from(self.prefix))
    }
}

impl Subnet {
    fn reserved(&self) -> [Ipv4Addr; 3] {
        [self.cidr.network(), self.router_ip(), self.cidr.broadcast()]
    }

    /// Whether every address of `block` is inside the subnet, not reserved and not taken.
    fn is_free(&self, block: Ipv4Net) -> bool {
        self.cidr.contains(&block)
            && !self.reserved().iter().any(|r| block.contains(r))
            && self
                .used
                .range(block.network()..=block.broadcast())
                .next()
                .is_none()
    }

    fn free_addresses(&self) -> u64 {
        let total = 1_u64 << (32 - u32::from(self.cidr.prefix_len()));
        total.saturating_sub(3 + self.used.len() as u64)
    }

    /// Claims the block (or address) `want` names, or the lowest free aligned one.
    pub fn take(&mut self, want: Want, fragmented: &ApiError) -> Result<Ipv4Net, ApiError> {
        if want.prefix < self.cidr.prefix_len() {
            return Err(ApiError::new(
                400,
                "InvalidParameter",
                format!("a /{} does not fit in subnet {}", want.prefix, self.cidr),
            ));
        }
        let block = match want.at {
            Some(at) => self.claimable(at, want.prefix)?,
            None => self.lowest_free(want, fragmented)?,
        };
        self.used.extend(block.hosts_all());
        Ok(block)
    }

    fn claimable(&self, at: Ipv4Addr, prefix: u8) -> Result<Ipv4Net, ApiError> {
        let block = Ipv4Net::new(at, prefix).expect("prefix checked against 32");
        if block.network() != at {
            return Err(ApiError::new(
                400,
                "InvalidParameter",
                format!(
                    "{at}/{prefix} is not aligned: a /{prefix} starts at {}",
                    block.network()
                ),
            ));
        }
        if !self.cidr.contains(&block) || self.reserved().iter().any(|r| block.contains(r)) {
            let what = if prefix == 32 {
                format!("{at} is not a usable address")
            } else {
                format!("{block} is not a usable range")
            };
            return Err(ApiError::new(
                400,
                "InvalidParameter",
                format!(
                    "{what} of {} (its network, router and broadcast addresses are reserved)",
                    self.cidr
                ),
            ));
        }
        if !self.is_free(block) {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "{} is already assigned in subnet {}",
                    if prefix == 32 {
                        at.to_string()
                    } else {
                        format!("part of {block}")
                    },
                    self.id
                ),
            ));
        }
        Ok(block)
    }

    fn lowest_free(&self, want: Want, fragmented: &ApiError) -> Result<Ipv4Net, ApiError> {
        let (first, last) = (
            u32::from(self.cidr.network()),
            u32::from(self.cidr.broadcast()),
        );
        let found = (first..=last)
            .step_by(want.size() as usize)
            .map(|start| Ipv4Net::new(Ipv4Addr::from(start), want.prefix).expect("valid prefix"))
            .find(|block| self.is_free(*block));
        if let Some(block) = found {
            return Ok(block);
        }
        if self.free_addresses() >= u64::from(want.size()) && want.is_block() {
            return Err(fragmented.clone());
        }
        Err(ApiError::new(
            400,
            "LimitExceeded",
            format!("subnet {} has no free private IP addresses", self.id),
        ))
    }

    /// Frees every address of `block`.
    pub fn give_back(&mut self, block: Ipv4Net) {
        for ip in block.hosts_all() {
            self.used.remove(&ip);
        }
    }
}

/// `hosts()` of ipnet skips a block's network and broadcast; a VNIC's block owns all of them.
trait AllHosts {
    fn hosts_all(&self) -> std::iter::Map<std::ops::RangeInclusive<u32>, fn(u32) -> Ipv4Addr>;
}

impl AllHosts for Ipv4Net {
    fn hosts_all(&self) -> std::iter::Map<std::ops::RangeInclusive<u32>, fn(u32) -> Ipv4Addr> {
        (u32::from(self.network())..=u32::from(self.broadcast())).map(Ipv4Addr::from)
    }
}
