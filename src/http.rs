//! Plain HTTP on the WebSocket port: reading a request head, and the
//! answers to requests that are not WebSocket upgrades (`/health`,
//! `/metrics`, the live page at `/` and its client library at `/bzpush.js`,
//! 404 for the rest).
//!
//! A request head is read with a size cap and a deadline for the whole
//! head, so a slow or endless client costs one bounded buffer for a
//! bounded time. Nothing here reveals more than counts and states (with
//! the poller lock's holder, and why the database refuses, for an operator
//! to act on): never a bug, never a credential, and no setting but the
//! public Bugzilla address the page links to.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tungstenite::handshake::server::Request;
use tungstenite::http::{self, Method, Version};

use crate::metrics::Metrics;
use crate::poller;

/// A request head larger than this is refused (431).
pub const MAX_HEAD: usize = 8 * 1024;
/// More header lines than this is refused (400), as tungstenite does.
const MAX_HEADERS: usize = 124;

/// How reading a request head went.
pub enum Head {
    /// The parsed request and any bytes after it (the start of a
    /// WebSocket stream).
    Request(Box<Request>, Vec<u8>),
    TooLarge,
    Malformed,
}

/// Reads one request head from `socket`, all of it within `timeout`: a
/// client that sends a byte now and then does not get more time (an
/// `io::ErrorKind::TimedOut` error). Any method and HTTP/1.0 or 1.1 parse;
/// what to make of them is the caller's.
pub fn read_head(mut socket: &TcpStream, timeout: Duration) -> io::Result<Head> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        socket.set_read_timeout(Some(left))?;
        let n = socket.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_head(&buf) {
            Ok(Some((len, request))) => {
                return Ok(Head::Request(Box::new(request), buf.split_off(len)));
            }
            Ok(None) if buf.len() >= MAX_HEAD => return Ok(Head::TooLarge),
            Ok(None) => {}
            Err(()) => return Ok(Head::Malformed),
        }
    }
}

/// A complete head as a request and its length; `None` while incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, Request)>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(buf).map_err(drop)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        Some(1) => Version::HTTP_11,
        _ => return Err(()),
    };
    let mut request = http::Request::builder()
        .method(parsed.method.ok_or(())?)
        .uri(parsed.path.ok_or(())?)
        .version(version);
    for header in parsed.headers.iter() {
        request = request.header(header.name, header.value);
    }
    request.body(()).map(|r| Some((len, r))).map_err(drop)
}

/// Header fields a request may carry only once. Two of them leave it open
/// which one counts, and a proxy in front may have picked the other: Host
/// (RFC 9112 §3.2: 400 for more than one), Content-Length (RFC 9112 §6.3),
/// Origin (RFC 6454 §7.3), Sec-WebSocket-Key and Sec-WebSocket-Version (RFC
/// 6455 §11.3.1, §11.3.5). List-valued fields (Connection, Upgrade,
/// Sec-WebSocket-Protocol, Sec-WebSocket-Extensions) may repeat.
const SINGLETONS: [&str; 5] = [
    "Host",
    "Content-Length",
    "Origin",
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
];

/// The first header field of [`SINGLETONS`] that `request` carries more
/// than once: such a request is answered 400.
pub fn duplicated_singleton(request: &Request) -> Option<&'static str> {
    SINGLETONS
        .into_iter()
        .find(|name| request.headers().get_all(*name).iter().nth(1).is_some())
}

/// Writes a complete response and nothing more (`Connection: close`).
pub fn respond(socket: &TcpStream, status: &str, content_type: &str, body: &str) -> io::Result<()> {
    Response {
        status,
        content_type,
        body,
        extra: "",
        head_only: false,
    }
    .write(socket)
}

/// A response, written whole.
struct Response<'a> {
    status: &'a str,
    content_type: &'a str,
    body: &'a str,
    /// More header lines, each ending in CRLF.
    extra: &'a str,
    /// HEAD: the headers of the GET answer, without its body.
    head_only: bool,
}

