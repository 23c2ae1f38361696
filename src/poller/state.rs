//! What the poller is doing, as one value: connecting, down, refused,
//! standby, active, or waiting for a broker. The poll loop changes it only
//! through [`Reporter`], which logs a change once (an outage is one line
//! when it starts and one when it ends, however many retries lie between),
//! tells systemd in `STATUS=`, and keeps it in [`Metrics`] for `/health`
//! and `/metrics`.
//! Nothing here talks to the database or decides what the poller does
//! next.

use std::fmt;
use std::time::Duration;

use log::{info, warn};

use crate::database;
use crate::metrics::{Metrics, POLLER};
use crate::retry::Link;
use crate::systemd;

/// What the poller is doing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum State {
    /// Connecting to the database: at start, or again after the
    /// connection dropped.
    #[default]
    Connecting,
    /// The database does not answer (why, as a sentence); retried with
    /// capped backoff.
    Down(String),
    /// The database answers but refuses what the poller asks (a missing
    /// table or privilege): `reason` says what and the fix; retried every
    /// [`crate::retry::REFUSED_RETRY`]. A refusal met while polling
    /// (`at_work`) stands while the poller reconnects and waits for the
    /// lock (`role`): only a whole poll shows it is over.
    Refused {
        reason: String,
        at_work: bool,
        role: Option<Role>,
    },
    /// Connected; another connection holds the lock.
    Standby(LockHolder),
    /// Holding the lock and polling.
    Active,
    /// Holding the lock and polling, but another database session holds
    /// a lock that a statement needed (what, as a sentence): everything
    /// else flows, and that statement is tried again at the next poll.
    LockWait(String),
    /// No broker node answered for longer than the grace: the poller let
    /// go of the lock (or stopped competing for it) and waits for a node
    /// to answer before it competes again.
    BrokerLost,
}

/// Whether the poller holds the lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Holds the lock and polls.
    Active,
    /// Waits for the lock, which this connection holds.
    Standby(LockHolder),
}

/// The database connection holding the poller lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockHolder {
    pub connection: u64,
    /// Where it connects from, as the server sees it (`host:port`); `None`
    /// when this user may not see it (no PROCESS privilege).
    pub host: Option<String>,
}

impl fmt::Display for LockHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "database connection {} from {}",
            self.connection,
            self.host.as_deref().unwrap_or("an unknown host")
        )
    }
}

impl State {
    /// Whether the poller holds the lock, waits for it, or neither.
    pub fn role(&self) -> Option<Role> {
        match self {
            State::Active | State::LockWait(_) => Some(Role::Active),
            State::Standby(holder) => Some(Role::Standby(holder.clone())),
            State::Refused { role, .. } => role.clone(),
            State::Connecting | State::Down(_) | State::BrokerLost => None,
        }
    }

    /// Why a poller in this state may hand nothing on, for `/health`
    /// when changes wait too long; `None` while it polls.
    pub fn why_behind(&self) -> Option<String> {
        Some(match self {
            State::Active => return None,
            State::Connecting => "it is connecting to the database".to_string(),
            State::Down(why) => format!("the database is down ({why})"),
            State::Refused { reason, .. } => format!("the database refuses it: {reason}"),
            State::Standby(holder) => format!(
                "it is a standby: the active poller ({holder}) hands changes to its own clients, \
                 not this process's"
            ),
            State::LockWait(what) => format!("lock wait: {what}"),
            State::BrokerLost => {
                "no broker node answers: it let go of the lock until one does".to_string()
            }
        })
    }

