//! TCP keepalive on the client sockets of a dedicated connection (the migration session): a peer
//! that vanished (a partition, a host that died) is noticed by the kernel within about half a
//! minute ([`IDLE`] + [`INTERVAL`] × [`COUNT`]) instead of the operating system's two hours, also
//! while the client waits for an answer. sqlx opens its sockets itself and offers no option for
//! it, so the sockets are found among the process's file descriptors by the server's address and
//! port (Linux; elsewhere nothing is done). Setting it on every socket of the process connected to
//! that address is harmless: each is a connection to the same server.
//!
//! Keepalive does not bound a server or pooler that is alive but silent (its kernel still answers
//! the probes): the client-side deadlines of the migration session do.

use std::net::{IpAddr, SocketAddr};

/// Seconds a connection is idle before the first probe.
pub const IDLE: i32 = 10;
/// Seconds between probes.
pub const INTERVAL: i32 = 5;
/// Unanswered probes before the connection is dropped.
pub const COUNT: i32 = 4;

/// Turns keepalive on for every TCP socket of this process connected to `port` on one of
/// `addresses` (the server's resolved addresses; empty: any address). Returns how many.
pub fn enable_to(port: u16, addresses: &[IpAddr]) -> usize {
    #[cfg(target_os = "linux")]
    {
        let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
            return 0;
        };
        let mut n = 0;
        for entry in entries.filter_map(Result::ok) {
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let Some(peer) = peer_of(fd) else { continue };
            let ours = addresses.is_empty() || addresses.contains(&peer.ip());
            if peer.port() == port && ours && set(fd) {
                n += 1;
            }
        }
        n
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (port, addresses);
        0
    }
}

/// The peer of `fd`, if it is a connected TCP socket.
#[cfg(target_os = "linux")]
fn peer_of(fd: i32) -> Option<SocketAddr> {
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `kind` and `len` are valid for writes of the sizes given; a descriptor that is not a
    // socket makes the call fail, which is checked.
    let ok = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut kind as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if ok != 0 || kind != libc::SOCK_STREAM {
        return None;
    }
    // SAFETY: an all-zero `sockaddr_storage` is a valid value.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `addr` is valid for writes of `len` bytes.
    let ok = unsafe {
        libc::getpeername(
            fd,
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if ok != 0 {
        return None;
    }
    match i32::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a `sockaddr_in`.
            let v4 =
                unsafe { &*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(v4.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a `sockaddr_in6`.
            let v6 =
                unsafe { &*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(v6.sin6_addr.s6_addr);
            Some(SocketAddr::new(IpAddr::V6(ip), u16::from_be(v6.sin6_port)))
        }
        _ => None,
    }
}

/// Sets `SO_KEEPALIVE` with [`IDLE`], [`INTERVAL`] and [`COUNT`] on `fd`.
#[cfg(target_os = "linux")]
fn set(fd: i32) -> bool {
    let options = [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, IDLE),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, INTERVAL),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, COUNT),
    ];
    options.iter().all(|&(level, name, value)| {
        // SAFETY: `value` is a valid `c_int` for the call's duration.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    })
}
