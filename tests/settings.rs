//! Settings that can never work, and what the operator sees (issue 9):
//! `check` binding the listen address, and, against the real binary with
//! real MariaDB and real WebSocket clients, each kind of setting that used
//! to pass and then fail or mislead.

mod common;

use std::net::TcpListener;
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
