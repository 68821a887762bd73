//! Address-space and CPU-access ops: `mmap`, `munmap`, `mprotect`, `madvise`, `mremap`, `store`, `load`,
//! `reclaim`.
//!
//! These are the system calls of `mm/mmap.c`, `mm/mprotect.c`, `mm/madvise.c` and `mm/mremap.c`, and the
//! CPU's loads and stores (which fault pages in, break COW, and raise SIGSEGV/SIGBUS as the `signal` of the
//! step). A named mapping (`mmap`/`mremap` `name`) is recorded in the acting process, where later symbolic
//! addresses (`buf+4KiB`) resolve. `reclaim` runs one pass of page reclaim (`mm/vmscan.c` `shrink_node`) on a
//! node when the scenario asks, instead of when memory runs low.

use std::collections::BTreeSet;

use peerdma_core::Errno;
use peerdma_devices::DmirrorResult;
use peerdma_mm::MmapArgs;
use toml::de::DeValue;

use super::{Op, OpSpec};
use crate::ast::{AddrExpr, Advice, MmapFlags};
use crate::error::{RunError, ScenarioError};
use crate::parse::{Parser, RefKind, Table, Value, describe, is_mapping_name, list};
use crate::pattern::Pattern;
use crate::run::{StepCx, StepResult};

type Result<T> = std::result::Result<T, ScenarioError>;

/// `mmap`.
pub(crate) const MMAP: OpSpec = OpSpec {
    name: "mmap",
    keys: &[
        "name", "len", "prot", "flags", "at", "file", "offset", "align",
    ],
    expect_keys: &["errno"],
    doc_keys: "`name`, `len`, `prot`, `flags` (list: `\"private\"`/`\"shared\"`, `\"anonymous\"`, `\"fixed\"`, \
               `\"fixed_noreplace\"`, `\"populate\"`, `\"hugetlb\"`), `at` (hint/fixed address), `file` + \
               `offset` (file mapping), `align` (align the returned address inside an over-sized reservation, \
               like the tests' `ALIGN(ptr, size)`)",
    doc: "`mmap(2)`",
    parse: parse_mmap,
};

/// `munmap`.
pub(crate) const MUNMAP: OpSpec = OpSpec {
    name: "munmap",
    keys: &["at", "len"],
    expect_keys: &["errno"],
    doc_keys: "`at`, `len`",
    doc: "`munmap(2)`",
    parse: |p, t| {
        let (at, len) = range(p, t)?;
        Ok(Op::Mem(MemOp::Munmap { at, len }))
    },
};

/// `mprotect`.
pub(crate) const MPROTECT: OpSpec = OpSpec {
    name: "mprotect",
    keys: &["at", "len", "prot"],
    expect_keys: &["errno"],
    doc_keys: "`at`, `len`, `prot`",
    doc: "`mprotect(2)`",
    parse: |p, t| {
        let (at, len) = range(p, t)?;
        let prot = p.prot(p.required(t, "prot")?)?;
        Ok(Op::Mem(MemOp::Mprotect { at, len, prot }))
    },
};

/// `madvise`.
pub(crate) const MADVISE: OpSpec = OpSpec {
    name: "madvise",
    keys: &["at", "len", "advice"],
    expect_keys: &["errno"],
    doc_keys: "`at`, `len`, `advice` (`\"dontneed\"`, `\"hugepage\"`, `\"nohugepage\"`, `\"free\"`, \
               `\"collapse\"`, `\"dontfork\"`, `\"dofork\"`, `\"cold\"`, `\"pageout\"`)",
    doc: "`madvise(2)`",
    parse: |p, t| {
        let (at, len) = range(p, t)?;
        let advice = p.keyword(
            p.required(t, "advice")?,
            "advice",
            &[
                ("dontneed", Advice::DontNeed),
                ("hugepage", Advice::HugePage),
                ("nohugepage", Advice::NoHugePage),
                ("free", Advice::Free),
                ("collapse", Advice::Collapse),
                ("dontfork", Advice::DontFork),
                ("dofork", Advice::DoFork),
                ("cold", Advice::Cold),
                ("pageout", Advice::PageOut),
            ],
        )?;
        Ok(Op::Mem(MemOp::Madvise { at, len, advice }))
    },
};

