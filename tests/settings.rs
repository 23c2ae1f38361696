//! Settings that can never work, and what the operator sees (issue 9):
//! `check` binding the listen address, and, against the real binary with
//! real MariaDB and real WebSocket clients, each kind of setting that used
//! to pass and then fail or mislead.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::{Bzpush, Finished, TestDb};

/// `bzpush check <mode>` with exactly `env`.
fn check(mode: &str, env: &[(&str, String)]) -> Finished {
    let finished = Bzpush::run(&["check", mode], env, Duration::from_secs(30));
    eprintln!("check {mode}:\n{}{}", finished.stdout, finished.stderr);
    finished
}

// ---- the listen address ----

#[test]
fn check_fails_when_the_listen_port_is_in_use() {
    let db = TestDb::new();
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("its address").to_string();
    for mode in ["run", "serve"] {
        let finished = check(
            mode,
            &[
                ("BZPUSH_DATABASE_URL", db.url()),
                ("BZPUSH_LISTEN", addr.clone()),
            ],
        );
        assert_eq!(finished.status.code(), Some(1), "check {mode} must fail");
        assert!(
            finished
                .stdout
                .lines()
                .any(|l| l.starts_with(&format!("FAIL  listen {addr}: in use"))),
            "check {mode}: no FAIL line naming {addr}:\n{}",
            finished.stdout
        );
    }
    // Once the port is free, the same check passes that line, and leaves
    // the port free (`run` can then bind it).
    drop(taken);
    let finished = check(
        "run",
        &[
            ("BZPUSH_DATABASE_URL", db.url()),
            ("BZPUSH_LISTEN", addr.clone()),
        ],
    );
    assert!(
        finished.stdout.contains(&format!("ok    listen {addr}: free")),
        "{}",
        finished.stdout
    );
    TcpListener::bind(&addr).expect("check released the port");
}

// ---- handshake headers that may appear once ----

/// Sends `request` on a fresh socket; the response's status line.
fn status_line(addr: &str, request: &str) -> String {
    let mut socket = TcpStream::connect(addr).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    socket.write_all(request.as_bytes()).expect("send");
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    // Read only the head: a 101 leaves the socket open.
    while !response.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&response);
    text.lines().next().unwrap_or_default().to_string()
}

#[test]
fn duplicated_singleton_headers_get_400() {
    let db = TestDb::new();
    let server = Bzpush::run_on(&db, &[]);
    let addr = server.listen_addr();
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let version = "Sec-WebSocket-Version: 13\r\n";
    let host = format!("Host: {addr}\r\n");
    let origin = "Origin: https://bugzilla.example.org\r\n";
    let upgrade = |extra: &str| {
        format!(
            "GET / HTTP/1.1\r\n{host}Upgrade: websocket\r\nConnection: Upgrade\r\n\
             {key}{version}{origin}{extra}\r\n"
        )
    };
    // The control: one of each is a handshake.
    assert!(
        status_line(&addr, &upgrade("")).starts_with("HTTP/1.1 101"),
        "a plain handshake must succeed"
    );
    // List-valued fields may repeat.
    assert!(
        status_line(&addr, &upgrade("Connection: keep-alive\r\nUpgrade: websocket\r\n"))
            .starts_with("HTTP/1.1 101")
    );
    let cases = [
        ("two keys", upgrade("Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==\r\n")),
        ("the same key twice", upgrade(key)),
        ("two versions", upgrade("Sec-WebSocket-Version: 13\r\n")),
        ("two origins", upgrade("Origin: https://evil.example\r\n")),
        ("two hosts", upgrade("Host: evil.example\r\n")),
        ("two lengths", upgrade("Content-Length: 0\r\nContent-Length: 0\r\n")),
        (
            "two hosts on plain HTTP",
            format!("GET /health HTTP/1.1\r\n{host}Host: evil.example\r\n\r\n"),
        ),
        (
            "two keys, other case",
            upgrade("sec-websocket-key: AQIDBAUGBwgJCgsMDQ4PEA==\r\n"),
        ),
    ];
    let mut wrong = Vec::new();
    for (name, request) in &cases {
        let status = status_line(&addr, request);
        if !status.starts_with("HTTP/1.1 400") {
            wrong.push(format!("{name}: {status:?}"));
        }
    }
    assert!(wrong.is_empty(), "expected 400 for {wrong:#?}");
    // The server still serves.
    assert!(status_line(&addr, &upgrade("")).starts_with("HTTP/1.1 101"));
}
