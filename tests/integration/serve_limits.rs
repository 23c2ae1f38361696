//! `bzpush serve` under load, at its limits, and with its broker cut off:
//! a flood with a stalled client, a broker link severed by a TCP proxy,
//! 10,000 subscriptions on one connection, 1,000 concurrent connections,
//! the connection limit. Each test has its own exchange, queue and server.

use std::io::{Read, Write};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::serve::{Client, healthy_server, http_get, metric, ok, t, update};
use crate::util::{AMQP_ADDR, Bzpush, Proxy, TestBroker, wait_until};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

// ---- a flood and a stalled client ----

const FLOOD: usize = 100_000;
const FLOOD_BUGS: u64 = 10;

/// The `i`th update of the flood: bugs in turn, each time one second on.
fn flood_update(i: usize) -> (u64, String) {
    let secs = i as u64;
    let (day, rem) = (1 + secs / 86_400, secs % 86_400);
    let when = format!(
        "2026-01-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
    (1 + secs % FLOOD_BUGS, when)
}

#[test]
fn a_stalled_client_is_closed_and_never_slows_another() {
    let broker = TestBroker::without_queue();
    let server = healthy_server(&broker, &[]);
    let addr = server.listen_addr();
    let bugs: Vec<u64> = (1..=FLOOD_BUGS).collect();
    let subscribe = json!({"command": "subscribe", "bugs": bugs});

    // Subscribes, then never reads again.
    let mut stalled = Client::connect(&server.ws_url("/"));
    assert_eq!(stalled.request(subscribe.clone()), ok("subscribe", &bugs));
    let mut fast = Client::connect(&server.ws_url("/"));
    assert_eq!(fast.request(subscribe), ok("subscribe", &bugs));

    let start = Instant::now();
    let reader = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        for i in 0..FLOOD {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(frame) = fast.try_recv(left) else {
                return Err(format!("only {i} of {FLOOD} updates within 120 s"));
            };
            let (bug, when) = flood_update(i);
            if frame != update(bug, &when) {
                return Err(format!(
                    "update {i}: expected bug {bug} at {when}, got {frame}"
                ));
            }
        }
        Ok((Instant::now(), fast))
    });
    let updates: Vec<(u64, String)> = (0..FLOOD).map(flood_update).collect();
    broker.publish_many(&updates);
    let published = start.elapsed();
    let (received, mut fast) = reader
        .join()
        .expect("the reader thread")
        .unwrap_or_else(|e| panic!("{e}\n{}", http_get(&addr, "/metrics").1));
    eprintln!(
        "flood: {FLOOD} updates published in {published:?}, all received in order in {:?}",
        received - start
    );
    assert!(
        metric(&addr, "bzpush_slow_client_closes_total") >= 1,
        "the stalled client was never closed:\n{}",
        http_get(&addr, "/metrics").1
    );
    // What the stalled client did get is the flood's beginning, in order,
    // then the end of the connection (1008, or cut without a close frame
    // when its socket was full).
    let (frames, code) = stalled.read_to_end(WAIT);
    assert!(frames.len() < FLOOD, "the stalled client got everything");
    for (i, frame) in frames.iter().enumerate() {
        let (bug, when) = flood_update(i);
        assert_eq!(frame, &update(bug, &when), "stalled client, update {i}");
    }
    assert!(matches!(code, None | Some(1008)), "closed with {code:?}");
    assert!(
        wait_until(WAIT, || metric(&addr, "bzpush_connections") == 1),
        "the stalled client's connection is still counted"
    );
    // The fast client is still served.
    assert_eq!(
        fast.request(json!({"command": "subscriptions"})),
        ok("subscriptions", &bugs)
    );
}

// ---- the broker link ----

/// Reads updates until each of `expected` has arrived, in that order.
/// Redelivered duplicates of an earlier update are allowed (delivery is
/// at-least-once), anything else is not.
fn expect_updates(client: &mut Client, seen: &mut Vec<Value>, expected: &[(u64, String)]) {
    for (bug, when) in expected {
        let want = update(*bug, when);
        loop {
            let frame = client.recv(WAIT);
            if frame == want {
                seen.push(frame);
                break;
            }
            assert!(
                seen.contains(&frame),
                "expected {want}, got {frame} (seen: {seen:?})"
            );
        }
    }
}

