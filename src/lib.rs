//! bzpush: Bugzilla push notifications.
//!
//! When a bug changes, every client subscribed to it learns that bug N
//! changed at time T, and asks Bugzilla's REST API for the rest. Only the bug
//! id and the change time ever leave the database.
//!
//! # Layout
//!
//! The pipeline, one line per module:
//!
//! - [`poller`]: reads changes from Bugzilla's database (`push_notify` or
//!   `bugs`), holds the one-active-poller lock, forgets a change only once
//!   the broker confirmed it.
//! - [`pulse`]: the Pulse (AMQP) wire format and the confirmed publisher.
//! - [`protocol`]: the client protocol (bugzfeed's wire format): frames in,
//!   commands out, and the JSON of every reply and update; no I/O.
//! - [`notification`]: [`notification::Notification`], the `(bug, when)`
//!   pair every stage passes on.
//! - [`config`]: the settings table; environment and flags in, a checked
//!   configuration out.
//! - [`shutdown`]: one trigger that stops every loop at once.
//! - [`signals`]: SIGTERM/SIGINT to the shutdown trigger.
#![forbid(unsafe_code)]

pub mod config;
pub mod notification;
pub mod poller;
pub mod protocol;
pub mod pulse;
pub mod shutdown;
pub mod signals;
