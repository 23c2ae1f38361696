//! `bzpush poll` end to end: real MariaDB, real RabbitMQ, the real binary.

mod common;

use std::time::Duration;

use common::{AMQP_ADDR, Bzpush, MYSQL_ADDR, TestBroker, TestDb};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn wire_format_is_field_for_field_what_mozillapulse_sends() {
    let db = TestDb::new();
    let broker = TestBroker::new();
    let mut conn = db.conn();
    TestDb::push_notify_change(&mut conn, 123456, Some("2026-11-28 02:04:50"));
    let _poller = Bzpush::poll(&db, MYSQL_ADDR, AMQP_ADDR, &broker.exchange, &[]);

    let message = broker.recv(WAIT).expect("the change reaches the broker");
    assert_eq!(message.routing_key, "123456");
    let p = &message.properties;
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(
        p.content_encoding().as_ref().map(|s| s.as_str()),
        Some("utf-8")
    );
    assert_eq!(*p.delivery_mode(), Some(2));
    let body = message.json();
    let top: Vec<&str> = body
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(top, ["_meta", "payload"]);
    assert_eq!(
        body["payload"],
        serde_json::json!({"id": 123456, "delta_ts": "2026-11-28T02:04:50"})
    );
    let meta = body["_meta"].as_object().expect("_meta is an object");
    assert_eq!(meta.len(), 4, "{meta:?}");
    assert_eq!(meta["exchange"], broker.exchange.as_str());
    assert_eq!(meta["routing_key"], "123456");
    assert_eq!(meta["serializer"], "json");
    let sent = meta["sent"].as_str().expect("sent is a string");
    assert_eq!(sent.len(), "2026-11-28T02:04:51+00:00".len(), "{sent}");
    assert!(
        sent.ends_with("+00:00") && sent.as_bytes()[10] == b'T',
        "{sent}"
    );

    assert!(
        common::wait_until(WAIT, || db.push_notify_rows() == 0),
        "the confirmed row is deleted"
    );
}
