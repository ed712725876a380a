//! The kernel's connection tracking table, read over ctnetlink (`NETLINK_NETFILTER`): the
//! flows `nf_nat` translated to the masquerade address (a Docker container's, kube-proxy's
//! MASQUERADE) on ports of the NAT range. The datapath records such a flow when the host
//! sends on it; one opened before the datapath was attached is only known here, so the
//! agent reads them at start and records them (see `datapath::hostflows`).
//!
//! Only the reply tuple of each entry is read: for a translated flow it names the remote
//! end and the translated local end, which is what the datapath's records are keyed by.

use std::{net::Ipv4Addr, ops::RangeInclusive};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

/// A flow of the table towards the masquerade address, by its reply tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackedFlow {
    /// IP protocol (TCP, UDP or ICMP).
    pub proto: u8,
    pub remote: Ipv4Addr,
    /// The remote's port (0 for ICMP).
    pub remote_port: u16,
    /// The local port (the echo identifier for ICMP), inside the range asked for.
    pub local_port: u16,
    /// `TCP_CONNTRACK_*` for TCP (3 is established), when the kernel says.
    pub tcp_state: Option<u8>,
}

/// `TCP_CONNTRACK_ESTABLISHED`: the handshake is done.
const TCP_ESTABLISHED: u8 = 3;
/// `TCP_CONNTRACK_CLOSE`: the last of the states after the handshake (`FIN_WAIT`,
/// `CLOSE_WAIT`, `LAST_ACK`, `TIME_WAIT` lie between).
const TCP_CLOSE: u8 = 8;

impl TrackedFlow {
    /// A TCP flow past its handshake (established or closing).
    pub fn handshake_done(&self) -> bool {
        self.tcp_state
            .is_some_and(|s| (TCP_ESTABLISHED..=TCP_CLOSE).contains(&s))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("cannot open a ctnetlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("the ctnetlink dump failed: {0}")]
    Io(#[source] std::io::Error),
    #[error(
        "the kernel refused the ctnetlink dump (errno {0}); is nf_conntrack_netlink available?"
    )]
    Refused(i32),
    #[error("the ctnetlink dump ended mid-message")]
    Truncated,
}

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
/// `(NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET`.
const CT_GET: u16 = (1 << 8) | 1;
const NFGENMSG_LEN: usize = 4;
const AF_INET: u8 = 2;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_PROTOINFO: u16 = 4;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
/// The attribute type without `NLA_F_NESTED` and `NLA_F_NET_BYTEORDER`.
const NLA_TYPE_MASK: u16 = 0x3fff;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// The IPv4 flows whose reply goes to `addr` on a port (or echo identifier) in `ports`.
pub fn flows_to(
    addr: Ipv4Addr,
    ports: RangeInclusive<u16>,
) -> Result<Vec<TrackedFlow>, ConntrackError> {
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(ConntrackError::Socket)?;
    socket.bind_auto().map_err(ConntrackError::Socket)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(ConntrackError::Socket)?;
    socket
        .send(&dump_request(), 0)
        .map_err(ConntrackError::Io)?;
    let mut flows = Vec::new();
    loop {
        let (buffer, _) = socket.recv_from_full().map_err(ConntrackError::Io)?;
        if buffer.is_empty() {
            return Err(ConntrackError::Truncated);
        }
        if read_messages(&buffer, &mut |flow| {
            if flow.to == addr && ports.contains(&flow.flow.local_port) {
                flows.push(flow.flow);
            }
        })? {
            return Ok(flows);
        }
    }
}

/// `IPCTNL_MSG_CT_GET` with `NLM_F_DUMP` for IPv4.
fn dump_request() -> Vec<u8> {
    let len = NLMSG_HDRLEN + NFGENMSG_LEN;
    let mut message = Vec::with_capacity(len);
    message.extend_from_slice(&u32::try_from(len).expect("small").to_ne_bytes());
    message.extend_from_slice(&CT_GET.to_ne_bytes());
    message.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    message.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel
    message.extend_from_slice(&[AF_INET, 0, 0, 0]); // nfgenmsg: family, version 0, res_id
    message
}

/// A reply tuple as read, with the (local) address it goes to.
struct Reply {
    to: Ipv4Addr,
    flow: TrackedFlow,
}

/// Hands each entry of the netlink messages in `buffer` to `each`; true once the dump's
/// end was read.
fn read_messages(buffer: &[u8], each: &mut dyn FnMut(Reply)) -> Result<bool, ConntrackError> {
    let mut rest = buffer;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(ConntrackError::Truncated);
        }
        let body = &rest[NLMSG_HDRLEN..len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = body
                    .get(0..4)
                    .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                    .ok_or(ConntrackError::Truncated)?;
                if errno != 0 {
                    return Err(ConntrackError::Refused(-errno));
                }
            }
            _ => {
                if let Some(reply) = body.get(NFGENMSG_LEN..).and_then(entry) {
                    each(reply);
                }
            }
        }
        rest = &rest[align(len).min(rest.len())..];
    }
    Ok(false)
}

