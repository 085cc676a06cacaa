//! supervisord's `%(name)s` expansions (Python's `str % dict`), and the two ways it splits text:
//! `shlex.split` for `command`, and the non-POSIX `shlex` lexer of `dict_of_key_value_pairs` for
//! `environment` (`KEY="val,ue",B=2`).
//!
//! These follow Python's own rules rather than a shell-splitting crate's, because they are not a
//! shell's: inside double quotes Python keeps the backslash of `\$`, and the environment lexer
//! keeps quotes only at the start of a word and ends a word at any character outside
//! `[A-Za-z0-9_/.+\-():]`.

use std::collections::BTreeMap;

/// Largest width or precision of one `%(name)…` conversion: Python would pad to any size, and a
/// file of a few bytes must not make the import allocate gigabytes.
pub const EXPANSION_WIDTH_MAX: usize = 4096;
/// Longest value an expansion may produce: Linux's `MAX_ARG_STRLEN`, the longest argument `execve`
/// takes, is more than any real command, directory or environment needs.
pub const EXPANDED_VALUE_MAX_BYTES: usize = 131_072;

/// A value an expansion can take: supervisord's names are strings, except `process_num` and
/// `numprocs`, which are integers (so `%(process_num)02d` works and `%(ENV_X)d` does not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    Str(String),
    Int(i64),
}

/// The names a value may use, by name.
pub type Expansions = BTreeMap<String, Arg>;

/// Expands `text % expansions` the way Python does for a mapping: `%(name)` followed by flags
/// (`-`, `0`, `+`, space, `#`), a width, a precision and one of `s r d i u x X o`; `%%` is `%`. Any
/// other `%` is an error, as in supervisord (which quotes Python's `TypeError`/`ValueError`).
pub fn expand(text: &str, expansions: &Expansions) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let spec = &rest[at + 1..];
        if let Some(after) = spec.strip_prefix('%') {
            out.push('%');
            rest = after;
            continue;
        }
        let Some(named) = spec.strip_prefix('(') else {
            return Err(format!(
                "a `%` that is neither `%%` nor `%(name)s` in {} (supervisord expands `%(name)s`; write `%%` for a percent sign)",
                crate::clip::clip(text)
            ));
        };
        let close = named
            .find(')')
            .ok_or_else(|| format!("unclosed `%(` in {}", crate::clip::clip(text)))?;
        let name = &named[..close];
        let mut chars = named[close + 1..].char_indices().peekable();
        let mut flags = String::new();
        while let Some((_, c)) = chars.peek().copied()
            && "-0+ #".contains(c)
        {
            flags.push(c);
            chars.next();
        }
        let mut width = String::new();
        while let Some((_, c)) = chars.peek().copied()
            && c.is_ascii_digit()
        {
            width.push(c);
            chars.next();
        }
        let mut precision: Option<String> = None;
        if let Some((_, '.')) = chars.peek().copied() {
            chars.next();
            let mut digits = String::new();
            while let Some((_, c)) = chars.peek().copied()
                && c.is_ascii_digit()
            {
                digits.push(c);
                chars.next();
            }
            precision = Some(digits);
        }
        // Python accepts (and ignores) a length modifier.
        if let Some((_, 'h' | 'l' | 'L')) = chars.peek().copied() {
            chars.next();
        }
        let Some((at_conversion, conversion)) = chars.next() else {
            return Err(format!(
                "`%({name})` without a conversion (such as `s` or `d`) in {}",
                crate::clip::clip(text)
            ));
        };
        let value = expansions.get(name).ok_or_else(|| {
            format!(
                "`%({})` cannot be expanded (available: {})",
                crate::clip::clip(name),
                expansions
                    .keys()
                    .filter(|k| !k.starts_with("ENV_"))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
                    + ", ENV_<variable>"
            )
        })?;
        let bounded = |digits: &str| -> Result<usize, String> {
            match digits.parse::<usize>() {
                Ok(n) if n <= EXPANSION_WIDTH_MAX => Ok(n),
                Err(_) if digits.is_empty() => Ok(0),
                _ => Err(format!(
                    "`%({name})`: a width or precision over {EXPANSION_WIDTH_MAX} in {}",
                    crate::clip::clip(text)
                )),
            }
        };
        let width = bounded(&width)?;
        let precision = precision.as_deref().map(bounded).transpose()?;
        let body = convert(name, value, conversion, &flags, precision)?;
        out.push_str(&pad(&body, width, &flags, conversion));
        if out.len() > EXPANDED_VALUE_MAX_BYTES {
            return Err(format!(
                "expands to more than {EXPANDED_VALUE_MAX_BYTES} bytes: {}",
                crate::clip::clip(text)
            ));
        }
        rest = &named[close + 1 + at_conversion + conversion.len_utf8()..];
    }
    out.push_str(rest);
    Ok(out)
}

