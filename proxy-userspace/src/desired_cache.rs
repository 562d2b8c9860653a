//! The desired state kept between syncs and updated only for the services that changed
//! (kube-proxy's partial sync): at 10,000 Services, rebuilding everything for one endpoint
//! change costs tens of milliseconds; this costs what the changed services cost.
//!
//! `DesiredCache::update` gives exactly what `desired::build` + `build6` would give for the
//! same model (a unit test checks this over random changes): each service's candidate
//! frontends come from the same functions, and a key two service ports ask for goes to the
//! first by `ServicePortName` order, as in `build`. The candidates that lost a key are kept
//! (rare), so that the key passes to the next one when the winner goes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, Ipv6Addr},
};

use crate::{
    desired::{
        self, DesiredState, Frontend, Frontend6, KeyedFrontend, NodeContext, Protocol,
        ServicePortName,
    },
    model::{Model, NamespacedName},
};

pub type Key4 = (Ipv4Addr, u16, Protocol);
pub type Key6 = (Ipv6Addr, u16, Protocol);

/// The frontend keys whose frontend was added, changed or removed by an update.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontendChanges {
    pub keys: BTreeSet<Key4>,
    pub keys6: BTreeSet<Key6>,
}

impl FrontendChanges {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.keys6.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len() + self.keys6.len()
    }
}

/// The keys one service asked for (won or not), per family.
#[derive(Debug, Default)]
struct Claims {
    v4: Vec<Key4>,
    v6: Vec<Key6>,
}

/// The candidates that lost their key to an earlier service port, per key.
type Shadowed<F> = HashMap<<F as KeyedFrontend>::Key, Vec<F>>;

#[derive(Debug, Default)]
pub struct DesiredCache {
    state: DesiredState,
    claims: HashMap<NamespacedName, Claims>,
    shadowed: Shadowed<Frontend>,
    shadowed6: Shadowed<Frontend6>,
    /// The node context the state was built for (None: never built).
    context: Option<NodeContext>,
}

impl DesiredCache {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    /// The node context of the last build (an update needs the same one).
    pub fn context(&self) -> Option<&NodeContext> {
        self.context.as_ref()
    }

    /// Builds the whole state from the model (as `Model::desired`).
    pub fn rebuild(&mut self, model: &Model, node: &NodeContext) -> &DesiredState {
        self.claims.clear();
        self.shadowed.clear();
        self.shadowed6.clear();
        let mut frontends: BTreeMap<Key4, Frontend> = BTreeMap::new();
        let mut frontends6: BTreeMap<Key6, Frontend6> = BTreeMap::new();
        let (mut buf, mut buf6) = (Vec::new(), Vec::new());
        let mut owner: Option<NamespacedName> = None;
        for (spn, info) in model.services().iter() {
            if owner
                .as_ref()
                .is_none_or(|o| o.namespace != spn.namespace || o.name != spn.name)
            {
                owner = Some(NamespacedName::new(&spn.namespace, &spn.name));
            }
            let claims = self.claims.entry(owner.clone().unwrap_or_default());
            let claims = claims.or_default();
            desired::push_candidates(spn, info, model.endpoints(), node, &mut buf);
            for f in buf.drain(..) {
                claims.v4.push(f.key());
                keep_first(&mut frontends, &mut self.shadowed, f);
            }
            desired::push_candidates6(spn, info, model.endpoints6(), node, &mut buf6);
            for f in buf6.drain(..) {
                claims.v6.push(f.key());
                keep_first(&mut frontends6, &mut self.shadowed6, f);
            }
        }
        self.state = DesiredState {
            frontends: frontends.into_values().collect(),
            nodeport_addresses: desired::sorted_unique(&node.nodeport_addresses),
            frontends6: frontends6.into_values().collect(),
            nodeport_addresses6: desired::sorted_unique(&node.nodeport_addresses6),
        };
        self.context = Some(node.clone());
        &self.state
    }

