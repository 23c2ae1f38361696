//! `check`'s look at Bugzilla's database: the account, the source's
//! tables and privileges, the poller lock, the state folder, what it can
//! see of changes owed, a replica and the clock's zone. It only reads (and
//! attempts a DELETE that matches no row); it never changes data.

use std::io::{self};
use std::time::Duration;

use mysql::Conn;
use mysql::prelude::Queryable;

use crate::config::{DatabaseUrl, PollerConfig, Setting, Source, key};
use crate::{database, poller};

use super::Report;

/// MySQL/MariaDB's ER_NO_SUCH_TABLE.
const NO_SUCH_TABLE: u16 = 1146;
/// ER_BAD_DB_ERROR: no database of that name.
const NO_SUCH_DATABASE: u16 = 1049;
/// ER_DBACCESS_DENIED_ERROR: no such database, or none this user may use
/// (the server does not say which).
const DATABASE_DENIED: u16 = 1044;
/// A check query slower than this fails.
const TIMEOUT: Duration = Duration::from_secs(10);

pub(super) fn check_poller(
    report: &mut Report,
    config: &PollerConfig,
    catchup: bool,
    stale_after: Duration,
) {
    let Some(mut db) = check_database(report, &config.database, &key::DATABASE_URL) else {
        return;
    };
    let lock_free = check_lock(report, &mut db, &config.lock_name);
    let read_only = read_only(&mut db);
    let chosen = if config.source_given {
        ""
    } else {
        " (the default)"
    };
    match config.source {
        Source::PushNotify => {
            report.line(Ok(format!(
                "source push_notify{chosen}: the PushNotify extension's table, audited \
                 against bugs.delta_ts"
            )));
            check_push_notify(report, &mut db, read_only);
            check_bugs_table(report, &mut db, "audit of push_notify", false);
            check_waiting_rows(report, &mut db, lock_free, stale_after);
            if lock_free {
                check_extension_writes(report, &mut db);
            }
        }
        Source::Bugs => {
            report.line(Ok(format!("source bugs{chosen}: reads bugs.delta_ts")));
            check_bugs_table(report, &mut db, "source bugs", true);
            if !config.source_given && poller::push_notify_left_alone(&mut db) {
                report.warn(poller::PUSH_NOTIFY_LEFT_ALONE);
            }
            if read_only {
                report.warn(&format!(
                    "the database is read-only (@@read_only: a replica?): a change that \
                     replicates later than BZPUSH_OVERLAP ({}s) after its stamp is missed; \
                     point BZPUSH_DATABASE_URL at the primary",
                    config.overlap.as_secs()
                ));
            }
            check_state_directory(report, config);
        }
    }
    if catchup {
        check_bugs_table(report, &mut db, "catch-up", false);
    }
}

/// Reading and deleting in `push_notify`: a missing table says which
/// source to use instead, a missing privilege which GRANT, a read-only
/// database where to point instead.
fn check_push_notify(report: &mut Report, db: &mut Conn, read_only: bool) {
    let read = db.query_drop("SELECT id, bug_id, delta_ts FROM push_notify LIMIT 0");
    if matches!(&read, Err(mysql::Error::MySqlError(e)) if e.code == NO_SUCH_TABLE) {
        report.line(Err(
            "table push_notify: doesn't exist — this Bugzilla has no PushNotify extension \
             (upstream Bugzilla never had it): set BZPUSH_SOURCE=bugs, the default, which \
             reads bugs.delta_ts and needs only SELECT on bugs (bug_id, delta_ts)"
                .into(),
        ));
        return;
    }
    let todo = grant(db, "SELECT, DELETE", "push_notify");
    if locked(report, "table push_notify", &read) {
        return;
    }
    report.line(
        read.map(|()| "table push_notify: present, SELECT allowed".into())
            .map_err(|e| format!("table push_notify: {}", advice(&e, &todo))),
    );
    if read_only {
        report.line(Err(
            "the database is read-only (@@read_only: a replica?), and source push_notify \
             deletes the rows it published — point BZPUSH_DATABASE_URL at the primary"
                .into(),
        ));
        return;
    }
    // Matches no row (ids start at 1): proves the privilege only.
    let delete = db.query_drop("DELETE FROM push_notify WHERE id = 0");
    if locked(report, "table push_notify (DELETE)", &delete) {
        return;
    }
    report.line(
        delete
            .map(|()| "table push_notify: DELETE allowed".into())
            .map_err(|e| format!("table push_notify: {}", advice(&e, &todo))),
    );
}

