//! What the deployer's live tools (`deploy --wait`, `watch`) read of one service: the builds it
//! should run, each host's role and status, and the leases of the hosts restarting now — kept up
//! to date by one persistent recursive watch on `/services/<svc>` (ZooKeeper 3.6+), so a change
//! costs one read of the node that changed, not a re-read of the fleet.
//!
//! A persistent watch may lose the events of a reconnection (ZOOKEEPER-4698), and
//! `zookeeper-client` 0.11.2 does not register persistent watches again with the server after a
//! reconnect (its `resend_watches` sends only the one-shot kinds), so after the session comes
//! back the watch is added anew and every node is read again. A session that ends (expired,
//! closed, refused) ends the watch with [`CoordError::SessionEnded`]; the view is never silently
//! stale.

use std::collections::BTreeMap;
use std::time::Duration;

use zookeeper_client::{AddWatchMode, EventType, PersistentWatcher, SessionState, WatchedEvent};

use super::{CoordError, Fleet, Role, build_id, check_name, parse_role, service_path};

/// Changes that arrive this soon after the first are taken together: a host writes its status a
/// few times in a burst (phase, instance, phase), and one redraw is enough.
const COALESCE_MS: u64 = 30;
/// At most this many events are taken together, so a storm still yields a view now and then.
const COALESCE_MAX: usize = 256;

/// One service as the fleet sees it now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetView {
    /// `enabled`: the build every host should run.
    pub enabled: Option<String>,
    /// `enabled/canary`: the build canary hosts should run.
    pub canary: Option<String>,
    /// Each host's role, from `roles/<host>` (absent: prod; unreadable: prod, as hosts take it).
    pub roles: BTreeMap<String, Role>,
    /// Each host's status node as published (JSON; a node that is not JSON as a string).
    pub hosts: BTreeMap<String, serde_json::Value>,
    /// Hosts holding a restart lease now (`restarting/<lease>` nodes name their host).
    pub leases: usize,
}

impl FleetView {
    /// A host's role (prod unless its role node says canary).
    pub fn role(&self, host: &str) -> Role {
        self.roles.get(host).copied().unwrap_or(Role::Prod)
    }

    /// The build a host should run: `enabled/canary` on canary hosts when set, else `enabled`.
    pub fn target_of(&self, host: &str) -> Option<&str> {
        match (self.role(host), &self.canary) {
            (Role::Canary, Some(canary)) => Some(canary),
            _ => self.enabled.as_deref(),
        }
    }
}

/// A live [`FleetView`]. Holds the fleet client's session.
pub struct ViewWatch<'a> {
    fleet: &'a Fleet,
    service: String,
    watcher: PersistentWatcher,
    view: FleetView,
}

impl Fleet {
    /// Reads a service's view once.
    pub async fn view(&self, service: &str) -> Result<FleetView, CoordError> {
        check_name("service", service)?;
        let mut view = FleetView::default();
        read_all(self, service, &mut view).await?;
        Ok(view)
    }

    /// Starts following a service: the watch is set before the first read, so no change between
    /// the two is missed.
    pub async fn watch_view(&self, service: &str) -> Result<ViewWatch<'_>, CoordError> {
        check_name("service", service)?;
        let base = service_path(service);
        let watcher = self
            .client
            .watch(&base, AddWatchMode::PersistentRecursive)
            .await
            .map_err(|e| CoordError::zk("watch", &base, e))?;
        let mut view = FleetView::default();
        read_all(self, service, &mut view).await?;
        Ok(ViewWatch {
            fleet: self,
            service: service.to_owned(),
            watcher,
            view,
        })
    }
}

