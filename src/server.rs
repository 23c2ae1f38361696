//! `bzpush poll`, `serve` and `run`: where every thread of the pipeline
//! starts and is joined.
//!
//! `poll` is the poller alone. `serve` and `run` are a WebSocket server:
//! this file owns its listening socket and accept loop (the handshake is
//! [`crate::handshake`]'s), and starting
//! and joining every other thread: the hub, the writer pool, what feeds the
//! hub (one broker consumer per feed for `serve`, the poller for `run`),
//! the catch-up worker, and the connections' threads (handshake, then
//! WebSocket), all in one scope, never more of them than the machine
//! allows ([`Capacity`], [`Sockets`]): a thread that cannot start costs
//! its client a refusal, never the process. Shutdown stops
//! accepting, closes every connection with 1001, joins every thread.
//! Nothing here touches a subscription: that is the hub's.

use std::io;
use std::net::{IpAddr, Shutdown as SocketShutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle, Scope};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender, TrySendError};
use log::{error, info, warn};
use tungstenite::protocol::frame::coding::CloseCode;

use crate::address::ClientAddress;
use crate::capacity::Capacity;
use crate::catchup::{self, CatchUp};
use crate::config::{DatabaseUrl, Feed, PollConfig, RunConfig, ServeConfig, ServerConfig};
use crate::connection::{self, Limits};
use crate::freshness::Freshness;
use crate::handshake::{self, HEAD_TIMEOUT, Handshake, Upgraded};
use crate::http;
use crate::hub::{
    Budget, CONN_QUEUE, ConnEvent, ConnId, ConnSender, Event, HUB_QUEUE, Hub, HubConfig, HubSender,
    HubSink,
};
use crate::logging::Throttle;
use crate::metrics::Metrics;
use crate::origin;
use crate::outbox::{Outbox, Writers};
use crate::poller;
use crate::pulse::{self, ConsumerSetup, PulseSink};
use crate::shutdown::{self, Shutdown};
use crate::sockets::{MAX_HANDSHAKES, Refusal, Sockets};
use crate::systemd;

/// A connection's thread touches little stack, except to parse a frame:
/// serde_json recurses up to its limit of 127 levels, and a frame nested
/// that deep takes up to 80 KiB of stack in a release build and 256 KiB in
/// a debug build (measured). At 128 KiB one such frame overflowed the
/// stack of a debug build and aborted the whole process. Only pages
/// touched cost memory: an idle connection touches a few KiB.
const CONNECTION_STACK: usize = 512 * 1024;
/// A handshake thread's stack: smaller than [`CONNECTION_STACK`] so that
/// glibc, which hands an ended thread's stack to the next thread asking for
/// no more than its size, never gives a connection thread a stack whose
/// pages a handshake touched (idle connections: 11.2 KiB of stack each
/// when it could, 8.0 since, measured).
const HANDSHAKE_STACK: usize = 256 * 1024;
/// A handshake thread with no socket to take ends after this long.
const HANDSHAKE_IDLE: Duration = Duration::from_secs(10);
/// How long the accept loop waits for a handshake thread to come free when
/// [`MAX_HANDSHAKES`] live: one is about to (see [`Acceptor::hand_over`]),
/// within microseconds unless the machine is starved.
const HANDOVER_WAIT: Duration = Duration::from_millis(100);
/// A write to a client that makes no progress this long fails the client.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for connections to take their close frames.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// What every connection thread shares.
struct Shared {
    /// What a request must pass to become a WebSocket.
    handshake: Handshake,
    outbound_queue: usize,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// Every open client socket: how many, from where, what to cut.
    sockets: Sockets,
    /// Handshake threads alive: at most [`MAX_HANDSHAKES`].
    handshake_threads: AtomicUsize,
}

