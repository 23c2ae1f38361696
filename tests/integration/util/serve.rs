//! Harness for `bzpush serve`: the server on a test's exchange (started
//! by `process.rs`, which the benchmarks share), a Pulse-format publisher,
//! and a real WebSocket client over TCP.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bzpush::config::AmqpUrl;
use bzpush::notification::{BugId, ChangeTime, Notification};
use bzpush::pulse::Publisher;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use serde_json::Value;
use tungstenite::handshake::HandshakeError;
use tungstenite::{Message, WebSocket};

/// Tests import it from here, beside the rest of what talks to a server.
pub use super::http_get;

use super::{
    AMQP_ADDR, BROKER_TIMEOUT, Bzpush, TestBroker, amqp_connect, amqp_url_at, broker, within,
};

impl Bzpush {
    /// `bzpush serve` on a free port, one feed `/` on `broker`'s exchange,
    /// its own queue, and `extra` settings.
    pub fn serve(broker: &TestBroker, extra: &[(&str, String)]) -> Bzpush {
        Bzpush::serve_at(AMQP_ADDR, &format!("/={}", broker.exchange), extra)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.listen_addr())
    }
}

/// The body the poller publishes for `bug` changed at `when`.
pub fn pulse_body(exchange: &str, bug: u64, when: &str) -> Vec<u8> {
    serde_json::json!({
        "payload": {"id": bug, "delta_ts": when},
        "_meta": {"exchange": exchange, "routing_key": bug.to_string(),
                  "serializer": "json", "sent": "2026-11-28T00:00:00+00:00"},
    })
    .to_string()
    .into_bytes()
}

/// The value of the metric `name` in a `/metrics` scrape of `addr`.
pub fn metric(addr: &str, name: &str) -> u64 {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "/metrics answered {status}: {body}");
    body.lines()
        .find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no metric {name} in:\n{body}"))
}

/// A channel on `connection` in confirm mode.
fn confirming_channel(connection: &Connection) -> Channel {
    let channel = broker("open a channel", connection.create_channel());
    broker(
        "select confirms",
        channel.confirm_select(ConfirmSelectOptions::default()),
    );
    channel
}

impl TestBroker {
    /// An exchange of its own, as [`TestBroker::new`] makes, but without
    /// the test's own queue, whose consumer would halve the rate a flood
    /// can be published at. [`TestBroker::recv`] is not for this one.
    pub fn without_queue() -> TestBroker {
        let (exchange, connection, _) = super::declare_exchange();
        TestBroker {
            exchange,
            connection,
            received: crossbeam_channel::never(),
        }
    }

    /// Publishes a Pulse message for `bug` at `when`, as the poller does.
    pub fn publish(&self, bug: u64, when: &str) {
        self.publish_raw(&bug.to_string(), &pulse_body(&self.exchange, bug, when));
    }

    /// Publishes any body with `routing_key`, confirmed.
    pub fn publish_raw(&self, routing_key: &str, body: &[u8]) {
        let connection = amqp_connect();
        let channel = confirming_channel(&connection);
        let confirm = broker(
            "publish",
            channel.basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            ),
        );
        assert!(
            matches!(broker("confirm", confirm), Confirmation::Ack(_)),
            "the broker did not confirm the message"
        );
        let _ = within(BROKER_TIMEOUT, connection.close(200, "done".into()));
    }

    /// Publishes a Pulse message for each `(bug, when)`, in order, with
    /// bzpush's own publisher (whose wire format `poll.rs` checks),
    /// so a flood goes out as fast as the poller would send it; returns
    /// once the broker has confirmed them all.
    pub fn publish_many(&self, updates: &[(u64, String)]) {
        let url = AmqpUrl::parse(&amqp_url_at(AMQP_ADDR)).expect("the test broker's URL");
        let mut publisher = Publisher::connect(&url, &self.exchange, "test-publisher")
            .unwrap_or_else(|e| panic!("connect to publish: {e}"));
        let notifications: Vec<Notification> = updates
            .iter()
            .map(|(bug, when)| Notification {
                bug: u32::try_from(*bug)
                    .ok()
                    .and_then(BugId::new)
                    .unwrap_or_else(|| panic!("bug {bug} is not a valid bug id")),
                when: ChangeTime::new(when.as_str()),
            })
            .collect();
        // In chunks, each well inside the publisher's time bound even in a
        // debug build on a loaded machine.
        for chunk in notifications.chunks(10_000) {
            let refused = publisher
                .publish(chunk)
                .unwrap_or_else(|e| panic!("publish and confirm: {e}"));
            assert!(refused.is_empty(), "the broker refused {refused:?}");
        }
    }
}