/// The reply tuple and TCP state of one entry's attributes; `None` for an entry that is
/// not IPv4 TCP, UDP or ICMP echo, or lacks a field.
fn entry(attributes: &[u8]) -> Option<Reply> {
    let mut tuple = None;
    let mut tcp_state = None;
    for (kind, value) in attrs(attributes) {
        match kind {
            CTA_TUPLE_REPLY => tuple = Some(value),
            CTA_PROTOINFO => {
                tcp_state = find(value, CTA_PROTOINFO_TCP)
                    .and_then(|tcp| find(tcp, CTA_PROTOINFO_TCP_STATE))
                    .and_then(|state| state.first().copied());
            }
            _ => {}
        }
    }
    let tuple = tuple?;
    let ip = find(tuple, CTA_TUPLE_IP)?;
    let remote = ipv4(find(ip, CTA_IP_V4_SRC)?)?;
    let to = ipv4(find(ip, CTA_IP_V4_DST)?)?;
    let l4 = find(tuple, CTA_TUPLE_PROTO)?;
    let proto = *find(l4, CTA_PROTO_NUM)?.first()?;
    let port = |kind| find(l4, kind).and_then(be16);
    let (remote_port, local_port) = match proto {
        IPPROTO_TCP | IPPROTO_UDP => (port(CTA_PROTO_SRC_PORT)?, port(CTA_PROTO_DST_PORT)?),
        IPPROTO_ICMP => (0, port(CTA_PROTO_ICMP_ID)?),
        _ => return None,
    };
    Some(Reply {
        to,
        flow: TrackedFlow {
            proto,
            remote,
            remote_port,
            local_port,
            tcp_state: if proto == IPPROTO_TCP {
                tcp_state
            } else {
                None
            },
        },
    })
}

/// The netlink attributes in `buffer`: type (without flags) and value.
fn attrs(mut buffer: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buffer.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buffer[0], buffer[1]]));
        let kind = u16::from_ne_bytes([buffer[2], buffer[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buffer.len() {
            return None;
        }
        let value = &buffer[4..len];
        buffer = &buffer[align(len).min(buffer.len())..];
        Some((kind, value))
    })
}

fn find(buffer: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(buffer).find(|(k, _)| *k == kind).map(|(_, v)| v)
}

fn ipv4(value: &[u8]) -> Option<Ipv4Addr> {
    <[u8; 4]>::try_from(value).ok().map(Ipv4Addr::from)
}

fn be16(value: &[u8]) -> Option<u16> {
    <[u8; 2]>::try_from(value).ok().map(u16::from_be_bytes)
}

/// Netlink's 4-byte alignment.
fn align(len: usize) -> usize {
    (len + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&u16::try_from(4 + value.len()).unwrap().to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(align(out.len()), 0);
        out
    }

    fn nested(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(kind | 0x8000, &parts.concat())
    }

    fn tuple(kind: u16, src: [u8; 4], dst: [u8; 4], proto: u8, ports: (u16, u16)) -> Vec<u8> {
        nested(
            kind,
            &[
                nested(
                    CTA_TUPLE_IP,
                    &[attr(CTA_IP_V4_SRC, &src), attr(CTA_IP_V4_DST, &dst)],
                ),
                nested(
                    CTA_TUPLE_PROTO,
                    &[
                        attr(CTA_PROTO_NUM, &[proto]),
                        attr(CTA_PROTO_SRC_PORT, &ports.0.to_be_bytes()),
                        attr(CTA_PROTO_DST_PORT, &ports.1.to_be_bytes()),
                    ],
                ),
            ],
        )
    }

    fn message(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let len = NLMSG_HDRLEN + body.len();
        out.extend_from_slice(&u32::try_from(len).unwrap().to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&[0; 10]);
        out.extend_from_slice(body);
        out.resize(align(out.len()), 0);
        out
    }

    /// A container's connection 172.17.0.2:40000 → 203.0.113.10:443 that MASQUERADE
    /// translated to 10.0.0.10:61005: the reply tuple names the remote and the translated
    /// end, and the TCP state comes from the nested protocol info.
    #[test]
    fn the_reply_tuple_and_tcp_state_of_a_masqueraded_flow_are_read() {
        let body = [
            vec![AF_INET, 0, 0, 0],
            tuple(1, [172, 17, 0, 2], [203, 0, 113, 10], 6, (40000, 443)),
            tuple(
                CTA_TUPLE_REPLY,
                [203, 0, 113, 10],
                [10, 0, 0, 10],
                6,
                (443, 61005),
            ),
            nested(
                CTA_PROTOINFO,
                &[nested(
                    CTA_PROTOINFO_TCP,
                    &[attr(CTA_PROTOINFO_TCP_STATE, &[TCP_ESTABLISHED])],
                )],
            ),
        ]
        .concat();
        let buffer = [message(CT_GET, &body), message(NLMSG_DONE, &[0; 4])].concat();
        let mut seen = Vec::new();
        let done = read_messages(&buffer, &mut |r| seen.push((r.to, r.flow))).expect("parses");
        assert!(done, "the dump's end is seen");
        assert_eq!(
            seen,
            vec![(
                Ipv4Addr::new(10, 0, 0, 10),
                TrackedFlow {
                    proto: 6,
                    remote: Ipv4Addr::new(203, 0, 113, 10),
                    remote_port: 443,
                    local_port: 61005,
                    tcp_state: Some(TCP_ESTABLISHED),
                }
            )]
        );
    }

    #[test]
    fn a_refused_dump_and_a_cut_message_are_errors() {
        let refused = message(NLMSG_ERROR, &(-95i32).to_ne_bytes());
        assert!(matches!(
            read_messages(&refused, &mut |_| {}),
            Err(ConntrackError::Refused(95))
        ));
        let mut cut = message(CT_GET, &[AF_INET, 0, 0, 0, 8, 0, 2, 0]);
        cut.truncate(cut.len() - 6);
        cut[0] = 40;
        assert!(matches!(
            read_messages(&cut, &mut |_| {}),
            Err(ConntrackError::Truncated)
        ));
    }
}