/// `bzpush serve`: the server fed by one Pulse consumer per feed, until
/// `shutdown`.
pub fn serve(config: &ServeConfig, listener: TcpListener, shutdown: &Shutdown) -> io::Result<()> {
    // What serve owes, by slot: each feed's queue (the broker's ready
    // messages, which the alarm watch reads), then the catch-up database's
    // changes no feed received.
    let mut owing: Vec<String> = (0..config.feeds.len())
        .map(|feed| format!("queue {:?}", ConsumerSetup::for_feed(config, feed).queue))
        .collect();
    let catchup_slot = config.catchup_database.as_ref().map(|_| owing.len());
    owing.extend(catchup_slot.map(|_| "catch-up database".to_string()));
    let freshness = Freshness::new(&owing, config.stale_after);
    let metrics = Arc::new(Metrics::new("broker", config.feeds.len(), freshness));
    let server = Server {
        config: &config.server,
        feeds: &config.feeds,
        catchup: config.catchup_database.as_ref(),
        catchup_slot,
        metrics,
    };
    server.run(listener, shutdown, |hub, metrics| {
        start_consumers(config, hub, metrics, shutdown)
    })
}

/// `bzpush run`: the server fed by the database poller in this process, on
/// one feed at `/`, until `shutdown`. Catch-up beyond the cache reads the
/// poller's database.
pub fn run(config: &RunConfig, listener: TcpListener, shutdown: &Shutdown) -> io::Result<()> {
    let metrics = poller_metrics("database", config.stale_after);
    let feeds = [Feed {
        path: "/".into(),
        exchange: "in-process".into(),
    }];
    let server = Server {
        config: &config.server,
        feeds: &feeds,
        catchup: Some(&config.poller.database),
        catchup_slot: None,
        metrics,
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

/// `bzpush poll`: the database poller publishing to the broker, without
/// a server, until `shutdown` or until the poller dies (which fails
/// `shutdown`: the caller reports it).
pub fn poll(config: &PollConfig, shutdown: &Shutdown) -> io::Result<()> {
    let sink = PulseSink::new(config.amqp.clone(), config.exchange.clone());
    let metrics = poller_metrics("database", config.stale_after);
    let poller = {
        let (poller_config, metrics, stop) = (
            config.poller.clone(),
            Arc::clone(&metrics),
            shutdown.clone(),
        );
        shutdown::spawn_essential(
            "poller".into(),
            thread::Builder::new(),
            shutdown,
            move || poller::run(&poller_config, sink, &metrics, &stop),
        )
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start the poller thread: {e}")))?
    };
    let watchdog = systemd::spawn_watchdog(shutdown, move |interval| alive(&metrics, interval))
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start the watchdog thread: {e}")))?;
    systemd::notify("READY=1");
    // Returns on shutdown, which also ends the watchdog, or when the
    // poller died, which fails the shutdown.
    shutdown::join(poller);
    systemd::notify("STOPPING=1");
    if let Some(watchdog) = watchdog {
        shutdown::join(watchdog);
    }
    Ok(())
}

/// `bzpush demo` in memory: the server of `run`, fed by the poller thread
/// `feed` starts (given the sink `run`'s poller gets) on a database `run`
/// cannot name, the simulated one, until `shutdown`. `upstream` names what
/// feeds it in `/health` and `/metrics`; `feed` reports that link's state
/// in `upstream_links[0]`.
pub fn run_fed(
    config: &ServerConfig,
    stale_after: Duration,
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
        catchup_slot: None,
        metrics: poller_metrics(upstream, stale_after),
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

/// Metrics for a process with a poller fed from `upstream`: the poller
/// owes changes downstream.
fn poller_metrics(upstream: &'static str, stale_after: Duration) -> Arc<Metrics> {
    let freshness = Freshness::new(&["poller".to_string()], stale_after);
    Arc::new(Metrics::new(upstream, 1, freshness))
}

/// The watchdog's check: no pipeline thread has been at one piece of work
/// for a whole watchdog `interval` (a thread waiting for work is fine).
fn alive(metrics: &Metrics, interval: Duration) -> bool {
    match metrics.tasks.stuck(interval) {
        None => true,
        Some((thread, busy)) => {
            error!(
                "the {thread} thread has been stuck in one piece of work for {} s",
                busy.as_secs()
            );
            false
        }
    }
}

/// What `serve` and `run` share: everything but where updates come from.
struct Server<'a> {
    config: &'a ServerConfig,
    feeds: &'a [Feed],
    catchup: Option<&'a DatabaseUrl>,
    /// Its slot in the freshness measure, if it measures one (serve).
    catchup_slot: Option<usize>,
    metrics: Arc<Metrics>,
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
        let max_connections = connection_limit(self.config);
        let metrics = self.metrics;
        let writers = Writers::start(shutdown)?;
        let (hub_tx, hub_rx) = crossbeam_channel::bounded(HUB_QUEUE);
        let (conn_tx, conn_rx) = crossbeam_channel::bounded(CONN_QUEUE);
        let (catchup_tx, catchup_thread) = match self.catchup {
            Some(url) => {
                let (jobs_tx, jobs_rx) = crossbeam_channel::bounded(catchup::database::JOB_QUEUE);
                let (url, hub) = (url.clone(), hub_tx.clone());
                let task = metrics.tasks.register("catchup");
                let owed = self.catchup_slot.map(|slot| catchup::database::Owed {
                    metrics: Arc::clone(&metrics),
                    slot,
                });
                let thread = shutdown::spawn_essential(
                    "catchup".into(),
                    thread::Builder::new(),
                    shutdown,
                    move || catchup::database::run(&url, jobs_rx, hub, &task, owed),
                )?;
                (Some(jobs_tx), Some(thread))
            }
            None => (None, None),
        };
        let hub = Hub::new(
            HubConfig {
                feeds: self.feeds.len(),
                max_subscriptions: self.config.max_subscriptions,
                budget: Budget::new(
                    self.config.max_subscriptions_total,
                    self.config.max_connections_per_address,
                    self.config.max_connections,
                ),
                outbound_queue: self.config.outbound_queue,
                catchup: CatchUp::new(self.feeds.len(), self.config.cache_size, catchup_tx),
            },
            Arc::clone(&metrics),
        );
        let hub_thread =
            shutdown::spawn_essential("hub".into(), thread::Builder::new(), shutdown, move || {
                hub.run(hub_rx, conn_rx)
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
            let metrics = Arc::clone(&metrics);
            move |interval| alive(&metrics, interval)
        })?;
        systemd::notify("READY=1");

        let shared = Arc::new(Shared {
            handshake: Handshake {
                feeds: self.feeds.to_vec(),
                allowed_origins: self.config.allowed_origins.clone(),
                refused_origins: origin::Refusals::default(),
                max_connections,
                proxies: self.config.trusted_proxies.clone(),
                metrics: Arc::clone(&metrics),
                page: http::Page {
                    bugzilla_url: self.config.bugzilla_url.clone(),
                    bugs: self.config.page_bugs.clone(),
                    note: self.config.page_note.clone(),
                },
            },
            outbound_queue: self.config.outbound_queue,
            limits: Limits {
                max_message_size: self.config.max_message_size,
                ping_interval: self.config.ping_interval,
                ping_timeout: self.config.ping_timeout,
            },
            metrics: Arc::clone(&metrics),
            sockets: Sockets::new(self.config.max_connections_per_address),
            handshake_threads: AtomicUsize::new(0),
        });
        let acceptor = Acceptor {
            shared: Arc::clone(&shared),
            hub: conn_tx,
            writers: &writers,
            next_id: 0,
            handshakes: crossbeam_channel::bounded(0),
        };
        // Every connection thread is a thread of this scope: leaving it
        // joins them all. Their work cannot panic out of them ([`contain`]).
        thread::scope(|scope| {
            acceptor.run(scope, &listener, shutdown);
            systemd::notify("STOPPING=1");
            let open = shared.sockets.len();
            let noun = if open == 1 {
                "connection"
            } else {
                "connections"
            };
            info!("stopping: closing {open} {noun}");
            // Also ends the catch-up worker, which holds a sender to the hub.
            let _ = hub_tx.send(Event::CloseAll);
            shared.sockets.drain(CLOSE_GRACE);
        });
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
    let consumers = (0..config.feeds.len()).map(|feed| {
        let setup = ConsumerSetup::for_feed(config, feed);
        let (nodes, hub, metrics, shutdown) = (
            config.amqp.clone(),
            hub.clone(),
            Arc::clone(metrics),
            shutdown.clone(),
        );
        shutdown::spawn_essential(
            format!("pulse-{feed}"),
            thread::Builder::new(),
            &shutdown.clone(),
            move || pulse::consume(&nodes, &setup, &hub, &metrics, &shutdown),
        )
    });
    // A consumer never publishes, so the broker never tells it of an
    // alarm: a thread of its own asks, for `/health`.
    let alarm = {
        let (nodes, metrics, stop) = (config.amqp.clone(), Arc::clone(metrics), shutdown.clone());
        let queues: Vec<String> = (0..config.feeds.len())
            .map(|feed| ConsumerSetup::for_feed(config, feed).queue)
            .collect();
        shutdown::spawn_essential(
            "broker-alarm".into(),
            thread::Builder::new(),
            shutdown,
            move || pulse::alarm::watch(nodes, &queues, &metrics, &stop),
        )
    };
    consumers.chain([alarm]).collect()
}

/// Blocks until shutdown, then connects to the listener once so that a
/// thread blocked in `accept` wakes up and sees it.
fn wake_on_shutdown(shutdown: &Shutdown, addr: SocketAddr) {
    while !shutdown.sleep(Duration::from_secs(3600)) {}
    let _ = TcpStream::connect(addr);
}

/// The most WebSockets to hold: `BZPUSH_MAX_CONNECTIONS`, or fewer if this
/// machine allows fewer ([`Capacity`]); says which, and how to allow more.
fn connection_limit(config: &ServerConfig) -> usize {
    let capacity = Capacity::measure();
    let allowed = capacity.connections();
    match capacity.shortfall(config.max_connections) {
        Some(why) => warn!("{why}; serving at most {allowed} connections until then"),
        None => info!(
            "this machine allows {}; serving at most {} (BZPUSH_MAX_CONNECTIONS)",
            capacity.describe(),
            config.max_connections
        ),
    }
    config.max_connections.min(allowed)
}

/// Accepts that failed (out of descriptors, usually): a few lines a minute.
static ACCEPT_FAILURES: Throttle = Throttle::new();
/// Threads that could not start: one line a minute, with the count.
static NO_THREAD: Throttle = Throttle::per_minute(1);
/// Connection threads whose work panicked: a few lines a minute.
static PANICS: Throttle = Throttle::new();

/// The accept loop and what it gives each connection.
///
/// Each handshake runs on a thread of its own, never on the accept loop's,
/// so that a slow client holds up no other. Starting a thread costs more
/// than a handshake does (its stack, its signal stack, and undoing both
/// when it ends), so a handshake thread that is done waits
/// [`HANDSHAKE_IDLE`] for the next socket before it ends; a new one starts
/// only when none is waiting, and never more than [`MAX_HANDSHAKES`]. The
/// WebSocket itself is always served on a fresh thread
/// ([`Accepted::start_websocket`]). A socket that a bound of [`Sockets`]
/// refuses, or that no thread can be started for, gets a refusal (429 or
/// 503) and is closed: it costs that client alone.
struct Acceptor<'a> {
    shared: Arc<Shared>,
    hub: ConnSender,
    writers: &'a Writers,
    next_id: ConnId,
    /// Rendezvous with a handshake thread waiting for a socket: a send
    /// succeeds only if one is waiting.
    handshakes: (Sender<Accepted>, Receiver<Accepted>),
}

impl<'scope> Acceptor<'_> {
    /// Accepts connections until `shutdown`, each on threads of `scope`,
    /// which joins them all when it ends. Waiting handshake threads end
    /// when this returns.
    fn run(
        mut self,
        scope: &'scope Scope<'scope, '_>,
        listener: &TcpListener,
        shutdown: &Shutdown,
    ) {
        let mut backoff = Duration::from_millis(10);
        for socket in listener.incoming() {
            if shutdown.requested() {
                break;
            }
            let socket = match socket {
                Ok(s) => s,
                Err(e) => {
                    if let Some(held) = ACCEPT_FAILURES.allow() {
                        // Usually out of file descriptors: wait for some to free.
                        warn!("accept failed: {e}; trying again{held}");
                    }
                    shutdown.sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            backoff = Duration::from_millis(10);
            self.start(scope, socket);
        }
    }

    /// Takes in `socket` if the bounds of [`Sockets`] let it, and hands it
    /// to a handshake thread ([`Acceptor::hand_over`]).
    fn start(&mut self, scope: &'scope Scope<'scope, '_>, socket: TcpStream) {
        let id = self.next_id;
        self.next_id += 1;
        // Gone before it was looked at, or unusable: nothing to answer.
        let Ok(peer) = socket.peer_addr() else { return };
        let peer = peer.ip().to_canonical();
        if socket.set_nodelay(true).is_err()
            || socket.set_read_timeout(Some(HEAD_TIMEOUT)).is_err()
            || socket.set_write_timeout(Some(WRITE_TIMEOUT)).is_err()
        {
            return;
        }
        let socket = Arc::new(socket);
        let proxied = self.shared.handshake.proxies.trusts(peer);
        let admitted = self
            .shared
            .sockets
            .admit(id, &socket, ClientAddress::of(peer), proxied);
        if let Err(refusal) = admitted {
            handshake::refuse(&socket, refusal);
            return;
        }
        let accepted = Accepted {
            id,
            peer,
            outbox: Outbox::new(
                Arc::clone(&socket),
                self.shared.outbound_queue,
                self.writers,
                Arc::clone(&self.shared.metrics),
            ),
            socket,
            shared: Arc::clone(&self.shared),
            hub: self.hub.clone(),
        };
        self.hand_over(scope, accepted);
    }

    /// Hands `accepted` to a handshake thread: a waiting one, a new one
    /// while fewer than [`MAX_HANDSHAKES`] live, or else the next that
    /// comes free ([`Sockets`] keeps as many sockets in their handshake,
    /// so one is about to); [`Handshake::answer`] answers the request.
    fn hand_over(&mut self, scope: &'scope Scope<'scope, '_>, accepted: Accepted) {
        let accepted = match self.handshakes.0.try_send(accepted) {
            Ok(()) => return,
            Err(TrySendError::Full(a) | TrySendError::Disconnected(a)) => a,
        };
        let threads = &self.shared.handshake_threads;
        if threads.fetch_add(1, Ordering::Relaxed) >= MAX_HANDSHAKES {
            threads.fetch_sub(1, Ordering::Relaxed);
            if let Err(SendTimeoutError::Timeout(a) | SendTimeoutError::Disconnected(a)) =
                self.handshakes.0.send_timeout(accepted, HANDOVER_WAIT)
            {
                a.refuse_busy();
            }
            return;
        }
        let (id, socket, shared) = (
            accepted.id,
            Arc::clone(&accepted.socket),
            Arc::clone(&accepted.shared),
        );
        let next = self.handshakes.1.clone();
        let thread = thread::Builder::new()
            .name("handshake".into())
            .stack_size(HANDSHAKE_STACK)
            .spawn_scoped(scope, move || {
                let shared = Arc::clone(&accepted.shared);
                handshakes(scope, accepted, &next);
                shared.handshake_threads.fetch_sub(1, Ordering::Relaxed);
            });
        if let Err(e) = thread {
            shared.handshake_threads.fetch_sub(1, Ordering::Relaxed);
            if let Some(held) = NO_THREAD.allow() {
                warn!("cannot start a handshake thread: {e}; its client got 503{held}");
            }
            handshake::refuse(&socket, Refusal::Busy);
            shared.sockets.remove(id);
        }
    }
}

/// A handshake thread: answers `first`, then each socket it is handed,
/// until none comes for [`HANDSHAKE_IDLE`] or the accept loop ends.
fn handshakes<'scope>(
    scope: &'scope Scope<'scope, '_>,
    first: Accepted,
    next: &Receiver<Accepted>,
) {
    let mut accepted = first;
    loop {
        let shared = &accepted.shared;
        match contain(accepted.id, || {
            let sockets = &shared.sockets;
            (shared.handshake).answer(accepted.id, &accepted.socket, accepted.peer, sockets)
        })
        .flatten()
        {
            Some(websocket) => accepted.start_websocket(scope, websocket),
            None => accepted.finish(),
        }
        accepted = match next.recv_timeout(HANDSHAKE_IDLE) {
            Ok(a) => a,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
        };
    }
}

/// Runs a connection thread's `work`. A panic (a bug that one client's
/// input reached) is logged and ends only this connection: `None`, and
/// the caller cleans up as after any other end, so that the socket is
/// closed and the connection forgotten rather than left hanging. What
/// runs outside `work` cannot panic, so the scope that joins connection
/// threads never finds one that did.
fn contain<T>(id: ConnId, work: impl FnOnce() -> T) -> Option<T> {
    panic::catch_unwind(AssertUnwindSafe(work))
        .map_err(|payload| {
            if let Some(held) = PANICS.allow() {
                warn!(
                    "connection {id}: its thread panicked: {}{held}",
                    shutdown::panic_message(payload.as_ref())
                );
            }
        })
        .ok()
}

/// A WebSocket's thread: serves it, then forgets it. What it is given
/// stays in its box: on this thread's stack it would be one more page for
/// the whole life of an idle connection.
fn serve_websocket(given: &mut (Accepted, Upgraded)) {
    let (accepted, websocket) = given;
    let id = accepted.id;
    let (socket, outbox) = (Arc::clone(&accepted.socket), Arc::clone(&accepted.outbox));
    let websocket = Upgraded {
        leftover: std::mem::take(&mut websocket.leftover),
        ..*websocket
    };
    let served = contain(id, || {
        connection::run(
            id,
            websocket,
            socket,
            outbox,
            &accepted.hub,
            accepted.shared.limits,
        )
    });
    if served.is_none() {
        // It may not have told the hub it left.
        let _ = accepted.hub.send(ConnEvent::Disconnect { conn: id });
    }
    accepted.left();
}

/// An accepted socket, as its threads (handshake, then WebSocket) hold it.
#[derive(Clone)]
struct Accepted {
    id: ConnId,
    /// The address it came from (a proxy's, if proxied).
    peer: IpAddr,
    socket: Arc<TcpStream>,
    outbox: Arc<Outbox>,
    shared: Arc<Shared>,
    hub: ConnSender,
}

impl Accepted {
    /// Serves `websocket` on a thread of its own, started afresh: the
    /// handshake's thread ends here, and its stack and malloc cache keep
    /// what the handshake touched, which would otherwise cost every idle
    /// connection some KiB for its whole life. A thread that cannot start
    /// costs its client a close (1013, try again later) right after its
    /// handshake; the budget ([`Capacity`], counted before the 101) keeps
    /// that rare.
    fn start_websocket<'scope>(self, scope: &'scope Scope<'scope, '_>, websocket: Upgraded) {
        self.shared.sockets.upgraded(self.id);
        // Boxed: std's thread start moves what the thread is given through
        // three frames, and every idle connection's thread keeps them on
        // its stack (a page more by value: 4 KiB a connection, measured).
        let given = Box::new((self.clone(), websocket));
        let spawned = thread::Builder::new()
            .name(format!("conn-{}", self.id))
            .stack_size(CONNECTION_STACK)
            .spawn_scoped(scope, move || {
                let mut given = given;
                serve_websocket(&mut given);
            });
        if let Err(e) = spawned {
            if let Some(held) = NO_THREAD.allow() {
                warn!(
                    "cannot start a connection thread: {e}; its client was closed with 1013 \
                     (try again later){held}"
                );
            }
            // The writers put the close frame out, then shut the socket.
            self.outbox.close(CloseCode::Again, "try again later");
            self.left();
        }
    }

    /// No handshake thread came free in time: 503, and the socket goes.
    fn refuse_busy(self) {
        handshake::refuse(&self.socket, Refusal::Busy);
        self.finish();
    }

    /// The WebSocket is over: it no longer counts, and its socket goes.
    fn left(&self) {
        self.shared
            .metrics
            .connections
            .fetch_sub(1, Ordering::Relaxed);
        self.finish();
    }

    /// The connection's last thread ends: forget the socket, shut it.
    fn finish(&self) {
        let socket = self.shared.sockets.remove(self.id);
        // A closing outbox shuts the socket itself once its close frame is
        // out: shutting it here could cut that frame off.
        if let Some(s) = socket
            && !self.outbox.is_closing()
        {
            let _ = s.shutdown(SocketShutdown::Both);
        }
    }
}
