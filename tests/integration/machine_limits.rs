//! A thread per connection that knows its machine (README "Scaling up"):
//! past the connections this machine allows, clients get 503 and the
//! process lives on; a thread that cannot start costs its client alone;
//! `check` fails on a `BZPUSH_MAX_CONNECTIONS` the machine cannot hold.
//! The limits are lowered for the child process alone (`prlimit`, and
//! `setpriv` to run it as `nobody` under its own `RLIMIT_NPROC`): nothing
//! here changes a setting of the machine.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::util::serve::{Client, http_get, ok, refused_status, t, update};
use crate::util::{AMQP_ADDR, Bzpush, TestBroker, amqp_url_at, wait_until};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

/// The user the server runs as under its own `RLIMIT_NPROC`.
const NOBODY: u32 = 65534;

/// `serve` on `broker`'s exchange, run by `wrapper`, once healthy.
fn serve_under(wrapper: &[&str], broker: &TestBroker) -> Bzpush {
    let feeds = format!("/={}", broker.exchange);
    let server = Bzpush::serve_under(wrapper, AMQP_ADDR, &feeds, &[]);
    server.wait_healthy();
    server
}

/// The connections the server says this machine allows, from its
/// start-up warning.
fn allowed(log: &str) -> usize {
    let (_, rest) = log
        .split_once("is more than this machine allows: ")
        .unwrap_or_else(|| panic!("no warning about the machine's limits:\n{log}"));
    rest.split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number of connections in:\n{log}"))
}

/// Opens `n` clients, client `i` subscribed to bug `i + 1`.
fn subscribed_clients(url: &str, n: usize) -> Vec<Client> {
    (0..n as u64)
        .map(|i| {
            let mut c = Client::connect(url);
            assert_eq!(
                c.request(json!({"command": "subscribe", "bugs": [i + 1]})),
                ok("subscribe", &[i + 1])
            );
            c
        })
        .collect()
}

/// The first ten clients each get an update of their bug.
fn first_ten_get_updates(broker: &TestBroker, clients: &mut [Client], at: u32) {
    broker.publish_many(&(1..=10).map(|bug| (bug, t(at))).collect::<Vec<_>>());
    for (i, c) in clients.iter_mut().take(10).enumerate() {
        assert_eq!(c.recv(WAIT), update(i as u64 + 1, &t(at)));
    }
}

/// With 450 descriptors (the machine's limit, as this process sees it)
/// and `BZPUSH_MAX_CONNECTIONS` at its default of 10,000, the server says
/// at start how many connections it can hold and how to allow more, holds
/// that many, refuses the next with 503, and serves the first ones on.
#[test]
fn past_the_machines_limit_clients_get_503_and_the_first_keep_their_updates() {
    let broker = TestBroker::new();
    let server = serve_under(&["prlimit", "--nofile=450:450", "--"], &broker);
    server.wait_for_log("serving at most", WAIT);
    let log = server.log();
    assert!(
        log.contains("BZPUSH_MAX_CONNECTIONS=10000 is more than this machine allows")
            && log.contains("the tightest limit: open files (RLIMIT_NOFILE) 450")
            && log.contains("LimitNOFILE=11000"),
        "{log}"
    );
    let allowed = allowed(&log);
    assert!((50..130).contains(&allowed), "{allowed} allowed:\n{log}");
    let url = server.ws_url("/");
    let mut clients = subscribed_clients(&url, allowed);
    for _ in 0..20 {
        assert_eq!(refused_status(Client::try_connect(&url)), 503);
    }
    let addr = server.listen_addr();
    assert_eq!(http_get(&addr, "/health").0, 200);
    first_ten_get_updates(&broker, &mut clients, 1);
    // One leaves: room for one, and no more.
    let mut leaving = clients.pop().expect("a client");
    leaving.ws.close(None).expect("close");
    assert_eq!(leaving.close_code(WAIT), Some(1000));
    assert!(wait_until(WAIT, || Client::try_connect(&url).is_ok()));
    assert!(!server.log().contains("accept failed"), "{}", server.log());
}

