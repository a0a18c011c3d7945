//! A document's running connectors, one per server, each stopped and started on its own: a
//! replacement that changes one server reconnects that server's connector only.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Connectors;
use crate::hub::Hub;
use crate::spec::Api;

/// How long a stopping connector gets to disconnect.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The connectors of one document, by server id.
#[derive(Default)]
pub(super) struct ServerTasks {
    by_server: BTreeMap<String, (CancellationToken, TaskTracker)>,
}

impl ServerTasks {
    /// Starts the connectors of `api`'s servers for which `only` holds, each under a child of
    /// `parent`. Stops at the first that cannot start (the caller undoes what it must).
    pub(super) fn start(
        &mut self,
        connectors: &dyn Connectors,
        hub: &Arc<Hub>,
        api: &Api,
        parent: &CancellationToken,
        only: &dyn Fn(&str) -> bool,
    ) -> Result<(), (String, String)> {
        for server in api.servers.iter().filter(|s| only(&s.id)) {
            let (stop, tracker) = (parent.child_token(), TaskTracker::new());
            let started = connectors.start_server(hub, api, &server.id, &stop, &tracker);
            tracker.close();
            self.by_server.insert(server.id.clone(), (stop, tracker));
            started?;
        }
        Ok(())
    }

    /// Stops the connectors of the servers for which `which` holds and waits for them.
    pub(super) async fn stop(&mut self, document: &str, which: &(dyn Fn(&str) -> bool + Sync)) {
        let stopping: Vec<String> = self
            .by_server
            .keys()
            .filter(|s| which(s))
            .cloned()
            .collect();
        for server in stopping {
            if let Some((stop, tracker)) = self.by_server.remove(&server) {
                stop.cancel();
                if tokio::time::timeout(STOP_TIMEOUT, tracker.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!(document = %document, server = %server, tasks = tracker.len(), "a connector did not stop in time");
                }
            }
        }
    }

    /// Cancels every connector without waiting (a start that failed midway).
    pub(super) fn cancel_all(&self) {
        for (stop, _) in self.by_server.values() {
            stop.cancel();
        }
    }

    pub(super) fn trackers(&self) -> Vec<TaskTracker> {
        self.by_server.values().map(|(_, t)| t.clone()).collect()
    }

    pub(super) fn len(&self) -> usize {
        self.by_server.values().map(|(_, t)| t.len()).sum()
    }
}