impl Response<'_> {
    fn write(&self, mut socket: &TcpStream) -> io::Result<()> {
        let response = format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nConnection: close\r\n{}\r\n{}",
            self.status,
            self.content_type,
            self.body.len(),
            self.extra,
            if self.head_only { "" } else { self.body }
        );
        socket.write_all(response.as_bytes())
    }
}

/// Whether a request's method is one plain HTTP here answers.
pub fn method_allowed(request: &Request) -> bool {
    request.method() == Method::GET || request.method() == Method::HEAD
}

/// Refuses a method other than GET and HEAD.
pub fn respond_not_allowed(socket: &TcpStream) -> io::Result<()> {
    Response {
        status: "405 Method Not Allowed",
        content_type: "text/plain; charset=utf-8",
        body: "only GET and HEAD\n",
        extra: "Allow: GET, HEAD\r\n",
        head_only: false,
    }
    .write(socket)
}

/// A short plain-text answer: errors and refusals.
pub fn respond_text(socket: &TcpStream, status: &str, text: &str) -> io::Result<()> {
    respond(
        socket,
        status,
        "text/plain; charset=utf-8",
        &format!("{text}\n"),
    )
}

/// Whether `request` asks for `/health` or `/metrics` and nothing more (no
/// WebSocket): what a client address past its share may still have.
pub fn is_monitoring(request: &Request) -> bool {
    matches!(request.uri().path(), "/health" | "/metrics")
        && !request.headers().contains_key("Upgrade")
}