/// `store`.
pub(crate) const STORE: OpSpec = OpSpec {
    name: "store",
    keys: &["at", "len", "pattern"],
    expect_keys: &["errno", "signal", "violation"],
    doc_keys: "`at`, `len` (default: to the end of the mapping), `pattern`",
    doc: "CPU writes the pattern",
    parse: |p, t| {
        let (at, len) = access(p, t)?;
        let pattern = p.pattern(p.required(t, "pattern")?, "pattern")?;
        Ok(Op::Mem(MemOp::Store { at, len, pattern }))
    },
};

/// `load`.
pub(crate) const LOAD: OpSpec = OpSpec {
    name: "load",
    keys: &["at", "len"],
    expect_keys: &["errno", "data", "value", "signal", "violation"],
    doc_keys: "`at`, `len` (default: to the end of the mapping)",
    doc: "CPU reads; check with `expect.data`/`value`",
    parse: |p, t| {
        let (at, len) = access(p, t)?;
        Ok(Op::Mem(MemOp::Load { at, len }))
    },
};

/// `mremap`.
pub(crate) const MREMAP: OpSpec = OpSpec {
    name: "mremap",
    keys: &["at", "len", "new_len", "flags", "to", "name"],
    expect_keys: &["errno"],
    doc_keys: "`at`, `len`, `new_len`, `flags` (`maymove`, `fixed`, `dontunmap`), `to` (the fixed target), \
               `name` (the resulting mapping)",
    doc: "`mremap(2)`",
    parse: parse_mremap,
};

/// `reclaim`.
pub(crate) const RECLAIM: OpSpec = OpSpec {
    name: "reclaim",
    keys: &["pages", "node"],
    expect_keys: &["errno", "cpages"],
    doc_keys: "`pages` (an integer), `node` (default 0)",
    doc: "one reclaim pass (`shrink_node`, as memory pressure runs it) over the NUMA node's LRU lists, aiming \
          at `pages` pages: proactive reclaim at a chosen moment; `cpages` = pages written to swap; a node that \
          does not exist is `ENOENT`",
    parse: |p, t| {
        let pages = p.uint_as(
            p.required(t, "pages")?,
            "pages",
            "an integer number of pages",
        )?;
        let node = t.get("node").map(|v| p.uint(v, "node")).transpose()?;
        Ok(Op::Mem(MemOp::Reclaim {
            pages,
            node: node.unwrap_or(0),
        }))
    },
};

/// The address-space and CPU-access ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemOp {
    /// `mmap(2)`.
    Mmap {
        /// The name later steps use for the mapping (`at = "buf+4KiB"`).
        name: Option<String>,
        /// Length in bytes.
        len: u64,
        /// Protections.
        prot: crate::ast::Prot,
        /// Flags.
        flags: MmapFlags,
        /// Hint address, or the address for `fixed`/`fixed_noreplace` (always set for those).
        at: Option<AddrExpr>,
        /// The `[[file]]` to map (set exactly when `flags.anonymous` is not).
        file: Option<String>,
        /// The file offset in bytes (0 for anonymous mappings).
        offset: u64,
        /// Align the returned address to this power of two inside an over-sized reservation.
        align: Option<u64>,
    },
    /// `munmap(2)`.
    Munmap {
        /// Start address.
        at: AddrExpr,
        /// Length in bytes.
        len: u64,
    },
    /// `mprotect(2)`.
    Mprotect {
        /// Start address.
        at: AddrExpr,
        /// Length in bytes.
        len: u64,
        /// New protections.
        prot: crate::ast::Prot,
    },
    /// `madvise(2)`.
    Madvise {
        /// Start address.
        at: AddrExpr,
        /// Length in bytes.
        len: u64,
        /// The advice.
        advice: Advice,
    },
    /// The CPU writes a pattern.
    Store {
        /// Start address.
        at: AddrExpr,
        /// Length in bytes; `None` is "to the end of the mapping".
        len: Option<u64>,
        /// What to write.
        pattern: Pattern,
    },
    /// The CPU reads.
    Load {
        /// Start address.
        at: AddrExpr,
        /// Length in bytes; `None` is "to the end of the mapping".
        len: Option<u64>,
    },
    /// `mremap(2)`; the moved (or resized) mapping is named `name`.
    Mremap {
        /// Old address.
        at: AddrExpr,
        /// Old length.
        len: u64,
        /// New length.
        new_len: u64,
        /// MREMAP_* flags (`new_addr` is filled from `to` at run time).
        flags: peerdma_mm::MremapFlags,
        /// The MREMAP_FIXED target.
        to: Option<AddrExpr>,
        /// Name of the resulting mapping.
        name: String,
    },
    /// One reclaim pass over a NUMA node's LRU lists (`shrink_node`), at the step's moment.
    Reclaim {
        /// How many pages the pass aims at.
        pages: u64,
        /// The node (a node the scenario does not have is `ENOENT` at run time).
        node: u64,
    },
}

