//! No single machine (README, "Scaling out"; SPEC §3.3, §4.1): the broker
//! as a RabbitMQ cluster of three nodes of the test's own, any of which may
//! die, and pollers that hand the lock over when their broker is out of
//! reach. `serve` and `poll` are given every node; each moves to another
//! node when it loses its own, and says which one it uses.

use std::thread;
use std::time::{Duration, Instant};

use bzpush::config::AmqpUrl;
use bzpush::notification::{BugId, ChangeTime, Notification};
use bzpush::pulse::Publisher;
use serde_json::json;

use crate::util::serve::{Client, health, ok, update};
use crate::util::{
    AMQP_ADDR, Bzpush, MYSQL_ADDR, PrivateRabbit, Proxy, TestBroker, TestDb, amqp_url_at, datetime,
    unique, wait_until,
};

const WAIT: Duration = Duration::from_secs(30);

/// The node a server's first consumer uses, from `/health`.
fn serve_node(cluster: &PrivateRabbit, server: &Bzpush) -> Option<usize> {
    let (_, json) = health(server);
    let node = json["broker_links"][0]["node"].as_str()?.to_string();
    (0..cluster.len()).find(|&i| node.contains(&format!("@{}/", cluster.addr(i))))
}

/// Publishes `bug` changed at `when` to `exchange` through node `i`.
fn publish(cluster: &PrivateRabbit, i: usize, exchange: &str, bug: u32, when: &str) {
    let url = AmqpUrl::parse(&cluster.url(i)).expect("a node's URL");
    let mut publisher = Publisher::connect(&url, exchange, "test-publisher")
        .unwrap_or_else(|e| panic!("connect to node {i}: {e}"));
    let change = Notification {
        bug: BugId::new(bug).expect("a bug id"),
        when: ChangeTime::new(when),
    };
    let refused = publisher
        .publish(&[change])
        .unwrap_or_else(|e| panic!("publish through node {i}: {e}"));
    assert!(refused.is_empty(), "refused: {refused:?}");
}

#[test]
fn serve_moves_to_another_node_when_its_node_dies_and_delivers_what_comes_later() {
    let mut cluster = PrivateRabbit::cluster();
    let exchange = unique("bzpush.test");
    let server = Bzpush::serve_at(
        &cluster.addr(0),
        &format!("/={exchange}"),
        &[("BZPUSH_AMQP_URL", cluster.urls())],
    );
    server.wait_healthy();
    let mut client = Client::connect(&server.ws_url("/"));
    assert_eq!(
        client.request(json!({"command": "subscribe", "bugs": [7]})),
        ok("subscribe", &[7])
    );
    let node = serve_node(&cluster, &server).unwrap_or_else(|| {
        panic!(
            "/health names no node of the cluster: {}",
            health(&server).1
        )
    });
    let other = (node + 1) % cluster.len();
    publish(&cluster, other, &exchange, 7, &datetime(1).1);
    assert_eq!(client.recv(WAIT), update(7, &datetime(1).1));

    cluster.kill9(node);
    thread::sleep(Duration::from_secs(15));
    publish(&cluster, other, &exchange, 7, &datetime(2).1);
    // At least once: the first may come again, redelivered.
    let mut next = client.recv(WAIT);
    if next == update(7, &datetime(1).1) {
        next = client.recv(WAIT);
    }
    assert_eq!(next, update(7, &datetime(2).1), "{}", server.log());
    let (status, json) = health(&server);
    assert_eq!(status, 200, "{json}");
    let now = serve_node(&cluster, &server);
    assert!(
        now.is_some() && now != Some(node),
        "/health names the node in use, not the dead one: {json}"
    );
    // check tries every node: the dead one is a warning while the others
    // answer.
    let checked = Bzpush::run(
        &["check", "serve"],
        &[
            ("BZPUSH_AMQP_URL", cluster.urls()),
            ("BZPUSH_FEEDS", format!("/={exchange}")),
        ],
        WAIT,
    );
    assert!(checked.status.success(), "{checked:?}");
    for i in 0..cluster.len() {
        let line = checked
            .stdout
            .lines()
            .find(|l| l.contains(&format!("broker amqp://guest:***@{}/", cluster.addr(i))))
            .unwrap_or_else(|| panic!("no line for node {i}: {checked:?}"));
        let expected = if i == node { "warn  " } else { "ok    " };
        assert!(line.starts_with(expected), "node {i}: {line}");
    }
    let moved = server
        .log()
        .lines()
        .filter(|l| l.contains(": connected") && l.contains(&cluster.addr(now.unwrap_or(0))))
        .count();
    assert!(
        moved >= 1,
        "the log says which node serve moved to:\n{}",
        server.log()
    );
}