/// What `check` can see of the freshness lag: changes waiting in
/// `push_notify` for longer than `BZPUSH_STALE_AFTER` are owed and not
/// handed on, by a poller that is behind or by none at all.
fn check_waiting_rows(report: &mut Report, db: &mut Conn, lock_free: bool, stale_after: Duration) {
    let waiting: Option<(u64, Option<i64>)> = db
        .query_first(
            "SELECT COUNT(*), TIMESTAMPDIFF(SECOND, MIN(delta_ts), NOW()) FROM push_notify",
        )
        .ok()
        .flatten();
    let Some((rows, Some(oldest))) = waiting else {
        return;
    };
    let rows = match rows {
        1 => "1 change".to_string(),
        n => format!("{n} changes"),
    };
    if oldest.unsigned_abs() <= stale_after.as_secs() {
        report.line(Ok(format!(
            "push_notify: {rows} waiting, the oldest {oldest} s"
        )));
        return;
    }
    let who = if lock_free {
        "no poller runs to hand them on"
    } else {
        "the active poller is behind: its /health (\"stale\") and log say why"
    };
    report.warn(&format!(
        "push_notify: {rows} waiting, the oldest {oldest} s, past \
         BZPUSH_STALE_AFTER ({} s): {who}",
        stale_after.as_secs()
    ));
}

/// With no poller emptying it (the lock is free), an empty `push_notify`
/// beside a bug changed lately means the extension writes nothing: BMO's
/// ZPushNotify does not until its `enable_simple_push` parameter is on.
/// The audit publishes such changes from `bugs.delta_ts`, but late by a
/// poll and counted as missed; a warning, not a failure.
fn check_extension_writes(report: &mut Report, db: &mut Conn) {
    let rows: Option<u64> = db
        .query_first("SELECT COUNT(*) FROM push_notify")
        .ok()
        .flatten();
    // NULL for an empty table: converting that to a bare i64 would panic.
    let changed: Option<i64> = db
        .query_first::<Option<i64>, _>(
            "SELECT TIMESTAMPDIFF(SECOND, MAX(delta_ts), NOW()) FROM bugs",
        )
        .ok()
        .flatten()
        .flatten();
    if let (Some(0), Some(ago)) = (rows, changed)
        && ago < 24 * 3600
    {
        report.warn(&format!(
            "push_notify is empty and no poller runs, yet a bug changed {ago} s ago: the \
             PushNotify extension writes nothing — is it enabled? (BMO's ZPushNotify writes \
             nothing until its enable_simple_push parameter is on.) bzpush publishes such \
             changes from bugs.delta_ts and counts them in bzpush_missed_changes_total; \
             BZPUSH_SOURCE=bugs needs no extension"
        ));
    }
}