/// Reads `at` and `len` (both required) and checks that a raw range ends below 2^64.
fn range(p: &mut Parser<'_>, t: &Table<'_, '_>) -> Result<(AddrExpr, u64)> {
    let at = p.addr(p.required(t, "at")?, "at")?;
    let len_v = p.required(t, "len")?;
    let len = p.len(len_v, "len")?;
    p.check_range(&at, len, len_v)?;
    Ok((at, len))
}

/// Reads a CPU access's `at` (required) and `len` (optional: to the end of the mapping).
fn access(p: &mut Parser<'_>, t: &Table<'_, '_>) -> Result<(AddrExpr, Option<u64>)> {
    let at = p.addr(p.required(t, "at")?, "at")?;
    let len = match t.get("len") {
        Some(len_v) => {
            let len = p.len(len_v, "len")?;
            p.check_range(&at, len, len_v)?;
            Some(len)
        }
        None => None,
    };
    Ok((at, len))
}

fn parse_mmap(p: &mut Parser<'_>, t: &Table<'_, '_>) -> Result<Op> {
    let name = match t.get("name") {
        Some(v) => {
            let s = p.string(v, "name")?;
            if !is_mapping_name(s) {
                return Err(p.err(
                    &v.span(),
                    format!(
                        "expected a mapping name (a letter or `_`, then letters, digits or `_`) for `name`, \
                         found `{s}`"
                    ),
                ));
            }
            Some(s.to_owned())
        }
        None => None,
    };
    let len_v = p.required(t, "len")?;
    let len = p.len(len_v, "len")?;
    let prot = p.prot(p.required(t, "prot")?)?;
    let flags_v = p.required(t, "flags")?;
    let flags = mmap_flags(p, flags_v)?;
    let at = match t.get("at") {
        Some(v) => {
            let at = p.addr(v, "at")?;
            p.check_range(&at, len, len_v)?;
            Some(at)
        }
        None => None,
    };
    let file = match t.get("file") {
        Some(v) => {
            if flags.anonymous {
                return Err(p.err(
                    &v.span(),
                    "a file mapping cannot be `anonymous`; expected either `anonymous` in `flags` or a \
                     `file`",
                ));
            }
            Some(p.name_ref(v, "file", RefKind::File)?)
        }
        None => None,
    };
    if file.is_none() && !flags.anonymous {
        return Err(p.err(
            &flags_v.span(),
            "expected `anonymous` in `flags`, or a `file` to map",
        ));
    }
    let offset = match t.get("offset") {
        Some(v) if file.is_none() => {
            return Err(p.err(
                &v.span(),
                "`offset` is for file mappings; expected a `file` with it",
            ));
        }
        Some(v) => {
            let offset = p.size(v, "offset")?;
            p.check_end(offset, len, len_v, "file offset")?;
            offset
        }
        None => 0,
    };
    if (flags.fixed || flags.fixed_noreplace) && at.is_none() {
        return Err(p.err(
            &flags_v.span(),
            "`fixed` and `fixed_noreplace` need an address; expected `at` with them",
        ));
    }
    let align = match t.get("align") {
        Some(v) => {
            let align = p.size(v, "align")?;
            if !align.is_power_of_two() {
                return Err(p.err(
                    &v.span(),
                    format!("expected a power of two for `align`, found {align:#x}"),
                ));
            }
            Some(align)
        }
        None => None,
    };
    if let Some(name) = &name {
        p.define_mapping(name, len);
    }
    Ok(Op::Mem(MemOp::Mmap {
        name,
        len,
        prot,
        flags,
        at,
        file,
        offset,
        align,
    }))
}

