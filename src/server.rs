//! `bzpush serve` and `bzpush run`: the threads of a WebSocket server and
//! their lifecycle.
//!
//! Owns the listening socket and the accept loop, the limits checked at
//! the handshake (total connections, origin, feed path), and starting and
//! joining every other thread: the hub, the writer pool, what feeds the hub
//! (one broker consumer per feed for `serve`, the poller for `run`), the
//! catch-up worker, one thread per connection. Shutdown stops accepting,
//! closes every connection with 1001, joins every thread. Nothing here
//! touches a subscription: that is the hub's.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown as SocketShutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, info, warn};

use crate::catchup;
use crate::config::{DatabaseUrl, Feed, RunConfig, ServeConfig, ServerConfig, feed_path};
use crate::connection::{self, Limits};
use crate::http::{self, Head};
use crate::hub::{ConnId, HUB_QUEUE, Hub, HubConfig, HubSender, HubSink, Message};
use crate::metrics::Metrics;
use crate::origin;
use crate::outbox::{Outbox, Writers};
use crate::poller;
use crate::pulse::{self, ConsumerSetup};
use crate::shutdown::{self, Shutdown};
use crate::systemd;

/// A connection's thread touches little stack, except to parse a frame:
/// serde_json recurses up to its limit of 127 levels, and a frame nested
/// that deep takes up to 80 KiB of stack in a release build and 256 KiB in
/// a debug build (measured). At 128 KiB one such frame overflowed the
/// stack of a debug build and aborted the whole process. Only pages
/// touched cost memory: an idle connection touches a few KiB.
const CONNECTION_STACK: usize = 512 * 1024;
/// A client has this long to send its request head (slowloris).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Sockets may wait in the handshake beyond the connection limit by this
/// many before new ones are refused at once.
const HANDSHAKE_SLACK: usize = 256;
/// A write to a client that makes no progress this long fails the client.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for connections to take their close frames.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// What every connection thread shares.
struct Shared {
    feeds: Vec<Feed>,
    allowed_origins: Option<Vec<String>>,
    refused_origins: origin::Refusals,
    max_connections: usize,
    outbound_queue: usize,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// What the live page is given: where bugs link to, what it watches.
    page: http::Page,
    /// Sockets of live connections, to cut them at shutdown. A connection
    /// has one descriptor, shared by this map, its thread and its outbox.
    sockets: Mutex<HashMap<ConnId, Arc<TcpStream>>>,
}

/// The thread serving a connection. The thread that reads the request
/// hands a WebSocket on to a thread of its own and returns that one (see
/// [`handle`]), so a connection may have two threads in turn.
type ConnThread = JoinHandle<Successor>;

/// The thread a connection's thread handed the connection to, if any.
struct Successor(Option<ConnThread>);

/// `bzpush serve`: the server fed by one Pulse consumer per feed, until
/// `shutdown`.
pub fn serve(config: &ServeConfig, listener: TcpListener, shutdown: &Shutdown) -> io::Result<()> {
    let metrics = Arc::new(Metrics::new("broker", config.feeds.len()));
    let server = Server {
        config: &config.server,
        feeds: &config.feeds,
        catchup: config.catchup_database.as_ref(),
        metrics,
        has_poller: false,
    };
    server.run(listener, shutdown, |hub, metrics| {
        start_consumers(config, hub, metrics, shutdown)
    })
}

/// `bzpush run`: the server fed by the database poller in this process, on
/// one feed at `/`, until `shutdown`. Catch-up beyond the cache reads the
/// poller's database.
pub fn run(config: &RunConfig, listener: TcpListener, shutdown: &Shutdown) -> io::Result<()> {
    let metrics = Arc::new(Metrics::new("database", 1));
    let feeds = [Feed {
        path: "/".into(),
        exchange: "in-process".into(),
    }];
    let server = Server {
        config: &config.server,
        feeds: &feeds,
        catchup: Some(&config.poller.database),
        metrics,
        has_poller: true,
    };
    server.run(listener, shutdown, |hub, metrics| {
        let sink = HubSink {
            hub: hub.clone(),
            feed: 0,
            metrics: Arc::clone(metrics),
        };
        let (poller_config, metrics, shutdown) =
            (config.poller.clone(), Arc::clone(metrics), shutdown.clone());
        let poller = shutdown::spawn_essential(
            "poller".into(),
            thread::Builder::new(),
            &shutdown.clone(),
            move || poller::run(&poller_config, sink, &metrics, &shutdown),
        )?;
        Ok(vec![poller])
    })
}

