//! The man page, `bzpush(1)`, written from the settings table so it cannot
//! disagree with `--help`.
//!
//! The Debian package ships the rendered page as `doc/bzpush.1`, checked
//! in: what the package installs can be read in the repository, and a test
//! fails when the file and [`render`] disagree (`BZPUSH_WRITE_MAN=1 cargo
//! test --test integration package::the_man` rewrites it). Nothing here does I/O.

use crate::config::{SETTINGS, Setting};

/// The page in roff (man macros).
pub fn render() -> String {
    let mut page = format!(
        ".TH BZPUSH 1 \"\" \"bzpush {}\" \"User Commands\"\n",
        env!("CARGO_PKG_VERSION")
    );
    page.push_str(
        r#".SH NAME
bzpush \- Bugzilla push notifications over WebSocket and Pulse
.SH SYNOPSIS
.B bzpush
.RB { run | poll | serve | demo }
.RB [ \-\-env\-file
.IR PATH ]...
.RB [ \-\- \fISETTING\fR
.IR VALUE ]...
.br
.B bzpush check
.RB { run | poll | serve }
.RB [ \-\-env\-file
.IR PATH ]...
.RB [ \-\- \fISETTING\fR
.IR VALUE ]...
.br
.B bzpush
.RB [ COMMAND ]
.B \-\-help
.SH DESCRIPTION
bzpush tells clients, within about a second, that a Bugzilla bug changed.
It sends only the bug id and the change time; a client that wants details
asks Bugzilla's REST API. Clients written for bugzfeed work unchanged, and
the Pulse messages are those of Mozilla's mozillapulse.
.SH COMMANDS
.TP
.B run
Poll Bugzilla's database and serve WebSocket clients, in one process, with
no broker: the default for a Bugzilla on one machine.
.TP
.B poll
Poll Bugzilla's database and publish each change to Pulse (AMQP). One
poller is active at a time; others wait as hot standbys.
.TP
.B serve
Serve WebSocket clients from Pulse; run as many as needed.
.TP
.B demo
Like run, fed by a simulated Bugzilla, to try bzpush and its live page: in
memory, or in a scratch database that it creates and drops on the MySQL
or MariaDB server that
.B \-\-database\-url
names. It needs no Bugzilla and no broker.
.TP
.B check
Check the settings of a command and every dependency they name, one line
each; exit 1 if any check fails. It changes nothing.
.SH SETTINGS
Every setting is an environment variable and a flag of the same name; a
flag wins over an
.BR \-\-env\-file ,
which wins over the environment.
.B \-\-env\-file
reads a file in the syntax of systemd's
.BR EnvironmentFile= :
.I KEY=VALUE
lines, comments on lines of their own starting with # or ;, optional
quotes, a backslash at the end of a line continuing it. An unknown
.B BZPUSH_*
variable, or a value out of its range, stops bzpush with exit status 2.
"#,
    );
    for setting in SETTINGS {
        page.push_str(&entry(setting));
    }
    page.push_str(
        r#".SH FILES
.TP
.I /etc/bzpush/bzpush.env
The settings the units read (mode 0600: it holds passwords).
.TP
.I /lib/systemd/system/bzpush\-run.service
.TQ
.I /lib/systemd/system/bzpush\-poll.service
.TQ
.I /lib/systemd/system/bzpush\-serve@.service
The units; a serve instance NAME also reads
.IR /etc/bzpush/serve\-NAME.env .
.SH EXIT STATUS
0 on a clean stop (SIGTERM, SIGINT) or a passing check, 1 on a runtime
failure or a failing check, 2 on bad configuration.
.SH EXAMPLES
.nf
bzpush check run \-\-env\-file /etc/bzpush/bzpush.env
systemctl enable \-\-now bzpush\-run
curl \-s 127.0.0.1:8844/health
.fi
.SH SEE ALSO
.BR systemd.exec (5),
/usr/share/doc/bzpush/README.md
"#,
    );
    page
}

/// One setting as a tagged paragraph: names, default, range, commands.
fn entry(setting: &Setting) -> String {
    let read_by: Vec<&str> = setting.modes.iter().map(|mode| mode.name()).collect();
    let mut text = format!(
        ".TP\n.BR {} \", \" \\-\\-{}\n{}.\n.br\nDefault: {}.",
        escape(&setting.env_var()),
        escape(setting.name),
        escape(setting.doc),
        escape(setting.default),
    );
    if let Some(range) = setting.range.describe() {
        text.push_str(&format!(" Takes {}.", escape(&range)));
    }
    text.push_str(&format!(" Read by: {}.\n", read_by.join(", ")));
    text
}

/// Text safe in a roff line: backslashes and hyphens escaped, and no
/// leading dot or quote to be read as a request.
fn escape(text: &str) -> String {
    let text = text.replace('\\', "\\e").replace('-', "\\-");
    if text.starts_with('.') || text.starts_with('\'') {
        format!("\\&{text}")
    } else {
        text
    }
}
