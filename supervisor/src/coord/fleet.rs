//! The `sluice` command's side of ZooKeeper (fleet verbs): a short-lived client that deploys,
//! promotes and rolls back builds, registers builds and lists hosts.

use std::time::Duration;

use zookeeper_client::{Client, CreateMode, Error as E, Stat};

use super::{
    AclSet, BuildMeta, CoordError, Limit, Role, build_id, build_path, check_name, next_history,
    open, parse_build_meta, parse_history, restarting_path, service_path,
};

/// Session timeout of the CLI's client: long enough to ride out a leader election.
const FLEET_SESSION_TIMEOUT_MS: u64 = 10_000;
/// How many times a verb re-reads and retries when another writer changed the history meanwhile.
const WRITE_ATTEMPTS: usize = 5;

/// The CLI's connection to ZooKeeper. Closes its session when dropped.
pub struct Fleet {
    pub(super) client: Client,
    acl: AclSet,
}

impl Fleet {
    pub async fn connect(
        connect: &str,
        digest: Option<(String, String)>,
    ) -> Result<Fleet, CoordError> {
        let acl = AclSet::new(digest.as_ref());
        let timeout = Duration::from_millis(FLEET_SESSION_TIMEOUT_MS);
        let client = open(connect, digest.as_ref(), &acl, timeout).await?;
        Ok(Fleet { client, acl })
    }

    /// Whether `/builds/<svc>/<build>` exists.
    pub async fn is_registered(&self, service: &str, build: &str) -> Result<bool, CoordError> {
        check_name("service", service)?;
        check_name("build", build)?;
        Ok(self.read(&build_path(service, build)).await?.is_some())
    }

    /// Writes `enabled` (or `enabled/canary`), creating parents. A build need not be registered in
    /// `/builds/<svc>/`: hosts then fetch it from their `[build] source` and its sidecar checksum,
    /// and a build that is nowhere is reported by every host in its status. A prod deploy is
    /// recorded in the history.
    pub async fn deploy(&self, service: &str, build: &str, canary: bool) -> Result<(), CoordError> {
        check_name("service", service)?;
        check_name("build", build)?;
        if canary {
            let path = format!("{}/enabled/canary", service_path(service));
            return self.put(&path, build.as_bytes()).await;
        }
        let build = build.to_owned();
        self.set_enabled(service, move |_, _| Ok(build.clone()))
            .await
            .map(drop)
    }

    /// `enabled := enabled/canary`; returns the build.
    pub async fn promote(&self, service: &str) -> Result<String, CoordError> {
        check_name("service", service)?;
        let path = format!("{}/enabled/canary", service_path(service));
        let canary = build_id(self.read(&path).await?.map(|(data, _)| data));
        let Some(canary) = canary else {
            return Err(CoordError::NoCanary {
                service: service.to_owned(),
            });
        };
        self.set_enabled(service, move |_, _| Ok(canary.clone()))
            .await
    }

    /// `enabled :=` the build before the current one in the history; returns it.
    pub async fn rollback(&self, service: &str) -> Result<String, CoordError> {
        check_name("service", service)?;
        let service_name = service.to_owned();
        self.set_enabled(service, move |history, current| {
            // Walk back past the current build (it may be in the history more than once if
            // someone wrote `enabled` by hand in between).
            while history.last().is_some_and(|b| Some(b) == current.as_ref()) {
                history.pop();
            }
            let Some(previous) = history.pop() else {
                return Err(CoordError::NoHistory {
                    service: service_name.clone(),
                });
            };
            Ok(previous)
        })
        .await
    }