/// `bzpush demo` in memory: the server of `run`, fed by `feed` (given
/// the sink `run`'s poller would get) instead of a database poller, until
/// `shutdown`. `upstream` names what feeds it in `/health` and `/metrics`;
/// `feed` reports that link's state in `upstream_links[0]`.
pub fn run_fed(
    config: &ServerConfig,
    upstream: &'static str,
    listener: TcpListener,
    shutdown: &Shutdown,
    feed: impl FnOnce(HubSink, Arc<Metrics>) -> io::Result<JoinHandle<()>>,
) -> io::Result<()> {
    let feeds = [Feed {
        path: "/".into(),
        exchange: "in-process".into(),
    }];
    let server = Server {
        config,
        feeds: &feeds,
        catchup: None,
        metrics: Arc::new(Metrics::new(upstream, 1)),
        has_poller: false,
    };
    server.run(listener, shutdown, |hub, metrics| {
        let sink = HubSink {
            hub: hub.clone(),
            feed: 0,
            metrics: Arc::clone(metrics),
        };
        Ok(vec![feed(sink, Arc::clone(metrics))?])
    })
}

/// What `serve` and `run` share: everything but where updates come from.
struct Server<'a> {
    config: &'a ServerConfig,
    feeds: &'a [Feed],
    catchup: Option<&'a DatabaseUrl>,
    metrics: Arc<Metrics>,
    /// The poller runs in this process (`run`): the watchdog watches it too.
    has_poller: bool,
}