    /// Why the database refuses the poller, if it does.
    pub fn refused(&self) -> Option<&str> {
        match self {
            State::Refused { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

/// Changes the poller's [`State`] and says so: the log (a role or a
/// database link that changed), systemd's `STATUS=`, and [`Metrics`].
pub struct Reporter<'a> {
    lock_name: &'a str,
    metrics: &'a Metrics,
    /// The database's state as last logged.
    database: Link<'a>,
    /// The role last logged: a reconnect that takes the same role again
    /// says nothing.
    logged_role: Option<Role>,
}

impl<'a> Reporter<'a> {
    /// A reporter for the poller of lock `lock_name` on `database`
    /// (a description without a password).
    pub fn new(lock_name: &'a str, database: String, metrics: &'a Metrics) -> Reporter<'a> {
        let mut link = Link::new("database", database);
        if let Some(flag) = metrics.upstream_links.first() {
            link = link.reporting(flag);
        }
        Reporter {
            lock_name,
            metrics,
            database: link,
            logged_role: None,
        }
    }

    /// The state in force.
    pub fn state(&self) -> State {
        self.metrics.poller().clone()
    }

    /// The database does not answer.
    pub fn down(&mut self, error: &mysql::Error) {
        if self.state().refused().is_some() {
            // The last STATUS= was the refusal.
            systemd::notify("STATUS=database down; retrying with backoff");
        }
        self.database.down(&database::Sentence(error));
        self.set(State::Down(database::sentence(error)));
    }

    /// The database refuses the poller for `reason` (which says the fix),
    /// met while polling (`at_work`) or while connecting; the connection
    /// is gone.
    pub fn refused(&mut self, reason: &str, at_work: bool) {
        if self.database.refused(reason) {
            systemd::notify(&format!("STATUS=database refused: {reason}"));
        }
        self.set(State::Refused {
            reason: reason.to_string(),
            at_work,
            role: None,
        });
    }

    /// The lock attempt found `role`. A refusal met while polling stands
    /// (waiting for the lock proves nothing about it); otherwise the
    /// database answers, and is up.
    pub fn lock_attempt(&mut self, role: Role) {
        match (self.state(), role) {
            (
                State::Refused {
                    reason,
                    at_work: true,
                    ..
                },
                role,
            ) => self.set(State::Refused {
                reason,
                at_work: true,
                role: Some(role),
            }),
            // For an active poller, only a whole poll shows the database
            // works ([`Reporter::polled`]).
            (_, Role::Active) => self.set(State::Active),
            (_, Role::Standby(holder)) => {
                self.database.up();
                self.set(State::Standby(holder));
            }
        }
    }

    /// A whole poll worked, its confirm included: the database is up, and
    /// whatever refusal or lock wait stood is over.
    pub fn polled(&mut self) {
        self.database.up();
        match self.state() {
            State::Active => {}
            State::LockWait(_) => {
                info!("database: the lock wait is over");
                self.set(State::Active);
            }
            _ => self.set(State::Active),
        }
    }

    /// A poll met another session's lock (`what`): said when a lock wait
    /// starts, not at each poll while it lasts.
    pub fn lock_wait(&mut self, what: String) {
        self.database.up();
        if !matches!(self.state(), State::LockWait(_)) {
            warn!("database: lock wait: {what}");
            systemd::notify(&format!("STATUS=active, lock wait: {what}"));
        }
        self.set(State::LockWait(what));
    }

    /// No broker node answered for `after`, past the grace: the poller
    /// lets go of the lock, or stops competing for it, until one answers.
    /// One line for the whole outage.
    pub fn broker_lost(&mut self, after: Duration) {
        let name = self.lock_name;
        let line = match self.state().role() {
            Some(Role::Active) => format!(
                "no broker node answered for {} s: letting go of database lock {name:?} so that \
                 a poller that reaches one takes over; competing for it again once a node answers",
                after.as_secs()
            ),
            _ => format!(
                "no broker node answered for {} s: not competing for database lock {name:?} \
                 until one answers",
                after.as_secs()
            ),
        };
        warn!("{line}");
        systemd::notify(&format!("STATUS={line}"));
        // Whatever role comes next is news, even the one held before.
        self.logged_role = None;
        self.set(State::BrokerLost);
    }

    /// A broker node answers again after [`Reporter::broker_lost`]: the
    /// poller competes for the lock again.
    pub fn broker_back(&mut self) {
        info!(
            "a broker node answers again: competing for database lock {:?}",
            self.lock_name
        );
        self.set(State::Connecting);
    }

    fn set(&mut self, state: State) {
        let role = state.role();
        let was_refused = self.metrics.poller().refused().is_some();
        self.metrics.freshness.explain(POLLER, state.why_behind());
        *self.metrics.poller() = state.clone();
        match role {
            Some(role) if self.logged_role.as_ref() != Some(&role) => {
                let line = self.role_line(&role);
                info!("{line}");
                systemd::notify(&format!("STATUS={line}"));
                self.logged_role = Some(role);
            }
            Some(role) if was_refused && state.refused().is_none() => {
                // The last STATUS= was the refusal.
                systemd::notify(&format!("STATUS={}", self.role_line(&role)));
            }
            _ => {}
        }
    }

    fn role_line(&self, role: &Role) -> String {
        let name = self.lock_name;
        match role {
            Role::Standby(holder) => {
                format!("standby: database lock {name:?} is held by {holder}; waiting to take over")
            }
            Role::Active => format!("active: holding database lock {name:?}"),
        }
    }
}