/// One conversion without its width.
fn convert(
    name: &str,
    value: &Arg,
    conversion: char,
    flags: &str,
    precision: Option<usize>,
) -> Result<String, String> {
    match (conversion, value) {
        ('s', _) | ('r', _) => {
            let text = match value {
                Arg::Str(s) if conversion == 'r' => format!("'{s}'"),
                Arg::Str(s) => s.clone(),
                Arg::Int(n) => n.to_string(),
            };
            Ok(match precision {
                Some(p) => text.chars().take(p).collect(),
                None => text,
            })
        }
        ('d' | 'i' | 'u' | 'x' | 'X' | 'o', Arg::Int(n)) => {
            let magnitude = n.unsigned_abs();
            let mut digits = match conversion {
                'x' => format!("{magnitude:x}"),
                'X' => format!("{magnitude:X}"),
                'o' => format!("{magnitude:o}"),
                _ => magnitude.to_string(),
            };
            if let Some(p) = precision
                && digits.len() < p
            {
                digits = "0".repeat(p - digits.len()) + &digits;
            }
            let prefix = match (flags.contains('#'), conversion) {
                (true, 'x') => "0x",
                (true, 'X') => "0X",
                (true, 'o') => "0o",
                _ => "",
            };
            let sign = if *n < 0 {
                "-"
            } else if flags.contains('+') {
                "+"
            } else if flags.contains(' ') {
                " "
            } else {
                ""
            };
            Ok(format!("{sign}{prefix}{digits}"))
        }
        ('d' | 'i' | 'u' | 'x' | 'X' | 'o', Arg::Str(_)) => Err(format!(
            "`%({name}){conversion}` needs a number, and `{name}` is a string (use `%({name})s`)"
        )),
        (other, _) => Err(format!(
            "`%({name}){other}`: supervisord's expansions here are `s`, `r`, `d`, `i`, `u`, `x`, `X`, `o`"
        )),
    }
}

/// Pads to `width`: left-justified with `-`, zeros after the sign with `0` (numbers only), else
/// spaces on the left.
fn pad(body: &str, width: usize, flags: &str, conversion: char) -> String {
    let len = body.chars().count();
    if len >= width {
        return body.to_owned();
    }
    let fill = width - len;
    if flags.contains('-') {
        return format!("{body}{}", " ".repeat(fill));
    }
    if flags.contains('0') && !matches!(conversion, 's' | 'r') {
        // Zeros go after the sign and a `0x`/`0o` prefix: `-0003`, `0x0003`.
        let sign_len = usize::from(body.starts_with(['-', '+', ' ']));
        let prefix_len = if body[sign_len..].starts_with("0x")
            || body[sign_len..].starts_with("0X")
            || body[sign_len..].starts_with("0o")
        {
            2
        } else {
            0
        };
        let (head, tail) = body.split_at(sign_len + prefix_len);
        return format!("{head}{}{tail}", "0".repeat(fill));
    }
    format!("{}{body}", " ".repeat(fill))
}