    /// Rebuilds the frontends of the `changed` services (added, changed or deleted ones)
    /// from the model. Returns the keys whose frontend differs now. The node context must be
    /// the one of the last build (else call `rebuild`).
    pub fn update(&mut self, model: &Model, changed: &BTreeSet<NamespacedName>) -> FrontendChanges {
        let Some(node) = self.context.clone() else {
            return FrontendChanges::default();
        };
        let mut fresh: BTreeMap<Key4, Vec<Frontend>> = BTreeMap::new();
        let mut fresh6: BTreeMap<Key6, Vec<Frontend6>> = BTreeMap::new();
        let mut touched: BTreeSet<Key4> = BTreeSet::new();
        let mut touched6: BTreeSet<Key6> = BTreeSet::new();
        let (mut buf, mut buf6) = (Vec::new(), Vec::new());
        for name in changed {
            if let Some(old) = self.claims.remove(name) {
                touched.extend(old.v4);
                touched6.extend(old.v6);
            }
            let Some(ports) = model.services().service(name) else {
                continue;
            };
            let mut claims = Claims::default();
            for (spn, info) in ports {
                desired::push_candidates(spn, info, model.endpoints(), &node, &mut buf);
                for f in buf.drain(..) {
                    claims.v4.push(f.key());
                    fresh.entry(f.key()).or_default().push(f);
                }
                desired::push_candidates6(spn, info, model.endpoints6(), &node, &mut buf6);
                for f in buf6.drain(..) {
                    claims.v6.push(f.key());
                    fresh6.entry(f.key()).or_default().push(f);
                }
            }
            touched.extend(claims.v4.iter().copied());
            touched6.extend(claims.v6.iter().copied());
            self.claims.insert(name.clone(), claims);
        }
        let stale = |spn: &ServicePortName| {
            changed.contains(&NamespacedName::new(&spn.namespace, &spn.name))
        };
        FrontendChanges {
            keys: resolve(
                &mut self.state.frontends,
                &mut self.shadowed,
                fresh,
                touched,
                stale,
            ),
            keys6: resolve(
                &mut self.state.frontends6,
                &mut self.shadowed6,
                fresh6,
                touched6,
                stale,
            ),
        }
    }
}

/// `build`'s rule: the first candidate on a key is kept, later ones are shadowed.
fn keep_first<F: KeyedFrontend>(
    frontends: &mut BTreeMap<F::Key, F>,
    shadowed: &mut Shadowed<F>,
    f: F,
) {
    match frontends.get(&f.frontend_key()) {
        None => {
            frontends.insert(f.frontend_key(), f);
        }
        Some(kept) => {
            desired::warn_conflict(&f, kept);
            shadowed.entry(f.frontend_key()).or_default().push(f);
        }
    }
}

/// Picks the winner of every `touched` key again: among the current holder and the shadowed
/// candidates (unless they belong to a changed service: those are `stale`, replaced by the
/// `fresh` candidates), the first by `ServicePortName` (ties: the earlier candidate of that
/// service port). Updates `frontends` (sorted by key) and returns the keys that differ.
fn resolve<F: KeyedFrontend + Clone + PartialEq>(
    frontends: &mut Vec<F>,
    shadowed: &mut Shadowed<F>,
    mut fresh: BTreeMap<F::Key, Vec<F>>,
    touched: BTreeSet<F::Key>,
    stale: impl Fn(&ServicePortName) -> bool,
) -> BTreeSet<F::Key> {
    let mut updates: Vec<(F::Key, Option<F>)> = Vec::new();
    for key in touched {
        let current = frontends
            .binary_search_by(|f| f.frontend_key().cmp(&key))
            .ok()
            .map(|i| &frontends[i]);
        let mut pool: Vec<F> = Vec::new();
        if let Some(c) = current.filter(|c| !stale(c.service_port())) {
            pool.push(c.clone());
        }
        if let Some(s) = shadowed.remove(&key) {
            pool.extend(s.into_iter().filter(|f| !stale(f.service_port())));
        }
        pool.extend(fresh.remove(&key).unwrap_or_default());
        let winner =
            (0..pool.len()).min_by(|a, b| pool[*a].service_port().cmp(pool[*b].service_port()));
        let Some(winner) = winner else {
            if current.is_some() {
                updates.push((key, None));
            }
            continue;
        };
        let winner = pool.remove(winner);
        for lost in &pool {
            desired::warn_conflict(lost, &winner);
        }
        if !pool.is_empty() {
            shadowed.insert(key, pool);
        }
        if current != Some(&winner) {
            updates.push((key, Some(winner)));
        }
    }
    let keys = updates.iter().map(|(k, _)| *k).collect();
    merge_updates(frontends, updates);
    keys
}

