//! systemd's `EnvironmentFile=` syntax: the assignments of a file, read
//! exactly as systemd reads them, so that `bzpush check --env-file` sees
//! the values the unit will get.
//!
//! Only the syntax: which keys are settings is [`super::environment`]'s
//! to say. No I/O; the caller reads the file.

/// Assignments in systemd's `EnvironmentFile=` syntax, as systemd reads
/// them: `(line, key, value)`. Comments are whole lines starting with `#`
/// or `;`; a `#` after a value is part of the value. Unquoted values lose
/// trailing whitespace, and a backslash escapes the next character (before
/// a newline it joins the lines). Single quotes keep everything; in double
/// quotes a backslash escapes only `"`, `\`, `` ` ``, `$` and a newline.
/// Quoted and unquoted parts run together (`A="x"y` is `xy`), but quotes
/// after unquoted text are kept. A line without `=` is ignored, as systemd
/// does.
pub(super) fn parse_env_file(text: &str) -> Vec<(usize, String, String)> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        PreKey,
        Key,
        PreValue,
        Value,
        ValueEscape,
        Single,
        Double,
        DoubleEscape,
        Comment,
        CommentEscape,
    }
    let mut out = Vec::new();
    let (mut key, mut value) = (String::new(), String::new());
    // Where trailing unquoted whitespace begins, if the value ends in some.
    let mut trailing: Option<usize> = None;
    let (mut line, mut key_line) = (1, 1);
    let mut state = State::PreKey;
    let push = |out: &mut Vec<_>,
                line,
                key: &mut String,
                value: &mut String,
                trailing: &mut Option<usize>| {
        if let Some(at) = trailing.take() {
            value.truncate(at);
        }
        let key = std::mem::take(key);
        let key = key.trim_end().to_string();
        out.push((line, key, std::mem::take(value)));
    };
    for c in text.chars().chain(std::iter::once('\n')) {
        match state {
            State::PreKey => {
                if c == '#' || c == ';' {
                    state = State::Comment;
                } else if !c.is_whitespace() {
                    state = State::Key;
                    key_line = line;
                    key.push(c);
                }
            }
            State::Key => {
                if c == '\n' {
                    key.clear();
                    state = State::PreKey;
                } else if c == '=' {
                    state = State::PreValue;
                } else {
                    key.push(c);
                }
            }
            State::PreValue => match c {
                '\n' => {
                    push(&mut out, key_line, &mut key, &mut value, &mut trailing);
                    state = State::PreKey;
                }
                '\'' => state = State::Single,
                '"' => state = State::Double,
                '\\' => state = State::ValueEscape,
                c if c.is_whitespace() => {}
                c => {
                    value.push(c);
                    state = State::Value;
                }
            },
            State::Value => match c {
                '\n' => {
                    push(&mut out, key_line, &mut key, &mut value, &mut trailing);
                    state = State::PreKey;
                }
                '\\' => {
                    trailing = None;
                    state = State::ValueEscape;
                }
                c => {
                    if !c.is_whitespace() {
                        trailing = None;
                    } else if trailing.is_none() {
                        trailing = Some(value.len());
                    }
                    value.push(c);
                }
            },
            State::ValueEscape => {
                if c != '\n' {
                    value.push(c);
                }
                state = State::Value;
            }
            State::Single => {
                if c == '\'' {
                    state = State::PreValue;
                } else {
                    value.push(c);
                }
            }
            State::Double => match c {
                '"' => state = State::PreValue,
                '\\' => state = State::DoubleEscape,
                c => value.push(c),
            },
            State::DoubleEscape => {
                match c {
                    '"' | '\\' | '`' | '$' => value.push(c),
                    '\n' => {}
                    c => {
                        value.push('\\');
                        value.push(c);
                    }
                }
                state = State::Double;
            }
            State::Comment => match c {
                '\\' => state = State::CommentEscape,
                '\n' => state = State::PreKey,
                _ => {}
            },
            State::CommentEscape => state = State::Comment,
        }
        if c == '\n' {
            line += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_file(text: &str) -> Vec<(String, String)> {
        parse_env_file(text)
            .into_iter()
            .map(|(_, k, v)| (k, v))
            .collect()
    }

    fn pair(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn env_files_read_as_systemd_reads_them() {
        // The README's old snippet: systemd keeps the comment in the value.
        assert_eq!(
            env_file("#BZPUSH_SOURCE=bugs\nBZPUSH_LISTEN=127.0.0.1:8844       # nginx\n"),
            vec![pair("BZPUSH_LISTEN", "127.0.0.1:8844       # nginx")]
        );
        assert_eq!(
            env_file("  ; comment\n\tA = x y  \nB=\nC\nD='a # b'\nE=\"q\\\"\\$\\n\"\n"),
            vec![
                pair("A", "x y"),
                pair("B", ""),
                pair("D", "a # b"),
                pair("E", "q\"$\\n"),
            ]
        );
        // Continuations, in values and in comments; escapes; quotes that
        // run together with unquoted text.
        assert_eq!(
            env_file("A=one\\\ntwo\n# x \\\nB=hidden\nC=\"x\"y 'z'\nD=a\\ \nE='multi\nline'\n"),
            vec![
                pair("A", "onetwo"),
                pair("C", "xy 'z'"),
                pair("D", "a "),
                pair("E", "multi\nline"),
            ]
        );
        // No newline at the end; CRLF is not special to systemd either.
        assert_eq!(env_file("A=1"), vec![pair("A", "1")]);
    }
}
