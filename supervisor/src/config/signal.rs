//! Signals as service files name them: `TERM`, `SIGTERM`, `hup` or a number.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A signal given by name (`TERM`, `SIGTERM`, `hup`) or number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signal(pub i32);

impl Signal {
    pub fn parse(text: &str) -> Option<Signal> {
        if let Ok(n) = text.parse::<i32>() {
            return (1..=64).contains(&n).then_some(Signal(n));
        }
        let upper = text.to_ascii_uppercase();
        let name = upper.strip_prefix("SIG").unwrap_or(&upper);
        let n = match name {
            "HUP" => libc::SIGHUP,
            "INT" => libc::SIGINT,
            "QUIT" => libc::SIGQUIT,
            "KILL" => libc::SIGKILL,
            "USR1" => libc::SIGUSR1,
            "USR2" => libc::SIGUSR2,
            "TERM" => libc::SIGTERM,
            "CONT" => libc::SIGCONT,
            "STOP" => libc::SIGSTOP,
            "WINCH" => libc::SIGWINCH,
            _ => return None,
        };
        Some(Signal(n))
    }

    pub fn name(self) -> String {
        match self.0 {
            libc::SIGHUP => "HUP".into(),
            libc::SIGINT => "INT".into(),
            libc::SIGQUIT => "QUIT".into(),
            libc::SIGKILL => "KILL".into(),
            libc::SIGUSR1 => "USR1".into(),
            libc::SIGUSR2 => "USR2".into(),
            libc::SIGTERM => "TERM".into(),
            libc::SIGCONT => "CONT".into(),
            libc::SIGSTOP => "STOP".into(),
            libc::SIGWINCH => "WINCH".into(),
            n => n.to_string(),
        }
    }
}

impl Serialize for Signal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for Signal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Signal::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown signal `{text}` (use a name such as TERM, HUP, INT, QUIT, USR1, or a number)"
            ))
        })
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        assert_eq!(Signal::parse("hup"), Some(Signal(libc::SIGHUP)));
        assert_eq!(Signal::parse("SIGUSR2"), Some(Signal(libc::SIGUSR2)));
        assert_eq!(Signal::parse("9"), Some(Signal(9)));
        assert_eq!(Signal::parse("0"), None);
        assert_eq!(Signal::parse("NOPE"), None);
    }
}