/// Reads `mmap`'s `flags`: exactly one of `private`/`shared`, each flag at most once, not both `fixed` and
/// `fixed_noreplace`.
fn mmap_flags(p: &Parser<'_>, v: &Value<'_>) -> Result<MmapFlags> {
    const NAMES: &[&str] = &[
        "private",
        "shared",
        "anonymous",
        "fixed",
        "fixed_noreplace",
        "populate",
        "hugetlb",
    ];
    let DeValue::Array(items) = v.get_ref() else {
        return Err(p.err(
            &v.span(),
            format!(
                "expected a list of flags like `[\"private\", \"anonymous\"]` for `flags`, found {}",
                describe(v.get_ref())
            ),
        ));
    };
    let mut flags = MmapFlags::default();
    let mut private = false;
    let mut seen = BTreeSet::new();
    for item in items {
        let flag = match item.get_ref() {
            DeValue::String(s) if NAMES.contains(&s.as_ref()) => s.as_ref(),
            DeValue::String(s) => {
                return Err(p.err(
                    &item.span(),
                    format!(
                        "unknown mmap flag `{s}`; expected one of: {}",
                        list(NAMES.iter().copied())
                    ),
                ));
            }
            other => {
                return Err(p.err(
                    &item.span(),
                    format!(
                        "expected a flag name (a string) in `flags`, found {}",
                        describe(other)
                    ),
                ));
            }
        };
        if !seen.insert(flag) {
            return Err(p.err(
                &item.span(),
                format!("flag `{flag}` is listed twice; expected each flag at most once"),
            ));
        }
        match flag {
            "private" => private = true,
            "shared" => flags.shared = true,
            "anonymous" => flags.anonymous = true,
            "fixed" => flags.fixed = true,
            "fixed_noreplace" => flags.fixed_noreplace = true,
            "populate" => flags.populate = true,
            _ => flags.hugetlb = true,
        }
    }
    if private == flags.shared {
        return Err(p.err(
            &v.span(),
            "expected exactly one of `private` or `shared` in `flags`",
        ));
    }
    if flags.fixed && flags.fixed_noreplace {
        return Err(p.err(
            &v.span(),
            "expected at most one of `fixed` and `fixed_noreplace` in `flags`",
        ));
    }
    Ok(flags)
}

fn parse_mremap(p: &mut Parser<'_>, t: &Table<'_, '_>) -> Result<Op> {
    let (at, len) = range(p, t)?;
    let new_len = p.len(p.required(t, "new_len")?, "new_len")?;
    let mut flags = peerdma_mm::MremapFlags::default();
    if let Some(v) = t.get("flags") {
        let DeValue::Array(items) = v.get_ref() else {
            return Err(p.err(
                &v.span(),
                "expected a list like `[\"maymove\", \"fixed\"]` for `flags`",
            ));
        };
        for item in items {
            match item.get_ref() {
                DeValue::String(s) if s.as_ref() == "maymove" => flags.maymove = true,
                DeValue::String(s) if s.as_ref() == "fixed" => flags.fixed = true,
                DeValue::String(s) if s.as_ref() == "dontunmap" => {
                    flags.dontunmap = true;
                }
                _ => {
                    return Err(p.err(
                        &item.span(),
                        "expected an mremap flag: one of maymove, fixed, dontunmap",
                    ));
                }
            }
        }
    }
    let to = match t.get("to") {
        Some(v) => Some(p.addr(v, "to")?),
        None => None,
    };
    let v = p.required(t, "name")?;
    let name = p.string(v, "name")?;
    if !is_mapping_name(name) {
        return Err(p.err(
            &v.span(),
            format!("expected a mapping name, found `{name}`"),
        ));
    }
    let name = name.to_owned();
    p.define_mapping(&name, new_len);
    Ok(Op::Mem(MemOp::Mremap {
        at,
        len,
        new_len,
        flags,
        to,
        name,
    }))
}

