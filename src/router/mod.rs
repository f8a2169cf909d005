//! The hot path: a client message in, the right backend(s) out, the reply back.
//!
//! [`Relay`] is the composition root at run time: it owns the backends, the merged catalog
//! snapshot and the session registry, answers `initialize`, `ping` and the merged lists itself,
//! and forwards everything else to the owning backend. Frontends call [`Relay::handle`]; the
//! backends call back through [`backend::Hub`].

mod mrtr;
mod stateless;
pub use stateless::{Reply, Status, is_stateless};

use crate::admin;
use crate::backend::{self, Backend, State};
use crate::catalog::{self, Catalog, Source};
use crate::config::Config;
use crate::error::RpcError;
use crate::metrics::Outcome;
use crate::protocol::{self, Kind, Message, RawMap, method};
use crate::selection::{self, View};
use crate::session::{Grant, Outbox, ReqCtx, Session};
use crate::sync::{lock, read, write};
use crate::tasks;
use indexmap::IndexMap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Instant;

/// The running relay.
pub struct Relay {
    /// The config in force; replaced as a whole by [`Relay::apply`].
    config: RwLock<Arc<Config>>,
    /// What backends started from now on are given (limits shared with running ones).
    settings: backend::Settings,
    hub: Arc<dyn backend::Hub>,
    front: Front,
    /// Whether this front may offer the management tools (set by the front: stdio, or
    /// HTTP on a loopback address).
    admin_front: AtomicBool,
    /// Serving a non-loopback address without `--allow-unauthenticated` (see [`Relay::refuse`]).
    public: AtomicBool,
    started: Instant,
    /// Serializes config changes (tool calls, reloads) so they apply in file order.
    changing: tokio::sync::Mutex<()>,
    /// The last config reload that was rejected, for `relay__status`.
    config_error: Mutex<Option<String>>,
    /// Set by shutdown: config changes no longer start backends.
    closing: AtomicBool,
    /// Backends being stopped in the background (removed or replaced); shutdown waits.
    stopping: tokio_util::task::TaskTracker,
    backends: RwLock<IndexMap<String, Arc<Backend>>>,
    catalog: RwLock<Arc<Catalog>>,
    /// The catalog as `toolFiltering` lets sessions see it, with its ranking index.
    view: RwLock<Arc<View>>,
    /// Serializes catalog rebuilds; holds the analyzed tool texts between them.
    rebuild: Mutex<selection::DocCache>,
    /// Embeds each new view's tools in the background (`toolFiltering.embeddings`).
    warmer: selection::Warmer,
    /// Client for the optional LLM of `relay__analyze_prompt`.
    pub(crate) llm_client: reqwest::Client,
    pub(crate) llm_stats: selection::llm::Stats,
    sessions: Mutex<HashMap<String, Weak<Session>>>,
    /// The client capabilities backends are told (see [`backend::Settings`]).
    declared: tokio::sync::watch::Sender<Option<String>>,
    /// When backends were released to run their handshakes.
    released: Mutex<Instant>,
    /// Where upgrade requests go (stdio front only): the sender, and the receiver until the
    /// front takes it (requests made before it serves wait for it).
    upgrades: Mutex<UpgradeChannel>,
    /// An upgrade is being carried out (requests beyond it are refused).
    upgrading: AtomicBool,
    /// Control-socket requests being answered (an upgrade lets them finish first).
    control_busy: Arc<std::sync::atomic::AtomicUsize>,
    /// An HTTP relay that handed (or is handing) its listener to a new process: it only
    /// finishes what its connections still send.
    retiring: AtomicBool,
    pub metrics: crate::metrics::Metrics,
    /// Numbers requests for the logs (`request` span field).
    next_request: std::sync::atomic::AtomicU64,
    /// Processes of servers with `isolation` (per-session, pooled, per-call).
    instances: backend::isolation::Instances,
    /// The hub of those processes.
    instance_hub: Arc<dyn backend::Hub>,
    /// Stateless calls waiting for their client's `input_required` answers.
    bridge: mrtr::Bridge,
    /// In an upgraded image: carried calls to servers it did not adopt.
    orphaned_calls: Mutex<Vec<(String, backend::CarriedCall)>>,
    /// What `relay__analyze_prompt` exposed to stateless clients that have an identity
    /// (the stdio front's one client, or an authenticated HTTP client), so their picks
    /// outlive the request; and each open stateless request's exposure at its start.
    stateless_exposure: Mutex<HashMap<String, Option<Vec<String>>>>,
    exposure_seeds: Mutex<HashMap<String, Option<Vec<String>>>>,
}

/// What [`Relay::apply`] changed, by server name.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Applied {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    /// Unchanged servers started afresh because they had given up (`failed`).
    pub restarted: Vec<String>,
    /// Changed settings that take effect only after a restart of the relay.
    #[serde(rename = "needsRestart")]
    pub needs_restart: Vec<String>,
}

impl Applied {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.restarted.is_empty()
    }

    /// The servers this change started (added, changed or restarted).
    pub fn started(&self) -> impl Iterator<Item = &String> {
        self.added
            .iter()
            .chain(&self.changed)
            .chain(&self.restarted)
    }
}

/// Which front the relay serves: it decides what backends hear of client capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    /// One client: backends are told exactly its routable capabilities, once it has
    /// initialized (their processes start at once; only the handshake waits).
    Stdio,
    /// Many sessions: backends are told every capability the relay can route.
    Http,
}

struct HubRef(Weak<Relay>);

impl backend::Hub for HubRef {
    fn lists_changed(&self, _server: &str) {
        if let Some(r) = self.0.upgrade() {
            r.rebuild_catalog();
        }
    }

    fn resource_updated(&self, server: &str, uri: &str, msg: String) {
        let Some(r) = self.0.upgrade() else { return };
        let owner = r.catalog().resource_owner(uri).cloned();
        if owner.as_deref().is_some_and(|o| o != server) {
            return;
        }
        for s in r.live_sessions() {
            if s.state().subscriptions.contains(uri) && r.grant(&s).reaches(server) {
                let _ = s.outbox.send(msg.clone());
            }
        }
    }

    fn broadcast(&self, server: &str, msg: String) {
        if let Some(r) = self.0.upgrade() {
            for s in r.live_sessions() {
                if s.state().initialized && r.grant(&s).reaches(server) {
                    let _ = s.outbox.send(msg.clone());
                }
            }
        }
    }

    fn task_owner(&self, exposed_task_id: &str) -> Option<ReqCtx> {
        let r = self.0.upgrade()?;
        let server = tasks::resolve(exposed_task_id).map(|(s, _)| s.to_owned())?;
        r.live_sessions()
            .into_iter()
            .find(|s| s.state().tasks.contains(exposed_task_id))
            .filter(|s| r.grant(s).reaches(&server))
            .map(|s| s.ctx())
    }

    fn connected(&self, server: &str) {
        if let Some(r) = self.0.upgrade() {
            r.renew_subscriptions(server);
        }
    }

    fn sole_session(&self, server: &str) -> Option<ReqCtx> {
        let r = self.0.upgrade()?;
        // Listen streams are sessions too, but have no client to ask.
        let live: Vec<Arc<Session>> = r
            .live_sessions()
            .into_iter()
            .filter(|s| !s.is_stateless())
            .collect();
        match live.as_slice() {
            // Only if its client may see the server (nothing to a session that may not).
            [only] if r.grant(only).reaches(server) => Some(only.ctx()),
            _ => None,
        }
    }
}

/// The items of one merged list whose server the grant lets the session see (all of them,
/// without a copy of the item bodies, for a trusted session).
fn visible_items<'a>(
    all: &'a [Arc<serde_json::value::RawValue>],
    owners: &[Arc<str>],
    grant: &Grant,
) -> std::borrow::Cow<'a, [Arc<serde_json::value::RawValue>]> {
    if !grant.tools() {
        return std::borrow::Cow::Owned(Vec::new());
    }
    if !grant.restricted() {
        return std::borrow::Cow::Borrowed(all);
    }
    all.iter()
        .zip(owners)
        .filter(|(_, o)| grant.sees(o))
        .map(|(i, _)| i.clone())
        .collect()
}

