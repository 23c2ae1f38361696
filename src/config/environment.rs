//! Stage one: what the user wrote — flags, `--env-file`s, the process
//! environment — gathered into one value per setting ([`Values`]), and what
//! resolution needs from the machine ([`Host`]).
//!
//! A name that looks like a setting but is none (`BZPUSH_POLL_INTERVL`,
//! `bzpush_log`, or `DATABASE_URL` in an environment file) is refused,
//! naming the nearest setting: ignored, it would leave its setting at the
//! default without a word. Other names are not ours and are ignored. No
//! value is checked here; that is [`super::resolve`]'s.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::env_file::parse_env_file;
use super::resolve::{Host, Read};
use super::settings::{SETTINGS, Setting};
use super::url::shown;
use super::values::Value;
use super::{ConfigError, Mode};

/// The value of each setting the user gave, by name; the rest have their
/// defaults.
pub(super) struct Values(BTreeMap<&'static str, String>);

impl Read for Values {
    fn get(&self, setting: &'static Setting) -> Value<'_> {
        let value = self
            .0
            .get(setting.name)
            .map_or(setting.default, String::as_str);
        (setting, value)
    }

    fn given(&self, setting: &'static Setting) -> bool {
        self.0.contains_key(setting.name)
    }
}

/// The values of `args` (flags, `--env-file`s) over `env`: a flag wins over
/// an env file, which wins over the environment. `unit`: `env` is a systemd
/// unit's, so a setting's name without its prefix there came from the
/// unit's `EnvironmentFile=` or `Environment=`, and is refused as in an
/// env file.
pub(super) fn gather(
    mode: Mode,
    args: Vec<String>,
    env: &[(OsString, OsString)],
    unit: bool,
) -> Result<Values, ConfigError> {
    let mut values = from_env(env, unit)?;
    let mut flags = BTreeMap::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let Some(flag) = arg.strip_prefix("--") else {
            // A URL given without its flag may hold a password.
            let shown = shown(&arg).map_or("(not shown: it may hold a password)".into(), |a| {
                format!("{a:?}")
            });
            return Err(ConfigError(format!(
                "unexpected argument {shown}; settings are flags like --poll-interval 2s"
            )));
        };
        let (name, inline) = match flag.split_once('=') {
            Some((name, value)) => (name, Some(value.to_string())),
            None => (flag, None),
        };
        let setting = match name {
            "env-file" => None,
            _ => Some(SETTINGS.iter().find(|s| s.name == name).ok_or_else(|| {
                ConfigError(format!(
                    "unknown flag --{name}{}; try `bzpush {mode} --help`",
                    suggest(name, SETTINGS.iter().map(|s| s.name.to_string()))
                        .map(|s| format!(" (did you mean --{s}?)"))
                        .unwrap_or_default()
                ))
            })?),
        };
        let value = inline
            .or_else(|| args.next())
            .ok_or_else(|| ConfigError(format!("flag --{name} needs a value")))?;
        match setting {
            Some(setting) => _ = flags.insert(setting.name, value),
            None => values.extend(read_env_file(Path::new(&value))?),
        }
    }
    values.extend(flags);
    Ok(Values(values))
}

/// What the machine says, read once: the host name (`/etc/hostname` first,
/// as the hardened units hide `/proc/sys`) and the folder systemd made for
/// `StateDirectory=` (`$STATE_DIRECTORY`, a colon-separated list, ours
/// first).
pub(super) fn host(env: &[(OsString, OsString)]) -> Host {
    let var = |name: &str| {
        env.iter()
            .find(|(key, _)| key == name)
            .and_then(|(_, value)| value.to_str())
    };
    let hostname = ["/etc/hostname", "/proc/sys/kernel/hostname"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|h| h.trim().to_string())
        .find(|h| !h.is_empty())
        .or_else(|| var("HOSTNAME").map(str::to_string))
        .unwrap_or_else(|| "localhost".to_string());
    let state_directory = var("STATE_DIRECTORY")
        .and_then(|value| value.split(':').next())
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from);
    Host {
        hostname,
        state_directory,
    }
}