/// Answers a GET or HEAD request that is not a WebSocket upgrade.
pub fn serve_plain(
    socket: &TcpStream,
    request: &Request,
    metrics: &Metrics,
    page: &Page,
) -> io::Result<()> {
    let health_text;
    let rendered;
    let html;
    let (status, content_type, body) = match request.uri().path() {
        "/health" => {
            let (ok, json) = health(metrics);
            health_text = json.to_string();
            let status = if ok {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            (status, "application/json", health_text.as_str())
        }
        "/metrics" => {
            rendered = metrics.render();
            (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                rendered.as_str(),
            )
        }
        "/" => {
            html = page.render();
            ("200 OK", "text/html; charset=utf-8", html.as_str())
        }
        "/bzpush.js" => ("200 OK", "text/javascript; charset=utf-8", CLIENT),
        // Browsers ask for it whatever the page says; the page has none.
        "/favicon.ico" => ("204 No Content", "image/x-icon", ""),
        _ => ("404 Not Found", "text/plain; charset=utf-8", "not found\n"),
    };
    Response {
        status,
        content_type,
        body,
        extra: "",
        head_only: request.method() == Method::HEAD,
    }
    .write(socket)
}

/// `/health`'s answer: whether all is well, and the JSON saying so. Not
/// well: an upstream link is down or refuses, the machine allows no client
/// connection, or a change owed downstream has waited past
/// `BZPUSH_STALE_AFTER` (`"status": "stale"`, and why), whatever part
/// caused it.
fn health(metrics: &Metrics) -> (bool, serde_json::Value) {
    let up = metrics.upstream_up();
    let no_room = metrics.no_room.get();
    let lag = metrics.freshness.lag();
    let stale_why = metrics.stale(lag.as_ref());
    let stale = stale_why.is_some();
    let status = match (stale, up) {
        (true, _) => "stale",
        (false, true) if no_room.is_none() => "ok",
        (false, _) => "unavailable",
    };
    let mut json = serde_json::json!({
        "status": status,
        metrics.upstream: if up { "up" } else { "down" },
        "connections": metrics.connections.load(Ordering::Relaxed),
        "uptime_seconds": metrics.uptime_secs(),
    });
    if let Some(lag) = &lag {
        json["freshness_lag_seconds"] = (lag.age.as_millis() as f64 / 1000.0).into();
        if let Some(why) = stale_why {
            json["stale"] = why.into();
        }
    }
    if metrics.upstream == "database" {
        add_poller(&mut json, &metrics.poller());
    }
    if metrics.upstream == "broker" {
        add_broker(&mut json, metrics);
    }
    if let Some(why) = no_room {
        json["connections_allowed"] = 0.into();
        json["reason"] = why.as_str().into();
    }
    let warnings = metrics.warnings();
    if !warnings.is_empty() {
        json["warnings"] = warnings.into();
    }
    (status == "ok", json)
}

/// The poller's part of `/health`: its role (`active`, `standby` with the
/// lock's holder, or `none` while unconnected), and a database that refuses
/// it as `"database": "refused"` with the reason and the fix.
fn add_poller(json: &mut serde_json::Value, state: &poller::State) {
    json["poller"] = match state.role() {
        Some(poller::Role::Active) => "active".into(),
        Some(poller::Role::Standby(holder)) => {
            json["lock_holder"] = serde_json::json!({
                "connection": holder.connection,
                "host": holder.host.as_deref().unwrap_or("unknown"),
            });
            "standby".into()
        }
        None => "none".into(),
    };
    if let poller::State::LockWait(what) = state {
        json["database"] = "lock wait".into();
        json["reason"] = what.as_str().into();
    }
    if let Some(reason) = state.refused() {
        json["database"] = "refused".into();
        json["reason"] = reason.into();
    }
}

/// The broker's part of `/health` (serve): each feed's link, with the node
/// it uses or, while down, why (`"broker_links": [{"state": "up", "node":
/// …}, {"state": "down", "reason": …}]`), and a resource alarm that blocks
/// the broker's publishers (`"alarm"`). Nodes are shown without passwords.
fn add_broker(json: &mut serde_json::Value, metrics: &Metrics) {
    let links: Vec<serde_json::Value> = metrics
        .broker_links
        .iter()
        .map(|link| {
            let link = link.lock().unwrap_or_else(|e| e.into_inner()).clone();
            match (link.node, link.problem) {
                (Some(node), _) => serde_json::json!({"state": "up", "node": node}),
                (None, Some(reason)) => serde_json::json!({"state": "down", "reason": reason}),
                (None, None) => serde_json::json!({"state": "connecting"}),
            }
        })
        .collect();
    json["broker_links"] = links.into();
    let alarm = metrics
        .broker_alarm
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let Some(alarm) = alarm {
        json["alarm"] = alarm.into();
    }
}

/// The live page (see `page.html`): connect, subscribe, watch updates.
/// Self-contained but for the client library it loads from this server:
/// no external script, style or font.
const PAGE: &str = include_str!("page.html");
/// The client library (`GET /bzpush.js`), which the page uses too.
const CLIENT: &str = include_str!("bzpush.js");

/// What the live page is given when it is served.
#[derive(Clone, Debug, Default)]
pub struct Page {
    /// Bugzilla's address, to link bug numbers to.
    pub bugzilla_url: Option<String>,
    /// Bugs to subscribe to when the page's address names none.
    pub bugs: Vec<u32>,
    /// A line shown above everything, escaped (the demo's).
    pub note: Option<String>,
}

impl Page {
    /// The page's HTML with its settings filled in, escaped for an HTML
    /// attribute.
    fn render(&self) -> String {
        let bugs: Vec<String> = self.bugs.iter().map(u32::to_string).collect();
        PAGE.replace(
            "{{bugzilla_url}}",
            &escape_attribute(self.bugzilla_url.as_deref().unwrap_or("")),
        )
        .replace("{{bugs}}", &escape_attribute(&bugs.join(",")))
        .replace(
            "{{note}}",
            &escape_attribute(self.note.as_deref().unwrap_or("")),
        )
    }
}

/// `text` safe inside a double- or single-quoted HTML attribute.
fn escape_attribute(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_escapes_what_it_is_given() {
        let page = Page {
            bugzilla_url: Some("https://b.example/\"><script>x</script>&'".into()),
            bugs: vec![1, 20],
            note: Some("<b>simulated</b>".into()),
        }
        .render();
        assert!(!page.contains("<script>x"), "{page}");
        assert!(
            page.contains("https://b.example/&quot;&gt;&lt;script&gt;x&lt;/script&gt;&amp;&#39;"),
            "{page}"
        );
        assert!(page.contains("content=\"1,20\""), "{page}");
        assert!(page.contains("&lt;b&gt;simulated"), "{page}");
        assert!(!page.contains("{{"), "{page}");
    }
}