/// Removes a request from its session's in-flight table when dropped.
struct EndOnDrop<'a>(&'a Session, &'a str);

impl Drop for EndOnDrop<'_> {
    fn drop(&mut self) {
        self.0.end(self.1);
    }
}

/// What one request produced: a raw result or a ready error response.
/// A control-socket request in progress (see [`Relay::control_request`]).
pub struct ControlBusy(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for ControlBusy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The upgrade requests' channel: its sender, and its receiver until the front takes it.
type UpgradeChannel = (
    Option<tokio::sync::mpsc::Sender<crate::upgrade::Request>>,
    Option<tokio::sync::mpsc::Receiver<crate::upgrade::Request>>,
);

pub(crate) enum Answer {
    Result(Box<serde_json::value::RawValue>),
    Forwarded(Message),
}

impl Relay {
    /// Starts every enabled backend (concurrently, in the background).
    pub fn start(config: Config, front: Front) -> Arc<Relay> {
        Relay::start_with(config, front, None)
    }

    /// Starts the relay; with `carried` (an in-place upgrade), the stdio servers and the
    /// keeper of the previous image are adopted instead of started, and the backends are
    /// told the client's capabilities at once.
    pub fn start_with(
        config: Config,
        front: Front,
        carried: Option<(&crate::upgrade::State, Option<backend::keeper::Keeper>)>,
    ) -> Arc<Relay> {
        let known = carried.as_ref().map(|(st, _)| {
            backend::routable_capabilities(st.front.session.client_capabilities.as_deref())
        });
        let declared = tokio::sync::watch::Sender::new(match front {
            Front::Http => Some(backend::RELAY_CLIENT_CAPABILITIES.to_owned()),
            Front::Stdio => known,
        });
        let mut seeded = carried
            .as_ref()
            .map(|(st, _)| st.lists.clone())
            .unwrap_or_default();
        let mut adopted_gone: Vec<backend::Adopted> = Vec::new();
        let mut adopted: HashMap<String, backend::Adopted> = carried
            .as_ref()
            .map(|(st, _)| {
                st.backends
                    .iter()
                    .map(|a| (a.name.clone(), a.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let keeper = match carried {
            Some((_, k)) => k.map(Arc::new),
            None => backend::keeper::Keeper::start().map(Arc::new),
        };
        let supervision = config.relay.supervision;
        let limits = Arc::new(backend::Limits::new(
            config.relay.request_timeout,
            config.relay.max_message_bytes,
        ));
        let stopping = tokio_util::task::TaskTracker::new();
        let relay = Arc::new_cyclic(|me: &Weak<Relay>| Relay {
            config: RwLock::new(Arc::new(config)),
            settings: backend::Settings {
                limits,
                supervision: Arc::new(RwLock::new(supervision)),
                keeper,
                client_capabilities: declared.subscribe(),
            },
            hub: Arc::new(HubRef(me.clone())),
            front,
            admin_front: AtomicBool::new(front == Front::Stdio),
            public: AtomicBool::new(false),
            started: Instant::now(),
            changing: tokio::sync::Mutex::new(()),
            config_error: Mutex::new(None),
            closing: AtomicBool::new(false),
            stopping: stopping.clone(),
            backends: RwLock::new(IndexMap::new()),
            catalog: RwLock::new(Arc::new(Catalog::default())),
            view: RwLock::new(Arc::new(View::default())),
            rebuild: Mutex::new(selection::DocCache::default()),
            warmer: selection::Warmer::default(),
            llm_client: reqwest::Client::new(),
            llm_stats: selection::llm::Stats::default(),
            sessions: Mutex::new(HashMap::new()),
            metrics: crate::metrics::Metrics::new(),
            next_request: std::sync::atomic::AtomicU64::new(1),
            instances: backend::isolation::Instances::new(stopping.clone()),
            instance_hub: Arc::new(backend::isolation::InstanceHub(Arc::new(HubRef(
                me.clone(),
            )))),
            declared,
            bridge: mrtr::Bridge::default(),
            orphaned_calls: Mutex::new(Vec::new()),
            stateless_exposure: Mutex::new(HashMap::new()),
            exposure_seeds: Mutex::new(HashMap::new()),
            released: Mutex::new(Instant::now()),
            upgrades: Mutex::new({
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                (Some(tx), Some(rx))
            }),
            upgrading: AtomicBool::new(false),
            control_busy: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            retiring: AtomicBool::new(false),
        });
        {
            let cfg = relay.config();
            let mut backends = write(&relay.backends);
            for s in cfg.servers.iter().filter(|s| !s.disabled) {
                // Adopted only if the config still starts it the same way.
                let carried = adopted.remove_entry(&s.name).map(|(_, a)| a).and_then(|a| {
                    if a.fingerprint == backend::launch_fingerprint(&s.transport) {
                        Some(a)
                    } else {
                        adopted_gone.push(a);
                        None
                    }
                });
                let b = match carried {
                    Some(a) => {
                        Backend::adopt(s.clone(), relay.settings.clone(), relay.hub.clone(), a)
                    }
                    None => match seeded.remove(&s.name) {
                        Some(lists) => Backend::start_seeded(
                            s.clone(),
                            relay.settings.clone(),
                            relay.hub.clone(),
                            lists,
                        ),
                        None => relay.start_backend(s),
                    },
                };
                backends.insert(s.name.clone(), b);
            }
        }
        // Servers the config no longer has (or starts differently): their processes stop.
        adopted_gone.extend(adopted.into_values());
        for a in adopted_gone {
            lock(&relay.orphaned_calls).extend(a.calls.iter().map(|c| (a.name.clone(), c.clone())));
            tracing::info!(server = %a.name, "Handed-over server is no longer configured as it was; stopping it.");
            a.stdio.close_fds();
            backend::stdio::stop_adopted(a.stdio.pid, relay.settings.keeper.clone());
        }
        // The filtering rules are in force before any server reports its lists.
        relay.rebuild_catalog();
        // Idle per-session processes are stopped.
        let weak = Arc::downgrade(&relay);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(r) if !r.closing.load(Ordering::Acquire) => r.instances.reap(),
                    _ => break,
                }
            }
        });
        relay
    }

    /// Subscribes `server` again to the resources the sessions hold on it (a restarted or
    /// reconnected server has forgotten them).
    pub fn renew_subscriptions(&self, server: &str) {
        let Some(b) = self.backend(server) else {
            return;
        };
        if !b.info().has("resources") || !b.state().is_up() {
            return;
        }
        let uris: std::collections::BTreeSet<String> = self
            .live_sessions()
            .iter()
            .flat_map(|s| s.state().subscriptions.iter().cloned().collect::<Vec<_>>())
            .collect();
        // The stateless era has no `resources/subscribe`: its listen stream asks for them.
        if b.is_modern() {
            b.listen_resources(
                uris.into_iter()
                    .filter(|u| self.resource_owner(u).as_deref() == Some(server))
                    .collect(),
            );
            return;
        }
        for uri in uris {
            if self.resource_owner(&uri).as_deref() == Some(server) {
                let mut p = RawMap::default();
                p.set_str("uri", &uri);
                b.request_detached(method::RESOURCES_SUBSCRIBE, p);
            }
        }
    }

    /// After an upgrade restored its session: remote servers that reconnected before the
    /// session was back learn its subscriptions (adopted stdio servers never forgot them).
    pub fn renew_remote_subscriptions(&self) {
        for b in self.backends() {
            if !b.has_process() {
                self.renew_subscriptions(&b.name);
            }
        }
    }

    /// After an HTTP hand-over restored the sessions: every server (all new to them)
    /// learns their subscriptions.
    pub fn renew_all_subscriptions(&self) {
        for b in self.backends() {
            self.renew_subscriptions(&b.name);
        }
    }

    /// The front takes the upgrade requests (once).
    pub fn serve_upgrades(&self) -> Option<tokio::sync::mpsc::Receiver<crate::upgrade::Request>> {
        lock(&self.upgrades).1.take()
    }

    /// Counts a control-socket request until the returned guard drops (its answer written).
    pub fn control_request(&self) -> ControlBusy {
        self.control_busy.fetch_add(1, Ordering::SeqCst);
        ControlBusy(self.control_busy.clone())
    }

    /// Whether no control-socket request is being answered.
    pub fn control_idle(&self) -> bool {
        self.control_busy.load(Ordering::SeqCst) == 0
    }

    /// Marks (or unmarks, when the hand-over failed) this HTTP relay as retiring.
    pub fn set_retiring(&self, on: bool) {
        self.retiring.store(on, Ordering::SeqCst);
    }

    pub fn is_retiring(&self) -> bool {
        self.retiring.load(Ordering::SeqCst)
    }

    /// An upgrade that did not happen: logged and counted by `outcome` (`refused`,
    /// `abandoned`, `rolled_back`), told to whoever asked; the next one may start.
    pub fn upgrade_not_done(&self, outcome: &'static str, why: &str, reply: crate::upgrade::Reply) {
        tracing::error!(outcome, error = %why, "Upgrade not done; serving on.");
        self.metrics.upgrade(outcome);
        crate::upgrade::answer(reply, Err(why.to_owned()));
        self.upgrade_finished();
    }

    /// The front is done with an upgrade that did not exec (refused or abandoned).
    pub fn upgrade_finished(&self) {
        self.upgrading.store(false, Ordering::SeqCst);
    }

    /// Asks the front to upgrade to `binary` (default: the path the relay started from).
    /// Answers once the new binary passed its check (the exec follows when the requests
    /// in flight have answered), or why the upgrade is refused.
    pub async fn request_upgrade(
        &self,
        binary: Option<std::path::PathBuf>,
    ) -> Result<String, String> {
        let tx = lock(&self.upgrades)
            .0
            .clone()
            .ok_or_else(|| "this relay takes no upgrade requests".to_owned())?;
        if self.is_retiring() {
            return Err("this process has handed over to a new one; ask that one".to_owned());
        }
        if self.upgrading.swap(true, Ordering::SeqCst) {
            return Err("an upgrade is already under way".to_owned());
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        if tx
            .try_send(crate::upgrade::Request {
                binary,
                reply: Some(reply),
            })
            .is_err()
        {
            self.upgrade_finished();
            return Err("an upgrade is already under way".to_owned());
        }
        answer
            .await
            .map_err(|_| "the upgrade was abandoned (the relay is stopping)".to_owned())?
    }

    /// Hands the stdio servers and the keeper over to the next image (an upgrade about to
    /// exec). Per-session and pooled processes are stopped (the next image starts them on
    /// demand); remote servers reconnect from the next image.
    pub async fn hand_over(&self) -> Result<crate::upgrade::Carried, String> {
        // Nothing may be left half-done: servers being stopped finish, servers starting
        // become ready (or the upgrade waits for another time).
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let starting: Vec<String> = self
                .backends()
                .iter()
                .filter(|b| b.has_process() && !b.state().is_up())
                .map(|b| b.name.clone())
                .collect();
            if self.stopping.is_empty() && starting.is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(if starting.is_empty() {
                    "servers are still stopping; try again".to_owned()
                } else {
                    format!(
                        "server `{}` is still starting; try again",
                        starting.join("`, `")
                    )
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        self.instances.stop_all().await;
        let mut out = Vec::new();
        let mut lists = std::collections::BTreeMap::new();
        let mut failed = None;
        let all = self.backends();
        // Concurrently: each waits for its writer and reader to stop.
        let handed = futures::future::join_all(all.iter().map(|b| b.hand_over())).await;
        for (b, h) in all.iter().zip(handed) {
            match h {
                Some(Ok(a)) => out.push(a),
                Some(Err(e)) => {
                    failed.get_or_insert(format!("server `{}`: {e}", b.name));
                }
                None => {
                    lists.insert(b.name.clone(), b.carried_lists());
                }
            }
        }
        let keeper = match (&failed, &self.settings.keeper) {
            (None, Some(k)) => match k.hand_over() {
                Ok(h) => Some(h),
                Err(e) => {
                    failed = Some(e);
                    None
                }
            },
            _ => None,
        };
        if let Some(e) = failed {
            self.take_back(out, keeper);
            return Err(e);
        }
        Ok(crate::upgrade::Carried {
            backends: out,
            lists,
            keeper,
        })
    }

    /// How many of `session`'s requests wait for a stdio server's answer and would be
    /// carried by an in-place upgrade (answered by the next image).
    pub fn carryable_calls(&self, session: &str) -> usize {
        self.backends().iter().map(|b| b.carryable(session)).sum()
    }

    /// In an upgraded image: the restored session takes over the requests the previous
    /// image carried (see [`Backend::resume_calls`]).
    pub fn resume_calls(
        &self,
        session: &Arc<Session>,
        stream: &Outbox,
        tasks: &tokio_util::task::TaskTracker,
    ) {
        for b in self.backends() {
            b.resume_calls(session, stream, tasks);
        }
        // Calls to servers this image did not adopt (the config changed them): their
        // answers are lost, which the client hears at once.
        let orphaned = std::mem::take(&mut *lock(&self.orphaned_calls));
        for (server, c) in orphaned {
            if c.session != session.id {
                continue;
            }
            let e = RpcError::from(backend::Error::Lost {
                server,
                method: c.method,
                reason: "the server was changed or removed by the config the upgraded relay started with".into(),
            });
            let _ = stream.send(e.to_response(&c.request));
        }
    }

    /// What [`Relay::hand_over`] would carry, without descriptors: the state a new binary
    /// checks before the upgrade starts.
    pub fn preview_hand_over(&self) -> crate::upgrade::Carried {
        let mut backends = Vec::new();
        let mut lists = std::collections::BTreeMap::new();
        for b in self.backends() {
            match b.preview() {
                Some(a) => backends.push(a),
                None => {
                    lists.insert(b.name.clone(), b.carried_lists());
                }
            }
        }
        crate::upgrade::Carried {
            backends,
            lists,
            keeper: None,
        }
    }

    /// Undoes [`Relay::hand_over`]: the upgrade was abandoned.
    pub fn take_back(
        &self,
        adopted: Vec<backend::Adopted>,
        keeper: Option<backend::keeper::Handover>,
    ) {
        for a in adopted {
            match self.backend(&a.name) {
                Some(b) => b.take_back(a),
                None => a.stdio.close_fds(),
            }
        }
        if let Some(k) = keeper {
            crate::upgrade::close(k.fd);
        }
    }

    fn start_backend(&self, s: &crate::config::ServerConfig) -> Arc<Backend> {
        Backend::start(s.clone(), self.settings.clone(), self.hub.clone())
    }

    /// Stops every backend and waits for their processes to exit.
    pub async fn shutdown(&self) {
        // No change may start a backend after this: take the change lock and close.
        {
            let _g = self.changing.lock().await;
            self.closing.store(true, Ordering::Release);
        }
        let all: Vec<Arc<Backend>> = read(&self.backends).values().cloned().collect();
        futures::future::join_all(all.iter().map(|b| b.stop())).await;
        self.instances.stop_all().await;
        self.stopping.close();
        self.stopping.wait().await;
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        read(&self.config).clone()
    }

    pub fn front(&self) -> Front {
        self.front
    }

    /// Called by the HTTP front once it knows its address: serving a non-loopback address
    /// without `--allow-unauthenticated` (a reload may then not turn auth off).
    pub fn set_public(&self, public: bool) {
        self.public.store(public, Ordering::Relaxed);
    }

    /// Why `cfg` may not replace the running config, if it may not: it would leave a
    /// non-loopback listener without authentication.
    pub fn refuse(&self, cfg: &Config) -> Option<String> {
        (self.public.load(Ordering::Relaxed)
            && !cfg.auth.enabled()
            && !cfg.relay.allow_unauthenticated)
            .then(|| {
                "the relay serves a non-loopback address, and this config has no `auth` clients: it would let anyone in. Keep `auth`, or set relay.allowUnauthenticated".to_owned()
            })
    }

    /// Called by the HTTP front once it knows its address: without auth, the management
    /// tools are offered over HTTP only on a loopback address.
    pub fn allow_admin_front(&self, allowed: bool) {
        self.admin_front.store(allowed, Ordering::Relaxed);
    }

    /// Whether sessions of this relay see and may call the `relay__*` management tools.
    pub fn admin_enabled(&self) -> bool {
        let cfg = self.config();
        // With auth, the `admin` scope decides per session, on any address.
        if self.front == Front::Http && cfg.auth.enabled() {
            return cfg.relay.management;
        }
        if !self.admin_front.load(Ordering::Relaxed) {
            return false;
        }
        let r = &cfg.relay;
        // Extra allowed hosts mean requests arrive under other names (a proxy, a LAN name),
        // and a wildcard origin lets any web page in: not a loopback-only front any more.
        r.management
            && (self.front == Front::Stdio
                || (r.allowed_hosts.is_empty() && !r.allowed_origins.iter().any(|o| o == "*")))
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Open handshake-era sessions (listen streams are not counted).
    pub fn session_count(&self) -> usize {
        self.live_sessions()
            .iter()
            .filter(|s| !s.is_stateless())
            .count()
    }

    /// The reason the last config reload was rejected, if it was.
    pub fn config_error(&self) -> Option<String> {
        lock(&self.config_error).clone()
    }

    /// Takes the config-change lock: every change (tool, CLI, file watch) runs under it.
    pub async fn changing(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.changing.lock().await
    }

    /// Makes `new` the running config: starts added servers, stops removed ones, replaces
    /// changed ones and leaves the rest (and their requests in flight) alone. The caller
    /// holds [`Relay::changing`].
    pub fn apply(&self, new: Config, restart_failed: bool) -> Applied {
        let old = self.config();
        let filtering_changed = old.tool_filtering != new.tool_filtering;
        let mut applied = Applied::default();
        if self.closing.load(Ordering::Acquire) {
            return applied;
        }
        if new.relay.listen != old.relay.listen {
            applied
                .needs_restart
                .push("relay.listen (the HTTP listener stays where it is)".into());
        }
        if new.relay.tls.is_some() != old.relay.tls.is_some() {
            applied
                .needs_restart
                .push("relay.tls (HTTPS is turned on or off only at start)".into());
        }
        self.settings
            .limits
            .set(new.relay.request_timeout, new.relay.max_message_bytes);
        *write(&self.settings.supervision) = new.relay.supervision;
        let wanted: Vec<&crate::config::ServerConfig> =
            new.servers.iter().filter(|s| !s.disabled).collect();
        let mut retired = Vec::new();
        {
            let mut backends = write(&self.backends);
            let mut next = IndexMap::with_capacity(wanted.len());
            for s in &wanted {
                match backends.shift_remove(&s.name) {
                    // A reload gives a server that gave up (restart limit) a fresh start.
                    Some(b)
                        if restart_failed
                            && b.config == **s
                            && matches!(b.state(), State::Failed(_) | State::NeedsAuth(_)) =>
                    {
                        applied.restarted.push(s.name.clone());
                        retired.push(b);
                        next.insert(s.name.clone(), self.start_backend(s));
                    }
                    Some(b) if b.config == **s => {
                        next.insert(s.name.clone(), b);
                    }
                    Some(b) => {
                        applied.changed.push(s.name.clone());
                        retired.push(b);
                        next.insert(s.name.clone(), self.start_backend(s));
                    }
                    None => {
                        applied.added.push(s.name.clone());
                        next.insert(s.name.clone(), self.start_backend(s));
                    }
                }
            }
            for (name, b) in backends.drain(..) {
                applied.removed.push(name);
                retired.push(b);
            }
            *backends = next;
        }
        *write(&self.config) = Arc::new(new);
        *lock(&self.config_error) = None;
        for b in retired {
            self.stopping.spawn(async move { b.stop().await });
        }
        // Isolated processes of changed, restarted or removed servers follow them.
        for name in applied
            .changed
            .iter()
            .chain(&applied.restarted)
            .chain(&applied.removed)
        {
            self.instances.drop_server(name);
        }
        if filtering_changed
            || !(applied.removed.is_empty()
                && applied.changed.is_empty()
                && applied.restarted.is_empty())
        {
            self.rebuild_catalog();
        }
        self.metrics.config_reload(true);
        if !applied.is_empty() {
            tracing::info!(added = ?applied.added, removed = ?applied.removed, changed = ?applied.changed, "Config applied.");
        }
        applied
    }

    /// Records a rejected reload, for `relay__status`.
    pub fn reject_config(&self, reason: String) {
        self.metrics.config_reload(false);
        tracing::error!("Config change rejected; the running config stays:\n{reason}");
        *lock(&self.config_error) = Some(reason);
    }

    /// Stops a server and starts it afresh (clears `failed`). False if it is not running.
    pub fn restart_backend(&self, name: &str) -> bool {
        if self.closing.load(Ordering::Acquire) {
            return false;
        }
        let old = {
            let mut backends = write(&self.backends);
            let Some(slot) = backends.get_mut(name) else {
                return false;
            };
            let fresh = self.start_backend(&slot.config);
            std::mem::replace(slot, fresh)
        };
        self.stopping.spawn(async move { old.stop().await });
        self.rebuild_catalog();
        true
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        read(&self.catalog).clone()
    }

    pub fn backends(&self) -> Vec<Arc<Backend>> {
        read(&self.backends).values().cloned().collect()
    }

    pub fn backend(&self, name: &str) -> Option<Arc<Backend>> {
        read(&self.backends).get(name).cloned()
    }

    /// Registers a new session.
    /// Registers a new session of `client` (`None`: a trusted front).
    pub fn open_session(&self, id: String, outbox: Outbox, client: Option<String>) -> Arc<Session> {
        let s = Session::new(id, outbox);
        s.state().client = client;
        let mut sessions = lock(&self.sessions);
        sessions.retain(|_, w| w.strong_count() > 0);
        sessions.insert(s.id.clone(), Arc::downgrade(&s));
        s
    }

    /// Ends a session: cancels its requests and drops subscriptions no one else holds.
    /// Idempotent: a second call finds nothing left to release.
    pub async fn close_session(&self, s: &Arc<Session>) {
        for uri in self.end_session(s) {
            self.release_subscription(&uri).await;
        }
    }

    /// The synchronous part of [`Relay::close_session`]: returns the subscriptions the
    /// session held, for the caller to release.
    /// Whose exposure a stateless request of `client` shares: the stdio front has one
    /// client; over HTTP only an authenticated client is someone (anonymous requests
    /// cannot be told apart, so their picks end with the request).
    fn exposure_key(&self, client: Option<&str>) -> Option<String> {
        match (client, self.front) {
            (Some(name), _) => Some(format!("client:{name}")),
            (None, Front::Stdio) => Some("stdio".to_owned()),
            (None, Front::Http) => None,
        }
    }

    /// A stateless request starts with its client's exposure.
    fn seed_exposure(&self, s: &Session) {
        let key = self.exposure_key(s.state().client.as_deref());
        let Some(key) = key else { return };
        let exposed = lock(&self.stateless_exposure).get(&key).cloned().flatten();
        s.state().exposed = exposed.clone();
        lock(&self.exposure_seeds).insert(s.id.clone(), exposed);
    }

    /// A stateless request that changed its exposure (`relay__analyze_prompt`) leaves it
    /// to its client's next requests.
    fn keep_exposure(&self, s: &Session) {
        let Some(seed) = lock(&self.exposure_seeds).remove(&s.id) else {
            return;
        };
        let (client, exposed) = {
            let st = s.state();
            (st.client.clone(), st.exposed.clone())
        };
        if exposed != seed
            && let Some(key) = self.exposure_key(client.as_deref())
        {
            // Only over what the request started from: a newer pick (or reset) made by
            // another request meanwhile is not undone by a slower one.
            let mut kept = lock(&self.stateless_exposure);
            if kept.get(&key).cloned().flatten() == seed {
                kept.insert(key, exposed);
            }
        }
    }

    /// The stdio front's stateless client's picks, carried across an in-place upgrade.
    pub fn stdio_stateless_picks(&self) -> Option<Vec<String>> {
        lock(&self.stateless_exposure)
            .get("stdio")
            .cloned()
            .flatten()
    }

    pub fn set_stdio_stateless_picks(&self, picks: Option<Vec<String>>) {
        if picks.is_some() {
            lock(&self.stateless_exposure).insert("stdio".to_owned(), picks);
        }
    }

    fn end_session(&self, s: &Arc<Session>) -> Vec<String> {
        self.keep_exposure(s);
        s.close();
        lock(&self.sessions).remove(&s.id);
        self.instances.end_session(&s.id);
        std::mem::take(&mut s.state().subscriptions)
            .into_iter()
            .collect()
    }

    fn live_sessions(&self) -> Vec<Arc<Session>> {
        lock(&self.sessions)
            .values()
            .filter_map(Weak::upgrade)
            .filter(|s| !s.is_closed())
            .collect()
    }

    /// Rebuilds the merged catalog and tells sessions whose lists changed.
    fn rebuild_catalog(&self) {
        let mut cache = lock(&self.rebuild);
        let backends = self.backends();
        let lists: Vec<(Arc<Backend>, catalog::Lists)> = backends
            .into_iter()
            .map(|b| {
                let l = b.lists();
                (b, l)
            })
            .collect();
        let sources: Vec<Source<'_>> = lists
            .iter()
            .map(|(b, l)| Source {
                server: &b.name,
                prefix: &b.config.prefix,
                lists: l,
            })
            .collect();
        let new = Arc::new(Catalog::build(&sources));
        let servers: Vec<selection::ServerText> = lists
            .iter()
            .map(|(b, _)| selection::ServerText {
                server: b.name.clone(),
                text: b.info().describe(),
            })
            .collect();
        let view = Arc::new(View::build(
            &new,
            &self.config().tool_filtering,
            &servers,
            &mut cache,
        ));
        // Embedding the catalog takes seconds: done off the request path (rankings are local
        // until it is ready).
        self.warmer.warm(&view);
        let old = std::mem::replace(&mut *write(&self.catalog), new.clone());
        let old_view = std::mem::replace(&mut *write(&self.view), view.clone());
        let same = |a: &[Arc<serde_json::value::RawValue>],
                    b: &[Arc<serde_json::value::RawValue>]| {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(x, y)| Arc::ptr_eq(x, y) || x.get() == y.get())
        };
        // (notification, the list methods whose callers need it)
        let mut notes: Vec<(&str, &[&str])> = Vec::new();
        if !same(&old.prompts, &new.prompts) {
            notes.push((method::PROMPTS_CHANGED, &[method::PROMPTS_LIST]));
        }
        if !same(&old.resources, &new.resources) || !same(&old.templates, &new.templates) {
            notes.push((
                method::RESOURCES_CHANGED,
                &[method::RESOURCES_LIST, method::RESOURCES_TEMPLATES_LIST],
            ));
        }
        let tools_moved =
            !same(&old_view.tools, &view.tools) || old_view.filtering != view.filtering;
        if notes.is_empty() && !tools_moved {
            return;
        }
        for c in &new.collisions {
            tracing::warn!("Catalog collision: {c}");
        }
        let cfg = self.config();
        // A session that never listed a kind has nothing stale to refresh; a session's tool
        // list is compared as that session sees it (prompt mode shows each its own).
        for s in self.live_sessions() {
            let (due, tools_due) = {
                let st = s.state();
                let grant = Grant::new(cfg.clone(), st.client.as_deref());
                // A client that sees only some servers is told only of changes it can see.
                let seen_changed = |n: &str| {
                    if !grant.restricted() && grant.tools() {
                        return true;
                    }
                    let differ = |a: &[Arc<serde_json::value::RawValue>],
                                  ao: &[Arc<str>],
                                  b: &[Arc<serde_json::value::RawValue>],
                                  bo: &[Arc<str>]| {
                        !same(&visible_items(a, ao, &grant), &visible_items(b, bo, &grant))
                    };
                    if n == method::PROMPTS_CHANGED {
                        differ(
                            &old.prompts,
                            &old.owners.prompts,
                            &new.prompts,
                            &new.owners.prompts,
                        )
                    } else {
                        differ(
                            &old.resources,
                            &old.owners.resources,
                            &new.resources,
                            &new.owners.resources,
                        ) || differ(
                            &old.templates,
                            &old.owners.templates,
                            &new.templates,
                            &new.owners.templates,
                        )
                    }
                };
                let due: Vec<&str> = notes
                    .iter()
                    .filter(|(_, lists)| lists.iter().any(|l| st.listed.contains(*l)))
                    .map(|(n, _)| *n)
                    .filter(|n| seen_changed(n))
                    .collect();
                let tools_due = tools_moved
                    && st.listed.contains(method::TOOLS_LIST)
                    && !same(
                        &self.tools_of(&old_view, &grant, st.exposed.as_deref()),
                        &self.tools_of(&view, &grant, st.exposed.as_deref()),
                    );
                (due, tools_due)
            };
            for n in due {
                let _ = s.outbox.send(protocol::notification(n, None));
            }
            if tools_due {
                let _ = s
                    .outbox
                    .send(protocol::notification(method::TOOLS_CHANGED, None));
            }
        }
    }

    /// The management tools' definitions when this front offers them, else none.
    pub(crate) fn admin_tools(&self) -> &'static [Arc<serde_json::value::RawValue>] {
        if self.admin_enabled() {
            admin::definitions()
        } else {
            &[]
        }
    }

    /// Readiness: every `required` server is up (and the relay is not shutting down).
    /// Returns the required servers that are not, with their state.
    pub fn unready(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .backends()
            .iter()
            .filter(|b| b.config.required)
            .filter_map(|b| {
                let st = b.state();
                (!st.is_up()).then(|| (b.name.clone(), st.label().to_owned()))
            })
            .collect();
        if self.closing.load(Ordering::Acquire) {
            out.push(("relay".into(), "stopping".into()));
        }
        out
    }

    /// The catalog as the filtering rules let sessions see it.
    pub fn view(&self) -> Arc<View> {
        read(&self.view).clone()
    }

    /// What `session` may reach under the config in force.
    pub fn grant(&self, session: &Session) -> Grant {
        let client = session.state().client.clone();
        Grant::new(self.config(), client.as_deref())
    }

    /// The tool list `session` sees (a copy; `tools/list` pages the view's list directly).
    pub fn session_tools(&self, session: &Session) -> Vec<Arc<serde_json::value::RawValue>> {
        let view = self.view();
        let grant = self.grant(session);
        let exposed = session.state().exposed.clone();
        self.tools_of(&view, &grant, exposed.as_deref())
            .into_owned()
    }

    /// The tools a session with `grant` and picks `exposed` sees in `view`: the management
    /// tools with scope `admin`, the servers' tools (of the servers it sees) with `tools`.
    fn tools_of<'a>(
        &self,
        view: &'a View,
        grant: &Grant,
        exposed: Option<&[String]>,
    ) -> std::borrow::Cow<'a, [Arc<serde_json::value::RawValue>]> {
        let admin = if grant.admin() {
            self.admin_tools()
        } else {
            &[]
        };
        if !grant.tools() {
            return std::borrow::Cow::Owned(admin.to_vec());
        }
        let sees = |server: &str| grant.sees(server);
        let sees: selection::Sees<'_> = grant.restricted().then_some(&sees);
        selection::session_tools(view, exposed, admin, sees)
    }

    /// Calls a catalog tool by its exposed name (`tools/call`, and `relay__call_tool`).
    pub(crate) async fn call_tool(
        &self,
        name: &str,
        mut params: RawMap,
        ctx: &ReqCtx,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<Answer, RpcError> {
        self.settle().await;
        let grant = self.grant(&ctx.session);
        if !grant.tools() {
            return Err(RpcError::Forbidden(grant.missing("tools")));
        }
        let target = self
            .view()
            .target(name)
            .filter(|t| grant.sees(&t.server))
            .cloned()
            .ok_or_else(|| {
                RpcError::InvalidParams(format!(
                    "unknown tool `{name}`; list the tools to see what is available"
                ))
            })?;
        if *target.name != *name {
            params.set_str("name", &target.name);
        }
        let began = Instant::now();
        let out = self
            .forward(&target.server, method::TOOLS_CALL, params, ctx, cancel)
            .await;
        self.metrics.tool_call(&target.server, began.elapsed());
        out
    }

    /// The state the metrics gauges show now.
    pub fn metrics_snapshot(&self) -> crate::metrics::Snapshot {
        let front = match self.front {
            Front::Stdio => "stdio",
            Front::Http => "http",
        };
        crate::metrics::Snapshot {
            sessions: vec![(front, self.session_count())],
            input_waiting: self.bridge.parked(),
            backends: self
                .backends()
                .iter()
                .map(|b| {
                    let st = b.state();
                    crate::metrics::BackendSnapshot {
                        server: b.name.clone(),
                        state: st.label(),
                        up: st.is_up(),
                        ready: st == State::Ready,
                        restarts: b.restarts(),
                        in_flight: b.in_flight(),
                        tools: b.tool_count(),
                        instances: self.instances.count(&b.name),
                    }
                })
                .collect(),
        }
    }

    /// Waits (bounded by `startupWaitMs` from relay start) for backends still starting.
    /// The first client's capabilities release the backends' handshakes (stdio front: they
    /// wait to declare what the client can route back to them).
    fn release(&self, capabilities: Option<&serde_json::value::RawValue>) {
        let routable = backend::routable_capabilities(capabilities);
        let released = self
            .declared
            .send_if_modified(|d| d.is_none().then(|| *d = Some(routable)).is_some());
        if released {
            *lock(&self.released) = Instant::now();
        }
    }

    /// [`Relay::settle`], but never longer than `limit` (a client's probe, such as
    /// `server/discover`, must not time out waiting for slow servers).
    pub(crate) async fn settle_within(&self, limit: std::time::Duration) {
        let _ = tokio::time::timeout(limit, self.settle()).await;
    }

    pub(crate) async fn settle(&self) {
        // From when the backends could start their handshakes (over stdio: the client's
        // initialize), so a late client still gets their instructions and capabilities.
        let from = *lock(&self.released);
        let deadline = tokio::time::Instant::from_std(from + self.config().relay.startup_wait);
        if tokio::time::Instant::now() >= deadline {
            return;
        }
        let starting: Vec<Arc<Backend>> = self
            .backends()
            .into_iter()
            .filter(|b| b.state() == State::Starting)
            .collect();
        futures::future::join_all(starting.iter().map(|b| b.settled(deadline))).await;
    }

    /// Handles one client message. Returns the response for requests.
    pub async fn handle(
        self: &Arc<Self>,
        session: &Arc<Session>,
        msg: Message,
        stream: Outbox,
    ) -> Option<String> {
        self.handle_with(session, msg, stream, true).await
    }

    /// [`Relay::handle`]; `carry: false` for an item of a batch, whose answer goes out in
    /// the batch's array (an upgrade waits for it rather than carry it).
    pub async fn handle_with(
        self: &Arc<Self>,
        session: &Arc<Session>,
        msg: Message,
        stream: Outbox,
        carry: bool,
    ) -> Option<String> {
        match msg.kind() {
            Kind::Response => {
                if !session.answer(msg) {
                    tracing::debug!(session = %session.id, "Response to an unknown request; dropped.");
                }
                None
            }
            Kind::Notification => {
                self.on_notification(session, msg).await;
                None
            }
            Kind::Request => {
                let id = msg.id_text().to_owned();
                let cancel = session.begin(&id);
                // Ends the request's bookkeeping even if this future is dropped.
                let _end = EndOnDrop(session, &id);
                let ctx = ReqCtx {
                    session: session.clone(),
                    stream,
                    request: carry.then(|| Arc::from(id.as_str())),
                };
                let label = crate::metrics::method_label(msg.method());
                // Every log line of the request carries its number and session.
                let n = self.next_request.fetch_add(1, Ordering::Relaxed);
                let span = tracing::info_span!("request", request = n, session = %session.id, method = %msg.method());
                let answer =
                    tracing::Instrument::instrument(self.on_request(&ctx, msg, &cancel), span)
                        .await;
                let (out, outcome) = match answer {
                    Ok(Answer::Result(r)) => (protocol::response(&id, &r), Outcome::Ok),
                    Ok(Answer::Forwarded(reply)) => match (reply.result, reply.error) {
                        (Some(r), _) => (protocol::response(&id, &r), Outcome::Ok),
                        (None, Some(e)) => (protocol::error_response_raw(&id, &e), Outcome::Error),
                        (None, None) => {
                            (protocol::response(&id, &protocol::raw("{}")), Outcome::Ok)
                        }
                    },
                    Err(e) => (e.to_response(&id), Outcome::Error),
                };
                self.metrics.request(label, outcome);
                Some(out)
            }
        }
    }

    async fn on_request(
        self: &Arc<Self>,
        ctx: &ReqCtx,
        msg: Message,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<Answer, RpcError> {
        let params = msg
            .params_map()
            .map_err(|e| RpcError::InvalidParams(e.to_string()))?;
        let m = msg.method();
        match m {
            method::INITIALIZE => {
                // The first client's capabilities release the backends' handshakes (stdio
                // front); then the answer waits for them to settle, bounded by
                // `startupWaitMs`, so that it carries their instructions and capabilities.
                self.release(params.get("capabilities"));
                self.settle().await;
                Ok(Answer::Result(self.initialize(&ctx.session, &params)))
            }
            method::PING => Ok(Answer::Result(protocol::raw("{}"))),
            method::TOOLS_LIST
            | method::PROMPTS_LIST
            | method::RESOURCES_LIST
            | method::RESOURCES_TEMPLATES_LIST => {
                self.settle().await;
                let cat = self.catalog();
                let view = self.view();
                let grant = self.grant(&ctx.session);
                let exposed = ctx.session.state().exposed.clone();
                let tools;
                let visible;
                let (items, field) = match m {
                    method::TOOLS_LIST => {
                        tools = self.tools_of(&view, &grant, exposed.as_deref());
                        (&tools[..], "tools")
                    }
                    _ => {
                        let (all, owners, field) = match m {
                            method::PROMPTS_LIST => {
                                (&cat.prompts[..], &cat.owners.prompts, "prompts")
                            }
                            method::RESOURCES_LIST => {
                                (&cat.resources[..], &cat.owners.resources, "resources")
                            }
                            _ => (
                                &cat.templates[..],
                                &cat.owners.templates,
                                "resourceTemplates",
                            ),
                        };
                        visible = visible_items(all, owners, &grant);
                        (&visible[..], field)
                    }
                };
                ctx.session.state().listed.insert(m.to_owned());
                let cursor = params.get_str("cursor");
                let page = catalog::page(
                    items,
                    field,
                    cursor.as_deref(),
                    self.config().relay.page_size,
                )
                .map_err(|_| {
                    RpcError::InvalidParams(format!(
                        "invalid cursor for `{m}`; start again without a cursor"
                    ))
                })?;
                Ok(Answer::Result(protocol::raw(&page)))
            }
            method::TOOLS_CALL => {
                let name = params.get_str("name").ok_or_else(|| {
                    RpcError::InvalidParams(format!("`{m}` needs a string `name`"))
                })?;
                if let Some(op) = admin::tool(&name)
                    && self.admin_enabled()
                {
                    let grant = self.grant(&ctx.session);
                    if !grant.admin() {
                        return Err(RpcError::Forbidden(grant.missing("admin")));
                    }
                    return Ok(Answer::Result(
                        admin::call(self, op, params.get("arguments")).await,
                    ));
                }
                if selection::is_meta(&name)
                    && self.view().filtering.mode == crate::config::filtering::Mode::Prompt
                {
                    let grant = self.grant(&ctx.session);
                    if !grant.tools() {
                        return Err(RpcError::Forbidden(grant.missing("tools")));
                    }
                    return selection::meta::call(self, &name, params, ctx, cancel).await;
                }
                self.call_tool(&name, params, ctx, cancel).await
            }
            method::PROMPTS_GET => {
                let name = params.get_str("name").ok_or_else(|| {
                    RpcError::InvalidParams(format!("`{m}` needs a string `name`"))
                })?;
                self.settle().await;
                let grant = self.grant(&ctx.session);
                let target = self
                    .catalog()
                    .prompt(&name)
                    .filter(|t| grant.reaches(&t.server))
                    .cloned()
                    .ok_or_else(|| {
                        RpcError::InvalidParams(format!(
                            "unknown prompt `{name}`; list the prompts to see what is available"
                        ))
                    })?;
                let mut params = params;
                if *target.name != *name {
                    params.set_str("name", &target.name);
                }
                self.forward(&target.server, m, params, ctx, cancel).await
            }
            method::RESOURCES_READ
            | method::RESOURCES_SUBSCRIBE
            | method::RESOURCES_UNSUBSCRIBE => {
                let uri = params.get_str("uri").ok_or_else(|| {
                    RpcError::InvalidParams(format!("`{m}` needs a string `uri`"))
                })?;
                self.settle().await;
                let grant = self.grant(&ctx.session);
                let owner = self
                    .resource_owner(&uri)
                    .filter(|o| grant.reaches(o))
                    .ok_or_else(|| {
                        RpcError::InvalidParams(format!(
                            "unknown resource `{uri}`; no server offers it"
                        ))
                    })?;
                // A server of the stateless era takes subscriptions on its listen stream.
                if let Some(b) = self.backend(&owner).filter(|b| b.is_modern())
                    && m != method::RESOURCES_READ
                {
                    return self.subscribe_modern(&b, ctx, m, &uri);
                }
                match m {
                    method::RESOURCES_SUBSCRIBE => {
                        // The owner is subscribed once, however many sessions want it.
                        let held = self.subscribed_elsewhere(&uri);
                        ctx.session.state().subscriptions.insert(uri.clone());
                        if held {
                            return Ok(Answer::Result(protocol::raw("{}")));
                        }
                        let answer = self.forward(&owner, m, params, ctx, cancel).await;
                        let refused = match &answer {
                            Ok(Answer::Forwarded(reply)) => reply.error.is_some(),
                            Ok(Answer::Result(_)) => false,
                            Err(_) => true,
                        };
                        if refused {
                            ctx.session.state().subscriptions.remove(&uri);
                        }
                        answer
                    }
                    method::RESOURCES_UNSUBSCRIBE => {
                        ctx.session.state().subscriptions.remove(&uri);
                        if self.subscribed_elsewhere(&uri) {
                            Ok(Answer::Result(protocol::raw("{}")))
                        } else {
                            self.forward(&owner, m, params, ctx, cancel).await
                        }
                    }
                    _ => self.forward(&owner, m, params, ctx, cancel).await,
                }
            }
            method::COMPLETE => self.complete(ctx, params, cancel).await,
            method::TASKS_GET | method::TASKS_RESULT | method::TASKS_CANCEL => {
                let exposed = params.get_str("taskId").ok_or_else(|| {
                    RpcError::InvalidParams(format!("`{m}` needs a string `taskId`"))
                })?;
                let owned = ctx.session.state().tasks.contains(&exposed);
                let grant = self.grant(&ctx.session);
                let (server, id) = tasks::resolve(&exposed)
                    .filter(|(server, _)| owned && grant.reaches(server))
                    .map(|(s, i)| (s.to_owned(), i.to_owned()))
                    .ok_or_else(|| {
                        RpcError::InvalidParams(format!(
                            "unknown task `{exposed}`; `tasks/list` shows this session's tasks"
                        ))
                    })?;
                let mut params = params;
                params.set_str("taskId", &id);
                self.forward(&server, m, params, ctx, cancel).await
            }
            method::TASKS_LIST => self.list_tasks(ctx, &params, cancel).await,
            method::SET_LEVEL => {
                let level = params.get_str("level").ok_or_else(|| {
                    RpcError::InvalidParams("`logging/setLevel` needs a string `level`".into())
                })?;
                ctx.session.state().log_level = Some(level);
                let body = params.to_raw();
                let grant = self.grant(&ctx.session);
                for b in self.backends() {
                    // A server of the stateless era gets the level with each request.
                    if b.state().is_up()
                        && grant.reaches(&b.name)
                        && b.info().has("logging")
                        && !b.is_modern()
                    {
                        let r = b
                            .call(
                                m,
                                RawMap::parse(body.get()).unwrap_or_default(),
                                ctx.clone(),
                                cancel,
                            )
                            .await;
                        if let Err(e) = r {
                            tracing::debug!(server = %b.name, error = %e, "logging/setLevel not applied.");
                        }
                    }
                }
                Ok(Answer::Result(protocol::raw("{}")))
            }
            _ => {
                // Unknown methods pass through when exactly one server could own them.
                let backends = self.backends();
                let grant = self.grant(&ctx.session);
                match backends.as_slice() {
                    [only] if grant.reaches(&only.name) => {
                        let name = only.name.clone();
                        self.forward(&name, m, params, ctx, cancel).await
                    }
                    _ => Err(RpcError::MethodNotFound(m.to_owned())),
                }
            }
        }
    }

    /// Sends a request to its server and returns the reply, with task ids namespaced.
    async fn forward(
        &self,
        server: &str,
        m: &str,
        params: RawMap,
        ctx: &ReqCtx,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<Answer, RpcError> {
        let main = self.backend(server).ok_or_else(|| {
            RpcError::InvalidParams(format!("server `{server}` is not configured"))
        })?;
        // `isolation`: the session's own process, a pool member or a fresh process.
        let lease = if main.config.isolation == crate::config::Isolation::Shared {
            None
        } else {
            let want = backend::isolation::Want {
                method: m,
                session: &ctx.session.id,
                pinned: m.starts_with("tasks/") || params.get("task").is_some(),
                deadline: tokio::time::Instant::now() + self.settings.request_timeout(),
            };
            let start = |c: &crate::config::ServerConfig| {
                Backend::start(c.clone(), self.settings.clone(), self.instance_hub.clone())
            };
            let cap = self.config().relay.max_instances;
            self.instances
                .lease_for(&main.config, want, cap, &start)
                .await
                .map_err(|e| RpcError::Capacity(e.to_string()))?
        };
        let b = lease.as_ref().map_or(main, |l| l.backend.clone());
        let shape = match m {
            method::TASKS_GET | method::TASKS_CANCEL => tasks::Shape::Task,
            method::TASKS_LIST => tasks::Shape::List,
            _ if params.get("task").is_some() => tasks::Shape::Created,
            _ => tasks::Shape::Other,
        };
        let mut reply = b.call(m, params, ctx.clone(), cancel).await?;
        if let Some((result, ids)) = reply
            .result
            .as_deref()
            .and_then(|r| tasks::namespace(server, r, shape))
        {
            if shape == tasks::Shape::Created {
                ctx.session.state().tasks.extend(ids);
            }
            reply.result = Some(result);
        }
        Ok(Answer::Forwarded(reply))
    }

    /// `tasks/list`: this session's tasks on every server that lists tasks, in one page.
    async fn list_tasks(
        &self,
        ctx: &ReqCtx,
        params: &RawMap,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<Answer, RpcError> {
        if params.get("cursor").is_some() {
            return Err(RpcError::InvalidParams(
                "invalid cursor for `tasks/list`: the relay answers it in one page".into(),
            ));
        }
        let owned = ctx.session.state().tasks.clone();
        let grant = self.grant(&ctx.session);
        let mut all = Vec::new();
        for b in self.backends() {
            if !grant.reaches(&b.name)
                || !b.state().is_up()
                || !b.info().has("tasks")
                || !owned
                    .iter()
                    .any(|t| tasks::resolve(t).is_some_and(|(s, _)| s == b.name))
            {
                continue;
            }
            let mut cursor: Option<String> = None;
            for _ in 0..100 {
                let mut p = RawMap::default();
                if let Some(c) = &cursor {
                    p.set_str("cursor", c);
                }
                let Answer::Forwarded(reply) = self
                    .forward(&b.name, method::TASKS_LIST, p, ctx, cancel)
                    .await?
                else {
                    break;
                };
                let page: serde_json::Value = reply
                    .result
                    .as_deref()
                    .and_then(|r| serde_json::from_str(r.get()).ok())
                    .unwrap_or_default();
                if let Some(list) = page.get("tasks").and_then(serde_json::Value::as_array) {
                    all.extend(
                        list.iter()
                            .filter(|t| t["taskId"].as_str().is_some_and(|id| owned.contains(id)))
                            .cloned(),
                    );
                }
                match page.get("nextCursor").and_then(serde_json::Value::as_str) {
                    Some(c) if !c.is_empty() => cursor = Some(c.to_owned()),
                    _ => break,
                }
            }
        }
        Ok(Answer::Result(protocol::to_raw(
            &serde_json::json!({ "tasks": all }),
        )))
    }

    fn resource_owner(&self, uri: &str) -> Option<String> {
        if let Some(o) = self.catalog().resource_owner(uri) {
            return Some(o.to_string());
        }
        // A URI no list mentions: the only resource server may still serve it.
        let with_resources: Vec<Arc<Backend>> = self
            .backends()
            .into_iter()
            .filter(|b| b.info().has("resources"))
            .collect();
        match with_resources.as_slice() {
            [only] => Some(only.name.clone()),
            _ => None,
        }
    }

    /// `resources/subscribe` or `resources/unsubscribe` of a resource of a server of the
    /// stateless era: its `subscriptions/listen` stream asks for the resources sessions
    /// hold (opened again when they change).
    fn subscribe_modern(
        &self,
        b: &Arc<Backend>,
        ctx: &ReqCtx,
        m: &str,
        uri: &str,
    ) -> Result<Answer, RpcError> {
        if m == method::RESOURCES_SUBSCRIBE {
            if !b.offers_resource_subscriptions() {
                return Err(RpcError::MethodNotFound(format!(
                    "{m} (server `{}` speaks protocol 2026-07-28 and offers no resource subscriptions)",
                    b.name
                )));
            }
            ctx.session.state().subscriptions.insert(uri.to_owned());
            b.listen_resource(uri, true);
        } else {
            ctx.session.state().subscriptions.remove(uri);
            if !self.subscribed_elsewhere(uri) {
                b.listen_resource(uri, false);
            }
        }
        Ok(Answer::Result(protocol::raw("{}")))
    }

    fn subscribed_elsewhere(&self, uri: &str) -> bool {
        self.live_sessions()
            .iter()
            .any(|s| s.state().subscriptions.contains(uri))
    }

    async fn release_subscription(&self, uri: &str) {
        if self.subscribed_elsewhere(uri) {
            return;
        }
        if let Some(owner) = self.resource_owner(uri).and_then(|o| self.backend(&o)) {
            if owner.is_modern() {
                owner.listen_resource(uri, false);
                return;
            }
            let mut p = RawMap::default();
            p.set_str("uri", uri);
            owner.request_detached(method::RESOURCES_UNSUBSCRIBE, p);
        }
    }

    async fn complete(
        &self,
        ctx: &ReqCtx,
        mut params: RawMap,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<Answer, RpcError> {
        let bad = || {
            RpcError::InvalidParams(
                "`completion/complete` needs `ref` with `type` and `name` or `uri`".into(),
            )
        };
        self.settle().await;
        let grant = self.grant(&ctx.session);
        let mut r = params
            .get("ref")
            .and_then(|r| RawMap::parse(r.get()).ok())
            .ok_or_else(bad)?;
        let ty = r.get_str("type").ok_or_else(bad)?;
        let server = match ty.as_str() {
            "ref/prompt" => {
                let name = r.get_str("name").ok_or_else(bad)?;
                let t = self
                    .catalog()
                    .prompt(&name)
                    .filter(|t| grant.reaches(&t.server))
                    .cloned()
                    .ok_or_else(|| RpcError::InvalidParams(format!("unknown prompt `{name}`")))?;
                r.set_str("name", &t.name);
                params.set_raw("ref", r.to_raw());
                t.server.to_string()
            }
            "ref/resource" => {
                let uri = r.get_str("uri").ok_or_else(bad)?;
                let cat = self.catalog();
                cat.template_owner(&uri)
                    .map(ToString::to_string)
                    .or_else(|| self.resource_owner(&uri))
                    .filter(|o| grant.reaches(o))
                    .ok_or_else(|| RpcError::InvalidParams(format!("unknown resource `{uri}`")))?
            }
            _ => return Err(bad()),
        };
        let b = self.backend(&server).ok_or_else(bad)?;
        if !b.info().has("completions") {
            return Ok(Answer::Result(protocol::raw(
                r#"{"completion":{"values":[],"hasMore":false}}"#,
            )));
        }
        self.forward(&server, method::COMPLETE, params, ctx, cancel)
            .await
    }

    fn initialize(
        &self,
        session: &Arc<Session>,
        params: &RawMap,
    ) -> Box<serde_json::value::RawValue> {
        let requested = params.get_str("protocolVersion").unwrap_or_default();
        let version = if protocol::is_supported_version(&requested) {
            requested
        } else {
            protocol::LATEST_LEGACY.to_owned()
        };
        {
            let mut st = session.state();
            st.protocol_version = version.clone();
            st.client_capabilities = params.get("capabilities").map(|c| protocol::raw(c.get()));
            st.client_info = params.get("clientInfo").map(|c| protocol::raw(c.get()));
        }
        let (caps, instructions) = self.describe(&self.grant(session));
        let mut result = serde_json::json!({
            "protocolVersion": version,
            "capabilities": caps,
            "serverInfo": protocol::modern::server_info(),
        });
        if let (Some(i), Some(o)) = (instructions, result.as_object_mut()) {
            o.insert("instructions".into(), serde_json::Value::String(i));
        }
        protocol::to_raw(&result)
    }

    /// The relay's capabilities and instructions as a client with `grant` sees them (for
    /// `initialize` and `server/discover`).
    fn describe(
        &self,
        grant: &Grant,
    ) -> (serde_json::Map<String, serde_json::Value>, Option<String>) {
        let mut caps = serde_json::Map::new();
        caps.insert("tools".into(), serde_json::json!({"listChanged": true}));
        caps.insert("prompts".into(), serde_json::json!({"listChanged": true}));
        caps.insert(
            "resources".into(),
            serde_json::json!({"subscribe": true, "listChanged": true}),
        );
        caps.insert("completions".into(), serde_json::json!({}));
        caps.insert("logging".into(), serde_json::json!({}));
        let mut instructions = Vec::new();
        for b in self.backends() {
            if !grant.reaches(&b.name) {
                continue;
            }
            let info = b.info();
            if let Some(i) = info.instructions.filter(|i| !i.trim().is_empty()) {
                instructions.push(format!(
                    "## Server `{}` (tools prefixed `{}{}`)\n{i}",
                    b.name,
                    b.config.prefix,
                    catalog::SEPARATOR
                ));
            }
            // Experimental capabilities of backends (e.g. tasks) are advertised as a union.
            if let Some(c) = info.capabilities.as_deref().and_then(|c| {
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(c.get()).ok()
            }) {
                for (k, v) in c {
                    caps.entry(k).or_insert(v);
                }
            }
        }
        let instructions = (!instructions.is_empty()).then(|| instructions.join("\n\n"));
        (caps, instructions)
    }

    async fn on_notification(&self, session: &Arc<Session>, msg: Message) {
        match msg.method() {
            method::INITIALIZED => session.state().initialized = true,
            method::CANCELLED => {
                let id = msg
                    .params_map()
                    .ok()
                    .and_then(|p| p.get("requestId").map(|r| r.get().to_owned()));
                if let Some(id) = id {
                    session.cancel(&id);
                }
            }
            m => {
                // roots/list_changed and unknown notifications go to every ready backend
                // the session may reach.
                let grant = self.grant(session);
                for b in self.backends() {
                    if grant.reaches(&b.name) {
                        b.notify(m, msg.params.as_deref()).await;
                    }
                }
            }
        }
    }
}
