//! The daemon's ZooKeeper side of canary analysis, on the owner's session (no second client):
//! the other hosts' status nodes (their `canary_sample`), the verdict's action — promote the
//! canary build or clear `enabled/canary`, both only while `enabled/canary` still names the
//! judged build — and the persistent record `/services/<svc>/canary/<build>/<host>`.

use std::time::Duration;

use zookeeper_client::{Client, CreateMode, Error as E};

use super::{CoordError, Zk, build_id, check_name, next_history, parse_history, service_path};
use crate::protocol::CanaryAction;

/// Attempts of a compare-and-set write when another writer got in between.
const WRITE_ATTEMPTS: usize = 5;
/// Most status nodes read for a baseline.
const STATUS_NODES_MAX: usize = 1_000;

impl Zk {
    fn canary_session(&self) -> Result<(Client, Duration), CoordError> {
        let Some(session) = self.session.borrow().clone() else {
            return Err(CoordError::NotConnected);
        };
        let timeout = Duration::from_millis(self.shared.config.session_timeout_ms.max(1));
        Ok((session.client, timeout))
    }

    /// Every host's status node of `service` but this host's, raw (at most
    /// [`STATUS_NODES_MAX`]); a node gone between the listing and the read is skipped.
    pub async fn host_statuses(&self, service: &str) -> Result<Vec<(String, Vec<u8>)>, CoordError> {
        check_name("service", service)?;
        let (client, timeout) = self.canary_session()?;
        let base = format!("{}/status", service_path(service));
        let bounded = |path: String| CoordError::Timeout {
            path,
            timeout_ms: timeout.as_millis() as u64,
        };
        let children = match tokio::time::timeout(timeout, client.list_children(&base)).await {
            Err(_) => return Err(bounded(base)),
            Ok(Err(E::NoNode)) => Vec::new(),
            Ok(Err(e)) => return Err(CoordError::zk("list", &base, e)),
            Ok(Ok(children)) => children,
        };
        let mut out = Vec::new();
        for host in children.into_iter().take(STATUS_NODES_MAX) {
            if host == self.host() {
                continue;
            }
            let path = format!("{base}/{host}");
            match tokio::time::timeout(timeout, client.get_data(&path)).await {
                Err(_) => return Err(bounded(path)),
                Ok(Err(E::NoNode)) => {}
                Ok(Err(e)) => return Err(CoordError::zk("read", &path, e)),
                Ok(Ok((data, _))) => out.push((host, data)),
            }
        }
        Ok(out)
    }

    /// `enabled := build` with the history, in one transaction that also checks that
    /// `enabled/canary` still names `build`. Idempotent: `enabled` already on `build` (another
    /// canary host promoted it) is done.
    pub async fn promote_canary(
        &self,
        service: &str,
        build: &str,
    ) -> Result<CanaryAction, CoordError> {
        check_name("service", service)?;
        check_name("build", build)?;
        let (client, timeout) = self.canary_session()?;
        let base = service_path(service);
        let enabled = format!("{base}/enabled");
        let canary = format!("{base}/enabled/canary");
        let history = format!("{base}/history");
        let options = self.shared.acl.options(CreateMode::Persistent);
        let bound = |path: &str| CoordError::Timeout {
            path: path.to_owned(),
            timeout_ms: timeout.as_millis() as u64,
        };
        tokio::time::timeout(timeout, client.mkdir(&history, &options))
            .await
            .map_err(|_| bound(&history))?
            .map_err(|e| CoordError::zk("create", &history, e))?;
        let mut last = E::BadVersion;
        for _ in 0..WRITE_ATTEMPTS {
            let read = |path: String| {
                let client = client.clone();
                async move {
                    match tokio::time::timeout(timeout, client.get_data(&path)).await {
                        Err(_) => Err(bound(&path)),
                        Ok(Err(e)) => Err(CoordError::zk("read", &path, e)),
                        Ok(Ok(read)) => Ok(read),
                    }
                }
            };
            let (enabled_data, enabled_stat) = read(enabled.clone()).await?;
            if build_id(Some(enabled_data)).as_deref() == Some(build) {
                return Ok(CanaryAction::Promoted);
            }
            let (canary_data, canary_stat) = read(canary.clone()).await?;
            if build_id(Some(canary_data)).as_deref() != Some(build) {
                return Err(CoordError::BadData {
                    path: canary,
                    reason: format!("no longer names {build}: not promoting it"),
                });
            }
            let (history_data, history_stat) = read(history.clone()).await?;
            let list = next_history(parse_history(&history_data), build);
            let mut writer = client.new_multi_writer();
            let staged = writer
                .add_check_version(&canary, canary_stat.version)
                .and_then(|()| {
                    writer.add_set_data(&enabled, build.as_bytes(), Some(enabled_stat.version))
                })
                .and_then(|()| writer.add_set_data(&history, &list, Some(history_stat.version)));
            if let Err(e) = staged {
                return Err(CoordError::zk("write", &enabled, e));
            }
            match tokio::time::timeout(timeout, writer.commit()).await {
                Err(_) => return Err(bound(&enabled)),
                Ok(Ok(_)) => return Ok(CanaryAction::Promoted),
                Ok(Err(e)) => match E::from(e) {
                    E::BadVersion => last = E::BadVersion,
                    e => return Err(CoordError::zk("write", &enabled, e)),
                },
            }
        }
        Err(CoordError::zk("write", &enabled, last))
    }