#[test]
fn a_severed_broker_link_turns_health_red_and_delivers_what_waited() {
    let broker = TestBroker::new();
    let proxy = Proxy::to(AMQP_ADDR);
    let server = Bzpush::serve_at(&proxy.addr(), &format!("/={}", broker.exchange), &[]);
    server.wait_healthy();
    let addr = server.listen_addr();
    let health = || http_get(&addr, "/health");
    let mut client = Client::connect(&server.ws_url("/"));
    assert_eq!(
        client.request(json!({"command": "subscribe", "bugs": [1, 2]})),
        ok("subscribe", &[1, 2])
    );
    let mut seen = Vec::new();
    broker.publish(1, &t(1));
    expect_updates(&mut client, &mut seen, &[(1, t(1))]);

    proxy.set_down(true);
    assert!(
        wait_until(WAIT, || health().0 == 503),
        "/health stayed up with the broker cut off:\n{}",
        server.log()
    );
    let body: Value = serde_json::from_str(&health().1).expect("/health is JSON");
    assert_ne!(body["status"], "ok", "{body}");
    assert_eq!(metric(&addr, "bzpush_broker_up"), 0);
    // Published straight to RabbitMQ while the server is cut off: they wait
    // in its durable queue.
    broker.publish(1, &t(2));
    broker.publish(2, &t(3));
    // Several failed reconnection attempts, each pause longer than the last.
    let before = proxy.refusals().len();
    assert!(
        wait_until(WAIT, || proxy.refusals().len() >= before + 5),
        "the server gave up reconnecting: {} attempts\n{}",
        proxy.refusals().len() - before,
        server.log()
    );
    let first = proxy.refusals();
    let last_pause = first[first.len() - 1] - first[first.len() - 2];
    // The WebSocket side stays up meanwhile.
    assert_eq!(
        client.request(json!({"command": "subscriptions"})),
        ok("subscriptions", &[1, 2])
    );
    proxy.set_down(false);
    expect_updates(&mut client, &mut seen, &[(1, t(2)), (2, t(3))]);
    assert!(wait_until(WAIT, || health().0 == 200), "{}", server.log());
    assert!(metric(&addr, "bzpush_broker_reconnects_total") >= 1);

    // A second, short outage: retrying starts over from a short pause, it
    // does not carry on from the first outage's long one.
    proxy.set_down(true);
    assert!(wait_until(WAIT, || health().0 == 503), "{}", server.log());
    broker.publish(2, &t(4));
    let before = proxy.refusals().len();
    assert!(
        wait_until(WAIT, || proxy.refusals().len() >= before + 2),
        "the server gave up reconnecting\n{}",
        server.log()
    );
    let second = proxy.refusals();
    let first_pause = second[before + 1] - second[before];
    proxy.set_down(false);
    expect_updates(&mut client, &mut seen, &[(2, t(4))]);
    // Measured between the server's own attempts, so a slow machine
    // stretches both alike: with no reset this pause would be at least the
    // last one (doubling, capped), with the reset it is a fraction of it.
    assert!(
        first_pause < last_pause,
        "the second outage's first pause ({first_pause:?}) is not shorter than the \
         first outage's last ({last_pause:?}): the backoff did not start over"
    );
    assert!(wait_until(WAIT, || health().0 == 200));
    assert!(metric(&addr, "bzpush_broker_reconnects_total") >= 2);
}

// ---- many subscriptions, many connections ----

#[test]
fn ten_thousand_subscriptions_on_one_connection() {
    let broker = TestBroker::new();
    let server = healthy_server(&broker, &[]);
    let addr = server.listen_addr();
    let ids: Vec<u64> = (1..=10_000).map(|i| 100_000 + i * 7).collect();
    // Sent descending, every other one as a string.
    let sent: Vec<Value> = ids
        .iter()
        .rev()
        .enumerate()
        .map(|(i, id)| {
            if i % 2 == 0 {
                json!(id)
            } else {
                json!(id.to_string())
            }
        })
        .collect();
    let mut c = Client::connect(&server.ws_url("/"));
    assert_eq!(
        c.request(json!({"command": "subscribe", "bugs": sent})),
        ok("subscribe", &ids)
    );
    assert_eq!(
        c.request(json!({"command": "subscriptions"})),
        ok("subscriptions", &ids)
    );
    assert_eq!(metric(&addr, "bzpush_subscriptions"), 10_000);
    let (first, middle, last) = (ids[0], ids[5_000], ids[9_999]);
    broker.publish_many(&[
        (last, t(1)),
        (100_001, t(2)), // not subscribed
        (first, t(3)),
        (middle, t(4)),
    ]);
    assert_eq!(c.recv(WAIT), update(last, &t(1)));
    assert_eq!(c.recv(WAIT), update(first, &t(3)));
    assert_eq!(c.recv(WAIT), update(middle, &t(4)));
    // Unsubscribing half leaves the other half.
    let (gone, kept): (Vec<u64>, Vec<u64>) = ids.iter().partition(|id| *id % 2 == 0);
    assert_eq!(
        c.request(json!({"command": "unsubscribe", "bugs": gone})),
        ok("unsubscribe", &kept)
    );
    assert_eq!(metric(&addr, "bzpush_subscriptions"), kept.len() as u64);
    drop(c);
    assert!(wait_until(WAIT, || metric(&addr, "bzpush_subscriptions") == 0));
}

