//! The shim's command line, defined once for both sides: the brain builds it with
//! [`ShimArgs::to_args`], the shim reads it with [`ShimArgs::parse`] (by hand, because the shim
//! depends on std and libc only). A unit test keeps the two inverse of each other.

use std::ffi::OsString;
use std::path::PathBuf;

/// Printed after an argument error.
pub const USAGE: &str = "usage: sluice-shim --id SVC/INDEX --socket PATH --lock PATH --stdout-log PATH \
--stderr-log PATH [--log-max-bytes N] [--log-backups N] [--tag STRING] [--cwd DIR] [--uid N] [--gid N] \
[--groups N,N,...] [--umask OCTAL] [--nofile N] [--tree-cgroup DIR] [--cgroup DIR] -- PROGRAM [ARGS...]";

/// Default for `--log-max-bytes`: 50 MiB per log file before it is rotated.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 50 * 1024 * 1024;

/// Default for `--log-backups`: rotated files kept besides the current one.
pub const DEFAULT_LOG_BACKUPS: u32 = 10;

/// Everything the shim is told on its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimArgs {
    /// `SVC/INDEX`, used in messages only (the brain identifies a shim by its socket path).
    pub id: String,
    /// Unix socket the shim answers on.
    pub socket: PathBuf,
    /// File whose `flock` proves that this instance has a live shim; never unlinked.
    pub lock: PathBuf,
    /// Where the child's stdout goes.
    pub stdout_log: PathBuf,
    /// Where the child's stderr goes.
    pub stderr_log: PathBuf,
    /// Rotate a log file before it would grow past this; 0 never rotates.
    pub log_max_bytes: u64,
    /// Rotated files kept per log (`path.1` is the newest); 0 truncates instead.
    pub log_backups: u32,
    /// Opaque to the shim, echoed in status lines (the brain stores e.g. the build id there).
    pub tag: String,
    /// Working directory of the child; default: the shim's own.
    pub cwd: Option<PathBuf>,
    /// User the child runs as.
    pub uid: Option<u32>,
    /// Group the child runs as.
    pub gid: Option<u32>,
    /// Supplementary groups of the child; empty when `--uid` is given without `--groups`.
    pub groups: Option<Vec<u32>>,
    /// File mode creation mask of the child.
    pub umask: Option<u32>,
    /// `RLIMIT_NOFILE` (soft and hard) of the child.
    pub nofile: Option<u64>,
    /// The instance's tracking cgroup: the child joins it before it execs, so every process of the
    /// instance is in it (or in a child of it) for its whole life; the shim kills what is left in
    /// it before it starts the child (survivors of a predecessor) and after the child exits.
    /// `None`: the tree is tracked by the shim's session only (`setsid` descendants escape).
    pub tree_cgroup: Option<PathBuf>,
    /// A cgroup directory the child joins (through its `cgroup.procs`) before it execs, after the
    /// tracking cgroup (the CPU one; in the same hierarchy as the tracking cgroup it is where the
    /// child ends up, and the shim kills its members too).
    pub cgroup: Option<PathBuf>,
    /// Program to run, an absolute path or a name looked up in `PATH`.
    pub program: OsString,
    /// Its arguments.
    pub program_args: Vec<OsString>,
}

