//! `sluice import-supervisord FILE --out DIR`: reads a supervisord configuration (with its
//! includes) and writes one sluice service file per program, and a report of everything it could
//! not carry over. `docs/from-supervisord.md` is the mapping, key by key.
//!
//! Exit codes (documented there): 0 every program's settings were carried over; 5 the files were
//! written, but the report lists settings not carried over; 3 the supervisord configuration is
//! wrong (file and line said), nothing written; 1 the files could not be written (an existing one
//! without `--force`, an I/O error).

pub mod convert;
pub mod expand;
pub mod ini;
pub mod report;

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Exit code of an import that wrote its files but could not carry everything over.
pub const EXIT_INCOMPLETE: i32 = 5;

/// Mode of the service files written: root writes them, the daemon (root) reads them, and nothing
/// in them is secret that the supervisord file did not already show.
const SERVICE_FILE_MODE: u32 = 0o644;

/// The command line of `sluice import-supervisord`.
#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    /// The supervisord configuration (e.g. /etc/supervisor/supervisord.conf); its `[include]`
    /// files are read too.
    pub file: PathBuf,
    /// Directory to write the service files into (created if missing), e.g. /etc/sluice/services.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace service files that already exist.
    #[arg(long)]
    pub force: bool,
    /// Also write the report into this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The supervisord configuration is wrong; `line` 0 is the whole file.
    #[error("{}{}: {message}", path.display(), if *line > 0 { format!(":{line}") } else { String::new() })]
    Config {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} already exist(s) in {}: nothing was written (`--force` replaces them)", names.join(", "), dir.display())]
    Exists { dir: PathBuf, names: Vec<String> },
}

impl ImportError {
    /// The exit code of `sluice import-supervisord` for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            ImportError::Read { .. } | ImportError::Config { .. } => crate::exit::CONFIG,
            ImportError::Write { .. } | ImportError::Exists { .. } => crate::exit::FAILED,
        }
    }
}

/// Reads, converts and writes; returns the report. Nothing is written when the configuration
/// cannot be read or converted, or when a file exists and `force` is off.
pub fn import(args: &ImportArgs, ctx: &convert::Context) -> Result<report::Report, ImportError> {
    let ini = ini::Ini::load(&args.file, |v, file| convert::expand_include(ctx, v, file))?;
    let converted = convert::convert(&ini, ctx)?;
    write_all(&args.out, &converted.services, args.force)?;
    Ok(converted.report)
}

/// The CLI verb: prints the report (and writes `--report`), returns the exit code.
pub fn run(args: &ImportArgs) -> Result<i32, ImportError> {
    let report = import(args, &convert::Context::current())?;
    let text = report.render(
        &args.file.display().to_string(),
        &args.out.display().to_string(),
    );
    print!("{text}");
    if let Some(path) = &args.report {
        std::fs::write(path, &text).map_err(|source| ImportError::Write {
            path: path.clone(),
            source,
        })?;
    }
    Ok(if report.complete() {
        crate::exit::OK
    } else {
        EXIT_INCOMPLETE
    })
}

/// The exit code of [`run`]'s result, printing an error on stderr.
pub fn exit_code(result: Result<i32, ImportError>) -> i32 {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice: import-supervisord: {e}");
            e.exit_code()
        }
    }
}

/// Writes every file through a temporary file and a rename, after checking that none exists
/// (unless `force`), so an import either writes all its files or, short of an I/O error midway,
/// none.
fn write_all(dir: &Path, files: &[convert::ServiceFile], force: bool) -> Result<(), ImportError> {
    std::fs::create_dir_all(dir).map_err(|source| ImportError::Write {
        path: dir.to_owned(),
        source,
    })?;
    if !force {
        let existing: Vec<String> = files
            .iter()
            .map(|f| format!("{}.toml", f.name))
            .filter(|name| std::fs::symlink_metadata(dir.join(name)).is_ok())
            .collect();
        if !existing.is_empty() {
            return Err(ImportError::Exists {
                dir: dir.to_owned(),
                names: existing,
            });
        }
    }
    for file in files {
        write_one(dir, &format!("{}.toml", file.name), &file.toml)?;
    }
    Ok(())
}

/// One file: created new (never through a link someone left), written, synced, mode 0644, renamed
/// over the target.
fn write_one(dir: &Path, name: &str, text: &str) -> Result<(), ImportError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let target = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let fail = |path: &Path| {
        let path = path.to_owned();
        move |source| ImportError::Write { path, source }
    };
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(SERVICE_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(fail(&tmp))?;
    let result = (|| {
        file.write_all(text.as_bytes())?;
        // The umask may have taken bits away from the mode given at creation.
        file.set_permissions(std::fs::Permissions::from_mode(SERVICE_FILE_MODE))?;
        file.sync_all()?;
        std::fs::rename(&tmp, &target)
    })();
    if let Err(source) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(ImportError::Write {
            path: target,
            source,
        });
    }
    Ok(())
}
