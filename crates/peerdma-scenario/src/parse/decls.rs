//! The declarations of a scenario: `[[file]]`, `[[device]]` (dmirror, GPU, NVMe, NIC, SVA and `pci`
//! devices against `[topology]`), `[[process]]` and `[[thread]]`.

use std::collections::BTreeMap;
use std::ops::Range;

use peerdma_core::PAGE_SIZE;
use toml::de::DeValue;

use crate::ast::{
    DeviceDecl, DeviceKind, DeviceMemoryKind, ExportDecl, FileDecl, GpuDecl, IommuMode, P2pDecl,
    SvaDecl, ThreadDecl,
};
use crate::pattern::Pattern;

use super::{Parser, RefKind, Result, Table, Value, describe, is_mapping_name, list};

impl Parser<'_> {
    /// Checks that `name` is not in `defs` yet (a second definition of the same name is an error).
    pub(super) fn check_unique(
        &self,
        defs: &BTreeMap<String, Range<usize>>,
        name: &str,
        span: &Range<usize>,
        kind: &str,
    ) -> Result<()> {
        match defs.get(name) {
            Some(first) => Err(self.err(
                span,
                format!(
                    "duplicate {kind} name `{name}`; the first one is at line {}; expected a unique name",
                    self.line_of(first)
                ),
            )),
            None => Ok(()),
        }
    }

    pub(super) fn file(&mut self, t: &Table<'_, '_>) -> Result<FileDecl> {
        self.allow(t, &["name", "size", "pattern", "dax", "tmpfs"])?;
        let name_v = self.required(t, "name")?;
        let name = self.name(name_v, "name")?;
        self.check_unique(&self.files, &name, &name_v.span(), "file")?;
        self.files.insert(name.clone(), name_v.span());
        let size_v = self.required(t, "size")?;
        let size = self.size(size_v, "size")?;
        // The file's contents are filled in host memory once (its `pattern`) and live in simulated memory.
        if size > self.limits.host_memory {
            return Err(self.err(
                &size_v.span(),
                format!(
                    "a file of {size:#x} bytes is over the host memory limit of {:#x} \
                     (`[sim.limits] host_memory`)",
                    self.limits.host_memory
                ),
            ));
        }
        self.add_sim_memory(size, &size_v.span(), "this file")?;
        let pattern = match t.get("pattern") {
            Some(v) => self.pattern(v, "pattern")?,
            None => Pattern::Zero,
        };
        let dax = match t.get("dax") {
            Some(v) => self.boolean(v, "dax")?,
            None => false,
        };
        let tmpfs = match t.get("tmpfs") {
            Some(v) => self.boolean(v, "tmpfs")?,
            None => false,
        };
        if dax && tmpfs {
            let v = t.get("tmpfs").expect("read above");
            return Err(self.err(&v.span(), "a file is either `dax` or `tmpfs`, not both"));
        }
        Ok(FileDecl {
            name,
            size,
            pattern,
            dax,
            tmpfs,
        })
    }

    pub(super) fn device(&mut self, t: &Table<'_, '_>) -> Result<DeviceDecl> {
        self.allow(
            t,
            &[
                "name",
                "kind",
                "memory",
                "size",
                "node",
                "iommu",
                "p2p",
                "export",
                "p2p_queue",
                "vram",
                "bar",
                "bar_window",
                "managed",
                "beyond_mainline_p2p",
                "atc_sets",
                "atc_ways",
                "wq_depth",
                "prq_entries",
                "pasid_bits",
                "own_migrations",
            ],
        )?;
        let name_v = self.required(t, "name")?;
        let name = self.name(name_v, "name")?;
        self.check_unique(&self.devices, &name, &name_v.span(), "device")?;
        self.devices.insert(name.clone(), name_v.span());
        let kind = self.keyword(
            self.required(t, "kind")?,
            "kind",
            &[
                ("dmirror", DeviceKind::Dmirror),
                ("pci", DeviceKind::Pci),
                ("rnic", DeviceKind::Rnic),
                ("nvme", DeviceKind::Nvme),
                ("gpu", DeviceKind::Gpu),
                ("sva", DeviceKind::Sva),
            ],
        )?;
        if kind != DeviceKind::Gpu {
            for key in [
                "vram",
                "bar",
                "bar_window",
                "managed",
                "beyond_mainline_p2p",
            ] {
                if let Some(v) = t.get(key) {
                    return Err(self.err(
                        &v.span(),
                        format!("`{key}` is for a `kind = \"gpu\"` device"),
                    ));
                }
            }
        }
        if matches!(kind, DeviceKind::Dmirror | DeviceKind::Sva) {
            let what = if kind == DeviceKind::Sva {
                "an `sva`"
            } else {
                "a `dmirror`"
            };
            for key in ["node", "iommu", "p2p", "export", "p2p_queue"] {
                if let Some(v) = t.get(key) {
                    return Err(self.err(
                        &v.span(),
                        format!("`{key}` is for a `kind = \"pci\"` device, not {what}"),
                    ));
                }
            }
        }
        let mut sva = SvaDecl::default();
        for (key, field, lo, hi) in [
            ("atc_sets", &mut sva.atc_sets, 1, 1 << 16),
            ("atc_ways", &mut sva.atc_ways, 1, 1 << 10),
            ("wq_depth", &mut sva.wq_depth, 1, 1 << 12),
            ("prq_entries", &mut sva.prq_entries, 1, 1 << 16),
            ("pasid_bits", &mut sva.pasid_bits, 1, 20),
        ] {
            let Some(v) = t.get(key) else { continue };
            if kind != DeviceKind::Sva {
                return Err(self.err(
                    &v.span(),
                    format!("`{key}` is for a `kind = \"sva\"` device"),
                ));
            }
            let n = self.uint(v, key)?;
            if !(lo..=hi).contains(&n) {
                return Err(self.err(
                    &v.span(),
                    format!("expected {lo} to {hi} for `{key}`, found {n}"),
                ));
            }
            *field = n;
        }
        if kind == DeviceKind::Sva {
            self.sva_devices.insert(name.clone());
        }
        let memory = match t.get("memory") {
            Some(v) => self.keyword(
                v,
                "memory",
                &[
                    ("private", DeviceMemoryKind::Private),
                    ("coherent", DeviceMemoryKind::Coherent),
                ],
            )?,
            None => DeviceMemoryKind::Private,
        };
        let size = match t.get("size") {
            Some(v) => {
                let size = self.len(v, "size")?;
                if size % PAGE_SIZE != 0 {
                    return Err(self.err(
                        &v.span(),
                        format!(
                            "expected a whole number of 4 KiB pages for `size`, found {size} bytes"
                        ),
                    ));
                }
                self.add_sim_memory(size, &v.span(), "this device's `size`")?;
                size
            }
            None => 256 << 20,
        };
        let mut decl = DeviceDecl {
            name,
            kind,
            memory,
            size,
            node: None,
            iommu: IommuMode::default(),
            p2p: Vec::new(),
            exports: Vec::new(),
            p2p_queue: true,
            gpu: None,
            sva,
            invalidate_own_migrations: false,
        };
        if let Some(v) = t.get("own_migrations") {
            if kind != DeviceKind::Dmirror {
                return Err(self.err(
                    &v.span(),
                    "`own_migrations` is for a `kind = \"dmirror\"` device",
                ));
            }
            decl.invalidate_own_migrations = self.keyword(
                v,
                "own_migrations",
                &[("ignore", false), ("invalidate", true)],
            )?;
        }
        if let Some(v) = t.get("p2p_queue") {
            if kind != DeviceKind::Nvme {
                return Err(self.err(&v.span(), "`p2p_queue` is for a `kind = \"nvme\"` device"));
            }
            decl.p2p_queue = self.boolean(v, "p2p_queue")?;
        }
        if matches!(
            kind,
            DeviceKind::Pci | DeviceKind::Gpu | DeviceKind::Rnic | DeviceKind::Nvme
        ) {
            self.pci_device(t, &name_v.span(), &mut decl)?;
        }
        if kind == DeviceKind::Gpu {
            decl.gpu = Some(self.gpu_device(t, &name_v.span())?);
            self.gpu_devices.insert(decl.name.clone());
        }
        Ok(decl)
    }

    /// The `gpu` keys of a `[[device]]`: `vram` (required), `bar`, `bar_window`, `managed`.
    pub(super) fn gpu_device(
        &mut self,
        t: &Table<'_, '_>,
        name_span: &Range<usize>,
    ) -> Result<GpuDecl> {
        let Some(v) = t.get("vram") else {
            return Err(self.err(name_span, "a `kind = \"gpu\"` device needs `vram`"));
        };
        let vram = self.len(v, "vram")?;
        let page = |this: &Self, v: &Value<'_>, key: &str, n: u64| -> Result<u64> {
            if n.is_multiple_of(PAGE_SIZE) {
                Ok(n)
            } else {
                Err(this.err(
                    &v.span(),
                    format!("expected a whole number of 4 KiB pages for `{key}`, found {n} bytes"),
                ))
            }
        };
        let vram = page(self, v, "vram", vram)?;
        let bar = match t.get("bar") {
            Some(v) => {
                let b = self.uint_as(v, "bar", "a BAR index 0-5")?;
                u8::try_from(b).ok().filter(|b| *b <= 5).ok_or_else(|| {
                    self.err(
                        &v.span(),
                        format!("expected a BAR index 0-5 for `bar`, found {b}"),
                    )
                })?
            }
            None => 0,
        };
        let window = match t.get("bar_window") {
            Some(v) => {
                let w = page(self, v, "bar_window", self.len(v, "bar_window")?)?;
                if w > vram {
                    return Err(self.err(
                        &v.span(),
                        format!(
                            "`bar_window` ({w:#x} bytes) is larger than `vram` ({vram:#x} bytes)"
                        ),
                    ));
                }
                Some(w)
            }
            None => None,
        };
        let managed = match t.get("managed") {
            Some(v) => page(self, v, "managed", self.len(v, "managed")?)?,
            None => vram,
        };
        let beyond_mainline_p2p = match t.get("beyond_mainline_p2p") {
            Some(v) => self.boolean(v, "beyond_mainline_p2p")?,
            None => false,
        };
        Ok(GpuDecl {
            vram,
            bar,
            window,
            managed,
            beyond_mainline_p2p,
            skip_peer_invalidation: false,
        })
    }

    /// The `pci` keys of a `[[device]]`: its topology node, IOMMU mode, P2P resources and BAR exports.
    pub(super) fn pci_device(
        &mut self,
        t: &Table<'_, '_>,
        name_span: &Range<usize>,
        decl: &mut DeviceDecl,
    ) -> Result<()> {
        let Some(topo) = self.topo.clone() else {
            return Err(self.err(
                name_span,
                "a `kind = \"pci\"` device needs a `[topology]` with its PCI function",
            ));
        };
        let (node_name, node_span) = match t.get("node") {
            Some(v) => (self.string(v, "node")?.to_owned(), v.span()),
            None => (decl.name.clone(), name_span.clone()),
        };
        let Some(node) = topo.lookup(&node_name) else {
            let endpoints: Vec<&str> = topo.endpoints().map(|e| topo.name(e)).collect();
            return Err(self.err(
                &node_span,
                format!(
                    "no node `{node_name}` in `[topology]` for device `{}`; expected one of: {}",
                    decl.name,
                    list(endpoints)
                ),
            ));
        };
        if topo.node(node).kind() != peerdma_pci::NodeKind::Endpoint {
            return Err(self.err(
                &node_span,
                format!(
                    "node `{node_name}` is a {}, expected an endpoint for a `pci` device",
                    topo.node(node).kind().name()
                ),
            ));
        }
        if let Some(owner) = self.pci_nodes.get(&node_name) {
            return Err(self.err(
                &node_span,
                format!(
                    "node `{node_name}` already belongs to device `{owner}`; expected one `pci` device per PCI \
                     function"
                ),
            ));
        }
        self.pci_nodes.insert(node_name.clone(), decl.name.clone());
        decl.node = Some(node_name.clone());
        self.pci_devices.insert(decl.name.clone());
        if let Some(v) = t.get("iommu") {
            decl.iommu = self.keyword(
                v,
                "iommu",
                &[
                    ("identity", IommuMode::Identity),
                    ("dma", IommuMode::Dma),
                    ("dma-lazy", IommuMode::DmaLazy),
                ],
            )?;
        }
        // Returns the entry's BAR index and the BAR's size.
        let bar_of = |this: &Self, e: &Table<'_, '_>| -> Result<(u8, u64)> {
            let v = this.required(e, "bar")?;
            let bar = this.uint_as(v, "bar", "a BAR index 0-5")?;
            let Ok(bar @ 0..=5) = u8::try_from(bar) else {
                return Err(this.err(
                    &v.span(),
                    format!("expected a BAR index 0-5 for `bar`, found {bar}"),
                ));
            };
            let Some(b) = topo.node(node).bar(bar) else {
                let have: Vec<String> = topo
                    .node(node)
                    .bars()
                    .iter()
                    .map(|b| b.index.to_string())
                    .collect();
                let known = if have.is_empty() {
                    "it has no BARs (declare them in its `[[topology.endpoint]]` `bars`)".to_owned()
                } else {
                    format!("expected one of: {}", list(have.iter().map(String::as_str)))
                };
                return Err(this.err(
                    &v.span(),
                    format!("node `{node_name}` has no BAR {bar}; {known}"),
                ));
            };
            Ok((bar, b.size))
        };
        // Checks that `[offset, offset + len)` (len 0: to the end) lies inside the BAR, as
        // `pci_p2pdma_add_resource` and the exporter do; the error points at `offset` when it is past the end
        // of the BAR, else at the length.
        let fits = |this: &Self,
                    what: &str,
                    bar: u8,
                    bar_size: u64,
                    (offset, offset_v): (u64, Option<&Value<'_>>),
                    (len, len_v): (u64, Option<&Value<'_>>)|
         -> Result<()> {
            let end = if len == 0 {
                Some(bar_size)
            } else {
                offset.checked_add(len)
            };
            if offset < bar_size && end.is_some_and(|e| e <= bar_size) {
                return Ok(());
            }
            let span = if offset >= bar_size || len_v.is_none() {
                offset_v.or(len_v).map(Value::span)
            } else {
                len_v.map(Value::span)
            }
            .unwrap_or_else(|| name_span.clone());
            let len_text = if len == 0 {
                "to the end".to_owned()
            } else {
                format!("of {len:#x} bytes")
            };
            Err(this.err(
                &span,
                format!(
                    "{what} range at offset {offset:#x} {len_text} does not fit BAR {bar} of node `{node_name}` \
                     ({bar_size:#x} bytes)"
                ),
            ))
        };
        if let Some(v) = t.get("p2p") {
            for item in self.inline_tables(
                v,
                "p2p",
                "a P2P resource like `{ bar = 2, size = \"1MiB\" }`",
            )? {
                let mut item = item;
                "a `p2p` entry".clone_into(&mut item.what);
                self.allow(&item, &["bar", "size", "offset", "publish"])?;
                let (bar, bar_size) = bar_of(self, &item)?;
                let size = self.opt_size(&item, "size", 0)?;
                let offset = self.opt_size(&item, "offset", 0)?;
                fits(
                    self,
                    "p2p",
                    bar,
                    bar_size,
                    (offset, item.get("offset")),
                    (size, item.get("size")),
                )?;
                let publish = self.opt_bool(&item, "publish", true)?;
                decl.p2p.push(P2pDecl {
                    bar,
                    size,
                    offset,
                    publish,
                });
            }
        }
        if let Some(v) = t.get("export") {
            for item in self.inline_tables(
                v,
                "export",
                "a BAR export like `{ name = \"vram\", bar = 2 }`",
            )? {
                let mut item = item;
                "an `export` entry".clone_into(&mut item.what);
                self.allow(&item, &["name", "bar", "offset", "len", "revocable"])?;
                let name_v = self.required(&item, "name")?;
                let name = self.name(name_v, "name")?;
                self.check_unique(&self.exports, &name, &name_v.span(), "export")?;
                self.exports.insert(name.clone(), name_v.span());
                let (bar, bar_size) = bar_of(self, &item)?;
                let offset = self.opt_size(&item, "offset", 0)?;
                let len = self.opt_len(&item, "len", 0)?;
                for (key, n) in [("offset", offset), ("len", len)] {
                    if let Some(v) = item.get(key)
                        && n % PAGE_SIZE != 0
                    {
                        return Err(self.err(
                            &v.span(),
                            format!(
                                "expected a page-aligned `{key}` for a BAR export, found {n:#x}"
                            ),
                        ));
                    }
                }
                fits(
                    self,
                    "export",
                    bar,
                    bar_size,
                    (offset, item.get("offset")),
                    (len, item.get("len")),
                )?;
                let revocable = self.opt_bool(&item, "revocable", true)?;
                decl.exports.push(ExportDecl {
                    name,
                    bar,
                    offset,
                    len,
                    revocable,
                });
            }
        }
        Ok(())
    }

    /// The inline tables of an array value (`p2p = [{ ... }, ...]`).
    pub(super) fn inline_tables<'t, 'i>(
        &self,
        v: &'t Value<'i>,
        key: &str,
        what: &str,
    ) -> Result<Vec<Table<'t, 'i>>> {
        let DeValue::Array(items) = v.get_ref() else {
            return Err(self.err(
                &v.span(),
                format!(
                    "expected a list of tables for `{key}`, found {}",
                    describe(v.get_ref())
                ),
            ));
        };
        items.iter().map(|item| self.table(item, what)).collect()
    }

    /// A new mapping's name (`name = "buf"`).
    pub(crate) fn mapping_name(&self, v: &Value<'_>) -> Result<String> {
        let name = self.string(v, "name")?;
        if !is_mapping_name(name) {
            return Err(self.err(
                &v.span(),
                format!("expected a mapping name (a letter or `_`, then letters, digits or `_`), found `{name}`"),
            ));
        }
        Ok(name.to_owned())
    }

    /// Adds a process (declared or forked), failing when the name is taken.
    pub(crate) fn define_process(&mut self, name: &str, span: Range<usize>) -> Result<()> {
        match self.processes.get(name) {
            Some(None) => Err(self.err(
                &span,
                format!(
                    "duplicate process name `{name}`: a process named `main` always exists; expected another \
                     name"
                ),
            )),
            Some(Some(first)) => Err(self.err(
                &span,
                format!(
                    "duplicate process name `{name}`; the first one is at line {}; expected a unique name",
                    self.line_of(first)
                ),
            )),
            None => {
                self.processes.insert(name.to_owned(), Some(span));
                Ok(())
            }
        }
    }

    /// A `[[process]]`: its name and, when it sets `node`, its home NUMA node (below `nr_nodes`, the number
    /// of `[sim] memory` entries).
    pub(super) fn process(
        &mut self,
        t: &Table<'_, '_>,
        nr_nodes: usize,
    ) -> Result<(String, Option<u32>)> {
        self.allow(t, &["name", "node"])?;
        let name_v = self.required(t, "name")?;
        let name = self.name(name_v, "name")?;
        self.define_process(&name, name_v.span())?;
        let node = match t.get("node") {
            Some(v) => Some(self.numa_node(v, "node", nr_nodes)?),
            None => None,
        };
        Ok((name, node))
    }

    pub(super) fn thread(&mut self, t: &Table<'_, '_>) -> Result<ThreadDecl> {
        self.allow(t, &["name", "process", "steps"])?;
        let name_v = self.required(t, "name")?;
        let name = self.name(name_v, "name")?;
        self.check_unique(&self.threads, &name, &name_v.span(), "thread")?;
        self.threads.insert(name.clone(), name_v.span());
        let process = match t.get("process") {
            Some(v) => self.name_ref(v, "process", RefKind::Process)?,
            None => "main".to_owned(),
        };
        let steps_v = self.required(t, "steps")?;
        let DeValue::Array(items) = steps_v.get_ref() else {
            return Err(self.err(
                &steps_v.span(),
                format!(
                    "expected a list of steps like `[{{ op = \"exit\" }}]` for `steps`, found {}",
                    describe(steps_v.get_ref())
                ),
            ));
        };
        let steps = items
            .iter()
            .map(|item| self.step(item))
            .collect::<Result<Vec<_>>>()?;
        if let Some(i) = steps.iter().position(|s| s.op.ends_thread())
            && let Some(after) = items.get(i + 1)
        {
            return Err(self.err(
                &after.span(),
                format!(
                    "this step comes after the `exit` at line {} and would never run; expected `exit` to be \
                     the thread's last step",
                    steps[i].loc.line
                ),
            ));
        }
        Ok(ThreadDecl {
            name,
            process,
            steps,
        })
    }
}
