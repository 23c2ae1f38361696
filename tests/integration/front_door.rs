//! One client cannot hurt the others (SPEC §5.1, README "Facing the
//! internet"): silent sockets, half-sent heads and idle WebSockets from
//! one address; silent sockets from many; clients behind nginx, counted by
//! the address it forwards; `X-Forwarded-For` from anyone else ignored;
//! the subscription budget, in all and per address. Clients come from
//! distinct loopback addresses (127.0.0.2, …) as from distinct machines.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::util::demo::{Nginx, readme_nginx_block};
use crate::util::serve::{
    Client, healthy_server, http_get, loopback, metric, ok, raw_handshake, refused_status, t,
    tcp_from, update,
};
use crate::util::{TestBroker, wait_until};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

/// Sockets one attacker keeps open (or tries to), as in the issue.
const ATTACKER_SOCKETS: usize = 800;

/// The lines of `log` that contain `needle`.
fn lines_with(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// A WebSocket handshake from `from` with `headers` (each ending in CRLF)
/// added; the socket if the answer is 101, else the status line.
fn handshake_from(from: IpAddr, addr: SocketAddr, headers: &str) -> Result<TcpStream, String> {
    let socket = tcp_from(from, addr).map_err(|e| format!("connect: {e}"))?;
    raw_handshake(socket, &addr.to_string(), "/", headers, &[])
}

/// Whether the server has neither closed `socket` nor sent on it yet.
fn still_open(socket: &TcpStream) -> bool {
    socket.set_nonblocking(true).expect("non-blocking");
    let mut buf = [0u8; 1];
    let open =
        matches!(socket.peek(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    socket.set_nonblocking(false).expect("blocking");
    open
}

/// One abusive client: a thread that keeps up to `hold` sockets open from
/// `from`, each opened by `open`, and opens a new one for each the server
/// closes, until stopped.
struct Attacker {
    stop: Arc<AtomicBool>,
    /// Sockets it tried to open in all.
    opened: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Attacker {
    fn start(
        from: IpAddr,
        addr: SocketAddr,
        hold: usize,
        open: fn(IpAddr, SocketAddr) -> Option<TcpStream>,
    ) -> Attacker {
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicUsize::new(0));
        let thread = thread::spawn({
            let (stop, opened) = (Arc::clone(&stop), Arc::clone(&opened));
            move || {
                let mut held: Vec<TcpStream> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    held.retain(still_open);
                    for _ in held.len()..hold {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        held.extend(open(from, addr));
                        opened.fetch_add(1, Ordering::Relaxed);
                    }
                    // The pace of reopening: what the server closed in the
                    // meantime is opened again.
                    thread::sleep(Duration::from_millis(250));
                }
            }
        });
        Attacker {
            stop,
            opened,
            thread: Some(thread),
        }
    }

    /// Waits until it has tried to open `n` sockets in all.
    fn wait_opened(&self, n: usize) {
        assert!(
            wait_until(WAIT * 3, || self.opened.load(Ordering::Relaxed) >= n),
            "the attacker tried only {} sockets",
            self.opened.load(Ordering::Relaxed)
        );
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn silent(from: IpAddr, addr: SocketAddr) -> Option<TcpStream> {
    tcp_from(from, addr).ok()
}

fn half_sent_head(from: IpAddr, addr: SocketAddr) -> Option<TcpStream> {
    let mut socket = tcp_from(from, addr).ok()?;
    socket
        .write_all(b"GET / HTTP/1.1\r\nHost: bzpush\r\nUpgrade: websocket\r\nX-Slow: ")
        .ok()?;
    Some(socket)
}

fn idle_websocket(from: IpAddr, addr: SocketAddr) -> Option<TcpStream> {
    handshake_from(from, addr, "").ok()
}

/// While one address holds or keeps reopening `ATTACKER_SOCKETS` sockets
/// of one kind, six clients at other addresses connect, subscribe and get
/// their update, and `/health` and `/metrics` answer 200; the log names
/// the address and the limit, a few lines for thousands of refusals.
fn one_address_locks_nobody_out(open: fn(IpAddr, SocketAddr) -> Option<TcpStream>) {
    let broker = TestBroker::new();
    // As in the issue: `--max-connections 500`, a tenth of it per address.
    let server = healthy_server(&broker, &[("BZPUSH_MAX_CONNECTIONS", "500".into())]);
    let addr: SocketAddr = server.listen_addr().parse().expect("an address");
    let attacker = Attacker::start(loopback(2), addr, ATTACKER_SOCKETS, open);
    attacker.wait_opened(2 * ATTACKER_SOCKETS);
    let url = server.ws_url("/");
    let mut clients: Vec<Client> = (3..9)
        .map(|n| {
            Client::try_connect_from(Some(loopback(n)), &url).unwrap_or_else(|e| {
                panic!(
                    "a client at 127.0.0.{n} was refused beside the attacker: {e}\n{}",
                    server.log()
                )
            })
        })
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let bug = 100 + i as u64;
        assert_eq!(
            c.request(json!({"command": "subscribe", "bugs": [bug]})),
            ok("subscribe", &[bug])
        );
    }
    let host = server.listen_addr();
    assert_eq!(http_get(&host, "/health").0, 200);
    assert_eq!(http_get(&host, "/metrics").0, 200);
    broker.publish_many(&(0..6).map(|i| (100 + i, t(1))).collect::<Vec<_>>());
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.recv(WAIT), update(100 + i as u64, &t(1)));
    }
    // The attacker's own next WebSocket is refused, with 429.
    let refused = Client::try_connect_from(Some(loopback(2)), &url);
    assert_eq!(refused_status(refused), 429);
    drop(attacker);
    assert!(server.wait_for_log("127.0.0.2 has 50 sockets open", WAIT));
    let log = server.log();
    let said = lines_with(
        &log,
        "127.0.0.2 has 50 sockets open, the most one client address may \
         (BZPUSH_MAX_CONNECTIONS_PER_ADDRESS)",
    );
    assert!(
        (1..=10).contains(&said),
        "{said} lines about the attacker's address:\n{log}"
    );
}

#[test]
fn silent_sockets_from_one_address_lock_nobody_out() {
    one_address_locks_nobody_out(silent);
}

#[test]
fn half_sent_heads_from_one_address_lock_nobody_out() {
    one_address_locks_nobody_out(half_sent_head);
}

#[test]
fn websockets_that_never_send_a_frame_from_one_address_lock_nobody_out() {
    one_address_locks_nobody_out(idle_websocket);
}

/// More silent sockets than may be in their handshake at once, from 150
/// addresses with two each (under the per-address limit): each new socket
/// closes the one that waited longest, so real requests are answered at
/// once, while the newest silent sockets are still open.
/// The status line's code of a plain `GET path` sent from `from`.
fn get_from(from: IpAddr, addr: SocketAddr, path: &str) -> u16 {
    use std::io::Read;
    let mut socket = tcp_from(from, addr).expect("connect");
    write!(
        socket,
        "GET {path} HTTP/1.1\r\nHost: bzpush\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    socket.set_read_timeout(Some(WAIT)).expect("a read timeout");
    let mut answer = String::new();
    let _ = socket.read_to_string(&mut answer);
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("GET {path}: {answer:?}"))
}

/// An office behind one NAT (or clients through a proxy not named in
/// BZPUSH_TRUSTED_PROXIES) holds its address's whole share; the monitor
/// or load balancer behind the same address still gets `/health` and
/// `/metrics` (SPEC §5.1: always answered), nothing else.
#[test]
fn an_address_at_its_share_still_gets_health_and_metrics() {
    let broker = TestBroker::new();
    let server = healthy_server(&broker, &[("BZPUSH_MAX_CONNECTIONS", "50".into())]);
    let addr: SocketAddr = server.listen_addr().parse().expect("an address");
    let office = loopback(2);
    let users: Vec<TcpStream> = (0..5)
        .map(|_| idle_websocket(office, addr).expect("within the share"))
        .collect();
    let url = server.ws_url("/");
    assert_eq!(
        refused_status(Client::try_connect_from(Some(office), &url)),
        429
    );
    // Its own silent sockets take the places kept for monitoring: each
    // request that comes makes room by closing the oldest of them.
    let silent: Vec<TcpStream> = (0..8).filter_map(|_| silent(office, addr)).collect();
    for _ in 0..3 {
        assert_eq!(get_from(office, addr, "/health"), 200);
        assert_eq!(get_from(office, addr, "/metrics"), 200);
    }
    assert_eq!(get_from(office, addr, "/"), 429);
    assert_eq!(get_from(loopback(3), addr, "/"), 200);
    drop((users, silent));
}

#[test]
fn silent_sockets_from_many_addresses_give_way_to_real_requests() {
    let broker = TestBroker::new();
    let server = healthy_server(&broker, &[("BZPUSH_MAX_CONNECTIONS", "20".into())]);
    let addr: SocketAddr = server.listen_addr().parse().expect("an address");
    let silent: Vec<TcpStream> = (0..300u16)
        .map(|i| {
            let from = IpAddr::from([127, 0, 1, (i / 2) as u8 + 1]);
            tcp_from(from, addr).expect("connect")
        })
        .collect();
    // Every silent socket is taken in (or refused) before the real ones.
    assert!(
        wait_until(WAIT, || lines_with(
            &server.log(),
            "closed the one that waited longest"
        ) > 0),
        "no silent socket gave way:\n{}",
        server.log()
    );
    let host = server.listen_addr();
    let (status, body) = http_get(&host, "/health");
    assert_eq!(status, 200, "{body}");
    let mut client = Client::connect_from(loopback(3), &server.ws_url("/"));
    assert_eq!(
        client.request(json!({"command": "subscribe", "bugs": [7]})),
        ok("subscribe", &[7])
    );
    broker.publish(7, &t(2));
    assert_eq!(client.recv(WAIT), update(7, &t(2)));
    // The oldest gave way, the newest wait their turn: nobody waited for a
    // head timeout.
    let newest_open = silent[250..].iter().filter(|s| still_open(s)).count();
    assert_eq!(newest_open, 50, "the newest silent sockets were closed");
    assert!(
        !still_open(&silent[0]),
        "the oldest silent socket is still open"
    );
}

/// nginx in front with the README's block and `BZPUSH_TRUSTED_PROXIES`
/// naming it: nginx's own sockets are not one client, and each client
/// behind it counts under the address nginx forwards.
#[test]
fn behind_nginx_each_client_counts_under_its_own_address() {
    let broker = TestBroker::new();
    let server = healthy_server(
        &broker,
        &[
            ("BZPUSH_TRUSTED_PROXIES", "127.0.0.1".into()),
            ("BZPUSH_MAX_CONNECTIONS_PER_ADDRESS", "3".into()),
        ],
    );
    let block = readme_nginx_block();
    assert!(
        block.contains("proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"),
        "the README's block forwards the client's address:\n{block}"
    );
    let nginx = Nginx::start(&block.replace("127.0.0.1:8844", &server.listen_addr()));
    let url = format!("ws://{}/bzpush/", nginx.addr);
    let mut clients = Vec::new();
    for n in [2, 3] {
        for _ in 0..3 {
            clients.push(
                Client::try_connect_from(Some(loopback(n)), &url).unwrap_or_else(|e| {
                    panic!(
                        "a client at 127.0.0.{n} behind nginx was refused: {e}\n{}",
                        server.log()
                    )
                }),
            );
        }
        assert_eq!(
            refused_status(Client::try_connect_from(Some(loopback(n)), &url)),
            429,
            "a fourth client at 127.0.0.{n}"
        );
    }
    assert_eq!(metric(&server.listen_addr(), "bzpush_connections"), 6);
    for (i, c) in clients.iter_mut().enumerate() {
        let bug = 200 + i as u64;
        assert_eq!(
            c.request(json!({"command": "subscribe", "bugs": [bug]})),
            ok("subscribe", &[bug])
        );
    }
    broker.publish_many(&(0..6).map(|i| (200 + i, t(3))).collect::<Vec<_>>());
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.recv(WAIT), update(200 + i as u64, &t(3)));
    }
    for client in ["127.0.0.2", "127.0.0.3"] {
        assert!(
            server.wait_for_log(&format!("{client} has 3 sockets open"), WAIT),
            "the log names the clients, not nginx:\n{}",
            server.log()
        );
    }
    assert!(!server.log().contains("127.0.0.1 has"), "{}", server.log());
}

