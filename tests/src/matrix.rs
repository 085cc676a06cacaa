//! The servers and clients of the restart matrix: the real servers users run (gunicorn `sync` and
//! `gthread`, uvicorn, the JDK HttpServer with its default `nodelay`) as sluice service files, and
//! the real clients that reach them (an aiohttp keep-alive pool, aiohttp opening a new connection
//! per request, and Debian's nginx proxying with upstream keep-alive), each bounded in requests
//! and seconds, run inside the test's namespace and reporting every request's outcome.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fixtures;
use crate::netns::Netns;

/// How long a client or nginx gets to exit after SIGTERM before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(10);
/// How long nginx may take to listen after its start.
const NGINX_START_TIMEOUT: Duration = Duration::from_secs(10);

/// A server of the matrix, as a sluice service of `instances` instances on `port_base`.. behind
/// `front_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// gunicorn's default worker: answers every request with `Connection: close`.
    GunicornSync,
    /// gunicorn's threaded worker: keeps connections alive (`--keep-alive 5`).
    GunicornGthread,
    /// uvicorn on asyncio with h11, an ASGI app; keeps connections alive (5 s, its default).
    Uvicorn,
    /// The JDK's `com.sun.net.httpserver` with its default `sun.net.httpserver.nodelay=false`.
    JavaDefault,
}

impl Server {
    /// Whether the server keeps connections alive, so a keep-alive client holds connections to
    /// each instance across requests.
    pub fn keeps_alive(self) -> bool {
        self != Server::GunicornSync
    }

    pub fn name(self) -> &'static str {
        match self {
            Server::GunicornSync => "gunicorn-sync",
            Server::GunicornGthread => "gunicorn-gthread",
            Server::Uvicorn => "uvicorn",
            Server::JavaDefault => "java-default-nodelay",
        }
    }

    /// The instance command, or `None` (after saying what is missing) when the test must skip.
    /// `work` is a directory of the test's own (the Java classes are compiled into it).
    pub fn command(self, work: &Path) -> Option<String> {
        let quote = |args: &[String]| -> String {
            args.iter()
                .map(|a| format!("{a:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let fixtures = fixtures::dir().display().to_string();
        let args: Vec<String> = match self {
            Server::GunicornSync | Server::GunicornGthread => {
                let gunicorn = fixtures::gunicorn()?.display().to_string();
                let mut args = vec![gunicorn, "--bind".into(), "127.0.0.1:{port}".into()];
                if self == Server::GunicornSync {
                    // The default worker class, spelled out: two sync workers as users run it.
                    args.extend(["--workers", "2", "--worker-class", "sync"].map(String::from));
                } else {
                    args.extend(
                        [
                            "--workers",
                            "1",
                            "--worker-class",
                            "gthread",
                            "--threads",
                            "8",
                            "--keep-alive",
                            "5",
                        ]
                        .map(String::from),
                    );
                }
                args.extend(
                    [
                        "--graceful-timeout",
                        "5",
                        "--chdir",
                        &fixtures,
                        "wsgi_app:app",
                    ]
                    .map(String::from),
                );
                args
            }
            Server::Uvicorn => {
                let uvicorn = fixtures::venv_bin("uvicorn")?.display().to_string();
                vec![
                    uvicorn,
                    "--host".into(),
                    "127.0.0.1".into(),
                    "--port".into(),
                    "{port}".into(),
                    "--no-access-log".into(),
                    "--timeout-graceful-shutdown".into(),
                    "5".into(),
                    "--app-dir".into(),
                    fixtures,
                    "asgi_app:app".into(),
                ]
            }
            Server::JavaDefault => {
                let classes = fixtures::java_app(&work.join("classes"))?;
                // No -Dsun.net.httpserver.nodelay: the JDK's default is what this cell is about.
                vec![
                    fixtures::java().display().to_string(),
                    "-Xmx64m".into(),
                    "-XX:+UseSerialGC".into(),
                    "-cp".into(),
                    classes.display().to_string(),
                    "WarmApp".into(),
                    "{port}".into(),
                ]
            }
        };
        Some(format!("[{}]", quote(&args)))
    }

    /// The whole service file: drain restarts with warm-up on, `instances` instances.
    pub fn service_toml(
        self,
        command: &str,
        instances: u32,
        port_base: u16,
        front_port: u16,
        drain_timeout_ms: u64,
    ) -> String {
        // The JVM's first start on a busy machine takes seconds; the Python servers' less.
        let start_timeout_ms = if self == Server::JavaDefault {
            30_000
        } else {
            10_000
        };
        format!(
            r#"command = {command}
instances = {instances}
port_base = {port_base}
front_port = {front_port}
stop_grace_ms = 8000
env = {{ INSTANCE = "{{instance}}" }}
[restart]
strategy = "drain"
drain_timeout_ms = {drain_timeout_ms}
[health]
http = "/health"
start_timeout_ms = {start_timeout_ms}
[warmup]
requests = ["GET /item", "GET /other/path"]
max_duration_ms = 5000
concurrency = 2
"#
        )
    }
}

/// What one client saw: every request is `ok`, `failed`, or `retried` (its kept-alive connection
/// was closed under it before any answer, and the client's one resend succeeded). aiohttp resends
/// on the oldest idle connection of its pool, not on a new one: when a stopping instance closes
/// several kept-alive connections at once, the resend can meet another of them and the request
/// fails (`failed`, with both attempts quoted).
#[derive(Debug, Clone, Default)]
pub struct ClientReport {
    pub name: String,
    pub ok: u64,
    pub failed: u64,
    pub retried: u64,
    /// The first failures, as the client quoted them (bounded by the client).
    pub failures: Vec<String>,
    /// p50/p90/p99/max in ms, as the client measured them.
    pub latencies_ms: Value,
}

impl ClientReport {
    pub fn total(&self) -> u64 {
        self.ok + self.failed + self.retried
    }
}

/// The HTTP client modes of `tests/fixtures/http_client.py`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientMode {
    /// A keep-alive pool that never closes an idle connection.
    Pool,
    /// A new connection for every request.
    NewConnections,
}

/// Bounds of one client run.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    pub rate_per_s: u32,
    pub max_seconds: u64,
    pub max_requests: u64,
}