/// Python's `shlex.split(s)` (POSIX mode, no comments): words split on whitespace; `'…'` literal;
/// `"…"` where a backslash escapes only `"` and `\`; a backslash outside quotes escapes any character.
pub fn shlex_split(text: &str) -> Result<Vec<String>, String> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        Space,
        Word,
        Single,
        Double,
    }
    let mut words = Vec::new();
    let mut word = String::new();
    // Whether the word under way had quotes, so `""` is an (empty) word.
    let mut quoted = false;
    let mut state = State::Space;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match state {
            State::Space | State::Word => match c {
                ' ' | '\t' | '\r' | '\n' => {
                    if state == State::Word {
                        words.push(std::mem::take(&mut word));
                        quoted = false;
                        state = State::Space;
                    }
                }
                '\'' => {
                    quoted = true;
                    state = State::Single;
                }
                '"' => {
                    quoted = true;
                    state = State::Double;
                }
                '\\' => {
                    let next = chars.next().ok_or("no escaped character at the end")?;
                    word.push(next);
                    state = State::Word;
                }
                other => {
                    word.push(other);
                    state = State::Word;
                }
            },
            State::Single => match c {
                '\'' => state = State::Word,
                other => word.push(other),
            },
            State::Double => match c {
                '"' => state = State::Word,
                '\\' => {
                    let next = chars.next().ok_or("no closing quotation")?;
                    if next != '"' && next != '\\' {
                        word.push('\\');
                    }
                    word.push(next);
                }
                other => word.push(other),
            },
        }
    }
    match state {
        State::Single | State::Double => Err("no closing quotation".into()),
        State::Word => {
            words.push(word);
            Ok(words)
        }
        State::Space => {
            if quoted {
                words.push(word);
            }
            Ok(words)
        }
    }
}

/// supervisord's `dict_of_key_value_pairs`: a non-POSIX `shlex` lexer with `/.+-():` added to the
/// word characters, read as `KEY = VALUE ,` triples (the token after each value is skipped
/// unchecked, as supervisord does); quotes around a value are stripped. Later keys win.
pub fn key_value_pairs(text: &str) -> Result<Vec<(String, String)>, String> {
    let tokens = env_tokens(text)?;
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if i + 3 > tokens.len() || tokens[i + 1] != "=" {
            return Err(format!(
                "unexpected end of KEY=value pairs in {} (quote values that hold characters other than letters, digits and `_/.+-():`)",
                crate::clip::clip(text)
            ));
        }
        let value = tokens[i + 2].trim_matches(['\'', '"']).to_owned();
        let key = tokens[i].clone();
        pairs.retain(|(k, _)| *k != key);
        pairs.push((key, value));
        i += 4;
    }
    Ok(pairs)
}