impl ViewWatch<'_> {
    /// The view as of the last read.
    pub fn view(&self) -> &FleetView {
        &self.view
    }

    /// Waits for the next change and returns the view after it. Several changes close together
    /// come back as one view.
    pub async fn changed(&mut self) -> Result<&FleetView, CoordError> {
        let first = self.watcher.changed().await;
        let mut events = vec![first];
        let deadline = tokio::time::Instant::now() + Duration::from_millis(COALESCE_MS);
        while events.len() < COALESCE_MAX {
            match tokio::time::timeout_at(deadline, self.watcher.changed()).await {
                Ok(event) => {
                    let ended = event.session_state.is_terminated();
                    events.push(event);
                    if ended {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        self.apply(&events).await?;
        Ok(&self.view)
    }

    async fn apply(&mut self, events: &[WatchedEvent]) -> Result<(), CoordError> {
        let base = service_path(&self.service);
        let mut reread_all = false;
        let mut paths = Vec::new();
        for event in events {
            if event.event_type == EventType::Session {
                if event.session_state.is_terminated() {
                    return Err(CoordError::SessionEnded {
                        state: format!("{:?}", event.session_state),
                    });
                }
                // Events during a reconnection may be lost: read everything once it is back.
                reread_all |= event.session_state == SessionState::SyncConnected;
                continue;
            }
            if let Some(rest) = event.path.strip_prefix(&base)
                && !paths.contains(&rest.to_owned())
            {
                paths.push(rest.to_owned());
            }
        }
        if reread_all {
            // The server forgot the persistent watch with the connection: add it again (the new
            // watcher before the old one goes, so the path never has none), then read all.
            self.watcher = self
                .fleet
                .client
                .watch(&base, AddWatchMode::PersistentRecursive)
                .await
                .map_err(|e| CoordError::zk("watch", &base, e))?;
            return read_all(self.fleet, &self.service, &mut self.view).await;
        }
        for rest in paths {
            read_one(self.fleet, &self.service, &rest, &mut self.view).await?;
        }
        Ok(())
    }
}

/// Reads every node the view holds.
async fn read_all(fleet: &Fleet, service: &str, view: &mut FleetView) -> Result<(), CoordError> {
    let base = service_path(service);
    let mut fresh = FleetView::default();
    for rest in ["/enabled", "/enabled/canary", "/restarting"] {
        read_one(fleet, service, rest, &mut fresh).await?;
    }
    for host in fleet.children(&format!("{base}/roles")).await? {
        read_one(fleet, service, &format!("/roles/{host}"), &mut fresh).await?;
    }
    for host in fleet.children(&format!("{base}/status")).await? {
        read_one(fleet, service, &format!("/status/{host}"), &mut fresh).await?;
    }
    *view = fresh;
    Ok(())
}

/// Reads the node at `rest` (the path below `/services/<svc>`) into the view, if the view keeps it.
async fn read_one(
    fleet: &Fleet,
    service: &str,
    rest: &str,
    view: &mut FleetView,
) -> Result<(), CoordError> {
    let path = format!("{}{rest}", service_path(service));
    let data = || async { Ok::<_, CoordError>(fleet.read(&path).await?.map(|(data, _)| data)) };
    match rest.split('/').skip(1).collect::<Vec<_>>()[..] {
        ["enabled"] => view.enabled = build_id(data().await?),
        ["enabled", "canary"] => view.canary = build_id(data().await?),
        // A lease made or gone (the queue below `restarting/queue` is not part of the view).
        ["restarting"] | ["restarting", _] => {
            view.leases = fleet
                .children(&format!("{}/restarting", service_path(service)))
                .await?
                .iter()
                .filter(|c| c.starts_with("lease-"))
                .count();
        }
        ["roles", host] => match data().await? {
            Some(data) => {
                view.roles.insert(host.to_owned(), parse_role(Some(&data)));
            }
            None => {
                view.roles.remove(host);
            }
        },
        ["status", host] => match data().await? {
            Some(data) => {
                let status = serde_json::from_slice(&data).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(&data).into_owned())
                });
                view.hosts.insert(host.to_owned(), status);
            }
            None => {
                view.hosts.remove(host);
            }
        },
        // `config`, `history`, the parents themselves: not part of the view.
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_targets_the_canary_build_only_when_it_is_a_canary_and_one_is_set() {
        let mut view = FleetView {
            enabled: Some("b1".into()),
            ..FleetView::default()
        };
        view.roles.insert("c".into(), Role::Canary);
        assert_eq!(view.target_of("c"), Some("b1"));
        view.canary = Some("b2".into());
        assert_eq!(view.target_of("c"), Some("b2"));
        assert_eq!(view.target_of("p"), Some("b1"));
        assert_eq!(view.role("p"), Role::Prod);
    }
}