/// The settings the environment sets, by name.
fn from_env(
    env: &[(OsString, OsString)],
    unit: bool,
) -> Result<BTreeMap<&'static str, String>, ConfigError> {
    let in_unit = |e| match unit {
        true => ConfigError(format!(
            "the unit's environment (EnvironmentFile= or Environment=): {e}"
        )),
        false => e,
    };
    let mut values = BTreeMap::new();
    // The test-only fault injection is no setting (see its doc).
    for (key, value) in env
        .iter()
        .filter(|(k, _)| k != crate::shutdown::TEST_PANIC_VAR)
    {
        let Some(key) = key.to_str() else { continue };
        if let Some(setting) = setting_of(key, unit).map_err(in_unit)? {
            let value = value
                .to_str()
                .ok_or_else(|| ConfigError(format!("{key}: value is not valid UTF-8")))?;
            values.insert(setting.name, value.to_string());
        }
    }
    Ok(values)
}

/// The settings an environment file sets, by name.
fn read_env_file(path: &Path) -> Result<BTreeMap<&'static str, String>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError(format!(
            "--env-file {}: cannot read it: {e}",
            path.display()
        ))
    })?;
    let in_file = |line: usize, e: ConfigError| {
        ConfigError(format!("--env-file {} line {line}: {e}", path.display()))
    };
    // systemd skips a line without `=` (and so does the parser): one that
    // names a setting was meant to set it.
    for (at, raw) in text.lines().enumerate() {
        let raw = raw.trim();
        if raw.contains('=') || raw.starts_with('#') || raw.starts_with(';') {
            continue;
        }
        if let Some(setting) = raw.split([':', ' ', '\t']).find_map(resembled) {
            return Err(in_file(
                at + 1,
                ConfigError(format!(
                    "{raw:?} is no assignment, and systemd skips it: write {}=VALUE",
                    setting.env_var()
                )),
            ));
        }
    }
    let mut values = BTreeMap::new();
    for (line, key, value) in parse_env_file(&text) {
        if key.eq_ignore_ascii_case("Environment") {
            // Only the name: the value may hold a password.
            let name = value.split('=').next().unwrap_or_default();
            return Err(in_file(
                line,
                ConfigError(format!(
                    "Environment= is a unit file's line: in an environment file, write \
                     {name}=VALUE alone"
                )),
            ));
        }
        let setting = setting_of(&key, true).map_err(|e| in_file(line, e))?;
        if let Some(setting) = setting {
            values.insert(setting.name, value);
        }
    }
    Ok(values)
}

/// The setting variable `key` sets; `None` for a variable that is none of
/// bzpush's. A `BZPUSH_` name in any case must be a setting's. `strict`
/// (an environment file, a unit's environment): so must a setting's name
/// without the prefix (`DATABASE_URL`), except systemd's own
/// `STATE_DIRECTORY`, which bzpush reads as the default of its setting.
fn setting_of(key: &str, strict: bool) -> Result<Option<&'static Setting>, ConfigError> {
    let upper = key.to_ascii_uppercase();
    if strict && !upper.starts_with("BZPUSH_") && upper != "STATE_DIRECTORY" {
        // Its last word: systemd takes `export BZPUSH_LOG` for no variable.
        let word = key.split_whitespace().last().unwrap_or(key);
        let word_upper = word.to_ascii_uppercase();
        let meant = match resembled(word) {
            Some(setting) => Some(setting.env_var()),
            None if word != key && word_upper.starts_with("BZPUSH_") => {
                suggest(&word_upper, SETTINGS.iter().map(Setting::env_var))
            }
            None => return Ok(None),
        };
        return Err(ConfigError(format!(
            "{key} is not a bzpush setting{}; `bzpush --help` lists them",
            meant
                .map(|s| format!(" (did you mean {s}?)"))
                .unwrap_or_default()
        )));
    }
    if !upper.starts_with("BZPUSH_") {
        return Ok(None);
    }
    match SETTINGS.iter().find(|s| s.env_var() == key) {
        Some(setting) => Ok(Some(setting)),
        None => Err(ConfigError(format!(
            "{key} is not a bzpush setting{}; `bzpush --help` lists them",
            suggest(&upper, SETTINGS.iter().map(Setting::env_var))
                .map(|s| format!(" (did you mean {s}?)"))
                .unwrap_or_default()
        ))),
    }
}

