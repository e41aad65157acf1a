//! Loopback ports for the servers a test starts.
//!
//! Tests run in parallel and each binds `127.0.0.1:0`, so a port a test only remembers
//! (a cloud that is down for an outage, a listener a reload removed, a device that is
//! meant to be dead) can be handed to another test's server. Its clients then talk to
//! the wrong server: CI once saw a bridge forward 20 messages to another test's broker
//! through a cloud port that was "down". A [`ReservedPort`] keeps the port bound for as
//! long as the test holds it.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use socket2::{Domain, Socket, Type};

/// A loopback port bound, and not listening, for as long as this value lives.
///
/// The socket has `SO_REUSEADDR` and never listens, so Linux lets a server that also sets
/// `SO_REUSEADDR` (Outpost, through tokio; Mosquitto) bind and listen on the port while it
/// is held; with no such server, a connection is refused. No other `bind` to port 0 picks
/// a port with a socket on it, so the port stays this test's.
#[derive(Debug)]
pub struct ReservedPort {
    _socket: Socket,
    port: u16,
}

impl ReservedPort {
    /// The reserved port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// Reserves a free loopback port; see [`ReservedPort`].
pub fn reserve_port() -> ReservedPort {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("a TCP socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket
        .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
        .expect("bind 127.0.0.1:0");
    let port = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("the bound address")
        .port();
    ReservedPort {
        _socket: socket,
        port,
    }
}

/// A free loopback port, bound and then released: another test may take it before the
/// caller's server binds it. Only for servers that do not set `SO_REUSEADDR` (and so
/// cannot share a [`ReservedPort`]), such as RabbitMQ's Erlang listeners.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserved_port_refuses_connections_and_a_reuseaddr_server_can_still_listen_on_it() {
        let reserved = reserve_port();
        let port = reserved.port();
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "nothing listens on a reserved port"
        );
        // std's TcpListener::bind sets SO_REUSEADDR on Unix, as tokio's and Mosquitto's do.
        let server = TcpListener::bind(("127.0.0.1", port)).expect("a server binds the port");
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("and accepts on it");
        drop(server);
        for _ in 0..2_000 {
            let other = TcpListener::bind("127.0.0.1:0").unwrap();
            assert_ne!(
                other.local_addr().unwrap().port(),
                port,
                "port 0 never picks it"
            );
        }
    }
}
