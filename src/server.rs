//! `bzpush poll`, `serve` and `run`: where every thread of the pipeline
//! starts and is joined.
//!
//! `poll` is the poller alone. `serve` and `run` are a WebSocket server:
//! this file owns its listening socket and accept loop (the handshake is
//! [`crate::handshake`]'s), and starting
//! and joining every other thread: the hub, the writer pool, what feeds the
//! hub (one broker consumer per feed for `serve`, the poller for `run`),
//! the catch-up worker, and the connections' threads (handshake, then
//! WebSocket), all in one scope. Shutdown stops
//! accepting, closes every connection with 1001, joins every thread.
//! Nothing here touches a subscription: that is the hub's.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown as SocketShutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle, Scope};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use log::{error, info, warn};

use crate::catchup::{self, CatchUp};
use crate::config::{DatabaseUrl, Feed, PollConfig, RunConfig, ServeConfig, ServerConfig};
use crate::connection::{self, Limits};
use crate::freshness::Freshness;
use crate::handshake::{HEAD_TIMEOUT, Handshake, Upgraded};
use crate::http;
use crate::hub::{ConnId, Event, HUB_QUEUE, Hub, HubConfig, HubSender, HubSink};
use crate::metrics::Metrics;
use crate::origin;
use crate::outbox::{Outbox, Writers};
use crate::poller;
use crate::pulse::{self, ConsumerSetup, PulseSink};
use crate::shutdown::{self, Shutdown};
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
/// Sockets may wait in the handshake beyond the connection limit by this
/// many before new ones are refused at once.
const HANDSHAKE_SLACK: usize = 256;
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
    /// Every live connection's socket: how many, and what to cut.
    sockets: Sockets,
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
        let metrics = self.metrics;
        let writers = Writers::start(shutdown)?;
        let (hub_tx, hub_rx) = crossbeam_channel::bounded(HUB_QUEUE);
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
                outbound_queue: self.config.outbound_queue,
                catchup: CatchUp::new(self.feeds.len(), self.config.cache_size, catchup_tx),
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
            let metrics = Arc::clone(&metrics);
            move |interval| alive(&metrics, interval)
        })?;
        systemd::notify("READY=1");

        let shared = Arc::new(Shared {
            handshake: Handshake {
                feeds: self.feeds.to_vec(),
                allowed_origins: self.config.allowed_origins.clone(),
                refused_origins: origin::Refusals::default(),
                max_connections: self.config.max_connections,
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
            sockets: Sockets::default(),
        });
        let acceptor = Acceptor {
            shared: Arc::clone(&shared),
            hub: hub_tx.clone(),
            writers: &writers,
            next_id: 0,
            handshakes: crossbeam_channel::bounded(0),
        };
        // Every connection thread is a thread of this scope: leaving it
        // joins them all. Their work cannot panic out of them ([`contain`]).
        thread::scope(|scope| {
            acceptor.run(scope, &listener, shutdown);
            systemd::notify("STOPPING=1");
            let open = shared.sockets.lock().len();
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

/// The sockets of live connections, to count them and to cut them at
/// shutdown. A connection has one descriptor, shared by this map, its
/// thread and its outbox.
#[derive(Default)]
struct Sockets {
    live: Mutex<HashMap<ConnId, Arc<TcpStream>>>,
    /// Signalled when a connection leaves the map, for shutdown's wait.
    left: Condvar,
}

impl Sockets {
    fn lock(&self) -> MutexGuard<'_, HashMap<ConnId, Arc<TcpStream>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remove(&self, id: ConnId) -> Option<Arc<TcpStream>> {
        let socket = self.lock().remove(&id);
        self.left.notify_all();
        socket
    }

    /// Waits until every connection is gone or `grace` passed, then cuts
    /// the sockets of those still there: their threads then end soon.
    fn drain(&self, grace: Duration) {
        let live = self.lock();
        let (live, _) = self
            .left
            .wait_timeout_while(live, grace, |live| !live.is_empty())
            .unwrap_or_else(|e| e.into_inner());
        for socket in live.values() {
            let _ = socket.shutdown(SocketShutdown::Both);
        }
    }
}

/// The accept loop and what it gives each connection.
///
/// Each handshake runs on a thread of its own, never on the accept loop's,
/// so that a slow client holds up no other. Starting a thread costs more
/// than a handshake does (its stack, its signal stack, and undoing both
/// when it ends), so a handshake thread that is done waits
/// [`HANDSHAKE_IDLE`] for the next socket before it ends; a new one starts
/// only when none is waiting. The WebSocket itself is always served on a
/// fresh thread ([`Accepted::start_websocket`]).
struct Acceptor<'a> {
    shared: Arc<Shared>,
    hub: HubSender,
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
                    // Usually out of file descriptors: wait for some to free.
                    warn!("accept failed: {e}");
                    shutdown.sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            backoff = Duration::from_millis(10);
            if let Err(e) = self.start(scope, socket) {
                warn!("cannot start a connection thread: {e}");
            }
        }
    }

    /// Hands `socket` to a handshake thread, a waiting one or a new one,
    /// which hands a WebSocket on to a thread of its own
    /// ([`Accepted::start_websocket`]); [`Handshake::answer`] answers the
    /// request.
    fn start(&mut self, scope: &'scope Scope<'scope, '_>, socket: TcpStream) -> io::Result<()> {
        let id = self.next_id;
        self.next_id += 1;
        if self.shared.sockets.lock().len()
            >= self.shared.handshake.max_connections + HANDSHAKE_SLACK
        {
            let _ = socket.set_write_timeout(Some(Duration::from_secs(1)));
            return http::respond_text(&socket, "503 Service Unavailable", "too many connections");
        }
        socket.set_nodelay(true)?;
        socket.set_read_timeout(Some(HEAD_TIMEOUT))?;
        socket.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let socket = Arc::new(socket);
        self.shared.sockets.lock().insert(id, Arc::clone(&socket));
        let accepted = Accepted {
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
        };
        let accepted = match self.handshakes.0.try_send(accepted) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(a) | TrySendError::Disconnected(a)) => a,
        };
        let next = self.handshakes.1.clone();
        let thread = thread::Builder::new()
            .name("handshake".into())
            .stack_size(HANDSHAKE_STACK)
            .spawn_scoped(scope, move || handshakes(scope, accepted, &next));
        if let Err(e) = thread {
            self.shared.sockets.remove(id);
            return Err(e);
        }
        Ok(())
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
        match contain(accepted.id, || {
            accepted
                .shared
                .handshake
                .answer(accepted.id, &accepted.socket)
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
            warn!(
                "connection {id}: its thread panicked: {}",
                shutdown::panic_message(payload.as_ref())
            );
        })
        .ok()
}