/// A WebSocket handshake by hand on `socket` (connected to `host`), for
/// `path`, with `headers` (each ending in CRLF) added and `early` bytes in
/// the same write: the socket if the answer is 101, else its status line.
/// The head is read a byte at a time, so nothing after it is taken.
pub fn raw_handshake(
    mut socket: TcpStream,
    host: &str,
    path: &str,
    headers: &str,
    early: &[u8],
) -> Result<TcpStream, String> {
    use std::io::{Read, Write};
    socket
        .set_write_timeout(Some(CLIENT_IO_TIMEOUT))
        .expect("timeout");
    socket
        .set_read_timeout(Some(CLIENT_IO_TIMEOUT))
        .expect("timeout");
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n{headers}\r\n"
    )
    .into_bytes();
    request.extend_from_slice(early);
    socket
        .write_all(&request)
        .map_err(|e| format!("write: {e}"))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match socket.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head.lines().next().unwrap_or("").to_string();
    if status.starts_with("HTTP/1.1 101") {
        Ok(socket)
    } else {
        Err(status)
    }
}

/// The HTTP status of a refused handshake ([`Client::try_connect`]).
pub fn refused_status(result: Result<Client, tungstenite::Error>) -> u16 {
    match result {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("the handshake was accepted"),
    }
}

/// A WebSocket client over TCP.
pub struct Client {
    pub ws: WebSocket<TcpStream>,
}

/// How long connecting, the handshake and any one write may take.
const CLIENT_IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP connection to `addr` from the local address `from` (any of
/// 127.0.0.0/8 on loopback): a client at another address, as far as the
/// server can tell.
pub fn tcp_from(from: IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.bind(&SocketAddr::new(from, 0).into())?;
    socket.connect_timeout(&addr.into(), CLIENT_IO_TIMEOUT)?;
    Ok(socket.into())
}

/// The loopback address `127.0.0.N`: a client address of its own.
pub fn loopback(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

impl Client {
    pub fn connect(url: &str) -> Client {
        Client::try_connect(url).unwrap_or_else(|e| panic!("connect {url}: {e}"))
    }

    /// A client at the address `from` (see [`tcp_from`]).
    pub fn connect_from(from: IpAddr, url: &str) -> Client {
        Client::try_connect_from(Some(from), url)
            .unwrap_or_else(|e| panic!("connect {url} from {from}: {e}"))
    }

    /// The handshake's outcome: a refusal is `Err(Error::Http(response))`,
    /// a server that does not answer in time an `Err(Error::Io(_))`.
    pub fn try_connect(url: &str) -> Result<Client, tungstenite::Error> {
        Client::try_connect_from(None, url)
    }

    /// As [`Client::try_connect`], from the address `from` if given.
    pub fn try_connect_from(from: Option<IpAddr>, url: &str) -> Result<Client, tungstenite::Error> {
        super::watchdog::arm();
        let addr = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .and_then(|host| host.parse().ok())
            .unwrap_or_else(|| panic!("{url}: expected ws://IP:PORT/PATH"));
        let socket = match from {
            Some(from) => tcp_from(from, addr)?,
            None => TcpStream::connect_timeout(&addr, CLIENT_IO_TIMEOUT)?,
        };
        socket.set_read_timeout(Some(CLIENT_IO_TIMEOUT))?;
        socket.set_write_timeout(Some(CLIENT_IO_TIMEOUT))?;
        match tungstenite::client(url, socket) {
            Ok((ws, _)) => Ok(Client { ws }),
            Err(HandshakeError::Failure(e)) => Err(e),
            // A blocking socket is "interrupted" only by its read timeout.
            Err(HandshakeError::Interrupted(_)) => {
                Err(tungstenite::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no handshake answer within {CLIENT_IO_TIMEOUT:?}"),
                )))
            }
        }
    }

    /// Sets the socket's read timeout.
    pub fn set_read_timeout(&mut self, timeout: Duration) {
        self.ws
            .get_mut()
            .set_read_timeout(Some(timeout))
            .expect("set a read timeout");
    }

    pub fn send(&mut self, json: Value) {
        self.ws
            .send(Message::text(json.to_string()))
            .expect("send a frame");
    }

    /// The next text frame as JSON; panics after `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Value {
        self.try_recv(timeout)
            .unwrap_or_else(|| panic!("no message within {timeout:?}"))
    }

    /// The next text frame as JSON, or `None` after `timeout`.
    pub fn try_recv(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.set_read_timeout(left);
            match self.ws.read() {
                Ok(Message::Text(text)) => {
                    return Some(serde_json::from_str(text.as_str()).expect("server sends JSON"));
                }
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None;
                }
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    /// Connects to `server`'s feed `/` and subscribes to `bugs`; panics
    /// unless the server answers ok.
    pub fn subscribed(server: &Bzpush, bugs: &[u32]) -> Client {
        let mut client = Client::connect(&server.ws_url("/"));
        let answer = client.request(serde_json::json!({"command": "subscribe", "bugs": bugs}));
        assert_eq!(answer["result"], "ok", "{answer}");
        client
    }

    /// Sends `json` and returns the next frame.
    pub fn request(&mut self, json: Value) -> Value {
        self.send(json);
        self.recv(Duration::from_secs(10))
    }

    /// Reads until the server ends the connection: the text frames that
    /// came first, and the close frame's code, or `None` if the connection
    /// ended without one. Panics if it is still open after `timeout`.
    pub fn read_to_end(&mut self, timeout: Duration) -> (Vec<Value>, Option<u16>) {
        let deadline = Instant::now() + timeout;
        let mut texts = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the server did not end the connection within {timeout:?}"
            );
            self.set_read_timeout(left);
            match self.ws.read() {
                Ok(Message::Text(text)) => {
                    texts.push(serde_json::from_str(text.as_str()).expect("server sends JSON"));
                }
                Ok(Message::Close(frame)) => return (texts, frame.map(|f| u16::from(f.code))),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return (texts, None),
            }
        }
    }

    /// The close code the server ends the connection with, skipping any
    /// text frames before it; `None` if it ends without a close frame.
    pub fn close_code(&mut self, timeout: Duration) -> Option<u16> {
        self.read_to_end(timeout).1
    }
}