#[test]
fn poll_moves_to_another_node_mid_stream_and_a_quorum_queue_gets_every_change() {
    const CHANGES: u32 = 300;
    let mut cluster = PrivateRabbit::cluster();
    let db = TestDb::new();
    let exchange = unique("bzpush.test");
    let poller = Bzpush::poll(
        &db,
        MYSQL_ADDR,
        &cluster.addr(0),
        &exchange,
        &[
            ("BZPUSH_AMQP_URL", cluster.urls()),
            ("BZPUSH_LOG", "info".to_string()),
        ],
    );
    assert!(
        wait_until(WAIT, || cluster.node_of(&poller.log()).is_some()),
        "the poller never said which node it uses:\n{}",
        poller.log()
    );
    let node = cluster.node_of(&poller.log()).expect("a node");
    let listener = cluster.listen((node + 1) % cluster.len(), &exchange, true);

    // One change per bug, so that each must arrive, ~50 a second; the
    // poller's node dies a second in.
    let started = Instant::now();
    let writer = thread::spawn({
        let mut conn = db.conn();
        move || {
            for bug in 1..=CHANGES {
                let (sql, _) = datetime(bug);
                while !TestDb::push_notify_change(&mut conn, bug, Some(&sql)) {}
                thread::sleep(Duration::from_millis(20));
            }
        }
    });
    thread::sleep(Duration::from_secs(1));
    cluster.kill9(node);
    writer.join().expect("the writer");
    let mut seen = std::collections::BTreeSet::new();
    let all = wait_until(Duration::from_secs(60), || {
        seen.extend(listener.received.try_iter().map(|(bug, _)| bug));
        seen.len() == CHANGES as usize
    });
    let missing: Vec<u32> = (1..=CHANGES)
        .filter(|b| !seen.contains(&u64::from(*b)))
        .collect();
    assert!(
        all,
        "{} changes never reached the quorum queue ({:.0} s after the start): {:?}\n{}",
        missing.len(),
        started.elapsed().as_secs_f64(),
        &missing[..missing.len().min(20)],
        poller.log()
    );
    let now = cluster.node_of(&poller.log());
    assert!(
        now.is_some() && now != Some(node),
        "the log says which node the poller moved to:\n{}",
        poller.log()
    );
    assert_eq!(
        db.push_notify_rows(),
        0,
        "every row was confirmed and deleted"
    );
}

/// What a poller logs when it lets go of the lock for want of a broker.
const LETS_GO: &str = "letting go of database lock";

#[test]
fn an_active_poller_whose_brokers_are_all_down_hands_the_lock_to_a_standby_that_delivers() {
    let db = TestDb::new();
    let broker = TestBroker::new();
    // The active poller's two "nodes", and the standby's one.
    let mine = [Proxy::to(AMQP_ADDR), Proxy::to(AMQP_ADDR)];
    let theirs = Proxy::to(AMQP_ADDR);
    let nodes = |proxies: &[&Proxy]| {
        proxies
            .iter()
            .map(|p| amqp_url_at(&p.addr()))
            .collect::<Vec<_>>()
            .join(",")
    };
    let settings = |url: String| {
        vec![
            ("BZPUSH_AMQP_URL", url),
            ("BZPUSH_BROKER_GRACE", "3s".to_string()),
            ("BZPUSH_LOG", "info".to_string()),
        ]
    };
    let first = Bzpush::poll(
        &db,
        MYSQL_ADDR,
        AMQP_ADDR,
        &broker.exchange,
        &settings(nodes(&[&mine[0], &mine[1]])),
    );
    assert!(
        first.wait_for_log("active: holding", WAIT),
        "{}",
        first.log()
    );
    let second = Bzpush::poll(
        &db,
        MYSQL_ADDR,
        AMQP_ADDR,
        &broker.exchange,
        &settings(nodes(&[&theirs])),
    );
    assert!(second.wait_for_log("standby: ", WAIT), "{}", second.log());
    let mut conn = db.conn();
    assert!(TestDb::push_notify_change(
        &mut conn,
        1,
        Some(&datetime(1).0)
    ));
    let mut got = Vec::new();
    assert!(broker.receive_until(&mut got, WAIT, |g| g.contains(&(1, datetime(1).1))));

    for proxy in &mine {
        proxy.set_down(true);
        proxy.sever();
    }
    assert!(TestDb::push_notify_change(
        &mut conn,
        2,
        Some(&datetime(2).0)
    ));
    assert!(
        second.wait_for_log("active: holding", WAIT),
        "the standby did not take over:\n{}\n---- the first poller:\n{}",
        second.log(),
        first.log()
    );
    assert!(
        broker.receive_until(&mut got, WAIT, |g| g.contains(&(2, datetime(2).1))),
        "the new active poller did not deliver: {got:?}\n{}",
        second.log()
    );
    assert!(first.log().contains(LETS_GO), "{}", first.log());

    // The first poller's brokers answer again: it competes, and waits as
    // a standby. One hand-over for the whole outage.
    for proxy in &mine {
        proxy.set_down(false);
    }
    assert!(
        wait_until(WAIT, || first
            .log()
            .contains("a broker node answers again: competing")),
        "{}",
        first.log()
    );
    assert!(
        wait_until(WAIT, || first.log().rfind("standby: ")
            > first.log().rfind("active: holding")),
        "{}",
        first.log()
    );
    assert!(TestDb::push_notify_change(
        &mut conn,
        3,
        Some(&datetime(3).0)
    ));
    assert!(broker.receive_until(&mut got, WAIT, |g| g.contains(&(3, datetime(3).1))));
    thread::sleep(Duration::from_secs(5));
    assert_eq!(first.log().matches(LETS_GO).count(), 1, "{}", first.log());
    assert!(!second.log().contains(LETS_GO), "{}", second.log());
    assert!(
        !second.log()[second.log().find("active: holding").unwrap_or(0)..].contains("standby: "),
        "the lock went back and forth:\n{}",
        second.log()
    );
}