/// The setting whose variable `word` spells in another case, with other
/// separators or none, or without its prefix (`BZPUSH-LOG`, `BZPUSHLOG`,
/// `bz_push_log`, `DATABASE_URL`, `database.url`), if any.
fn resembled(word: &str) -> Option<&'static Setting> {
    let squash = |s: &str| -> String {
        s.chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_uppercase())
            .collect()
    };
    let word = squash(word);
    SETTINGS.iter().find(|s| {
        let name = squash(&s.env_var());
        name == word || name["BZPUSH".len()..] == word
    })
}

/// The candidate nearest to `name` by edit distance, if near enough to be
/// a plausible typo.
fn suggest(name: &str, candidates: impl Iterator<Item = String>) -> Option<String> {
    candidates
        .map(|c| (strsim::levenshtein(name, &c), c))
        .filter(|(d, c)| *d <= 3.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::tests::poll;

    /// `key=value` in an environment file, read for `poll`.
    fn file_line(line: &str) -> Result<(), ConfigError> {
        let path =
            std::env::temp_dir().join(format!("bzpush-env-{}-{}", std::process::id(), line.len()));
        std::fs::write(&path, format!("{line}\n")).expect("write a temp file");
        let file = path.to_str().expect("utf-8").to_string();
        let result = poll(&["--env-file", &file], &[]).map(|_| ());
        let _ = std::fs::remove_file(&path);
        result
    }

    #[test]
    fn a_flag_wins_over_an_env_file_which_wins_over_the_environment() {
        let path = std::env::temp_dir().join(format!("bzpush-env-{}", std::process::id()));
        std::fs::write(
            &path,
            "# from the unit\nBZPUSH_POLL_INTERVAL=3s\nBZPUSH_BATCH_SIZE=7\nOTHER=ignored\n",
        )
        .expect("write a temp file");
        let file = path.to_str().expect("utf-8");
        let env = [("BZPUSH_POLL_INTERVAL", "2s"), ("BZPUSH_OVERLAP", "5s")];
        let config = poll(&["--env-file", file, "--batch-size", "9"], &env).expect("valid");
        assert_eq!(config.poller.poll_interval, Duration::from_secs(3));
        assert_eq!(config.poller.batch_size, 9);
        assert_eq!(config.poller.overlap, Duration::from_secs(5));
        std::fs::write(&path, "BZPUSH_POLL_INTERVL=3s\n").expect("write");
        let err = poll(&[&format!("--env-file={file}")], &[]).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        assert!(err.to_string().contains("BZPUSH_POLL_INTERVAL?"), "{err}");
        let _ = std::fs::remove_file(&path);
        let err = poll(&["--env-file", "/nonexistent/bzpush.env"], &[]).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/bzpush.env"), "{err}");
    }

    #[test]
    fn unknown_names_suggest_the_nearest() {
        let err = poll(&[], &[("BZPUSH_PING_TIMOUT", "1s")]).unwrap_err();
        assert!(
            err.to_string()
                .contains("did you mean BZPUSH_PING_TIMEOUT?"),
            "{err}"
        );
        let err = poll(&["--databse-url", "x"], &[]).unwrap_err();
        assert!(
            err.to_string().contains("did you mean --database-url?"),
            "{err}"
        );
        // Nothing near: no guess.
        let err = poll(&[], &[("BZPUSH_SOMETHING_ELSE_ENTIRELY", "1")]).unwrap_err();
        assert!(!err.to_string().contains("did you mean"), "{err}");
    }

    #[test]
    fn a_setting_without_its_prefix_or_in_lower_case_is_refused_in_an_env_file() {
        for (line, meant) in [
            (
                "DATABASE_URL=mysql://bzpush:pw@db/bugs",
                "BZPUSH_DATABASE_URL",
            ),
            ("bzpush_log=debug", "BZPUSH_LOG"),
            ("Bzpush_Poll_Interval=2s", "BZPUSH_POLL_INTERVAL"),
            ("poll_interval=2s", "BZPUSH_POLL_INTERVAL"),
            ("export BZPUSH_LOG=debug", "BZPUSH_LOG"),
            ("BZPUSH-LOG=debug", "BZPUSH_LOG"),
            ("BZPUSHLOG=debug", "BZPUSH_LOG"),
            ("BZ_PUSH_LOG=debug", "BZPUSH_LOG"),
            (
                "export DATABASE_URL=mysql://bzpush:pw@db/bugs",
                "BZPUSH_DATABASE_URL",
            ),
            (
                "DATABASE-URL=mysql://bzpush:pw@db/bugs",
                "BZPUSH_DATABASE_URL",
            ),
            (
                "database.url=mysql://bzpush:pw@db/bugs",
                "BZPUSH_DATABASE_URL",
            ),
            ("export BZPUSH_LGO=debug", "BZPUSH_LOG"),
        ] {
            let err = file_line(line).expect_err(line).to_string();
            assert!(err.contains("line 1"), "{err}");
            assert!(err.contains(&format!("did you mean {meant}?")), "{err}");
            assert!(!err.contains("pw@"), "{err}");
        }
        let err = file_line("Environment=BZPUSH_DATABASE_URL=mysql://u:pw@db/bugs")
            .expect_err("a unit file's line")
            .to_string();
        assert!(
            err.contains("write BZPUSH_DATABASE_URL=VALUE alone") && !err.contains("pw@"),
            "{err}"
        );
        let err = file_line("DATABASE_URL: mysql://u@db/bugs")
            .expect_err("no `=`")
            .to_string();
        assert!(err.contains("write BZPUSH_DATABASE_URL=VALUE"), "{err}");
        let err = file_line("BZPUSH_LOG: debug")
            .expect_err("no `=`")
            .to_string();
        assert!(
            err.contains("line 1") && err.contains("write BZPUSH_LOG=VALUE"),
            "{err}"
        );
        // systemd exports other variables, and sets STATE_DIRECTORY itself.
        for line in [
            "PATH=/usr/bin",
            "LANG=C.UTF-8",
            "STATE_DIRECTORY=/var/lib/x",
        ] {
            file_line(line).expect(line);
        }
    }

    #[test]
    fn a_lower_case_setting_in_the_environment_is_refused() {
        let err = poll(&[], &[("bzpush_log", "debug")]).unwrap_err();
        assert!(
            err.to_string().contains("did you mean BZPUSH_LOG?"),
            "{err}"
        );
        // Outside a unit, a shell's DATABASE_URL is someone else's.
        let env = |key: &str| [(OsString::from(key), OsString::from("mysql://u@h/db"))];
        assert!(gather(Mode::Poll, Vec::new(), &env("DATABASE_URL"), false).is_ok());
        let Err(err) = gather(Mode::Poll, Vec::new(), &env("DATABASE_URL"), true) else {
            panic!("a unit's DATABASE_URL was ignored");
        };
        assert!(err.to_string().contains("EnvironmentFile="), "{err}");
        assert!(err.to_string().contains("BZPUSH_DATABASE_URL?"), "{err}");
        assert!(gather(Mode::Poll, Vec::new(), &env("STATE_DIRECTORY"), true).is_ok());
    }
}