/// A client's own `X-Forwarded-For` counts for nothing: unset, or naming
/// another proxy, `BZPUSH_TRUSTED_PROXIES` leaves the client its address.
#[test]
fn x_forwarded_for_from_anyone_but_a_trusted_proxy_is_ignored() {
    for trusted in ["off", "127.0.0.9, 10.0.0.0/8"] {
        let broker = TestBroker::new();
        let server = healthy_server(
            &broker,
            &[
                ("BZPUSH_TRUSTED_PROXIES", trusted.into()),
                ("BZPUSH_MAX_CONNECTIONS_PER_ADDRESS", "3".into()),
            ],
        );
        let addr: SocketAddr = server.listen_addr().parse().expect("an address");
        let claims: Vec<String> = (1..=4)
            .map(|n| format!("X-Forwarded-For: 10.0.0.{n}\r\n"))
            .collect();
        let held: Vec<TcpStream> = claims[..3]
            .iter()
            .map(|claim| handshake_from(loopback(2), addr, claim).expect("room for three"))
            .collect();
        assert_eq!(
            handshake_from(loopback(2), addr, &claims[3])
                .err()
                .as_deref(),
            Some("HTTP/1.1 429 Too Many Requests"),
            "trusted: {trusted}"
        );
        // The log is written by a thread of its own: it may come a moment
        // after the answer.
        assert!(
            server.wait_for_log("127.0.0.2 has 3 sockets open", WAIT),
            "{}",
            server.log()
        );
        drop(held);
    }
}