/// Change times a server's cache can vouch for: it vouches only for
/// changes stamped after it started consuming (plus a margin for clocks),
/// and learns from a stamp later than its arrival that the stamping clock
/// runs ahead. So these are recent, and a test publishes one only once the
/// clock has passed it ([`Stamps::wait_past`]).
pub struct Stamps {
    base: u64,
}

impl Stamps {
    /// Times from a little after now on; take them once the server is
    /// healthy (its consumer has started).
    pub fn after_start() -> Stamps {
        let margin = u64::try_from(bzpush::catchup::CLOCK_MARGIN_SECS).expect("a positive margin");
        Stamps {
            base: now_secs() + margin + 2,
        }
    }

    /// `offset` seconds after the first time, as the poller writes it.
    pub fn at(&self, offset: u64) -> String {
        let time = std::time::UNIX_EPOCH + Duration::from_secs(self.base + offset);
        bzpush::pulse::rfc3339_utc(time)[..19].to_string()
    }

    /// A time before the server started consuming: it cannot vouch for it.
    pub fn before_start(&self) -> String {
        self.at(0).replace(&self.at(0)[11..], "00:00:00")
    }

    /// Waits until this host's clock is past `at(offset)`, as it is when a
    /// change stamped then reaches the server.
    pub fn wait_past(&self, offset: u64) {
        let deadline = Instant::now() + Duration::from_secs(offset + 60);
        while now_secs() <= self.base + offset {
            assert!(Instant::now() < deadline, "the clock did not move");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs()
}

/// `2026-01-01T00:00:00` plus `secs` seconds, as the server sends it.
pub fn t(secs: u32) -> String {
    super::datetime(secs).1
}

/// `server`'s `GET /health`: the status code and the body as JSON (panics
/// if the body is not JSON).
pub fn health(server: &Bzpush) -> (u16, Value) {
    let (status, body) = http_get(&server.listen_addr(), "/health");
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("/health {body:?}: {e}"));
    (status, json)
}

/// `bzpush serve` on `broker` with `extra` settings, once its consumer runs
/// (`/health` says 200).
pub fn healthy_server(broker: &TestBroker, extra: &[(&str, String)]) -> Bzpush {
    let server = Bzpush::serve(broker, extra);
    server.wait_healthy();
    server
}

/// The answer to `version`: this build's version.
pub fn version() -> Value {
    serde_json::json!({"command": "version", "result": "ok", "version": env!("CARGO_PKG_VERSION")})
}

/// The update frame the server sends for `bug` changed at `when`.
pub fn update(bug: u64, when: &str) -> Value {
    serde_json::json!({"command": "update", "bug": bug, "when": when})
}

/// The answer to a `subscribe` with `since` that the server could not
/// catch up completely.
pub fn partial(bugs: &[u64]) -> Value {
    serde_json::json!({"command": "subscribe", "result": "ok", "bugs": bugs, "partial": true})
}

/// The ok answer to `command` listing `bugs`.
pub fn ok(command: &str, bugs: &[u64]) -> Value {
    serde_json::json!({"command": command, "result": "ok", "bugs": bugs})
}