impl Server<'_> {
    /// Starts the hub, the writers, `upstream` (the threads that feed the
    /// hub) and the catch-up worker, then accepts connections until
    /// `shutdown`, then stops and joins them all.
    fn run(
        self,
        listener: TcpListener,
        shutdown: &Shutdown,
        upstream: impl FnOnce(&HubSender, &Arc<Metrics>) -> io::Result<Vec<JoinHandle<()>>>,
    ) -> io::Result<()> {
        let metrics = self.metrics;
        let writers = Writers::start(shutdown)?;
        let (hub_tx, hub_rx) = crossbeam_channel::bounded(HUB_QUEUE);
        let (catchup_tx, catchup_thread) = match self.catchup {
            Some(url) => {
                let (jobs_tx, jobs_rx) = crossbeam_channel::bounded(catchup::JOB_QUEUE);
                let (url, hub) = (url.clone(), hub_tx.clone());
                let thread = shutdown::spawn_essential(
                    "catchup".into(),
                    thread::Builder::new(),
                    shutdown,
                    move || catchup::run(&url, jobs_rx, hub),
                )?;
                (Some(jobs_tx), Some(thread))
            }
            None => (None, None),
        };
        let hub = Hub::new(
            HubConfig {
                feeds: self.feeds.len(),
                cache_size: self.config.cache_size,
                max_subscriptions: self.config.max_subscriptions,
                outbound_queue: self.config.outbound_queue,
                catchup: catchup_tx,
            },
            Arc::clone(&metrics),
        );
        let hub_thread =
            shutdown::spawn_essential("hub".into(), thread::Builder::new(), shutdown, move || {
                hub.run(hub_rx)
            })?;
        let upstream = upstream(&hub_tx, &metrics)?;
        let addr = listener.local_addr()?;
        let waker = thread::Builder::new().name("accept-waker".into()).spawn({
            let shutdown = shutdown.clone();
            move || wake_on_shutdown(&shutdown, addr)
        })?;
        info!("serving WebSocket and HTTP on {addr}");
        systemd::notify(&format!("STATUS=serving WebSocket and HTTP on {addr}"));
        let watchdog = systemd::spawn_watchdog(shutdown, {
            let (hub, metrics) = (hub_tx.clone(), Arc::clone(&metrics));
            let poller = self.has_poller;
            move |interval| {
                // Answered by the hub before the next check if it is alive.
                let _ = hub.try_send(Message::Heartbeat);
                metrics.since(&metrics.hub_beat) < interval
                    && (!poller || metrics.since(&metrics.poller_beat) < interval)
            }
        })?;
        systemd::notify("READY=1");

        let shared = Arc::new(Shared {
            feeds: self.feeds.to_vec(),
            allowed_origins: self.config.allowed_origins.clone(),
            refused_origins: origin::Refusals::default(),
            max_connections: self.config.max_connections,
            outbound_queue: self.config.outbound_queue,
            limits: Limits {
                max_message_size: self.config.max_message_size,
                ping_interval: self.config.ping_interval,
                ping_timeout: self.config.ping_timeout,
            },
            metrics: Arc::clone(&metrics),
            page: http::Page {
                bugzilla_url: self.config.bugzilla_url.clone(),
                bugs: self.config.page_bugs.clone(),
            },
            sockets: Mutex::new(HashMap::new()),
        });
        let mut acceptor = Acceptor {
            shared: Arc::clone(&shared),
            hub: hub_tx.clone(),
            writers: &writers,
            threads: HashMap::new(),
            done: crossbeam_channel::unbounded(),
            next_id: 0,
        };
        acceptor.run(&listener, shutdown);

        systemd::notify("STOPPING=1");
        info!("stopping: closing {} connections", acceptor.threads.len());
        // Also ends the catch-up worker, which holds a sender to the hub.
        let _ = hub_tx.send(Message::CloseAll);
        acceptor.join_all(&shared);
        drop(acceptor);
        drop(hub_tx);
        for thread in upstream.into_iter().chain(catchup_thread).chain(watchdog) {
            shutdown::join(thread);
        }
        // Every sender is gone now: the hub ends, then the writers.
        shutdown::join(hub_thread);
        writers.join();
        shutdown::join(waker);
        info!("stopped");
        Ok(())
    }
}

fn start_consumers(
    config: &ServeConfig,
    hub: &HubSender,
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
) -> io::Result<Vec<JoinHandle<()>>> {
    config
        .feeds
        .iter()
        .enumerate()
        .map(|(feed, f)| {
            let setup = ConsumerSetup {
                feed,
                exchange: f.exchange.clone(),
                queue: pulse::queue_name(&config.queue_prefix, &f.exchange),
                expires: config.queue_expires,
            };
            let (url, hub, metrics, shutdown) = (
                config.amqp.clone(),
                hub.clone(),
                Arc::clone(metrics),
                shutdown.clone(),
            );
            shutdown::spawn_essential(
                format!("pulse-{feed}"),
                thread::Builder::new(),
                &shutdown.clone(),
                move || {
                    pulse::consume(
                        &url,
                        &setup,
                        &hub,
                        &metrics,
                        &metrics.upstream_links[feed],
                        &shutdown,
                    )
                },
            )
        })
        .collect()
}

/// Blocks until shutdown, then connects to the listener once so that a
/// thread blocked in `accept` wakes up and sees it.
fn wake_on_shutdown(shutdown: &Shutdown, addr: SocketAddr) {
    while !shutdown.sleep(Duration::from_secs(3600)) {}
    let _ = TcpStream::connect(addr);
}

struct Acceptor<'a> {
    shared: Arc<Shared>,
    hub: HubSender,
    writers: &'a Writers,
    threads: HashMap<ConnId, ConnThread>,
    /// Each connection thread says here that it is finishing: once, or
    /// twice for a WebSocket (its handshake thread, then its own).
    done: (Sender<ConnId>, Receiver<ConnId>),
    next_id: ConnId,
}

