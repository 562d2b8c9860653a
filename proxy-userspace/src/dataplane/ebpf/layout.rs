//! Map layout changes between agent versions.
//!
//! aya adopts whatever map is pinned under a map's name without comparing its definition, so
//! a pin of another layout under the current name would be read and written with the wrong
//! sizes. Before loading, every `KP_*` pin is checked against the definitions in the eBPF
//! object:
//!
//! - a pin under a current name with another type, key size, value size, capacity or flags is
//!   moved aside (`<name>_displaced`), so the loader creates the map afresh;
//! - pins of names this build does not use (an older `_Vn`, a map that no longer exists) are
//!   retired.
//!
//! After loading, each fresh flow-state map (conntrack, reverse NAT, socket reverse
//! translation) is filled from a retired map of the same family (the name without its `_Vn`
//! suffix) when the entries are byte-compatible (same type and sizes: a capacity change, or a
//! version bump that kept the layout), so flows keep their backends; the load-balancing maps
//! are rebuilt from the desired state by the first sync. The retired pins are removed once the
//! new programs serve. The programs still attached through the pinned links keep using the
//! retired maps until then, which is what makes the change gapless (see
//! `EbpfDataplane::start`).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use super::bpf_sys;

/// A map's definition, as the object declares it or the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl MapLayout {
    /// Whether entries can be copied byte for byte between maps of these layouts.
    fn entries_compatible(&self, other: &MapLayout) -> bool {
        self.map_type == other.map_type
            && self.key_size == other.key_size
            && self.value_size == other.value_size
            && !is_per_cpu(self.map_type)
    }
}

/// `BPF_MAP_TYPE_PERCPU_HASH`, `_PERCPU_ARRAY`, `_LRU_PERCPU_HASH`: their values are per CPU
/// in the syscalls, so they are not copied (they hold counters only).
fn is_per_cpu(map_type: u32) -> bool {
    matches!(map_type, 5 | 6 | 10)
}

/// The layouts of the `KP_*` maps the eBPF object defines, by name.
pub fn object_layouts(object: &[u8]) -> anyhow::Result<BTreeMap<String, MapLayout>> {
    let obj = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
    Ok(obj
        .maps
        .iter()
        .filter(|(name, _)| name.starts_with("KP_"))
        .map(|(name, m)| {
            (
                name.clone(),
                MapLayout {
                    map_type: m.map_type(),
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                    max_entries: m.max_entries(),
                    flags: m.map_flags(),
                },
            )
        })
        .collect())
}

/// The layout of the map pinned at `pin`.
pub fn pinned_layout(pin: &Path) -> anyhow::Result<MapLayout> {
    let fd = bpf_sys::open_pinned(pin).with_context(|| format!("opening {}", pin.display()))?;
    let [map_type, _id, key_size, value_size, max_entries, flags] =
        bpf_sys::map_info(&fd).with_context(|| format!("reading {}", pin.display()))?;
    Ok(MapLayout {
        map_type,
        key_size,
        value_size,
        max_entries,
        flags,
    })
}

/// What [`prepare`] found and did.
#[derive(Debug, Default)]
pub struct PinPlan {
    /// Maps the loader will create (not pinned, or pinned with another layout).
    pub fresh: Vec<String>,
    /// Pins to remove once the new programs serve: moved-aside maps and older names.
    pub retired: Vec<PathBuf>,
    /// This build's map layouts.
    pub layouts: BTreeMap<String, MapLayout>,
}

/// The family of a map name: without its `_Vn` version and a `_displaced` mark.
fn family(name: &str) -> &str {
    let name = name.strip_suffix("_displaced").unwrap_or(name);
    match name.rsplit_once("_V") {
        Some((base, v)) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => name,
    }
}

