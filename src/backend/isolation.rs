//! Extra processes of stdio servers whose `isolation` is not `shared`: a process per client
//! session (`per-session`), a pool used in turn (`pooled`), or a fresh process per
//! `tools/call` (`per-call`). The server's main [`Backend`] still supplies the catalog and
//! serves what is not isolated; an instance is a full `Backend` of its own (supervised,
//! in its own process group, stopped by the keeper if the relay dies).
//!
//! Task requests (`tasks/*`, task-augmented calls) are pinned: they go where the task lives
//! (the session's own process for `per-session`, the main process otherwise).

use super::{Backend, Hub};
use crate::config::{Isolation, ServerConfig};
use crate::session::ReqCtx;
use crate::sync::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

/// How many instances of isolated servers are alive, and where.
pub struct Instances {
    state: Arc<Mutex<State>>,
    /// Per-call concurrency caps by server (replaced when the cap changes).
    calls: Mutex<HashMap<String, (usize, Arc<Semaphore>)>>,
    stopping: TaskTracker,
}

impl State {
    /// Removes the per-session processes `which` selects and returns them.
    fn take(&mut self, which: impl Fn(&(String, String), &Slot) -> bool) -> Vec<Arc<Backend>> {
        self.sessions
            .extract_if(|k, slot| which(k, slot))
            .map(|(_, slot)| slot.backend)
            .collect()
    }
}

#[derive(Default)]
struct State {
    /// By (server, session id).
    sessions: HashMap<(String, String), Slot>,
    /// Extra members by server (the main process is the pool's member 0).
    pools: HashMap<String, Pool>,
    /// Extra processes alive (all policies).
    total: usize,
}

struct Slot {
    backend: Arc<Backend>,
    last_used: Instant,
    busy: usize,
    idle_timeout: Duration,
}

struct Pool {
    extra: Vec<Arc<Backend>>,
    next: usize,
}

/// Why no instance was given (the message names the server and the setting).
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "too many sessions for server `{server}`: each has its own process and its maxInstances is {max}; close a session or raise maxInstances"
    )]
    Sessions { server: String, max: usize },
    #[error(
        "server `{server}`: relay.maxInstances ({max}) isolated processes are running; close sessions or raise relay.maxInstances"
    )]
    Relay { server: String, max: usize },
    #[error(
        "server `{server}`: its {max} per-call processes (maxInstances) stayed busy for the whole request timeout"
    )]
    Calls { server: String, max: usize },
}

/// An instance lent to one request; returned (or stopped, for `per-call`) when dropped.
pub struct Lease {
    pub backend: Arc<Backend>,
    end: End,
    state: Arc<Mutex<State>>,
    stopping: TaskTracker,
}

enum End {
    Session((String, String)),
    Pool,
    /// The per-call slot, freed with the lease.
    Call {
        _slot: OwnedSemaphorePermit,
    },
}

impl Drop for Lease {
    fn drop(&mut self) {
        match &self.end {
            End::Session(key) => {
                if let Some(slot) = lock(&self.state).sessions.get_mut(key) {
                    slot.busy = slot.busy.saturating_sub(1);
                    slot.last_used = Instant::now();
                }
            }
            End::Pool => {}
            End::Call { .. } => {
                let b = self.backend.clone();
                let state = self.state.clone();
                self.stopping.spawn(async move {
                    b.stop().await;
                    let mut st = lock(&state);
                    st.total = st.total.saturating_sub(1);
                });
            }
        }
    }
}

/// One forwarded request, as isolation sees it.
pub struct Want<'a> {
    pub method: &'a str,
    pub session: &'a str,
    /// A task request (goes where the task lives).
    pub pinned: bool,
    /// The request's deadline (a per-call request waits for a free slot until then).
    pub deadline: tokio::time::Instant,
}

/// Starts an instance of a server (a `Backend` with the instance hub).
pub type Starter<'a> = &'a (dyn Fn(&ServerConfig) -> Arc<Backend> + Send + Sync);

impl Instances {
    pub fn new(stopping: TaskTracker) -> Instances {
        Instances {
            state: Arc::default(),
            calls: Mutex::new(HashMap::new()),
            stopping,
        }
    }

    fn lease(&self, backend: Arc<Backend>, end: End) -> Lease {
        Lease {
            backend,
            end,
            state: self.state.clone(),
            stopping: self.stopping.clone(),
        }
    }