impl Acceptor<'_> {
    fn run(&mut self, listener: &TcpListener, shutdown: &Shutdown) {
        let mut backoff = Duration::from_millis(10);
        for socket in listener.incoming() {
            if shutdown.requested() {
                break;
            }
            self.reap();
            let socket = match socket {
                Ok(s) => s,
                Err(e) => {
                    // Usually out of file descriptors: wait for some to free.
                    warn!("accept failed: {e}");
                    shutdown.sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            backoff = Duration::from_millis(10);
            if let Err(e) = self.start(socket) {
                warn!("cannot start a connection thread: {e}");
            }
        }
    }

    /// Joins the threads that have finished.
    fn reap(&mut self) {
        while let Ok(id) = self.done.1.try_recv() {
            self.join(id);
        }
    }

    /// Joins connection `id`'s current thread, which has said it is
    /// finishing, and keeps the thread it handed the connection to. Both of
    /// a WebSocket's threads say so, in either order: the first word joins
    /// the handshake thread (the one in the map), the second its successor.
    fn join(&mut self, id: ConnId) {
        if let Some(thread) = self.threads.remove(&id)
            && let Some(next) = join_connection(thread)
        {
            self.threads.insert(id, next);
        }
    }

    fn start(&mut self, socket: TcpStream) -> io::Result<()> {
        let id = self.next_id;
        self.next_id += 1;
        if self.threads.len() >= self.shared.max_connections + HANDSHAKE_SLACK {
            let _ = socket.set_write_timeout(Some(Duration::from_secs(1)));
            return http::respond_text(&socket, "503 Service Unavailable", "too many connections");
        }
        socket.set_nodelay(true)?;
        socket.set_read_timeout(Some(HEAD_TIMEOUT))?;
        socket.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let socket = Arc::new(socket);
        self.shared
            .sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Arc::clone(&socket));
        let conn = Conn {
            id,
            outbox: Outbox::new(
                Arc::clone(&socket),
                self.shared.outbound_queue,
                self.writers,
                Arc::clone(&self.shared.metrics),
            ),
            socket,
            shared: Arc::clone(&self.shared),
            hub: self.hub.clone(),
            done: self.done.0.clone(),
        };
        let thread = thread::Builder::new()
            .name(format!("http-{id}"))
            .stack_size(CONNECTION_STACK)
            .spawn(move || {
                let next = contain(id, || handle(&conn)).flatten();
                match next {
                    // Joined next, which yields the WebSocket's thread.
                    Some(_) => {
                        let _ = conn.done.send(id);
                    }
                    None => conn.finish(),
                }
                Successor(next)
            });
        match thread {
            Ok(thread) => {
                self.threads.insert(id, thread);
                Ok(())
            }
            Err(e) => {
                self.shared
                    .sockets
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                Err(e)
            }
        }
    }

    /// Waits for connection threads to finish after `CloseAll`; cuts the
    /// sockets of those that do not in time.
    fn join_all(&mut self, shared: &Shared) {
        let deadline = Instant::now() + CLOSE_GRACE;
        while !self.threads.is_empty() && Instant::now() < deadline {
            match self
                .done
                .1
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(id) => self.join(id),
                Err(_) => break,
            }
        }
        for socket in shared
            .sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            let _ = socket.shutdown(SocketShutdown::Both);
        }
        for (_, thread) in self.threads.drain() {
            let mut next = Some(thread);
            while let Some(thread) = next.take() {
                next = join_connection(thread);
            }
        }
    }
}

/// Runs a connection thread's `work`. A panic (a bug that one client's
/// input reached) is logged and ends only this connection: `None`, and
/// the caller cleans up as after any other end, so that the socket is
/// closed and the connection forgotten rather than left hanging.
fn contain<T>(id: ConnId, work: impl FnOnce() -> T) -> Option<T> {
    panic::catch_unwind(AssertUnwindSafe(work))
        .map_err(|payload| {
            warn!(
                "connection {id}: its thread panicked: {}",
                shutdown::panic_message(payload.as_ref())
            );
        })
        .ok()
}