/// Checks the pins under `root` against `layouts` before loading (see the module docs).
pub fn prepare(root: &Path, layouts: BTreeMap<String, MapLayout>) -> anyhow::Result<PinPlan> {
    let mut plan = PinPlan::default();
    for (name, want) in &layouts {
        let pin = root.join(name);
        if !pin.exists() {
            plan.fresh.push(name.clone());
            continue;
        }
        let have = pinned_layout(&pin).ok();
        if have.as_ref() == Some(want) {
            continue;
        }
        let aside = root.join(format!("{name}_displaced"));
        let _ = std::fs::remove_file(&aside);
        std::fs::rename(&pin, &aside).with_context(|| format!("moving {} aside", pin.display()))?;
        tracing::warn!(
            map = %name,
            pinned = ?have,
            expected = ?want,
            "a pinned map has another layout than this build's: it is rebuilt (the old one serves until then)"
        );
        plan.fresh.push(name.clone());
        plan.retired.push(aside);
    }
    for entry in std::fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let ours = name.starts_with("KP_") && !name.ends_with("_displaced");
        if ours && !layouts.contains_key(name) && path.is_file() {
            tracing::info!(pin = %name, "a map of an older layout is pinned: it is retired");
            plan.retired.push(path);
        }
    }
    plan.layouts = layouts;
    Ok(plan)
}

/// The maps holding flow state (not derived from the desired state), by name.
fn holds_flow_state(name: &str) -> bool {
    use proxy_common::maps as names;
    [names::CT4, names::NAT4_REV, names::SOCK4_REV]
        .iter()
        .any(|m| family(m) == family(name))
}

/// Fills each fresh flow-state map from a retired map of its family with compatible entries (again just
/// before the new programs take over: the old ones kept writing meanwhile). Returns
/// `(fresh map, from pin, entries)` for each copy made.
pub fn migrate(root: &Path, plan: &PinPlan) -> Vec<(String, PathBuf, usize)> {
    let mut done = Vec::new();
    for name in plan.fresh.iter().filter(|n| holds_flow_state(n)) {
        let Some(want) = plan.layouts.get(name) else {
            continue;
        };
        let source = plan.retired.iter().find(|old| {
            let old_name = old.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            family(old_name) == family(name)
                && pinned_layout(old).is_ok_and(|l| l.entries_compatible(want))
        });
        let Some(source) = source else {
            continue;
        };
        let copied = bpf_sys::open_pinned(source).and_then(|from| {
            let to = bpf_sys::open_pinned(&root.join(name))?;
            bpf_sys::map_copy(&from, &to, want.key_size as usize, want.value_size as usize)
        });
        match copied {
            Ok(n) => {
                tracing::info!(map = %name, from = %source.display(), entries = n, "migrated the entries of the older map");
                done.push((name.clone(), source.clone(), n));
            }
            Err(e) => {
                tracing::warn!(map = %name, from = %source.display(), "migrating entries failed ({e}); the map is rebuilt")
            }
        }
    }
    done
}

/// Removes the retired pins (the maps go when no program uses them any more).
pub fn remove_retired(plan: &PinPlan) {
    for pin in &plan.retired {
        match std::fs::remove_file(pin) {
            Ok(()) => tracing::info!(pin = %pin.display(), "removed a retired map pin"),
            Err(e) => tracing::warn!(pin = %pin.display(), "removing a retired map pin: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_ignore_versions_and_marks() {
        assert_eq!(family("KP_CT4_V1"), "KP_CT4");
        assert_eq!(family("KP_CT4_V12_displaced"), "KP_CT4");
        assert_eq!(family("KP_LB4_SVC_V0"), "KP_LB4_SVC");
        assert_eq!(family("KP_ODD"), "KP_ODD");
        assert_eq!(family("KP_ODD_Vx"), "KP_ODD_Vx");
    }

    #[test]
    fn the_object_defines_every_pinned_map() {
        let layouts = object_layouts(crate::EBPF_OBJECT).expect("the embedded object parses");
        for name in proxy_common::maps::ALL {
            assert!(layouts.contains_key(name), "{name} missing: {layouts:?}");
        }
        let ct = layouts[proxy_common::maps::CT4];
        assert_eq!(ct.max_entries, proxy_common::maps::CT4_MAX);
        assert!(ct.entries_compatible(&ct));
        assert!(
            !layouts[proxy_common::maps::STATS]
                .entries_compatible(&layouts[proxy_common::maps::STATS])
        );
    }
}