/// The subscription budget: each address its share (here a tenth of the
/// total: 10 of 100 connections per address), everyone the total; a
/// refused `subscribe` gets the documented error and the connection stays;
/// others are unaffected.
#[test]
fn subscriptions_are_bounded_in_total_and_per_address() {
    let broker = TestBroker::new();
    let server = healthy_server(
        &broker,
        &[
            ("BZPUSH_MAX_CONNECTIONS", "100".into()),
            ("BZPUSH_MAX_CONNECTIONS_PER_ADDRESS", "10".into()),
            ("BZPUSH_MAX_SUBSCRIPTIONS_TOTAL", "1000".into()),
        ],
    );
    let url = server.ws_url("/");
    let bugs = |from: u64, n: u64| -> Vec<u64> { (from..from + n).collect() };
    let error = |limit: u64| {
        json!({"command": "subscribe", "result": "error",
               "error": format!("too many subscriptions (limit {limit})")})
    };
    // Two connections of one address share its 100.
    let mut a = Client::connect_from(loopback(2), &url);
    let mut b = Client::connect_from(loopback(2), &url);
    assert_eq!(
        a.request(json!({"command": "subscribe", "bugs": bugs(1, 60)})),
        ok("subscribe", &bugs(1, 60))
    );
    assert_eq!(
        b.request(json!({"command": "subscribe", "bugs": bugs(61, 40)})),
        ok("subscribe", &bugs(61, 40))
    );
    assert_eq!(
        b.request(json!({"command": "subscribe", "bugs": [101]})),
        error(100)
    );
    assert_eq!(
        b.request(json!({"command": "subscriptions"})),
        ok("subscriptions", &bugs(61, 40)),
        "the refused connection stays, as it was"
    );
    assert_eq!(
        a.request(json!({"command": "unsubscribe", "bugs": bugs(1, 10)})),
        ok("unsubscribe", &bugs(11, 50))
    );
    assert_eq!(
        b.request(json!({"command": "subscribe", "bugs": bugs(101, 10)})),
        ok("subscribe", &bugs(61, 50))
    );
    // Nine more addresses take their share: the total is reached.
    let mut others: Vec<Client> = (3..12)
        .map(|n| {
            let mut c = Client::connect_from(loopback(n), &url);
            let mine = bugs(1000 * u64::from(n), 100);
            assert_eq!(
                c.request(json!({"command": "subscribe", "bugs": mine})),
                ok("subscribe", &mine)
            );
            c
        })
        .collect();
    let mut late = Client::connect_from(loopback(12), &url);
    assert_eq!(
        late.request(json!({"command": "subscribe", "bugs": [5]})),
        error(1000)
    );
    assert_eq!(metric(&server.listen_addr(), "bzpush_subscriptions"), 1000);
    // Those inside their budget are served as before.
    broker.publish(11, &t(4));
    broker.publish(3000, &t(4));
    assert_eq!(a.recv(WAIT), update(11, &t(4)));
    assert_eq!(others[0].recv(WAIT), update(3000, &t(4)));
    // One address leaves: room for another.
    drop(others.pop());
    assert!(wait_until(WAIT, || metric(
        &server.listen_addr(),
        "bzpush_subscriptions"
    ) == 900));
    assert_eq!(
        late.request(json!({"command": "subscribe", "bugs": [5]})),
        ok("subscribe", &[5])
    );
    for said in [
        "127.0.0.2 holds 100 subscriptions",
        "past BZPUSH_MAX_SUBSCRIPTIONS_TOTAL (1000)",
    ] {
        assert!(
            wait_until(WAIT, || lines_with(&server.log(), said) == 1),
            "one line saying {said:?}:\n{}",
            server.log()
        );
    }
}