    /// The instance for one request, or `None` for the main process. `cap`:
    /// `relay.maxInstances`.
    pub async fn lease_for(
        &self,
        cfg: &ServerConfig,
        want: Want<'_>,
        cap: usize,
        start: Starter<'_>,
    ) -> Result<Option<Lease>, LeaseError> {
        let Want {
            method,
            session,
            pinned,
            deadline,
        } = want;
        match cfg.isolation {
            Isolation::Shared => Ok(None),
            Isolation::PerSession {
                max_instances,
                idle_timeout,
            } => {
                let key = (cfg.name.clone(), session.to_owned());
                let mut st = lock(&self.state);
                if let Some(slot) = st.sessions.get_mut(&key) {
                    slot.busy += 1;
                    let b = slot.backend.clone();
                    drop(st);
                    return Ok(Some(self.lease(b, End::Session(key))));
                }
                let mine = st.sessions.keys().filter(|(s, _)| *s == cfg.name).count();
                if mine >= max_instances {
                    return Err(LeaseError::Sessions {
                        server: cfg.name.clone(),
                        max: max_instances,
                    });
                }
                if st.total >= cap {
                    return Err(LeaseError::Relay {
                        server: cfg.name.clone(),
                        max: cap,
                    });
                }
                let b = start(cfg);
                st.total += 1;
                st.sessions.insert(
                    key.clone(),
                    Slot {
                        backend: b.clone(),
                        last_used: Instant::now(),
                        busy: 1,
                        idle_timeout,
                    },
                );
                drop(st);
                tracing::info!(server = %cfg.name, session, "Started a per-session process.");
                Ok(Some(self.lease(b, End::Session(key))))
            }
            _ if pinned => Ok(None),
            Isolation::Pooled { size } => {
                let mut st = lock(&self.state);
                if !st.pools.contains_key(&cfg.name) {
                    let room = cap.saturating_sub(st.total);
                    let extra: Vec<Arc<Backend>> =
                        (1..size.min(room + 1)).map(|_| start(cfg)).collect();
                    st.total += extra.len();
                    tracing::info!(server = %cfg.name, processes = extra.len() + 1, "Started a pool.");
                    st.pools.insert(cfg.name.clone(), Pool { extra, next: 0 });
                }
                let Some(pool) = st.pools.get_mut(&cfg.name) else {
                    return Ok(None);
                };
                let members = pool.extra.len() + 1;
                let i = pool.next % members;
                pool.next = pool.next.wrapping_add(1);
                Ok(match i {
                    0 => None,
                    i => {
                        let b = pool.extra[i - 1].clone();
                        drop(st);
                        Some(self.lease(b, End::Pool))
                    }
                })
            }
            Isolation::PerCall { max_instances } => {
                if method != crate::protocol::method::TOOLS_CALL {
                    return Ok(None);
                }
                let sem = {
                    let mut calls = lock(&self.calls);
                    let entry = calls.entry(cfg.name.clone()).or_insert_with(|| {
                        (max_instances, Arc::new(Semaphore::new(max_instances)))
                    });
                    if entry.0 != max_instances {
                        *entry = (max_instances, Arc::new(Semaphore::new(max_instances)));
                    }
                    entry.1.clone()
                };
                let busy = || LeaseError::Calls {
                    server: cfg.name.clone(),
                    max: max_instances,
                };
                let permit = tokio::time::timeout_at(deadline, sem.acquire_owned())
                    .await
                    .map_err(|_| busy())?
                    .map_err(|_| busy())?;
                let b = {
                    let mut st = lock(&self.state);
                    if st.total >= cap {
                        return Err(LeaseError::Relay {
                            server: cfg.name.clone(),
                            max: cap,
                        });
                    }
                    st.total += 1;
                    start(cfg)
                };
                Ok(Some(self.lease(b, End::Call { _slot: permit })))
            }
        }
    }

    /// Extra processes alive for `server`.
    pub fn count(&self, server: &str) -> usize {
        let st = lock(&self.state);
        st.sessions.keys().filter(|(s, _)| s == server).count()
            + st.pools.get(server).map_or(0, |p| p.extra.len())
    }

    fn stop_later(&self, gone: Vec<Arc<Backend>>) {
        if gone.is_empty() {
            return;
        }
        let state = self.state.clone();
        self.stopping.spawn(async move {
            let n = gone.len();
            futures::future::join_all(gone.iter().map(|b| b.stop())).await;
            let mut st = lock(&state);
            st.total = st.total.saturating_sub(n);
        });
    }

    /// A session ended: its processes stop.
    pub fn end_session(&self, session: &str) {
        let gone = lock(&self.state).take(|(_, s), _| s == session);
        self.stop_later(gone);
    }

    /// A server was removed or changed: its instances stop (new ones start from the new
    /// entry).
    pub fn drop_server(&self, server: &str) {
        let gone: Vec<Arc<Backend>> = {
            let mut st = lock(&self.state);
            let mut gone = st.take(|(s, _), _| s == server);
            if let Some(p) = st.pools.remove(server) {
                gone.extend(p.extra);
            }
            gone
        };
        self.stop_later(gone);
    }

    /// Stops per-session processes unused for their `idleTimeoutMs`.
    pub fn reap(&self) {
        let gone = lock(&self.state).take(|(server, session), slot| {
            let idle = slot.busy == 0 && slot.last_used.elapsed() >= slot.idle_timeout;
            if idle {
                tracing::info!(server = %server, session = %session, "Idle per-session process stopped.");
            }
            idle
        });
        self.stop_later(gone);
    }

    /// Stops every instance (shutdown) and waits for them.
    pub async fn stop_all(&self) {
        let gone: Vec<Arc<Backend>> = {
            let mut st = lock(&self.state);
            let mut gone: Vec<Arc<Backend>> = st.sessions.drain().map(|(_, s)| s.backend).collect();
            gone.extend(st.pools.drain().flat_map(|(_, p)| p.extra));
            gone
        };
        futures::future::join_all(gone.iter().map(|b| b.stop())).await;
        lock(&self.state).total = 0;
    }
}

/// The hub of instances: server messages reach sessions as the main process's do, but an
/// instance's lists never replace the catalog (the main process supplies it) and its
/// reconnection renews nothing (its session's subscriptions were made on it).
pub struct InstanceHub(pub Arc<dyn Hub>);

impl Hub for InstanceHub {
    fn lists_changed(&self, _server: &str) {}

    fn resource_updated(&self, server: &str, uri: &str, msg: String) {
        self.0.resource_updated(server, uri, msg);
    }

    fn broadcast(&self, server: &str, msg: String) {
        self.0.broadcast(server, msg);
    }

    fn sole_session(&self, server: &str) -> Option<ReqCtx> {
        self.0.sole_session(server)
    }

    fn task_owner(&self, exposed_task_id: &str) -> Option<ReqCtx> {
        self.0.task_owner(exposed_task_id)
    }

    fn connected(&self, _server: &str) {}
}
