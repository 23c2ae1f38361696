//! `bzpush poll`, `serve` and `run`: where every thread of the pipeline
//! starts and is joined.
//!
//! `poll` is the poller alone. `serve` and `run` are a WebSocket server:
//! this folder owns its listening socket and accept loop (`accept.rs`; the
//! handshake is [`crate::handshake`]'s), and starting
//! and joining every other thread: the hub, the writer pool, what feeds the
//! hub (one broker consumer per feed for `serve`, the poller for `run`),
//! the catch-up worker, and the connections' threads (handshake, then
//! WebSocket), all in one scope, never more of them than the machine
//! allows ([`Capacity`], [`Sockets`]): a thread that cannot start costs
//! its client a refusal, never the process. Shutdown stops
//! accepting, closes every connection with 1001, joins every thread.
//! Nothing here touches a subscription: that is the hub's.

mod accept;

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{error, info, warn};

use crate::capacity::{self, Capacity};
use crate::catchup::{self, CatchUp};
use crate::config::{DatabaseUrl, Feed, PollConfig, RunConfig, ServeConfig, ServerConfig};
use crate::connection::Limits;
use crate::freshness::Freshness;
use crate::handshake::Handshake;
use crate::http;
use crate::hub::{Budget, CONN_QUEUE, Event, HUB_QUEUE, Hub, HubConfig, HubSender, HubSink};
use crate::metrics::Metrics;
use crate::origin;
use crate::outbox::Writers;
use crate::poller;
use crate::pulse::{self, ConsumerSetup, PulseSink};
use crate::shutdown::{self, Shutdown};
use crate::sockets::Sockets;
use crate::systemd;
use accept::{Acceptor, Shared};

/// How long shutdown waits for connections to take their close frames.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

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
    let stale_log = spawn_stale_log(&metrics, shutdown)?;
    let watchdog = systemd::spawn_watchdog(shutdown, move |interval| alive(&metrics, interval))
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start the watchdog thread: {e}")))?;
    systemd::notify("READY=1");
    // Returns on shutdown, which also ends the watchdog, or when the
    // poller died, which fails the shutdown.
    shutdown::join(poller);
    systemd::notify("STOPPING=1");
    shutdown::join(stale_log);
    if let Some(watchdog) = watchdog {
        shutdown::join(watchdog);
    }
    Ok(())
}

/// `poll` serves no `/health`: its operator learns from the log when a
/// change has waited past `BZPUSH_STALE_AFTER` (and why), and when it is
/// over. Checks once a second until `shutdown`.
fn spawn_stale_log(metrics: &Arc<Metrics>, shutdown: &Shutdown) -> io::Result<JoinHandle<()>> {
    let (metrics, shutdown) = (Arc::clone(metrics), shutdown.clone());
    thread::Builder::new()
        .name("stale-log".into())
        .spawn(move || {
            let mut was_stale = false;
            while !shutdown.sleep(Duration::from_secs(1)) {
                let stale = metrics.stale(metrics.freshness.lag().as_ref());
                match (&stale, was_stale) {
                    (Some(why), false) => warn!("stale: {why}"),
                    (None, true) => info!("no longer stale: every change owed is handed on"),
                    _ => {}
                }
                was_stale = stale.is_some();
            }
        })
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start the stale-log thread: {e}")))
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
        let max_connections = connection_limit(self.config, &metrics);
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
        let acceptor = Acceptor::new(Arc::clone(&shared), conn_tx, &writers);
        // Every connection thread is a thread of this scope: leaving it
        // joins them all. Their work cannot panic out of them.
        thread::scope(|scope| {
            acceptor.run(scope, &listener, shutdown);
            systemd::notify("STOPPING=1");
            info!(
                "stopping: closing {}",
                capacity::n_connections(shared.sockets.len())
            );
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
/// None at all is unhealthy: `/health` says so.
fn connection_limit(config: &ServerConfig, metrics: &Metrics) -> usize {
    let capacity = Capacity::measure();
    let allowed = capacity.connections();
    match capacity.shortfall(config.max_connections) {
        Some(why) if allowed == 0 => {
            error!("{why}; serving no connection until then (/health answers 503)");
            let _ = metrics.no_room.set(format!(
                "this machine allows no WebSocket connection: {}",
                capacity.describe()
            ));
        }
        Some(why) => warn!(
            "{why}; serving at most {} until then",
            capacity::n_connections(allowed)
        ),
        None => info!(
            "this machine allows {}; serving at most {} (BZPUSH_MAX_CONNECTIONS)",
            capacity.describe(),
            config.max_connections
        ),
    }
    config.max_connections.min(allowed)
}