    /// Registers a build's metadata. Builds are immutable: registering again with the same
    /// metadata is a no-op, with other metadata an error.
    pub async fn register_build(
        &self,
        service: &str,
        build: &str,
        meta: &BuildMeta,
    ) -> Result<(), CoordError> {
        check_name("service", service)?;
        check_name("build", build)?;
        let path = build_path(service, build);
        let data = serde_json::to_vec(meta).expect("build metadata serialises");
        match self.create(&path, &data).await {
            Ok(()) => Ok(()),
            Err(CoordError::Zk {
                source: E::NodeExists,
                ..
            }) => {
                let existing = self.read(&path).await?.map(|(data, _)| data);
                let same = existing
                    .is_some_and(|d| parse_build_meta(&path, &d).ok().as_ref() == Some(meta));
                if same {
                    Ok(())
                } else {
                    Err(CoordError::BuildExists {
                        service: service.to_owned(),
                        build: build.to_owned(),
                    })
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Every registered build of a service with its metadata, oldest `created` first.
    pub async fn builds(&self, service: &str) -> Result<Vec<(String, BuildMeta)>, CoordError> {
        check_name("service", service)?;
        let dir = format!("/builds/{service}");
        let mut builds = Vec::new();
        for build in self.children(&dir).await? {
            let path = format!("{dir}/{build}");
            if let Some((data, _)) = self.read(&path).await? {
                builds.push((build, parse_build_meta(&path, &data)?));
            }
        }
        builds.sort_by(|a, b| (&a.1.created, &a.0).cmp(&(&b.1.created, &b.0)));
        Ok(builds)
    }

    /// The statuses the hosts of a service publish, by host name. A status that is not JSON is
    /// shown as a string.
    pub async fn hosts(
        &self,
        service: &str,
    ) -> Result<Vec<(String, serde_json::Value)>, CoordError> {
        check_name("service", service)?;
        let dir = format!("{}/status", service_path(service));
        let mut hosts = Vec::new();
        for host in self.children(&dir).await? {
            if let Some((data, _)) = self.read(&format!("{dir}/{host}")).await? {
                let status = serde_json::from_slice(&data).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(&data).into_owned())
                });
                hosts.push((host, status));
            }
        }
        hosts.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(hosts)
    }

    pub async fn set_role(&self, service: &str, host: &str, role: Role) -> Result<(), CoordError> {
        check_name("service", service)?;
        check_name("host", host)?;
        let path = format!("{}/roles/{host}", service_path(service));
        let data: &[u8] = match role {
            Role::Prod => b"prod",
            Role::Canary => b"canary",
        };
        self.put(&path, data).await
    }

    /// Writes a service's configuration; refuses text that is not JSON.
    pub async fn set_config(&self, service: &str, json: &str) -> Result<(), CoordError> {
        check_name("service", service)?;
        let path = format!("{}/config", service_path(service));
        if let Err(e) = serde_json::from_str::<serde_json::Value>(json) {
            return Err(CoordError::BadData {
                path,
                reason: format!("not json: {e}"),
            });
        }
        self.put(&path, json.as_bytes()).await
    }

    pub async fn set_max_hosts_restarting(
        &self,
        service: &str,
        limit: Limit,
    ) -> Result<(), CoordError> {
        check_name("service", service)?;
        self.put(&restarting_path(service), limit.to_string().as_bytes())
            .await
    }

    /// Sets `enabled` to the build `choose` picks from the history and the current build, and
    /// records it in the history, both in one transaction (retried if another writer got in
    /// between).
    async fn set_enabled(
        &self,
        service: &str,
        choose: impl Fn(&mut Vec<String>, &Option<String>) -> Result<String, CoordError>,
    ) -> Result<String, CoordError> {
        let base = service_path(service);
        let enabled = format!("{base}/enabled");
        let history_path = format!("{base}/history");
        let mut last = E::BadVersion;
        for _ in 0..WRITE_ATTEMPTS {
            self.ensure(&enabled).await?;
            self.ensure(&history_path).await?;
            let Some((current, enabled_stat)) = self.read(&enabled).await? else {
                continue;
            };
            let Some((history_data, history_stat)) = self.read(&history_path).await? else {
                continue;
            };
            let current = build_id(Some(current));
            let mut history = parse_history(&history_data);
            let build = choose(&mut history, &current)?;
            let history_data = next_history(history, &build);
            let result = self.commit(
                (&enabled, build.as_bytes(), &enabled_stat),
                (&history_path, &history_data, &history_stat),
            );
            match result.await {
                Ok(()) => return Ok(build),
                Err(E::BadVersion) => last = E::BadVersion,
                Err(e) => return Err(CoordError::zk("write", &enabled, e)),
            }
        }
        Err(CoordError::zk("write", &history_path, last))
    }

    /// Writes two nodes at once if neither changed since it was read.
    async fn commit(
        &self,
        (first, first_data, first_stat): (&str, &[u8], &Stat),
        (second, second_data, second_stat): (&str, &[u8], &Stat),
    ) -> Result<(), E> {
        let mut writer = self.client.new_multi_writer();
        writer.add_set_data(first, first_data, Some(first_stat.version))?;
        writer.add_set_data(second, second_data, Some(second_stat.version))?;
        writer.commit().await.map(drop).map_err(E::from)
    }

    pub(super) async fn read(&self, path: &str) -> Result<Option<(Vec<u8>, Stat)>, CoordError> {
        match self.client.get_data(path).await {
            Ok(read) => Ok(Some(read)),
            Err(E::NoNode) => Ok(None),
            Err(e) => Err(CoordError::zk("read", path, e)),
        }
    }

    pub(super) async fn children(&self, path: &str) -> Result<Vec<String>, CoordError> {
        match self.client.list_children(path).await {
            Ok(children) => Ok(children),
            Err(E::NoNode) => Ok(Vec::new()),
            Err(e) => Err(CoordError::zk("list", path, e)),
        }
    }

    /// Creates a persistent node and its missing parents.
    async fn create(&self, path: &str, data: &[u8]) -> Result<(), CoordError> {
        let options = self.acl.options(CreateMode::Persistent);
        match self.client.create(path, data, &options).await {
            Ok(_) => Ok(()),
            Err(E::NoNode) => {
                let parent = &path[..path.rfind('/').expect("absolute path")];
                self.client
                    .mkdir(parent, &options)
                    .await
                    .map_err(|e| CoordError::zk("create", parent, e))?;
                self.client
                    .create(path, data, &options)
                    .await
                    .map(drop)
                    .map_err(|e| CoordError::zk("create", path, e))
            }
            Err(e) => Err(CoordError::zk("create", path, e)),
        }
    }

    /// Creates an empty node (and parents) unless it exists.
    async fn ensure(&self, path: &str) -> Result<(), CoordError> {
        self.client
            .mkdir(path, &self.acl.options(CreateMode::Persistent))
            .await
            .map_err(|e| CoordError::zk("create", path, e))
    }

    /// Sets a node's data, creating it (and its parents) if missing.
    async fn put(&self, path: &str, data: &[u8]) -> Result<(), CoordError> {
        for _ in 0..WRITE_ATTEMPTS {
            match self.client.set_data(path, data, None).await {
                Ok(_) => return Ok(()),
                Err(E::NoNode) => {}
                Err(e) => return Err(CoordError::zk("write", path, e)),
            }
            match self.create(path, data).await {
                Ok(()) => return Ok(()),
                // Created by someone else meanwhile: overwrite it.
                Err(CoordError::Zk {
                    source: E::NodeExists,
                    ..
                }) => {}
                Err(e) => return Err(e),
            }
        }
        Err(CoordError::zk("write", path, E::NodeExists))
    }
}