impl ShimArgs {
    /// The command line after the program name, as [`ShimArgs::parse`] reads it back: the required
    /// flags, the optional ones that are set, then `--`, the program and its arguments.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut argv: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, value: OsString| {
            argv.push(name.into());
            argv.push(value);
        };
        flag("--id", self.id.clone().into());
        flag("--socket", self.socket.clone().into());
        flag("--lock", self.lock.clone().into());
        flag("--stdout-log", self.stdout_log.clone().into());
        flag("--stderr-log", self.stderr_log.clone().into());
        flag("--log-max-bytes", self.log_max_bytes.to_string().into());
        flag("--log-backups", self.log_backups.to_string().into());
        flag("--tag", self.tag.clone().into());
        if let Some(cwd) = &self.cwd {
            flag("--cwd", cwd.clone().into());
        }
        if let Some(uid) = self.uid {
            flag("--uid", uid.to_string().into());
        }
        if let Some(gid) = self.gid {
            flag("--gid", gid.to_string().into());
        }
        if let Some(groups) = &self.groups {
            let list: Vec<String> = groups.iter().map(u32::to_string).collect();
            flag("--groups", list.join(",").into());
        }
        if let Some(umask) = self.umask {
            flag("--umask", format!("{umask:03o}").into());
        }
        if let Some(nofile) = self.nofile {
            flag("--nofile", nofile.to_string().into());
        }
        if let Some(dir) = &self.tree_cgroup {
            flag("--tree-cgroup", dir.clone().into());
        }
        if let Some(dir) = &self.cgroup {
            flag("--cgroup", dir.clone().into());
        }
        argv.push("--".into());
        argv.push(self.program.clone());
        argv.extend(self.program_args.iter().cloned());
        argv
    }

    /// Parses the arguments after the program name. The error is a one-line message.
    pub fn parse(argv: impl IntoIterator<Item = OsString>) -> Result<ShimArgs, String> {
        parse(argv)
    }
}

fn parse(argv: impl IntoIterator<Item = OsString>) -> Result<ShimArgs, String> {
    let mut argv = argv.into_iter();
    let mut id = None;
    let mut socket = None;
    let mut lock = None;
    let mut stdout_log = None;
    let mut stderr_log = None;
    let mut log_max_bytes = DEFAULT_LOG_MAX_BYTES;
    let mut log_backups = DEFAULT_LOG_BACKUPS;
    let mut tag = "-".to_owned();
    let mut cwd = None;
    let mut uid = None;
    let mut gid = None;
    let mut groups = None;
    let mut umask = None;
    let mut nofile = None;
    let mut tree_cgroup = None;
    let mut cgroup = None;
    let mut command = None;

    while let Some(arg) = argv.next() {
        if arg == "--" {
            command = Some(argv.by_ref().collect::<Vec<_>>());
            break;
        }
        let Some(flag) = arg
            .to_str()
            .filter(|a| a.starts_with("--"))
            .map(str::to_owned)
        else {
            return Err(format!(
                "unexpected argument {arg:?}: the program goes after --"
            ));
        };
        let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let text = || {
            value
                .to_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("{flag}: value is not utf-8"))
        };
        match flag.as_str() {
            "--id" => id = Some(word(&flag, text()?)?),
            "--socket" => socket = Some(PathBuf::from(value)),
            "--lock" => lock = Some(PathBuf::from(value)),
            "--stdout-log" => stdout_log = Some(PathBuf::from(value)),
            "--stderr-log" => stderr_log = Some(PathBuf::from(value)),
            "--log-max-bytes" => log_max_bytes = number(&flag, &text()?)?,
            "--log-backups" => log_backups = number(&flag, &text()?)?,
            "--tag" => tag = word(&flag, text()?)?,
            "--cwd" => cwd = Some(PathBuf::from(value)),
            "--uid" => uid = Some(number(&flag, &text()?)?),
            "--gid" => gid = Some(number(&flag, &text()?)?),
            "--groups" => {
                let list = text()?;
                let parsed: Result<Vec<u32>, String> = list
                    .split(',')
                    .filter(|g| !g.is_empty())
                    .map(|g| number(&flag, g))
                    .collect();
                groups = Some(parsed?);
            }
            "--umask" => {
                let octal = text()?;
                match u32::from_str_radix(&octal, 8) {
                    Ok(mask) if mask <= 0o777 => umask = Some(mask),
                    _ => return Err(format!("{flag}: not an octal mask: {octal}")),
                }
            }
            "--nofile" => nofile = Some(number(&flag, &text()?)?),
            "--tree-cgroup" => tree_cgroup = Some(PathBuf::from(value)),
            "--cgroup" => cgroup = Some(PathBuf::from(value)),
            _ => return Err(format!("unknown flag: {flag}")),
        }
    }

    let required =
        |name: &str, value: Option<PathBuf>| value.ok_or_else(|| format!("missing {name}"));
    let mut command = command
        .filter(|c| !c.is_empty())
        .ok_or_else(|| "missing -- PROGRAM".to_owned())?
        .into_iter();
    let program = command.next().unwrap_or_default();
    Ok(ShimArgs {
        id: id.ok_or_else(|| "missing --id".to_owned())?,
        socket: required("--socket", socket)?,
        lock: required("--lock", lock)?,
        stdout_log: required("--stdout-log", stdout_log)?,
        stderr_log: required("--stderr-log", stderr_log)?,
        log_max_bytes,
        log_backups,
        tag,
        cwd,
        uid,
        gid,
        groups: groups.or_else(|| uid.map(|_| Vec::new())),
        umask,
        nofile,
        tree_cgroup,
        cgroup,
        program,
        program_args: command.collect(),
    })
}