#[test]
fn a_thousand_concurrent_connections_subscribe_and_unsubscribe() {
    const THREADS: usize = 4;
    const PER_THREAD: usize = 250;
    const TOTAL: u64 = (THREADS * PER_THREAD) as u64;
    let broker = TestBroker::new();
    // All from one address, the /metrics requests as well.
    let server = healthy_server(
        &broker,
        &[("BZPUSH_MAX_CONNECTIONS_PER_ADDRESS", "2000".into())],
    );
    let addr = server.listen_addr();
    let url = server.ws_url("/");
    // Every thread has its connections open and subscribed; then the main
    // thread looks at the metrics; then they all unsubscribe and close.
    let opened = Arc::new(Barrier::new(THREADS + 1));
    let checked = Arc::new(Barrier::new(THREADS + 1));
    let threads: Vec<_> = (0..THREADS)
        .map(|n| {
            let (url, opened, checked) = (url.clone(), Arc::clone(&opened), Arc::clone(&checked));
            thread::spawn(move || {
                let base = (n * PER_THREAD) as u64;
                let mut clients: Vec<Client> =
                    (0..PER_THREAD).map(|_| Client::connect(&url)).collect();
                // All requests out before any answer is read.
                for (i, c) in clients.iter_mut().enumerate() {
                    let bug = base + i as u64 + 1;
                    c.send(json!({"command": "subscribe", "bugs": [bug, bug + TOTAL]}));
                }
                for (i, c) in clients.iter_mut().enumerate() {
                    let bug = base + i as u64 + 1;
                    assert_eq!(c.recv(WAIT), ok("subscribe", &[bug, bug + TOTAL]));
                }
                opened.wait();
                checked.wait();
                for (i, c) in clients.iter_mut().enumerate() {
                    let bug = base + i as u64 + 1;
                    c.send(json!({"command": "unsubscribe", "bugs": bug + TOTAL}));
                }
                for (i, c) in clients.iter_mut().enumerate() {
                    let bug = base + i as u64 + 1;
                    assert_eq!(c.recv(WAIT), ok("unsubscribe", &[bug]));
                    assert_eq!(
                        c.request(json!({"command": "subscriptions"})),
                        ok("subscriptions", &[bug])
                    );
                }
                for c in &mut clients {
                    c.ws.close(None).expect("send a close frame");
                }
                for c in &mut clients {
                    c.close_code(WAIT);
                }
            })
        })
        .collect();
    opened.wait();
    let connections = metric(&addr, "bzpush_connections");
    let subscriptions = metric(&addr, "bzpush_subscriptions");
    checked.wait();
    for t in threads {
        t.join().expect("a client thread");
    }
    assert_eq!(connections, TOTAL);
    assert_eq!(subscriptions, 2 * TOTAL);
    assert!(
        wait_until(WAIT, || metric(&addr, "bzpush_connections") == 0),
        "connections left: {}",
        metric(&addr, "bzpush_connections")
    );
    assert_eq!(metric(&addr, "bzpush_subscriptions"), 0);
}

#[test]
fn the_connection_limit_refuses_handshakes_with_503() {
    let broker = TestBroker::new();
    // All from one address: the per-address limit is not what this is about.
    let server = healthy_server(
        &broker,
        &[
            ("BZPUSH_MAX_CONNECTIONS", "2".into()),
            ("BZPUSH_MAX_CONNECTIONS_PER_ADDRESS", "10".into()),
        ],
    );
    let addr = server.listen_addr();
    let url = server.ws_url("/");
    let mut first = Client::connect(&url);
    let mut second = Client::connect(&url);
    for _ in 0..2 {
        match Client::try_connect(&url) {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 503);
            }
            Err(e) => panic!("expected HTTP 503, got {e}"),
            Ok(_) => panic!("a third connection was accepted"),
        }
    }
    // Plain HTTP does not count against the limit.
    assert_eq!(http_get(&addr, "/health").0, 200);
    assert_eq!(metric(&addr, "bzpush_connections"), 2);
    // The two still work.
    for c in [&mut first, &mut second] {
        assert_eq!(
            c.request(json!({"command": "subscribe", "bugs": 1})),
            ok("subscribe", &[1])
        );
    }
    // One leaves: there is room again.
    first.ws.close(None).expect("close");
    assert_eq!(first.close_code(WAIT), Some(1000));
    assert!(wait_until(WAIT, || metric(&addr, "bzpush_connections") == 1));
    let mut third = Client::connect(&url);
    assert_eq!(
        third.request(json!({"command": "subscriptions"})),
        ok("subscriptions", &[])
    );
}

/// The 101 answer leaves in one write, so one TCP segment: written a piece
/// at a time on a socket without Nagle's delay, it took about 20, and a
/// client's first read saw only its first lines.
#[test]
fn the_upgrade_answer_arrives_whole_in_the_first_read() {
    let broker = TestBroker::new();
    let server = healthy_server(&broker, &[]);
    let addr = server.listen_addr();
    for i in 0..50 {
        let mut socket = std::net::TcpStream::connect(&addr).expect("connect");
        socket.set_read_timeout(Some(WAIT)).expect("timeout");
        socket
            .write_all(
                b"GET / HTTP/1.1\r\nHost: bzpush\r\nUpgrade: websocket\r\n\
                  Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                  Sec-WebSocket-Version: 13\r\n\r\n",
            )
            .expect("write the request");
        let mut first = [0u8; 1024];
        let n = socket.read(&mut first).expect("read the answer");
        let head = String::from_utf8_lossy(&first[..n]);
        assert!(
            head.starts_with("HTTP/1.1 101") && head.ends_with("\r\n\r\n"),
            "connection {i}: the first read gave {head:?}"
        );
    }
}
