//! The WebSocket handshake and its limits: what a request on an accepted
//! socket must pass to become a WebSocket (a well-formed head in time,
//! room under its client address's limit, an allowed method, a feed at its
//! path, an allowed origin, room under the connection limit), and the
//! answer to one that does not, or that asks for a plain HTTP page. The
//! client address is the socket's peer, or what a trusted proxy's
//! `X-Forwarded-For` says. Serving the WebSocket afterwards is not its
//! job.

use std::io::Write;
use std::net::{IpAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use log::debug;

use crate::address::{ClientAddress, TrustedProxies};
use crate::config::{Feed, feed_path};
use crate::http::{self, Head};
use crate::hub::ConnId;
use crate::metrics::Metrics;
use crate::origin;
use crate::sockets::{Refusal, Sockets};

/// A client has this long to send its request head (slowloris).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// What a request must pass to become a WebSocket, and what a plain HTTP
/// request is answered from.
pub struct Handshake {
    pub feeds: Vec<Feed>,
    pub allowed_origins: Option<Vec<String>>,
    pub refused_origins: origin::Refusals,
    /// Open WebSockets beyond this are refused with 503: the lower of
    /// `BZPUSH_MAX_CONNECTIONS` and what the machine allows.
    pub max_connections: usize,
    /// Whose `X-Forwarded-For` names the client.
    pub proxies: TrustedProxies,
    pub metrics: Arc<Metrics>,
    /// What the live page is given: where bugs link to, what it watches.
    pub page: http::Page,
}

/// A WebSocket whose handshake succeeded: the feed it asked for, the
/// bytes the client sent after its request head, and the address its
/// client counts under. It counts in `metrics.connections` from here on:
/// whoever serves it takes it off.
pub struct Upgraded {
    pub feed: usize,
    pub leftover: Vec<u8>,
    pub address: ClientAddress,
}

/// Answers a socket that a bound of [`Sockets`] refuses, at most a second
/// spent on it.
pub fn refuse(socket: &TcpStream, refusal: Refusal) {
    let _ = socket.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = match refusal {
        Refusal::Address(_) => http::respond_text(
            socket,
            "429 Too Many Requests",
            "too many connections from your address",
        ),
        Refusal::Busy => {
            http::respond_text(socket, "503 Service Unavailable", "too many connections")
        }
    };
}

impl Handshake {
    /// Answers socket `id`, accepted from `peer`: a plain HTTP request, or
    /// the handshake of a WebSocket, which the caller then serves. `None`:
    /// the connection is over.
    pub fn answer(
        &self,
        id: ConnId,
        mut socket: &TcpStream,
        peer: IpAddr,
        sockets: &Sockets,
    ) -> Option<Upgraded> {
        let (request, leftover) = match http::read_head(socket, HEAD_TIMEOUT) {
            Ok(Head::Request(request, leftover)) => (request, leftover),
            Ok(Head::TooLarge) => {
                let _ = http::respond_text(
                    socket,
                    "431 Request Header Fields Too Large",
                    "request head too large",
                );
                return None;
            }
            Ok(Head::Malformed) => {
                let _ = http::respond_text(socket, "400 Bad Request", "malformed request");
                return None;
            }
            Err(e) => {
                debug!("connection {id}: no request: {e}");
                return None;
            }
        };
        let forwarded = request.headers().get_all("X-Forwarded-For");
        let client = self
            .proxies
            .client(peer, forwarded.iter().map(|v| v.as_bytes()));
        let address = ClientAddress::of(client);
        let proxied = self.proxies.trusts(peer);
        let monitoring = http::is_monitoring(&request);
        if let Err(refusal) = sockets.headed(id, proxied.then_some(address), monitoring) {
            refuse(socket, refusal);
            return None;
        }
        if let Some(name) = http::duplicated_singleton(&request) {
            let _ = http::respond_text(
                socket,
                "400 Bad Request",
                &format!("more than one {name} header"),
            );
            return None;
        }
        if !http::method_allowed(&request) {
            let _ = http::respond_not_allowed(socket);
            return None;
        }
        let upgrade = request
            .headers()
            .get("Upgrade")
            .and_then(|h| h.to_str().ok())
            .is_some_and(|h| h.eq_ignore_ascii_case("websocket"));
        if !upgrade {
            if let Err(e) = http::serve_plain(socket, &request, &self.metrics, &self.page) {
                debug!("connection {id}: {e}");
            }
            return None;
        }
        let Some(feed) = feed_path(request.uri().path())
            .and_then(|path| self.feeds.iter().position(|f| f.path == path))
        else {
            let _ = http::respond_text(socket, "404 Not Found", "no feed at this path");
            return None;
        };
        // No Origin header: not a browser, which origins do not restrict.
        if let Some(allowed) = &self.allowed_origins
            && let Some(header) = request.headers().get("Origin")
        {
            let origin = String::from_utf8_lossy(header.as_bytes());
            if !origin::is_allowed(allowed, &origin) {
                self.refused_origins.refused(&origin);
                let _ = http::respond_text(socket, "403 Forbidden", "origin not allowed");
                return None;
            }
        }
        let response = match tungstenite::handshake::server::create_response(&request) {
            Ok(r) => r,
            Err(e) => {
                let _ = http::respond_text(
                    socket,
                    "400 Bad Request",
                    &format!("bad WebSocket handshake: {e}"),
                );
                return None;
            }
        };
        let connections = &self.metrics.connections;
        if connections.fetch_add(1, Ordering::Relaxed) >= self.max_connections as u64 {
            connections.fetch_sub(1, Ordering::Relaxed);
            let _ = http::respond_text(socket, "503 Service Unavailable", "too many connections");
            return None;
        }
        // Written whole, in one write: tungstenite writes the answer a
        // piece at a time, and on a socket without Nagle's delay each
        // piece is a TCP segment of its own (about 20).
        let mut head = Vec::with_capacity(256);
        if tungstenite::handshake::server::write_response(&mut head, &response).is_err()
            || socket.write_all(&head).is_err()
        {
            connections.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Upgraded {
            feed,
            leftover,
            address,
        })
    }
}