/// Whether the catch-up database is a replica, and how far behind. Bugzilla's
/// `shadowdb` is one, and a natural choice for a read-only account; it lags,
/// and an answer from it lacks what it has not applied yet. `serve` then
/// answers `partial` when the live stream brought a change it lacks; this
/// says how often that may be.
pub(super) fn check_replica(report: &mut Report, db: &mut Conn) {
    let status: Result<Option<mysql::Row>, _> = db.query_first("SHOW SLAVE STATUS");
    let read_only = read_only(db);
    let lag = match status {
        Ok(Some(row)) => {
            let field = |name: &str| -> String {
                match row.get_opt::<Option<u64>, _>(name) {
                    Some(Ok(Some(secs))) => format!("{secs} s"),
                    _ => "unknown".to_string(),
                }
            };
            format!(
                "a replica, {} behind its primary (SQL_Delay {})",
                field("Seconds_Behind_Master"),
                field("SQL_Delay")
            )
        }
        Ok(None) if !read_only => return,
        Ok(None) => "read-only (@@read_only), perhaps a replica".to_string(),
        Err(_) if !read_only => return,
        Err(_) => "read-only (@@read_only), perhaps a replica; how far behind it is needs the \
                   REPLICA MONITOR privilege (SHOW SLAVE STATUS)"
            .to_string(),
    };
    report.warn(&format!(
        "catch-up database: {lag}. An answer from it lacks what it has not applied yet: \
         when the live stream brought a change it lacks, `since` is answered partial. Point \
         BZPUSH_CATCHUP_DATABASE_URL at the primary for complete answers"
    ));
}

/// `@@read_only`, which any user may read: a replica usually has it on.
fn read_only(db: &mut Conn) -> bool {
    db.query_first::<Option<i64>, _>("SELECT @@read_only + 0")
        .ok()
        .flatten()
        .flatten()
        .is_some_and(|on| on != 0)
}

/// Who holds the poller lock. Held is no failure (it is how a standby
/// starts), but it is said, naming the holder: a forgotten poller elsewhere
/// would make this one a standby that delivers nothing.
fn check_lock(report: &mut Report, db: &mut Conn, name: &str) -> bool {
    // NULL when free: a bare u64 would make the mysql crate panic.
    let holder: Result<Option<Option<u64>>, _> = db.exec_first("SELECT IS_USED_LOCK(?)", (name,));
    match holder.map(Option::flatten) {
        Ok(Some(id)) => {
            let holder = poller::lock_holder(db, id);
            report.warn(&format!(
                "lock {name:?}: held by {holder}; this poller will wait as a standby \
                 until it is released (if that is no poller of this database, set \
                 BZPUSH_LOCK_NAME)"
            ));
            false
        }
        Ok(None) => {
            report.line(Ok(format!(
                "lock {name:?}: free; this poller will be the active one"
            )));
            true
        }
        Err(e) => {
            report.line(Err(format!(
                "lock {name:?}: {}",
                advice(&e, "is the server MariaDB or MySQL?")
            )));
            false
        }
    }
}

/// Where source `bugs` keeps its watermark. None is a valid choice, and a
/// missing folder is created at the first save; a path that is there but
/// no folder fails.
fn check_state_directory(report: &mut Report, config: &PollerConfig) {
    let Some(dir) = &config.state_directory else {
        report.line(Ok(
            "state directory: none (BZPUSH_STATE_DIRECTORY, or systemd's \
             StateDirectory=): a restarted poller replays only one overlap"
                .into(),
        ));
        return;
    };
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => report.line(writable(dir).map_or_else(
            || {
                Ok(format!(
                    "state directory {}: present, writable",
                    dir.display()
                ))
            },
            |e| {
                Err(format!(
                    "state directory {}: this user cannot write in it ({e}), so the watermark \
                     is never saved and changes made while the poller was down are not \
                     replayed — give the folder to the unit's user (systemd: \
                     StateDirectory=bzpush does), or set BZPUSH_STATE_DIRECTORY=off",
                    dir.display()
                ))
            },
        )),
        Ok(_) => report.line(Err(format!(
            "state directory {}: not a folder — set BZPUSH_STATE_DIRECTORY to a folder",
            dir.display()
        ))),
        Err(e) => {
            // The poller creates it at its first save, in the nearest
            // folder that is there.
            let parent = dir.ancestors().skip(1).find(|a| a.is_dir());
            match parent.and_then(|p| writable(p).map(|e| (p, e))) {
                Some((parent, denied)) => report.line(Err(format!(
                    "state directory {}: {e}, and this user cannot create it in {} \
                     ({denied}) — create it for the unit's user (systemd: \
                     StateDirectory=bzpush does), or set BZPUSH_STATE_DIRECTORY=off",
                    dir.display(),
                    parent.display()
                ))),
                None => report.warn(&format!(
                    "state directory {}: {e} (the poller creates it at its first save)",
                    dir.display()
                )),
            }
        }
    }
}