/// With every default, one address holds at most a tenth of the total
/// (500,000 subscriptions, some 15 to 40 MB), however many connections it
/// opens: the client took 5.8 GiB with 10,000 of them.
#[test]
fn at_the_defaults_one_address_holds_a_tenth_of_the_subscriptions() {
    let broker = TestBroker::new();
    let server = healthy_server(&broker, &[]);
    let url = server.ws_url("/");
    let share: u64 = 500_000;
    let per_connection: u64 = 20_000;
    let mut clients = Vec::new();
    let started = Instant::now();
    for i in 0..share / per_connection {
        let mut c = Client::connect_from(loopback(2), &url);
        let mine: Vec<u64> = (1 + i * per_connection..=(i + 1) * per_connection).collect();
        let answer = c.request(json!({"command": "subscribe", "bugs": mine}));
        assert_eq!(answer["result"], "ok", "connection {i}");
        clients.push(c);
    }
    let mut one_more = Client::connect_from(loopback(2), &url);
    let answer = one_more.request(json!({"command": "subscribe", "bugs": [share + 1]}));
    assert_eq!(
        answer["error"],
        Value::from(format!("too many subscriptions (limit {share})"))
    );
    // Another address is not affected.
    let mut other = Client::connect_from(loopback(3), &url);
    assert_eq!(
        other.request(json!({"command": "subscribe", "bugs": [share + 1]})),
        ok("subscribe", &[share + 1])
    );
    eprintln!("500,000 subscriptions in {:?}", started.elapsed());
}