/// An accepted socket, as its threads (handshake, then WebSocket) hold it.
#[derive(Clone)]
struct Accepted {
    id: ConnId,
    socket: Arc<TcpStream>,
    outbox: Arc<Outbox>,
    shared: Arc<Shared>,
    hub: HubSender,
}

impl Accepted {
    /// Serves `websocket` on a thread of its own, started afresh: the
    /// handshake's thread ends here, and its stack and malloc cache keep
    /// what the handshake touched, which would otherwise cost every idle
    /// connection some KiB for its whole life.
    fn start_websocket<'scope>(self, scope: &'scope Scope<'scope, '_>, websocket: Upgraded) {
        let (id, accepted) = (self.id, self.clone());
        let spawned = thread::Builder::new()
            .name(format!("conn-{id}"))
            .stack_size(CONNECTION_STACK)
            .spawn_scoped(scope, move || {
                let (socket, outbox) = (Arc::clone(&accepted.socket), Arc::clone(&accepted.outbox));
                let served = contain(id, || {
                    connection::run(
                        id,
                        websocket.feed,
                        socket,
                        websocket.leftover,
                        outbox,
                        &accepted.hub,
                        accepted.shared.limits,
                    )
                });
                if served.is_none() {
                    // It may not have told the hub it left.
                    let _ = accepted.hub.send(Event::Disconnect { conn: id });
                }
                accepted.left();
            });
        if let Err(e) = spawned {
            warn!("cannot start a connection thread: {e}");
            self.left();
        }
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