/// Why this user cannot create a file in `dir`, if it cannot: a probe file
/// is written and removed, as the poller writes its watermark.
fn writable(dir: &std::path::Path) -> Option<io::Error> {
    let probe = dir.join(format!(".bzpush-check-{}", std::process::id()));
    match std::fs::write(&probe, b"") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            None
        }
        Err(e) => Some(e),
    }
}

/// Reading `bugs`. For `run`'s catch-up it is not `required`: without it
/// the server still works and answers `partial`, so it only warns.
pub(super) fn check_bugs_table(report: &mut Report, db: &mut Conn, purpose: &str, required: bool) {
    let read = db.query_drop("SELECT bug_id, delta_ts FROM bugs LIMIT 0");
    if locked(report, &format!("table bugs ({purpose})"), &read) {
        return;
    }
    let result = read
        .map(|()| format!("table bugs ({purpose}): SELECT allowed"))
        .map_err(|e| match &e {
            mysql::Error::MySqlError(m) if m.code == NO_SUCH_TABLE => format!(
                "table bugs ({purpose}): doesn't exist — is the database in the URL \
                 Bugzilla's?"
            ),
            _ => format!(
                "table bugs ({purpose}): {}",
                advice(&e, &grant(db, "SELECT (bug_id, delta_ts)", "bugs"))
            ),
        });
    match result {
        Err(e) if !required => {
            let until = if purpose == "catch-up" {
                "`since` may be answered partial"
            } else {
                "a change no push_notify row carries is not caught"
            };
            report.warn(&format!("{e} (until then {until})"));
        }
        result => report.line(result),
    }
}

/// Connects to `url`, the value of `setting`.
pub(super) fn check_database(
    report: &mut Report,
    url: &DatabaseUrl,
    setting: &Setting,
) -> Option<Conn> {
    match database::connect(url, TIMEOUT) {
        Ok(mut db) => {
            let version: Option<String> = db.query_first("SELECT VERSION()").ok().flatten();
            report.line(Ok(format!(
                "database {url}: reachable over {} ({})",
                database::route(url),
                version.as_deref().unwrap_or("unknown version")
            )));
            check_time_zone(report, &mut db);
            Some(db)
        }
        Err(e) => {
            let todo = format!("check {}", setting.env_var());
            report.line(Err(format!(
                "database {}: {}",
                report.url(url, setting),
                advice(&e, &todo)
            )));
            None
        }
    }
}

/// Warns (never fails) when the database's clock is not on UTC: a clock on
/// local time goes back an hour when summer time ends, and a change stamped
/// in the repeated hour is earlier than changes already sent. It is still
/// delivered live, but a `since` catch-up, which goes by time, cannot see
/// it.
fn check_time_zone(report: &mut Report, db: &mut Conn) {
    let zones: Option<(String, String)> = db
        .query_first("SELECT @@time_zone, @@system_time_zone")
        .ok()
        .flatten();
    let Some((session, system)) = zones else {
        return;
    };
    match time_zone_warning(&session, &system) {
        Some(zone) => report.warn(&format!(
            "database time zone: {zone}, not UTC — when its clock goes back (summer \
             time ending), a change stamped in the repeated hour is still delivered live, \
             but a client's `since` catch-up cannot see it, and `serve` without a \
             catch-up database takes its stamps for UTC; run the server on UTC \
             (default_time_zone = '+00:00')"
        )),
        None => report.line(Ok("database time zone: UTC".to_string())),
    }
}