impl MemOp {
    /// Returns the op's name as written in `op = "..."`.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Mmap { .. } => MMAP.name,
            Self::Munmap { .. } => MUNMAP.name,
            Self::Mprotect { .. } => MPROTECT.name,
            Self::Madvise { .. } => MADVISE.name,
            Self::Store { .. } => STORE.name,
            Self::Load { .. } => LOAD.name,
            Self::Mremap { .. } => MREMAP.name,
            Self::Reclaim { .. } => RECLAIM.name,
        }
    }

    /// Returns the `len` of a `load`.
    pub(crate) const fn load_len(&self) -> Option<u64> {
        match self {
            Self::Load { len, .. } => *len,
            _ => None,
        }
    }

    /// Runs the op.
    pub(crate) async fn run(
        &self,
        cx: &mut StepCx<'_>,
    ) -> std::result::Result<StepResult, RunError> {
        let (w, proc_name, pid) = (cx.world, cx.proc_name, cx.pid);
        let kernel = &w.kernel;
        let mut out = StepResult::default();
        match self {
            Self::Mmap {
                name,
                len,
                prot,
                flags,
                at,
                file,
                offset,
                align,
            } => {
                let addr = match at {
                    Some(a) => Some(w.resolve(proc_name, a)?.0),
                    None => None,
                };
                let extra = align.unwrap_or(0);
                let args = MmapArgs {
                    addr,
                    len: len.saturating_add(extra),
                    prot: *prot,
                    shared: flags.shared,
                    private: !flags.shared,
                    anonymous: flags.anonymous,
                    fixed: flags.fixed,
                    fixed_noreplace: flags.fixed_noreplace,
                    populate: flags.populate,
                    hugetlb: flags.hugetlb,
                    file: file.as_ref().map(|f| w.files[f]),
                    offset: *offset,
                    name: name.clone(),
                };
                match kernel.mmap(pid, &args).await {
                    Ok(va) => {
                        let va = match align {
                            Some(a) if *a > 0 => va.align_up(*a).expect("inside the reservation"),
                            _ => va,
                        };
                        if let Some(n) = name {
                            w.proc_mut(proc_name).mappings.insert(n.clone(), (va, *len));
                        }
                    }
                    Err(e) => out.errno = Some(e),
                }
            }
            Self::Munmap { at, len } => {
                let (va, _) = w.resolve(proc_name, at)?;
                out.errno = kernel.munmap(pid, va, *len).await.err();
            }
            Self::Mprotect { at, len, prot } => {
                let (va, _) = w.resolve(proc_name, at)?;
                out.errno = kernel.mprotect(pid, va, *len, *prot).await.err();
            }
            Self::Madvise { at, len, advice } => {
                let (va, _) = w.resolve(proc_name, at)?;
                out.errno = kernel.madvise(pid, va, *len, *advice).await.err();
            }
            Self::Store { at, len, pattern } => {
                let (va, rest) = w.resolve(proc_name, at)?;
                let n = len
                    .or(rest)
                    .ok_or(RunError::RawAddressNeedsLen { op: STORE.name })?;
                // Streamed a page at a time: no host buffer of the whole store exists, so a store is not
                // bounded by `[sim.limits] host_memory`.
                let total = w.streamed_len(n)?;
                let mut fill =
                    |pos: usize, chunk: &mut [u8]| pattern.fill_window(total, pos, chunk);
                out.signal = kernel.store_with(pid, va, total, &mut fill).await.err();
            }
            Self::Load { at, len } => {
                let (va, rest) = w.resolve(proc_name, at)?;
                let n = len
                    .or(rest)
                    .ok_or(RunError::RawAddressNeedsLen { op: LOAD.name })?;
                let mut data = w.host_buffer(n)?;
                match kernel.load(pid, va, &mut data).await {
                    Ok(()) => out.data = Some(data),
                    Err(s) => out.signal = Some(s),
                }
            }
            Self::Mremap {
                at,
                len,
                new_len,
                flags,
                to,
                name,
            } => {
                let (va, _) = w.resolve(proc_name, at)?;
                let mut flags = *flags;
                if let Some(t) = to {
                    flags.new_addr = Some(w.resolve(proc_name, t)?.0);
                }
                match kernel.mremap(pid, va, *len, *new_len, flags).await {
                    Ok(nva) => {
                        w.proc_mut(proc_name)
                            .mappings
                            .insert(name.clone(), (nva, *new_len));
                    }
                    Err(e) => out.errno = Some(e),
                }
            }
            Self::Reclaim { pages, node } => match u32::try_from(*node) {
                Ok(node) if node < kernel.nr_nodes() => {
                    let swapped = kernel.reclaim_node(node, *pages).await;
                    out.dm = Some(DmirrorResult {
                        cpages: swapped,
                        ..DmirrorResult::default()
                    });
                }
                _ => out.errno = Some(Errno::ENOENT),
            },
        }
        Ok(out)
    }
}