/// With fewer descriptors than the handshakes and the pipeline need beside
/// connections, the machine allows none: the server refuses every
/// WebSocket, so `/health` must not say it is well (a load balancer would
/// keep sending clients to it).
#[test]
fn a_machine_that_allows_no_connection_is_unhealthy() {
    let broker = TestBroker::new();
    let feeds = format!("/={}", broker.exchange);
    let server = Bzpush::serve_under(
        &["prlimit", "--nofile=300:300", "--"],
        AMQP_ADDR,
        &feeds,
        &[],
    );
    assert!(server.wait_listening(WAIT), "{}", server.log());
    let url = server.ws_url("/");
    assert_eq!(refused_status(Client::try_connect(&url)), 503);
    let (status, body) = http_get(&server.listen_addr(), "/health");
    assert_eq!(status, 503, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(json["status"], "unavailable", "{json}");
    assert_eq!(json["connections_allowed"], 0, "{json}");
    assert!(
        json["reason"]
            .as_str()
            .is_some_and(|r| r.contains("allows no WebSocket connection")),
        "{json}"
    );
    assert!(
        server.log().contains("serving no connection"),
        "{}",
        server.log()
    );
}

/// `check` says when the machine cannot hold `BZPUSH_MAX_CONNECTIONS`, and
/// how to raise each limit in the way: a failure, as the server would hold
/// fewer.
#[test]
fn check_fails_when_the_machine_cannot_hold_max_connections() {
    let broker = TestBroker::new();
    let env = |max: &str| {
        vec![
            ("BZPUSH_AMQP_URL", amqp_url_at(AMQP_ADDR)),
            ("BZPUSH_FEEDS", format!("/={}", broker.exchange)),
            ("BZPUSH_LISTEN", "127.0.0.1:0".to_string()),
            ("BZPUSH_MAX_CONNECTIONS", max.to_string()),
        ]
    };
    let check = |wrapper: &[&str], max: &str| {
        let finished = Bzpush::run_under(wrapper, &["check", "serve"], &env(max), WAIT);
        eprintln!("{}{}", finished.stdout, finished.stderr);
        finished
    };
    let impossible = check(&[], "1000000");
    assert_eq!(impossible.status.code(), Some(1));
    let fail = impossible
        .stdout
        .lines()
        .find(|l| {
            l.starts_with("FAIL  BZPUSH_MAX_CONNECTIONS=1000000 is more than this machine allows")
        })
        .unwrap_or_else(|| panic!("no FAIL line:\n{}", impossible.stdout));
    assert!(fail.contains("sysctl -w vm.max_map_count=4"), "{fail}");
    assert!(fail.contains("LimitNOFILE="), "{fail}");
    let few_files = check(&["prlimit", "--nofile=450:450", "--"], "10000");
    assert_eq!(few_files.status.code(), Some(1));
    assert!(
        few_files
            .stdout
            .contains("open files (RLIMIT_NOFILE) = 450 allows"),
        "{}",
        few_files.stdout
    );
    let fine = check(&[], "100");
    assert_eq!(fine.status.code(), Some(0), "{}", fine.stdout);
    assert!(fine.stdout.contains("ok    this machine allows "));
    assert!(fine.stdout.contains(
        "ok    connections: at most 100 (BZPUSH_MAX_CONNECTIONS), 10 sockets from one client address"
    ));
}

/// Threads of processes whose real user is `uid`: what `RLIMIT_NPROC`
/// counts.
fn tasks_of(uid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        .filter(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().next())
                == Some(&uid.to_string())
        })
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse::<usize>().ok())
        })
        .sum()
}

/// Processes as `nobody` that hold a place under its `RLIMIT_NPROC`;
/// killed when dropped.
struct Sleepers(Vec<Child>);

impl Sleepers {
    fn start(n: usize) -> Sleepers {
        Sleepers(
            (0..n)
                .map(|_| {
                    Command::new("setpriv")
                        .args([
                            "--reuid=65534",
                            "--regid=65534",
                            "--clear-groups",
                            "sleep",
                            "120",
                        ])
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .spawn()
                        .expect("setpriv (util-linux) starts sleep as nobody")
                })
                .collect(),
        )
    }
}

impl Drop for Sleepers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A server whose user may have 400 tasks, once other processes of that
/// user take them all after it started: no thread can start, each new
/// client gets 503 (no handshake thread) or its WebSocket closed with 1013
/// at once (no connection thread), the log says so once, the connections
/// it holds keep their updates, and it serves new clients again once tasks
/// free up.
#[test]
fn a_thread_that_cannot_start_costs_its_client_alone() {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().next() == Some("0"))
        });
    assert_eq!(
        root,
        Some(true),
        "this test runs the server as nobody (setpriv) under its own RLIMIT_NPROC: run it as root"
    );
    let limit: usize = 400;
    let nproc = format!("--nproc={limit}:{limit}");
    let wrapper = [
        "prlimit",
        &nproc,
        "--",
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
    ];
    let broker = TestBroker::new();
    let server = serve_under(&wrapper, &broker);
    let url = server.ws_url("/");
    let mut clients = subscribed_clients(&url, 10);
    // Other processes of the user take every place, and 20 more.
    let sleepers = Sleepers::start((limit + 20).saturating_sub(tasks_of(NOBODY)));
    assert!(
        tasks_of(NOBODY) >= limit,
        "the sleepers did not take the places"
    );
    for _ in 0..20 {
        match Client::try_connect(&url) {
            Ok(mut c) => assert_eq!(c.close_code(WAIT), Some(1013)),
            refused => assert_eq!(refused_status(refused), 503),
        }
    }
    first_ten_get_updates(&broker, &mut clients, 2);
    server.wait_for_log("cannot start a", WAIT);
    let log = server.log();
    let said = log.lines().filter(|l| l.contains("cannot start a")).count();
    assert_eq!(said, 1, "one line a minute:\n{log}");
    drop(sleepers);
    assert!(
        wait_until(WAIT, || Client::try_connect(&url).is_ok()),
        "{}",
        server.log()
    );
    assert_eq!(http_get(&server.listen_addr(), "/health").0, 200);
    first_ten_get_updates(&broker, &mut clients, 3);
}
