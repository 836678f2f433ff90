//! A free port for `cr-migrate receive`, which listens on UDP (QUIC) and
//! on TCP (page channels) at the same port number.

/// A port of 127.0.0.1 free for both UDP and TCP right now (another
/// process may still take it before it is used; tests run serially).
pub fn free_port() -> std::io::Result<u16> {
    let mut last = None;
    for _ in 0..64 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        match std::net::UdpSocket::bind(("127.0.0.1", port)) {
            Ok(_) => return Ok(port),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no port free for UDP and TCP")))
}
