//! The integration tests: one binary, as each test module would otherwise
//! link its own copy of bzpush's library and the harness. A module per
//! area; `util` is the one harness (real MariaDB, real RabbitMQ, the real
//! `bzpush` binary). Run one area with a filter, e.g.
//! `cargo test --test integration serve::`.

mod util;

mod broker_faults;
mod chaos;
mod cluster;
mod cluster_chaos;
mod demo;
mod docs;
mod front_door;
mod hostile;
mod install;
mod lock_waits;
mod machine_limits;
mod messages;
mod metrics;
mod outcome;
mod package;
mod poll;
mod poller_role;
mod replica;
mod run;
mod serve;
mod serve_limits;
mod settings;
mod silent_stops;
mod systemd;
