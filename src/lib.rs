//! bzpush: Bugzilla push notifications.
//!
//! When a bug changes, every client subscribed to it learns that bug N
//! changed at time T, and asks Bugzilla's REST API for the rest. Only the bug
//! id and the change time ever leave the database.
//!
//! # Layout
//!
//! The pipeline, in the order a change travels, one line per module:
//!
//! - [`poller`]: reads changes from Bugzilla's database (`push_notify` or
//!   `bugs`), holds the one-active-poller lock, forgets a change only once
//!   the broker confirmed it.
//! - [`pulse`]: the Pulse (AMQP) wire format; [`pulse::publisher`], the
//!   confirmed publisher; [`pulse::consumer`], the consumer that feeds the
//!   hub (ack after hand-off); [`pulse::nodes`], the nodes of a RabbitMQ
//!   cluster and moving between them; [`pulse::alarm`], a broker that
//!   blocks publishers.
//! - [`hub`]: the subscription index and budget, commands, and fan-out of
//!   pre-encoded frames, fair to every client; it owns the catch-up room
//!   and routes its events.
//! - [`catchup`]: the room that answers `since`: each feed's cache and the
//!   proof of what it holds, what waits for a catch-up, the database worker.
//! - [`outbox`]: each connection's bounded send queue and the writer pool
//!   that drains them; slow clients are closed, never waited for.
//! - [`handshake`]: what a request must pass to become a WebSocket (head,
//!   method, feed path, origin, connection limit); plain HTTP requests.
//! - [`sockets`]: every open client socket: the per-address limit, and the
//!   silent ones that give way when too many are in their handshake.
//! - [`connection`]: one thread per WebSocket client: read, keepalive; the
//!   hub parses what it reads.
//! - [`protocol`]: the client protocol (bugzfeed's wire format): frames in,
//!   commands out, and the JSON of every reply and update; no I/O.
//! - [`http`]: `/health`, `/metrics`, the live page, request heads.
//! - [`server`]: `bzpush poll`, `serve` and `run`: the accept loop, and
//!   starting and joining every thread.
//! - [`capacity`]: the connections this machine allows (threads, memory
//!   mappings, files, task limits), worked out before serving.
//! - [`demo`]: `bzpush demo`: `run` fed by a simulated Bugzilla, in memory
//!   or in a scratch database it creates and drops.
//!
//! # Threads
//!
//! Every thread is started from [`server`] and joined there: the pipeline's
//! threads (poller, broker consumers and alarm watch, hub, writers,
//! catch-up worker) through [`shutdown::spawn_essential`], so that one
//! that dies stops the process;
//! the watchdog ([`systemd`]); and the connections' threads, in one
//! `std::thread::scope` around the accept loop: handshake threads (at most
//! [`sockets::MAX_HANDSHAKES`]), each answering one request at a time and
//! kept a while for the next, which hand each WebSocket on to a fresh
//! thread of its own (no more than [`capacity`] allows). A thread that
//! cannot start costs its client a refusal, never the process. Two exceptions,
//! each with its own start and join: the signal watcher ([`signals`],
//! started by `main`), and `demo`'s simulated Bugzilla ([`demo`]).
//!
//! Around it:
//!
//! - [`notification`]: [`notification::Notification`], the `(bug, when)`
//!   pair every stage passes on.
//! - [`address`]: client addresses, and the trusted reverse proxies whose
//!   `X-Forwarded-For` names the client.
//! - [`config`]: the settings table, each row naming the modes that read
//!   it; flags, environment and env files in, one [`config::Mode`]'s checked
//!   configuration out. A room per job: the table, gathering the values,
//!   the `EnvironmentFile=` syntax, URLs and redaction, validators, a
//!   resolver per mode, help.
//! - [`database`]: connections to Bugzilla's database, and its values read
//!   without panics.
//! - [`check`]: `bzpush check`: each setting and dependency, one line each.
//! - [`logging`]: log lines on stderr, with journal priorities when stderr
//!   is the journal.
//! - [`manual`]: the man page, written from the settings table.
//! - [`metrics`]: counters shared by every thread.
//! - [`origin`]: allowed origins as browsers send them, and logging refusals.
//! - [`retry`]: backoff, and logging a dependency's state once per change.
//! - [`shutdown`]: one trigger that stops every loop at once; a pipeline
//!   thread that dies makes it fatal (exit status 1).
//! - [`signals`]: SIGTERM/SIGINT to the shutdown trigger.
//! - [`systemd`]: readiness and watchdog notifications.
#![forbid(unsafe_code)]
// bzpush is a program: its documentation is for the maintainers, who read
// the private items too (`cargo doc` documents them, .cargo/config.toml).
#![allow(rustdoc::private_intra_doc_links)]

pub(crate) mod address;
pub(crate) mod capacity;
pub mod catchup;
pub mod check;
pub mod config;
pub(crate) mod connection;
pub mod database;
pub mod demo;
pub(crate) mod freshness;
pub(crate) mod handshake;
pub(crate) mod http;
pub(crate) mod hub;
pub mod logging;
pub mod manual;
pub(crate) mod metrics;
pub mod notification;
pub(crate) mod origin;
pub(crate) mod outbox;
pub mod poller;
pub mod protocol;
pub mod pulse;
pub(crate) mod retry;
pub mod server;
pub mod shutdown;
pub mod signals;
pub(crate) mod sockets;
pub(crate) mod systemd;