    /// Clears `enabled/canary` if it still names `build` (compare-and-set on its version): every
    /// canary host goes back to `enabled`. Already cleared, or naming another build: done.
    pub async fn clear_canary(
        &self,
        service: &str,
        build: &str,
    ) -> Result<CanaryAction, CoordError> {
        check_name("service", service)?;
        check_name("build", build)?;
        let (client, timeout) = self.canary_session()?;
        let canary = format!("{}/enabled/canary", service_path(service));
        let bound = || CoordError::Timeout {
            path: canary.clone(),
            timeout_ms: timeout.as_millis() as u64,
        };
        for _ in 0..WRITE_ATTEMPTS {
            let (data, stat) = match tokio::time::timeout(timeout, client.get_data(&canary)).await {
                Err(_) => return Err(bound()),
                Ok(Err(E::NoNode)) => return Ok(CanaryAction::RolledBack),
                Ok(Err(e)) => return Err(CoordError::zk("read", &canary, e)),
                Ok(Ok(read)) => read,
            };
            if build_id(Some(data)).as_deref() != Some(build) {
                tracing::info!(
                    service,
                    build,
                    "enabled/canary no longer names the build: nothing to clear"
                );
                return Ok(CanaryAction::RolledBack);
            }
            match tokio::time::timeout(timeout, client.set_data(&canary, b"", Some(stat.version)))
                .await
            {
                Err(_) => return Err(bound()),
                Ok(Ok(_)) => return Ok(CanaryAction::RolledBack),
                Ok(Err(E::BadVersion)) => continue,
                Ok(Err(e)) => return Err(CoordError::zk("write", &canary, e)),
            }
        }
        Err(CoordError::zk("write", &canary, E::BadVersion))
    }

    /// Writes this host's analysis of `build` to `/services/<svc>/canary/<build>/<host>`
    /// (persistent, so it outlives the host's session; created with its parents).
    pub async fn record_canary(
        &self,
        service: &str,
        build: &str,
        data: &[u8],
    ) -> Result<(), CoordError> {
        check_name("service", service)?;
        check_name("build", build)?;
        let (client, timeout) = self.canary_session()?;
        let path = format!("{}/canary/{build}/{}", service_path(service), self.host());
        let options = self.shared.acl.options(CreateMode::Persistent);
        let bound = || CoordError::Timeout {
            path: path.clone(),
            timeout_ms: timeout.as_millis() as u64,
        };
        for _ in 0..WRITE_ATTEMPTS {
            match tokio::time::timeout(timeout, client.set_data(&path, data, None)).await {
                Err(_) => return Err(bound()),
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(E::NoNode)) => {}
                Ok(Err(e)) => return Err(CoordError::zk("write", &path, e)),
            }
            let parent = &path[..path.rfind('/').expect("absolute path")];
            match tokio::time::timeout(timeout, client.mkdir(parent, &options)).await {
                Err(_) => return Err(bound()),
                Ok(Err(e)) => return Err(CoordError::zk("create", parent, e)),
                Ok(Ok(())) => {}
            }
            match tokio::time::timeout(timeout, client.create(&path, data, &options)).await {
                Err(_) => return Err(bound()),
                Ok(Ok(_)) => return Ok(()),
                // Written meanwhile (another daemon of this host name?): set it again.
                Ok(Err(E::NodeExists)) => {}
                Ok(Err(e)) => return Err(CoordError::zk("create", &path, e)),
            }
        }
        Err(CoordError::zk("write", &path, E::NodeExists))
    }
}