/// A running `http_client.py` inside a namespace; [`HttpClient::finish`] stops it and reads its
/// report. Killed on drop.
pub struct HttpClient {
    name: String,
    child: Option<Child>,
}

impl HttpClient {
    /// `None` (after saying so) when the venv's python with aiohttp is missing.
    pub fn start(
        ns: &Netns,
        name: &str,
        mode: ClientMode,
        url: &str,
        limits: ClientLimits,
    ) -> Option<HttpClient> {
        let python = fixtures::venv_bin("python")?;
        let mode = match mode {
            ClientMode::Pool => "pool",
            ClientMode::NewConnections => "new",
        };
        let child = ns
            .command(python)
            .arg(fixtures::dir().join("http_client.py"))
            .args(["--url", url, "--mode", mode])
            .args(["--rate", &limits.rate_per_s.to_string()])
            .args(["--seconds", &limits.max_seconds.to_string()])
            .args(["--max-requests", &limits.max_requests.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the HTTP client");
        Some(HttpClient {
            name: name.to_owned(),
            child: Some(child),
        })
    }

    /// Stops the client (SIGTERM: it lets the requests in flight finish) and returns its report.
    #[track_caller]
    pub fn finish(mut self) -> ClientReport {
        let mut child = self.child.take().expect("finished once");
        // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + EXIT_GRACE;
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let out = child.wait_with_output().expect("the client's output");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "client {}: no report ({e}); exit {:?}; stdout {stdout:?}; stderr {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
        ClientReport {
            name: self.name.clone(),
            ok: report["ok"].as_u64().unwrap_or(0),
            failed: report["failed"].as_u64().unwrap_or(0),
            retried: report["retried"].as_u64().unwrap_or(0),
            failures: report["failures"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str().map(str::to_owned))
                .collect(),
            latencies_ms: report["latencies_ms"].clone(),
        }
    }
}

impl Drop for HttpClient {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Debian's nginx inside a namespace: listens on `127.0.0.1:listen_port` and proxies everything
/// to `127.0.0.1:<upstream port>` (round robin over several) with upstream keep-alive, its config, pid, logs and temp files in
/// `dir`. Its access log records each request's upstream statuses, which is where its own
/// retries show (`502, 200`: a cached upstream connection was closed under it and it tried
/// again). Stopped on drop.
pub struct Nginx {
    dir: PathBuf,
    child: Option<Child>,
}

/// What nginx's access log says about the requests it proxied.
#[derive(Debug, Clone, Default)]
pub struct NginxLog {
    pub requests: u64,
    /// Requests nginx sent upstream more than once (its upstream statuses list several).
    pub retried_upstream: u64,
    /// Requests nginx answered with something other than 200.
    pub not_ok: u64,
    /// The first lines of the retried or failed requests.
    pub samples: Vec<String>,
}

impl Nginx {
    /// `None` (after saying so) when nginx is not installed.
    pub fn start(
        ns: &Netns,
        dir: &Path,
        listen_port: u16,
        upstream_ports: &[u16],
    ) -> Option<Nginx> {
        let nginx = Path::new("/usr/sbin/nginx");
        if !fixtures::require("nginx (Debian's nginx-light)", nginx.exists()) {
            return None;
        }
        std::fs::create_dir_all(dir.join("logs")).expect("creating nginx's dirs");
        let d = dir.display();
        let servers: String = upstream_ports
            .iter()
            .map(|p| format!("        server 127.0.0.1:{p};\n"))
            .collect();
        // Keep-alive upstream as the nginx docs prescribe it: `keepalive` in the upstream block,
        // HTTP/1.1 and an empty Connection header towards the upstream.
        let conf = format!(
            r#"daemon off;
master_process on;
worker_processes 1;
user root;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format upstreams '$status "$upstream_status" "$upstream_addr" $request_time';
    access_log {d}/logs/access.log upstreams;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream app {{
{servers}        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{listen_port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("writing nginx.conf");
        let mut cmd = ns.command(nginx);
        cmd.arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("logs/error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group, so the workers go with the master whatever happens.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().expect("spawning nginx");
        let nginx = Nginx {
            dir: dir.to_owned(),
            child: Some(child),
        };
        let deadline = Instant::now() + NGINX_START_TIMEOUT;
        while !ns.run_in(|| std::net::TcpStream::connect(("127.0.0.1", listen_port)).is_ok()) {
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on 127.0.0.1:{listen_port} within {NGINX_START_TIMEOUT:?}: {}",
                std::fs::read_to_string(dir.join("logs/error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(nginx)
    }

    /// Reads the access log (call after the clients finished).
    pub fn log(&self) -> NginxLog {
        let text = std::fs::read_to_string(self.dir.join("logs/access.log")).unwrap_or_default();
        let mut log = NginxLog::default();
        for line in text.lines() {
            log.requests += 1;
            let retried = line
                .split('"')
                .nth(1)
                .is_some_and(|statuses| statuses.contains(','));
            let not_ok = !line.starts_with("200 ");
            log.retried_upstream += u64::from(retried);
            log.not_ok += u64::from(not_ok);
            if (retried || not_ok) && log.samples.len() < 10 {
                log.samples.push(line.to_owned());
            }
        }
        log
    }

    /// The pids of nginx's master and workers (its process group), for CPU accounting.
    pub fn pids(&self) -> Vec<i32> {
        let Some(child) = &self.child else {
            return Vec::new();
        };
        crate::procs::live_in_group(child.id() as i32)
            .iter()
            .map(|p| p.pid)
            .collect()
    }

    /// nginx's error log (for failure messages).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("logs/error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pgid = child.id() as i32;
            // SAFETY: kill has no memory-safety preconditions; the group is nginx's own (see
            // `process_group(0)` above) and its leader our unreaped child.
            unsafe { libc::kill(pgid, libc::SIGTERM) };
            let deadline = Instant::now() + EXIT_GRACE;
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // SAFETY: as above; whatever is left of the group goes.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

/// How each drain of `service` ended (`idle`, `closed`, `timeout`, …), from the daemon's log: the
/// lines the drain writes when it hands an instance to its stop. One entry per drain, in order.
/// The daemon's log lines of `service`'s restart that matter to a client (chain writes, drains,
/// stops, exits, starts, enables), at most 80: set beside the clients' failure times.
pub fn restart_timeline(log: &str, service: &str) -> String {
    const WORDS: [&str; 8] = [
        "chain", "steer", "drain", "stop", "exit", "start", "enable", "warm",
    ];
    let service_field = format!("service={service} ");
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&service_field) && WORDS.iter().any(|w| l.contains(w)))
        .collect();
    let skip = lines.len().saturating_sub(80);
    lines[skip..].join("\n")
}

pub fn drain_endings(log: &str, service: &str) -> Vec<String> {
    let service_field = format!("service={service} ");
    log.lines()
        .filter(|l| l.contains("drain") && l.contains(&service_field))
        .filter_map(|l| {
            ["ending=", "ended=", "outcome="].iter().find_map(|key| {
                let rest = l.split(key).nth(1)?;
                let value = rest.split_whitespace().next()?;
                Some(value.trim_matches('"').trim_end_matches(',').to_owned())
            })
        })
        .collect()
}
