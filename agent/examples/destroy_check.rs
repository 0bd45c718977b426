//! Checks `breakwater::destroy::destroy_tcp` against the real kernel (needs root):
//! `cargo run -p breakwater --example destroy_check`.
//!
//! For IPv4 and IPv6 loopback: opens a listener and a client connection, destroys the client
//! side by 4-tuple, and checks that the client sees ECONNABORTED, the peer a reset, and that a
//! second destroy reports the socket as not found. Then checks that a thread in another network
//! namespace does not find the connection.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use breakwater::destroy::{destroy_tcp, DestroyReport};

fn main() -> io::Result<()> {
    check("127.0.0.1:0")?;
    check("[::1]:0")?;
    other_netns_does_not_see_it()?;
    println!("destroy_check: ok");
    Ok(())
}

fn pair(bind: &str) -> io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind(bind)?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    Ok((client, server))
}

fn tuple(s: &TcpStream) -> io::Result<(SocketAddr, SocketAddr)> {
    Ok((s.local_addr()?, s.peer_addr()?))
}

fn check(bind: &str) -> io::Result<()> {
    let (mut client, mut server) = pair(bind)?;
    let conn = tuple(&client)?;

    let report = destroy_tcp(&[conn])?;
    assert_eq!(
        report,
        DestroyReport {
            destroyed: 1,
            not_found: 0
        },
        "{bind}"
    );

    let err = client
        .read(&mut [0u8; 16])
        .expect_err("read on a destroyed socket");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ECONNABORTED),
        "{bind}: client read: {err}"
    );
    let err = client.write(b"x").expect_err("write on a destroyed socket");
    println!("{bind}: client read: ECONNABORTED; write: {err}");

    server.set_read_timeout(Some(Duration::from_secs(2)))?;
    let err = server
        .read(&mut [0u8; 16])
        .expect_err("peer read after RST");
    assert_eq!(
        err.kind(),
        io::ErrorKind::ConnectionReset,
        "{bind}: peer read: {err}"
    );
    println!("{bind}: peer read: {err}");

    let again = destroy_tcp(&[conn])?;
    assert_eq!(
        again,
        DestroyReport {
            destroyed: 0,
            not_found: 1
        },
        "{bind}: second destroy"
    );
    Ok(())
}

fn other_netns_does_not_see_it() -> io::Result<()> {
    let (mut client, _server) = pair("127.0.0.1:0")?;
    let conn = tuple(&client)?;
    let report = thread::spawn(move || {
        // SAFETY: unshare(2) only changes this thread's namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        destroy_tcp(&[conn])
    })
    .join()
    .expect("netns thread")?;
    assert_eq!(
        report,
        DestroyReport {
            destroyed: 0,
            not_found: 1
        },
        "another netns"
    );
    client.write_all(b"still up")?;
    println!("other netns: not found, connection still up");
    Ok(())
}
