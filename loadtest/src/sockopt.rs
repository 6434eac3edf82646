//! Socket options that tokio's `TcpSocket` does not set, set before the socket connects.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
};

use tokio::net::TcpSocket;

/// Sets the integer socket option `name` of `level` on `socket`.
pub fn set_int(socket: &TcpSocket, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid descriptor, and a pointer to an int of the size given, as these options take.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Binds `socket` to the loopback address `source`, its port taken when it connects, not now
/// (`IP_BIND_ADDRESS_NO_PORT`, for IPv4). A bind to port 0 searches the address's ephemeral ports
/// for one no other socket holds, a search that grows with every socket the address holds and
/// runs on the binding thread: with 17,000 sockets an address it stalled the generators of the
/// 100k run (their pongs a minute late, their handshakes cut by the nodes' header timeout). At
/// connect the port need only be free for that destination.
pub fn bind_source(socket: &TcpSocket, source: IpAddr) -> io::Result<()> {
    if source.is_ipv4() {
        set_int(socket, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
    }
    socket.bind(SocketAddr::new(source, 0))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn a_socket_bound_to_a_source_takes_its_port_when_it_connects() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let socket = TcpSocket::new_v4().unwrap();
        bind_source(&socket, source).unwrap();
        let bound = socket.local_addr().unwrap();
        assert_eq!(
            (bound.ip(), bound.port()),
            (source, 0),
            "no port searched for at the bind"
        );
        let stream = socket.connect(listener.local_addr().unwrap()).await.unwrap();
        let local = stream.local_addr().unwrap();
        assert_eq!(local.ip(), source);
        assert_ne!(local.port(), 0);
    }
}