/// Joins a connection's thread; the thread it handed the connection to,
/// if any. A connection's thread may end alone: a panic that escaped
/// [`contain`] (in its cleanup) ends only its connection, and is logged
/// here.
fn join_connection(thread: ConnThread) -> Option<ConnThread> {
    let name = thread.thread().name().unwrap_or("connection").to_string();
    match thread.join() {
        Ok(Successor(next)) => next,
        Err(payload) => {
            warn!(
                "{name}: the connection's thread panicked: {}",
                shutdown::panic_message(payload.as_ref())
            );
            None
        }
    }
}

/// What a connection's threads hold.
#[derive(Clone)]
struct Conn {
    id: ConnId,
    socket: Arc<TcpStream>,
    outbox: Arc<Outbox>,
    shared: Arc<Shared>,
    hub: HubSender,
    done: Sender<ConnId>,
}

impl Conn {
    /// The connection's last thread ends: forget the socket, shut it, say
    /// so.
    fn finish(&self) {
        let socket = self
            .shared
            .sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
        // A closing outbox shuts the socket itself once its close frame is
        // out: shutting it here could cut that frame off.
        if let Some(s) = socket
            && !self.outbox.is_closing()
        {
            let _ = s.shutdown(SocketShutdown::Both);
        }
        let _ = self.done.send(self.id);
    }
}

/// One accepted socket: a plain HTTP request, or the handshake of a
/// WebSocket. The WebSocket then gets a thread of its own, started afresh,
/// returned here: this thread's stack and malloc cache keep what the
/// handshake touched, which would otherwise cost every idle connection
/// some KiB for its whole life. `None`: the connection is over.
fn handle(conn: &Conn) -> Option<ConnThread> {
    let (id, mut socket, shared) = (conn.id, &*conn.socket, &*conn.shared);
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
        if let Err(e) = http::serve_plain(socket, &request, &shared.metrics, &shared.page) {
            debug!("connection {id}: {e}");
        }
        return None;
    }
    let Some(feed) = feed_path(request.uri().path())
        .and_then(|path| shared.feeds.iter().position(|f| f.path == path))
    else {
        let _ = http::respond_text(socket, "404 Not Found", "no feed at this path");
        return None;
    };
    // No Origin header: not a browser, which origins do not restrict.
    if let Some(allowed) = &shared.allowed_origins
        && let Some(header) = request.headers().get("Origin")
    {
        let origin = String::from_utf8_lossy(header.as_bytes());
        if !origin::is_allowed(allowed, &origin) {
            shared.refused_origins.refused(&origin);
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
    let connections = &shared.metrics.connections;
    if connections.fetch_add(1, Ordering::Relaxed) >= shared.max_connections as u64 {
        connections.fetch_sub(1, Ordering::Relaxed);
        let _ = http::respond_text(socket, "503 Service Unavailable", "too many connections");
        return None;
    }
    if tungstenite::handshake::server::write_response(&mut socket, &response).is_err() {
        connections.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    let conn = conn.clone();
    let websocket = move || {
        let (socket, outbox) = (Arc::clone(&conn.socket), Arc::clone(&conn.outbox));
        let served = contain(id, || {
            connection::run(
                id,
                feed,
                socket,
                leftover,
                outbox,
                &conn.hub,
                conn.shared.limits,
            )
        });
        if served.is_none() {
            // It may not have told the hub it left.
            let _ = conn.hub.send(Message::Disconnect { conn: id });
        }
        conn.shared
            .metrics
            .connections
            .fetch_sub(1, Ordering::Relaxed);
        conn.finish();
        Successor(None)
    };
    match thread::Builder::new()
        .name(format!("conn-{id}"))
        .stack_size(CONNECTION_STACK)
        .spawn(websocket)
    {
        Ok(thread) => Some(thread),
        Err(e) => {
            warn!("cannot start a connection thread: {e}");
            connections.fetch_sub(1, Ordering::Relaxed);
            None
        }
    }
}