/// The tokens of Python's `shlex.shlex(text)` (non-POSIX) with supervisord's word characters.
fn env_tokens(text: &str) -> Result<Vec<String>, String> {
    let is_word = |c: char| c.is_ascii_alphanumeric() || "_/.+-():".contains(c);
    let is_space = |c: char| matches!(c, ' ' | '\t' | '\r' | '\n');
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if is_space(c) {
            continue;
        }
        if c == '#' {
            // A comment runs to the end of the line.
            for c in chars.by_ref() {
                if c == '\n' {
                    break;
                }
            }
            continue;
        }
        if c == '"' || c == '\'' {
            // Non-POSIX: the quotes stay in the token, which ends at the closing quote.
            let mut token = String::from(c);
            loop {
                match chars.next() {
                    None => return Err("no closing quotation".into()),
                    Some(q) if q == c => {
                        token.push(q);
                        break;
                    }
                    Some(other) => token.push(other),
                }
            }
            tokens.push(token);
            continue;
        }
        if is_word(c) {
            let mut token = String::from(c);
            while let Some(&next) = chars.peek() {
                if is_word(next) || next == '"' || next == '\'' {
                    token.push(next);
                    chars.next();
                } else if next == '#' {
                    // Non-POSIX shlex skips the rest of the line and goes on with the same word.
                    for c in chars.by_ref() {
                        if c == '\n' {
                            break;
                        }
                    }
                } else {
                    break;
                }
            }
            tokens.push(token);
            continue;
        }
        // Any other character is a token of its own.
        tokens.push(c.to_string());
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expansions() -> Expansions {
        let mut e = Expansions::new();
        e.insert("program_name".into(), Arg::Str("web".into()));
        e.insert("process_num".into(), Arg::Int(3));
        e.insert("numprocs".into(), Arg::Int(4));
        e.insert("ENV_HOME".into(), Arg::Str("/root".into()));
        e
    }

    #[test]
    fn expansions_format_like_python() {
        let table: &[(&str, &str)] = &[
            ("plain", "plain"),
            ("%(program_name)s_%(process_num)02d", "web_03"),
            ("--port=80%(process_num)02d", "--port=8003"),
            ("%(process_num)d/%(numprocs)d", "3/4"),
            ("%(process_num)s", "3"),
            ("[%(process_num)3d]", "[  3]"),
            ("[%(process_num)-3d]", "[3  ]"),
            ("[%(process_num)+d]", "[+3]"),
            ("[%(process_num)#x]", "[0x3]"),
            ("[%(process_num)04x]", "[0003]"),
            ("[%(process_num).3d]", "[003]"),
            ("[%(program_name).2s]", "[we]"),
            ("[%(program_name)5s]", "[  web]"),
            ("[%(program_name)05s]", "[  web]"),
            ("[%(program_name)r]", "['web']"),
            ("100%%", "100%"),
            ("%(ENV_HOME)s/x", "/root/x"),
            ("%(process_num)ld", "3"),
        ];
        for (text, want) in table {
            assert_eq!(expand(text, &expansions()).as_deref(), Ok(*want), "{text}");
        }
    }

    #[test]
    fn bad_expansions_are_errors_naming_them() {
        let table: &[(&str, &str)] = &[
            ("50%", "neither `%%`"),
            ("date +%s", "neither `%%`"),
            ("%(nope)s", "`%(nope)` cannot be expanded"),
            ("%(program_name)d", "needs a number"),
            ("%(process_num)", "without a conversion"),
            ("%(process_num", "unclosed"),
            ("%(process_num)q", "`%(process_num)q`"),
            (
                "%(process_num)999999999999999999999d",
                "a width or precision over 4096",
            ),
            ("%(process_num)5000d", "a width or precision over 4096"),
            ("%(program_name).5000s", "a width or precision over 4096"),
        ];
        for (text, words) in table {
            let e = expand(text, &expansions()).unwrap_err();
            assert!(e.contains(words), "{text}: {e}");
        }
    }

    #[test]
    fn shlex_split_like_python() {
        let table: &[(&str, &[&str])] = &[
            ("a b  c", &["a", "b", "c"]),
            (
                "/bin/sh -c 'echo $HOME; x'",
                &["/bin/sh", "-c", "echo $HOME; x"],
            ),
            (r#"a "b c" d"#, &["a", "b c", "d"]),
            (r#"a "x\"y\\z\$w""#, &["a", r#"x"y\z\$w"#]),
            (r"a\ b c", &["a b", "c"]),
            (r#"a "" b"#, &["a", "", "b"]),
            ("a\n  b", &["a", "b"]),
            (r#"--x="1 2"y"#, &["--x=1 2y"]),
            ("", &[]),
        ];
        for (text, want) in table {
            assert_eq!(shlex_split(text).unwrap(), *want, "{text}");
        }
        assert!(shlex_split("a 'b").is_err());
        assert!(shlex_split("a \"b").is_err());
        assert!(shlex_split("a \\").is_err());
    }

    #[test]
    fn environment_pairs_like_supervisord() {
        type Case = (&'static str, &'static [(&'static str, &'static str)]);
        let table: &[Case] = &[
            ("A=1,B=2", &[("A", "1"), ("B", "2")]),
            (r#"KEY="val,ue",B=2"#, &[("KEY", "val,ue"), ("B", "2")]),
            ("K='a b',L=x", &[("K", "a b"), ("L", "x")]),
            (
                "PATH=/usr/bin:/bin,LANG=C.UTF-8",
                &[("PATH", "/usr/bin:/bin"), ("LANG", "C.UTF-8")],
            ),
            ("A=1,\n  B=2", &[("A", "1"), ("B", "2")]),
            ("A=1,A=2", &[("A", "2")]),
            ("", &[]),
            // supervisord skips the token after each value whatever it is.
            ("A=1;B=2", &[("A", "1"), ("B", "2")]),
        ];
        for (text, want) in table {
            let got = key_value_pairs(text).unwrap();
            let want: Vec<(String, String)> = want
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert_eq!(got, want, "{text}");
        }
        // `@` is no word character: an unquoted URL with a user breaks the pairs, as in supervisord.
        assert!(key_value_pairs("DB=postgres://u:p@h/db").is_err());
        assert_eq!(
            key_value_pairs(r#"DB="postgres://u:p@h/db""#).unwrap(),
            vec![("DB".to_string(), "postgres://u:p@h/db".to_string())]
        );
        assert!(key_value_pairs("A=").is_err());
        assert!(key_value_pairs("A=1 B=2").is_err());
        assert!(key_value_pairs("A=1 B=2 C=3").is_err());
        assert!(key_value_pairs("A=\"x").is_err());
    }
}
