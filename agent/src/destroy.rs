//! Destroys TCP sockets by 4-tuple with netlink sock_diag `SOCK_DESTROY` (what `ss -K` does).
//!
//! Built on the rust-netlink crates (`netlink-packet-sock-diag`, `netlink-packet-core`,
//! `netlink-sys`): `SockDiagDestroy` already emits message type `SOCK_DESTROY` (21) around the
//! same `inet_diag_req_v2` as a `SOCK_DIAG_BY_FAMILY` query, so nothing here is hand-laid bytes.
//!
//! The kernel looks sockets up in the network namespace of the netlink socket, which is the
//! namespace of the thread that calls [`destroy_tcp`]. It needs `CAP_NET_ADMIN` there and a
//! kernel built with `CONFIG_INET_DIAG_DESTROY`. The local side of a destroyed socket sees
//! `ECONNABORTED` on its next call; the peer gets a RST.

use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagDestroy, SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr as NetlinkAddr};

/// What one [`destroy_tcp`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DestroyReport {
    /// Sockets the kernel found and destroyed.
    pub destroyed: usize,
    /// Sockets the kernel did not find (`ENOENT`): already gone.
    pub not_found: usize,
}

/// `INET_DIAG_NOCOOKIE`: match by 4-tuple, not by socket cookie.
const NO_COOKIE: [u8; 8] = [0xff; 8];

/// Destroys each `(local, remote)` TCP connection in the calling thread's network namespace.
///
/// One netlink socket per call, one acknowledged request per connection. A connection the kernel
/// does not find counts as `not_found`; any other kernel error (`EPERM`, `EOPNOTSUPP` without
/// `CONFIG_INET_DIAG_DESTROY`, ...) stops the call and is returned. Both addresses of a pair
/// must be of the same family (`InvalidInput` otherwise); IPv4-mapped IPv6 addresses are passed
/// as AF_INET6 and the kernel matches them against IPv4 sockets itself.
pub fn destroy_tcp(conns: &[(SocketAddr, SocketAddr)]) -> io::Result<DestroyReport> {
    let mut report = DestroyReport::default();
    if conns.is_empty() {
        return Ok(report);
    }
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;

    let mut recv = vec![0u8; 8192];
    for (seq, &(local, remote)) in (1u32..).zip(conns) {
        let request = destroy_request(local, remote, seq)?;
        let mut send = vec![0u8; request.buffer_len()];
        request.serialize(&mut send);
        socket.send(&send, 0)?;

        match read_ack(&socket, &mut recv, seq)? {
            None => report.destroyed += 1,
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => report.not_found += 1,
            Some(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("SOCK_DESTROY {local} -> {remote}: {e}"),
                ))
            }
        }
    }
    Ok(report)
}

/// Whether this kernel lets sock_diag destroy a connection: tried on one made for the purpose
/// on loopback, in the calling thread's network namespace. Err says what is missing.
pub fn probe() -> Result<(), String> {
    let made = || -> io::Result<_> {
        let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
        let client = std::net::TcpStream::connect(listener.local_addr()?)?;
        let (server, _) = listener.accept()?;
        Ok((client, server))
    };
    let (client, _server) =
        made().map_err(|e| format!("no loopback connection to try it on: {e}"))?;
    let pair = client
        .local_addr()
        .and_then(|local| Ok((local, client.peer_addr()?)))
        .map_err(|e| e.to_string())?;
    match destroy_tcp(&[pair]) {
        Ok(r) if r.destroyed == 1 => Ok(()),
        Ok(_) => Err(
            "sock_diag did not find a live connection: the kernel's TCP sock_diag \
             (modules inet_diag and tcp_diag) is missing"
                .into(),
        ),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Err(
            "sock_diag SOCK_DESTROY is not supported: the kernel is built without \
             CONFIG_INET_DIAG_DESTROY"
                .into(),
        ),
        Err(e) => Err(format!("sock_diag SOCK_DESTROY: {e}")),
    }
}