/// A value that ends up as one token of a status line or message: non-empty, no whitespace.
fn word(flag: &str, value: String) -> Result<String, String> {
    if value.is_empty() || value.contains(char::is_whitespace) {
        return Err(format!(
            "{flag}: must be non-empty without spaces: {value:?}"
        ));
    }
    Ok(value)
}

fn number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{flag}: not a number: {value}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(args: &[&str]) -> Result<ShimArgs, String> {
        ShimArgs::parse(args.iter().map(OsString::from))
    }

    const REQUIRED: [&str; 10] = [
        "--id",
        "api/0",
        "--socket",
        "/run/s.sock",
        "--lock",
        "/run/s.lock",
        "--stdout-log",
        "/log/out",
        "--stderr-log",
        "/log/err",
    ];

    #[test]
    fn defaults() {
        let mut argv = REQUIRED.to_vec();
        argv.extend(["--", "sleep", "100"]);
        let args = parse_str(&argv).unwrap();
        assert_eq!(args.id, "api/0");
        assert_eq!(args.log_max_bytes, DEFAULT_LOG_MAX_BYTES);
        assert_eq!(args.log_backups, DEFAULT_LOG_BACKUPS);
        assert_eq!(args.tag, "-");
        assert_eq!(args.groups, None);
        assert_eq!(args.cgroup, None);
        assert_eq!(args.tree_cgroup, None);
        assert_eq!(args.program, "sleep");
        assert_eq!(args.program_args, vec![OsString::from("100")]);
    }

    #[test]
    fn all_options() {
        let mut argv = REQUIRED.to_vec();
        argv.extend([
            "--log-max-bytes",
            "0",
            "--log-backups",
            "3",
            "--tag",
            "b7",
            "--cwd",
            "/srv",
            "--uid",
            "5",
            "--gid",
            "6",
            "--umask",
            "027",
            "--nofile",
            "4096",
            "--tree-cgroup",
            "/sys/fs/cgroup/unified/sluice-tree/api@0",
            "--cgroup",
            "/sys/fs/cgroup/cpu/sluice/api@0",
            "--",
            "/bin/app",
            "--",
            "-x",
        ]);
        let args = parse_str(&argv).unwrap();
        assert_eq!(args.log_max_bytes, 0);
        assert_eq!(args.log_backups, 3);
        assert_eq!(args.tag, "b7");
        assert_eq!(args.cwd, Some(PathBuf::from("/srv")));
        assert_eq!((args.uid, args.gid), (Some(5), Some(6)));
        assert_eq!(
            args.groups,
            Some(vec![]),
            "--uid without --groups clears the groups"
        );
        assert_eq!(args.umask, Some(0o027));
        assert_eq!(args.nofile, Some(4096));
        assert_eq!(
            args.cgroup,
            Some(PathBuf::from("/sys/fs/cgroup/cpu/sluice/api@0"))
        );
        assert_eq!(
            args.tree_cgroup,
            Some(PathBuf::from("/sys/fs/cgroup/unified/sluice-tree/api@0"))
        );
        assert_eq!(args.program, "/bin/app");
        assert_eq!(
            args.program_args,
            vec![OsString::from("--"), OsString::from("-x")]
        );

        let mut argv = REQUIRED.to_vec();
        argv.extend(["--groups", "1,2,3", "--", "x"]);
        assert_eq!(parse_str(&argv).unwrap().groups, Some(vec![1, 2, 3]));
    }

    #[test]
    fn errors() {
        let with = |extra: &[&str]| {
            let mut argv = REQUIRED.to_vec();
            argv.extend(extra);
            parse_str(&argv).unwrap_err()
        };
        assert_eq!(with(&["--bogus", "1", "--", "x"]), "unknown flag: --bogus");
        assert_eq!(with(&[]), "missing -- PROGRAM");
        assert_eq!(with(&["--"]), "missing -- PROGRAM");
        assert_eq!(
            with(&["--umask", "9", "--", "x"]),
            "--umask: not an octal mask: 9"
        );
        assert_eq!(
            with(&["--uid", "root", "--", "x"]),
            "--uid: not a number: root"
        );
        assert_eq!(
            with(&["--tag", "a b", "--", "x"]),
            "--tag: must be non-empty without spaces: \"a b\""
        );
        assert_eq!(with(&["--nofile"]), "--nofile needs a value");
        assert_eq!(
            with(&["sleep"]),
            "unexpected argument \"sleep\": the program goes after --"
        );
        assert_eq!(
            parse_str(&REQUIRED[2..]).map(|_| ()).unwrap_err(),
            "missing -- PROGRAM"
        );
        let mut argv = REQUIRED[2..].to_vec();
        argv.extend(["--", "x"]);
        assert_eq!(parse_str(&argv).unwrap_err(), "missing --id");
    }

    /// What the brain builds, the shim reads back unchanged: every field set (with a non-UTF-8
    /// path and program argument, and a program argument that looks like a flag), and only the
    /// required ones.
    #[test]
    fn to_args_round_trips() {
        use std::os::unix::ffi::OsStringExt;
        let full = ShimArgs {
            id: "api/3".into(),
            socket: "/run/sluice/shims/api@3.sock".into(),
            lock: "/run/sluice/shims/api@3.lock".into(),
            stdout_log: PathBuf::from(OsString::from_vec(b"/log/api-3.\xffout".to_vec())),
            stderr_log: "/log/api-3.err".into(),
            log_max_bytes: 0,
            log_backups: 7,
            tag: "build-b7".into(),
            cwd: Some("/srv/api/releases/b7".into()),
            uid: Some(1000),
            gid: Some(1001),
            groups: Some(vec![4, 27, 1001]),
            umask: Some(0o007),
            nofile: Some(65_536),
            tree_cgroup: Some("/sys/fs/cgroup/unified/sluice-tree/api@3".into()),
            cgroup: Some("/sys/fs/cgroup/cpu/sluice/api@3".into()),
            program: "/usr/bin/java".into(),
            program_args: vec![
                "-jar".into(),
                "--".into(),
                "--uid".into(),
                OsString::from_vec(b"\xfe".to_vec()),
            ],
        };
        assert_eq!(ShimArgs::parse(full.to_args()), Ok(full.clone()));

        let minimal = ShimArgs {
            cwd: None,
            uid: None,
            gid: None,
            groups: None,
            umask: None,
            nofile: None,
            tree_cgroup: None,
            cgroup: None,
            program_args: Vec::new(),
            ..full.clone()
        };
        assert_eq!(ShimArgs::parse(minimal.to_args()), Ok(minimal));

        // A uid with an empty group list: the child gets no supplementary groups.
        let no_groups = ShimArgs {
            groups: Some(Vec::new()),
            ..full
        };
        assert_eq!(ShimArgs::parse(no_groups.to_args()), Ok(no_groups));
    }
}
