//! `bzpush --help` and `bzpush MODE --help`, written from the settings
//! table: a mode's help lists the rows that name it.
//!
//! Text only; it reads no value, so help works in a broken environment.

use super::Mode;
use super::settings::{SETTINGS, Setting, key};

/// The text of `bzpush --help`, written from [`SETTINGS`].
pub fn help() -> String {
    let mut text = format!(
        "bzpush {}: Bugzilla push notifications\n\n\
         Usage: bzpush <COMMAND> [--env-file PATH]... [--SETTING VALUE]...\n\n\
         Commands:\n  \
         run     poll Bugzilla's database and serve WebSocket clients, in one process\n  \
         poll    poll Bugzilla's database and publish each change to Pulse (AMQP)\n  \
         serve   serve WebSocket clients (bugzfeed protocol) from Pulse\n  \
         demo    run fed by a simulated Bugzilla (in memory, or a scratch database with --database-url)\n  \
         check   check a command's settings and dependencies: bzpush check run|poll|serve\n\n\
         `bzpush COMMAND --help` lists only the settings that command reads.\n\n\
         Settings (environment variable, flag, default):\n",
        env!("CARGO_PKG_VERSION")
    );
    text.push_str(&setting_lines(SETTINGS.iter(), None));
    text.push_str(HELP_FOOTER);
    text
}

/// The text of `bzpush MODE --help`: the settings `mode` reads.
pub fn mode_help(mode: Mode) -> String {
    let check = if mode.checkable() {
        format!("       bzpush check {mode} [--env-file PATH]... [--SETTING VALUE]...\n")
    } else {
        String::new()
    };
    let mut text = format!(
        "Usage: bzpush {mode} [--env-file PATH]... [--SETTING VALUE]...\n{check}\n\
         Settings `{mode}` reads (environment variable, flag, default):\n"
    );
    let read = SETTINGS.iter().filter(|s| s.read_by(mode));
    text.push_str(&setting_lines(read, Some(mode)));
    text.push_str(HELP_FOOTER);
    text
}

/// The demo needs no Bugzilla: without the setting it simulates one in
/// memory, and given one it wants a server, not `bugs`.
pub(super) const DEMO_DATABASE_DEFAULT: &str = "none: in memory";
const DEMO_DATABASE_DOC: &str = "demo: a MySQL or MariaDB server where the demo may create and \
    drop a scratch database, e.g. mysql://root@127.0.0.1:3306/; unset, Bugzilla is simulated in memory";

const HELP_FOOTER: &str = "\n--env-file PATH reads a file in systemd's EnvironmentFile= syntax (repeatable, \
    later files win).\nA flag wins over an --env-file, which wins over the environment. \
    Exit status: 0 clean stop, 1 runtime failure, 2 bad configuration.\n";

/// Two lines or three per setting: names and default, doc, range. For
/// `mode` demo, the database URL says what it is to the demo.
fn setting_lines<'a>(settings: impl Iterator<Item = &'a Setting>, mode: Option<Mode>) -> String {
    let mut text = String::new();
    for s in settings {
        let (default, doc) = match mode {
            Some(Mode::Demo) if s.name == key::DATABASE_URL.name => {
                (DEMO_DATABASE_DEFAULT, DEMO_DATABASE_DOC)
            }
            _ => (s.default, s.doc),
        };
        text.push_str(&format!(
            "  {:<28} --{:<21} {default}\n      {doc}\n",
            s.env_var(),
            s.name,
        ));
        if let Some(range) = s.range.describe() {
            text.push_str(&format!("      ({range})\n"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_help_lists_only_what_the_mode_reads_with_ranges() {
        let help = mode_help(Mode::Run);
        for name in [
            "BZPUSH_DATABASE_URL",
            "BZPUSH_LISTEN",
            "BZPUSH_PING_TIMEOUT",
        ] {
            assert!(help.contains(name), "{name} in {help}");
        }
        for name in [
            "BZPUSH_AMQP_URL",
            "BZPUSH_FEEDS",
            "BZPUSH_CATCHUP_DATABASE_URL",
        ] {
            assert!(!help.contains(name), "{name} in {help}");
        }
        assert!(help.contains("(a duration from 1s to 1h)"), "{help}");
        let serve = mode_help(Mode::Serve);
        assert!(!serve.contains("BZPUSH_POLL_INTERVAL"), "{serve}");
        assert!(serve.contains("BZPUSH_AMQP_URL"), "{serve}");
        let poll = mode_help(Mode::Poll);
        assert!(!poll.contains("BZPUSH_LISTEN"), "{poll}");
        assert!(poll.contains("bzpush check poll"), "{poll}");
        // There is no `bzpush check demo` to advertise, and the demo
        // needs no Bugzilla: its database is none unless given a server.
        let demo = mode_help(Mode::Demo);
        assert!(!demo.contains("bzpush check"), "{demo}");
        assert!(!demo.contains("mysql://bugs@localhost"), "{demo}");
        assert!(demo.contains(DEMO_DATABASE_DEFAULT), "{demo}");
        assert!(mode_help(Mode::Run).contains("mysql://bugs@localhost"));
    }
}