/// Applies `updates` (sorted by key: the new frontend, or None to remove) to `frontends`
/// (sorted by key): in place when only existing keys change, else in one merge pass.
fn merge_updates<F: KeyedFrontend>(frontends: &mut Vec<F>, updates: Vec<(F::Key, Option<F>)>) {
    let positions: Option<Vec<usize>> = updates
        .iter()
        .map(|(k, u)| {
            u.as_ref()?;
            frontends.binary_search_by(|f| f.frontend_key().cmp(k)).ok()
        })
        .collect();
    if let Some(positions) = positions {
        for (i, (_, u)) in positions.into_iter().zip(updates) {
            if let Some(f) = u {
                frontends[i] = f;
            }
        }
        return;
    }
    let old = std::mem::take(frontends);
    let mut out = Vec::with_capacity(old.len() + updates.len());
    let mut updates = updates.into_iter().peekable();
    for f in old {
        let key = f.frontend_key();
        while let Some((_, u)) = updates.next_if(|(k, _)| *k < key) {
            out.extend(u);
        }
        match updates.next_if(|(k, _)| *k == key) {
            Some((_, u)) => out.extend(u),
            None => out.push(f),
        }
    }
    for (_, u) in updates {
        out.extend(u);
    }
    *frontends = out;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::testutil::{service, simple_slice},
        source::K8sObject,
    };

    /// A tiny deterministic generator (xorshift), so failures reproduce from the seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn node() -> NodeContext {
        NodeContext {
            node_name: "n1".into(),
            nodeport_addresses: vec!["192.168.1.2".parse().unwrap()],
            nodeport_addresses6: vec!["fd00::2".parse().unwrap()],
            zone: None,
        }
    }

    /// A random Service `svc-{i}` drawn from few addresses and ports, so that frontends of
    /// different Services often collide (cluster IPs, external IPs, nodePorts), some
    /// dual-stack.
    fn random_service(rng: &mut Rng, i: u64) -> K8sObject {
        let ip = format!("10.96.0.{}", rng.below(6) + 1);
        let port = 80 + rng.below(2);
        let mut y = format!("metadata: {{name: svc-{i}}}\nspec:\n");
        let dual = rng.below(3) == 0;
        if dual {
            y.push_str(&format!(
                "  clusterIPs: [{ip}, 'fd00:96::{}']\n  ipFamilies: [IPv4, IPv6]\n",
                rng.below(4) + 1
            ));
        } else {
            y.push_str(&format!("  clusterIP: {ip}\n"));
        }
        if rng.below(2) == 0 {
            y.push_str(&format!(
                "  type: NodePort\n  externalIPs: [10.96.0.{}]\n",
                rng.below(6) + 1
            ));
            y.push_str(&format!(
                "  ports:\n  - {{name: http, port: {port}, targetPort: 8080, nodePort: {}}}\n",
                30000 + i
            ));
        } else {
            y.push_str(&format!(
                "  ports:\n  - {{name: http, port: {port}, targetPort: 8080}}\n  - {{name: dns, port: 53, protocol: UDP, targetPort: 53}}\n"
            ));
        }
        K8sObject::Service(Box::new(service(&y)))
    }

    fn random_slice(rng: &mut Rng, i: u64) -> K8sObject {
        let n = rng.below(4);
        let eps: Vec<(String, &str, bool, bool, bool)> = (0..n)
            .map(|e| {
                (
                    format!("10.244.{}.{}", i, e + rng.below(3) * 10 + 1),
                    if rng.below(2) == 0 { "n1" } else { "n2" },
                    rng.below(4) != 0,
                    true,
                    false,
                )
            })
            .collect();
        let eps: Vec<(&str, &str, bool, bool, bool)> = eps
            .iter()
            .map(|(a, n, r, s, t)| (a.as_str(), *n, *r, *s, *t))
            .collect();
        K8sObject::EndpointSlice(Box::new(simple_slice(
            &format!("svc-{i}-a"),
            &format!("svc-{i}"),
            8080,
            &eps,
        )))
    }

    #[test]
    fn updates_give_what_a_full_build_gives_over_random_changes() {
        for seed in 1..=20u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let mut objects: BTreeMap<(u64, bool), K8sObject> = BTreeMap::new();
            let mut model = Model::new();
            let mut cache = DesiredCache::new();
            cache.rebuild(&model, &node());
            for step in 0..60 {
                // A few changes per sync: add/replace/delete a Service or its slice.
                for _ in 0..=rng.below(3) {
                    let i = rng.below(8);
                    let is_slice = rng.below(2) == 0;
                    if rng.below(4) == 0 {
                        objects.remove(&(i, is_slice));
                    } else if is_slice {
                        objects.insert((i, true), random_slice(&mut rng, i));
                    } else {
                        objects.insert((i, false), random_service(&mut rng, i));
                    }
                }
                let before = cache.state().clone();
                let changes = model.replace_all(objects.values().cloned());
                let keys = cache.update(&model, &changes.services);
                let want = model.desired(&node());
                assert_eq!(cache.state(), &want, "seed {seed} step {step}");
                // The keys reported are exactly those whose frontend differs.
                let differs = |k: &Key4| {
                    let find =
                        |d: &DesiredState| d.frontends.iter().find(|f| f.key() == *k).cloned();
                    find(&before) != find(&want)
                };
                let all: BTreeSet<Key4> = before
                    .frontends
                    .iter()
                    .chain(&want.frontends)
                    .map(|f| f.key())
                    .filter(differs)
                    .collect();
                assert_eq!(keys.keys, all, "seed {seed} step {step}");
                let differs6 = |k: &Key6| {
                    let find =
                        |d: &DesiredState| d.frontends6.iter().find(|f| f.key() == *k).cloned();
                    find(&before) != find(&want)
                };
                let all6: BTreeSet<Key6> = before
                    .frontends6
                    .iter()
                    .chain(&want.frontends6)
                    .map(|f| f.key())
                    .filter(differs6)
                    .collect();
                assert_eq!(keys.keys6, all6, "seed {seed} step {step}");
            }
        }
    }

    #[test]
    fn a_key_passes_to_the_next_service_when_its_holder_goes() {
        let a = service(
            "metadata: {name: a}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{name: http, port: 80}]\n",
        );
        let b = service(
            "metadata: {name: b}\nspec:\n  clusterIP: 10.96.0.2\n  externalIPs: [10.96.0.1]\n  ports: [{name: http, port: 80}]\n",
        );
        let mut model = Model::new();
        let mut cache = DesiredCache::new();
        model.replace_all([
            K8sObject::Service(Box::new(a.clone())),
            K8sObject::Service(Box::new(b.clone())),
        ]);
        cache.rebuild(&model, &node());
        let key: Key4 = ("10.96.0.1".parse().unwrap(), 80, Protocol::Tcp);
        let holder = |c: &DesiredCache| {
            c.state()
                .frontends
                .iter()
                .find(|f| f.key() == key)
                .map(|f| f.service.name.clone())
        };
        assert_eq!(holder(&cache).as_deref(), Some("a"));
        let ch = model.replace_all([K8sObject::Service(Box::new(b))]);
        let keys = cache.update(&model, &ch.services);
        assert_eq!(holder(&cache).as_deref(), Some("b"));
        assert!(keys.keys.contains(&key));
        let ch = model.replace_all([K8sObject::Service(Box::new(a))]);
        cache.update(&model, &ch.services);
        assert_eq!(holder(&cache).as_deref(), Some("a"));
        assert_eq!(cache.state(), &model.desired(&node()));
    }
}
