//! What bzpush says: help that works in a broken environment, settings
//! refused with their ranges and the nearest name, and errors that read as
//! sentences with the right advice, never as Rust types
//! (`MySqlError { … }`, `DriverError { … }`, `Closed`).

use std::time::Duration;

use crate::util::run::{TestUser, closed_port};
use crate::util::{AMQP_ADDR, Bzpush, Finished, TestDb, amqp_url_at};

const TIMEOUT: Duration = Duration::from_secs(30);

fn bzpush(args: &[&str], env: &[(&str, String)]) -> Finished {
    let finished = Bzpush::run(args, env, TIMEOUT);
    eprintln!("bzpush {args:?}:\n{}{}", finished.stdout, finished.stderr);
    finished
}

/// No Rust type names or `Debug` braces in what a person reads.
fn assert_sentences(text: &str) {
    for wrapper in [
        "MySqlError",
        "DriverError",
        "IoError",
        "CodecError",
        "{",
        "invalid connection state",
        "AMQP soft error",
    ] {
        assert!(!text.contains(wrapper), "{wrapper:?} in:\n{text}");
    }
}

#[test]
fn help_works_with_a_bad_environment_and_lists_only_the_mode_settings() {
    let bad = [
        ("BZPUSH_POLL_INTERVL", "1s".to_string()),
        ("BZPUSH_PING_TIMEOUT", "1ms".to_string()),
    ];
    let help = bzpush(&["run", "--help"], &bad);
    assert_eq!(help.status.code(), Some(0), "{}", help.stderr);
    assert!(
        help.stdout.contains("BZPUSH_POLL_INTERVAL"),
        "{}",
        help.stdout
    );
    assert!(help.stdout.contains("(a duration from 10ms to 1h)"));
    assert!(!help.stdout.contains("BZPUSH_AMQP_URL"), "{}", help.stdout);
    let help = bzpush(&["check", "serve", "-h"], &bad);
    assert_eq!(help.status.code(), Some(0), "{}", help.stderr);
    assert!(
        !help.stdout.contains("BZPUSH_POLL_INTERVAL"),
        "{}",
        help.stdout
    );
}

#[test]
fn bad_settings_exit_2_naming_the_range_or_the_nearest_name() {
    for (env, needle) in [
        (
            ("BZPUSH_PING_TIMEOUT", "1ms"),
            "expected a duration from 1s to 1h",
        ),
        (
            ("BZPUSH_POLL_INTERVAL", "999999h"),
            "expected a duration from 10ms to 1h",
        ),
        (
            ("BZPUSH_MAX_CONNECTIONS", "0"),
            "expected a number of connections from 1 to 1000000",
        ),
        (
            ("BZPUSH_POLL_INTERVL", "1s"),
            "did you mean BZPUSH_POLL_INTERVAL?",
        ),
    ] {
        let finished = bzpush(&["check", "run"], &[(env.0, env.1.to_string())]);
        assert_eq!(finished.status.code(), Some(2), "{env:?}");
        assert!(
            finished.stderr.contains(needle),
            "{env:?}: {}",
            finished.stderr
        );
    }
}

#[test]
fn database_errors_read_as_sentences_with_the_right_advice() {
    let db = TestDb::new();
    // Nothing listens: the driver's error.
    let addr = closed_port();
    let finished = bzpush(
        &["check", "run"],
        &[("BZPUSH_DATABASE_URL", db.url_at(&addr))],
    );
    assert_eq!(finished.status.code(), Some(1));
    assert!(
        finished.stdout.contains("cannot connect to"),
        "{}",
        finished.stdout
    );
    assert!(finished.stdout.contains("is the server running"));
    assert_sentences(&finished.stdout);

    // A user without access to the database: error 1044. The server
    // answered, so asking whether it runs would mislead.
    let user = TestUser::new(&[]);
    let finished = bzpush(&["check", "run"], &[("BZPUSH_DATABASE_URL", user.url(&db))]);
    assert_eq!(finished.status.code(), Some(1));
    let line = finished
        .stdout
        .lines()
        .find(|l| l.contains("MySQL error 1044"))
        .unwrap_or_else(|| panic!("no error 1044 in:\n{}", finished.stdout));
    assert!(!line.contains("is the server running"), "{line}");
    assert!(line.contains("GRANT"), "{line}");
    assert!(
        !finished.stdout.contains(&user.password),
        "{}",
        finished.stdout
    );
    assert_sentences(&finished.stdout);

    // The running poller logs the outage as a sentence too.
    let mut run = Bzpush::start(
        &["run"],
        &[
            ("BZPUSH_DATABASE_URL", db.url_at(&addr)),
            ("BZPUSH_LISTEN", "127.0.0.1:0".to_string()),
        ],
    );
    assert!(
        run.wait_for_log("retrying with backoff", TIMEOUT),
        "no outage line:\n{}",
        run.log()
    );
    let log = run.log();
    assert!(log.contains("cannot connect to"), "{log}");
    assert_sentences(&log);
    run.sigterm();
    assert!(run.wait_exit(TIMEOUT).is_some(), "run did not stop");
}

#[test]
fn broker_errors_read_as_sentences_with_the_right_advice() {
    let addr = closed_port();
    let finished = bzpush(
        &["check", "serve"],
        &[("BZPUSH_AMQP_URL", amqp_url_at(&addr))],
    );
    assert_eq!(finished.status.code(), Some(1));
    assert!(
        finished.stdout.contains("is RabbitMQ running"),
        "{}",
        finished.stdout
    );
    assert_sentences(&finished.stdout);

    let url = format!("amqp://guest:wrong-password@{AMQP_ADDR}/%2f");
    let finished = bzpush(&["check", "serve"], &[("BZPUSH_AMQP_URL", url)]);
    assert_eq!(finished.status.code(), Some(1));
    let line = finished
        .stdout
        .lines()
        .find(|l| l.starts_with("FAIL  broker"))
        .unwrap_or_else(|| panic!("no broker line in:\n{}", finished.stdout));
    assert!(line.contains("the broker refused"), "{line}");
    assert!(!line.contains("is RabbitMQ running"), "{line}");
    // One piece of advice, not the same one twice in other words.
    assert_eq!(line.matches(" — ").count(), 1, "{line}");
    assert!(!line.contains("wrong-password"), "{line}");
    assert_sentences(&finished.stdout);
}