/// The zone changes are stamped in, if it is not UTC. `SYSTEM` means the
/// server's system zone.
fn time_zone_warning(time_zone: &str, system_time_zone: &str) -> Option<String> {
    let zone = if time_zone.eq_ignore_ascii_case("SYSTEM") {
        system_time_zone
    } else {
        time_zone
    };
    let utc = [
        "UTC",
        "+00:00",
        "-00:00",
        "Etc/UTC",
        "Etc/UCT",
        "UCT",
        "Universal",
        "Etc/Universal",
        "Zulu",
        "Etc/Zulu",
        "GMT",
        "Etc/GMT",
        "Coordinated Universal Time",
    ];
    (!utc.iter().any(|u| u.eq_ignore_ascii_case(zone))).then(|| {
        if zone == time_zone {
            zone.to_string()
        } else {
            format!("SYSTEM ({zone})")
        }
    })
}

/// The error as a sentence, and what to do about it.
/// Whether `result` is a statement another session's lock stopped (`LOCK
/// TABLES`, an `ALTER TABLE` waiting for a transaction, …); if so, says so
/// as a warning. It is no fault of this setup and the poller waits it out:
/// a failure would keep the unit (`check` is its `ExecStartPre=`) from
/// starting until the lock ends, with advice that fixes nothing.
fn locked(report: &mut Report, what: &str, result: &Result<(), mysql::Error>) -> bool {
    let Err(error) = result else {
        return false;
    };
    if !database::is_lock_wait(error) {
        return false;
    }
    report.warn(&format!(
        "{what}: not checked, another database session holds it locked ({}); bzpush \
         waits for such a lock at run time and goes on by itself — SHOW PROCESSLIST shows \
         who holds it",
        database::sentence(error)
    ));
    true
}

/// The GRANT of `privileges` on `table` that this account lacks, whole:
/// the database in the URL and the account the server matched the login
/// to (`CURRENT_USER()`, whose host may be a pattern such as `%`).
fn grant(db: &mut Conn, privileges: &str, table: &str) -> String {
    let (schema, account) = db
        .query_first::<(Option<String>, String), _>("SELECT DATABASE(), CURRENT_USER()")
        .ok()
        .flatten()
        .unwrap_or_default();
    let to = match account.rsplit_once('@') {
        Some((user, host)) => format!(" TO '{user}'@'{host}'"),
        None => String::new(),
    };
    let schema = schema.map_or(String::new(), |name| format!("`{name}`."));
    format!("GRANT {privileges} ON {schema}{table}{to}")
}

fn advice(error: &mysql::Error, otherwise: &str) -> String {
    let todo = match error {
        // The error says which account was tried (database::connect).
        mysql::Error::MySqlError(e) if database::ACCESS_DENIED.contains(&e.code) => {
            "check the user and password in the URL"
        }
        mysql::Error::MySqlError(e) if e.code == NO_SUCH_DATABASE => {
            "check the database name in the URL"
        }
        mysql::Error::MySqlError(e) if e.code == DATABASE_DENIED => {
            "check the database name in the URL, and GRANT this user access to that database"
        }
        mysql::Error::MySqlError(_) => otherwise,
        _ => "is the server running and reachable at that host and port, or socket?",
    };
    format!("{} — {todo}", database::sentence(error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_zone_other_than_utc_is_named() {
        assert_eq!(time_zone_warning("SYSTEM", "UTC"), None);
        assert_eq!(time_zone_warning("+00:00", "CET"), None);
        assert_eq!(time_zone_warning("SYSTEM", "Etc/UTC"), None);
        assert_eq!(
            time_zone_warning("SYSTEM", "CET"),
            Some("SYSTEM (CET)".to_string())
        );
        assert_eq!(
            time_zone_warning("Europe/Berlin", "UTC"),
            Some("Europe/Berlin".to_string())
        );
        assert_eq!(
            time_zone_warning("+01:00", "UTC"),
            Some("+01:00".to_string())
        );
        // London is at +00:00 in winter, and still goes back an hour.
        assert_eq!(
            time_zone_warning("Europe/London", "UTC"),
            Some("Europe/London".to_string())
        );
    }
}