fn destroy_request(
    local: SocketAddr,
    remote: SocketAddr,
    seq: u32,
) -> io::Result<NetlinkMessage<SockDiagDestroy>> {
    let family = match (local.ip(), remote.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => AF_INET,
        (IpAddr::V6(_), IpAddr::V6(_)) => AF_INET6,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("mixed address families: {local} -> {remote}"),
            ))
        }
    };
    let socket_id = SocketId {
        source_port: local.port(),
        destination_port: remote.port(),
        source_address: local.ip(),
        destination_address: remote.ip(),
        interface_id: 0,
        cookie: NO_COOKIE,
    };
    let inner = SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        // Every state (the kernel's lookup by 4-tuple ignores the mask, `ss -K` sends all).
        states: StateFlags::from_bits_retain(u32::MAX),
        socket_id,
    });
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(SockDiagDestroy::new(inner)),
    );
    // Sets the length and the message type (SOCK_DESTROY, from `SockDiagDestroy`).
    message.finalize();
    Ok(message)
}

/// Reads until the `NLMSG_ERROR` for `seq`: `None` for an ACK, `Some(errno)` for a NACK.
fn read_ack(socket: &Socket, buf: &mut [u8], seq: u32) -> io::Result<Option<io::Error>> {
    loop {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < n {
            let message = NetlinkMessage::<SockDiagDestroy>::deserialize(&buf[offset..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = message.header.length as usize;
            if len == 0 {
                break;
            }
            offset += (len + 3) & !3;
            if message.header.sequence_number != seq {
                continue;
            }
            if let NetlinkPayload::Error(e) = message.payload {
                return Ok(e.code.map(|_| e.to_io()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_is_sock_destroy_with_the_kernel_layout() {
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let remote: SocketAddr = "10.1.2.3:443".parse().unwrap();
        let message = destroy_request(local, remote, 7).unwrap();
        let mut buf = vec![0u8; message.buffer_len()];
        message.serialize(&mut buf);

        // nlmsghdr (16) + inet_diag_req_v2 (8) + inet_diag_sockid (48).
        assert_eq!(buf.len(), 16 + 8 + 48);
        assert_eq!(u32::from_ne_bytes(buf[0..4].try_into().unwrap()), 72);
        assert_eq!(u16::from_ne_bytes(buf[4..6].try_into().unwrap()), 21);
        assert_eq!(
            u16::from_ne_bytes(buf[6..8].try_into().unwrap()),
            NLM_F_REQUEST | NLM_F_ACK
        );
        assert_eq!(u32::from_ne_bytes(buf[8..12].try_into().unwrap()), 7);
        let req = &buf[16..];
        assert_eq!(req[0], libc::AF_INET as u8);
        assert_eq!(req[1], libc::IPPROTO_TCP as u8);
        assert_eq!(u32::from_ne_bytes(req[4..8].try_into().unwrap()), u32::MAX);
        let id = &req[8..];
        assert_eq!(&id[0..2], &40000u16.to_be_bytes());
        assert_eq!(&id[2..4], &443u16.to_be_bytes());
        assert_eq!(&id[4..8], &[127, 0, 0, 1]);
        assert_eq!(&id[8..20], &[0; 12]);
        assert_eq!(&id[20..24], &[10, 1, 2, 3]);
        assert_eq!(&id[36..40], &[0; 4]);
        assert_eq!(&id[40..48], &NO_COOKIE);
    }

    #[test]
    fn ipv6_and_mixed_families() {
        let local: SocketAddr = "[::1]:1".parse().unwrap();
        let remote: SocketAddr = "[2001:db8::1]:2".parse().unwrap();
        let message = destroy_request(local, remote, 1).unwrap();
        let mut buf = vec![0u8; message.buffer_len()];
        message.serialize(&mut buf);
        assert_eq!(buf[16], libc::AF_INET6 as u8);
        assert_eq!(
            &buf[24 + 4..24 + 20],
            &"::1".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );

        let v4: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let err = destroy_request(v4, remote, 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
