//! Device-file ops: `open`, `close` and the `dmirror.*` ioctls of the HMM test driver (`lib/test_hmm.c`).
//!
//! `open` binds a `dmirror` device file to the opener's address space (the mirror's interval notifier);
//! the fd is per process and not inherited by `fork`. Each `dmirror.*` op is one ioctl on an open fd:
//! `read`/`write`/`snapshot` mirror the range through `hmm_range_fault`, `migrate_to_dev`/`migrate_to_sys`
//! move pages with `migrate_vma`, `exclusive`/`check_exclusive` use device-exclusive entries. The
//! ioctl's `cpages`/`faults` counters and the data it read are the step's result.

use peerdma_core::PAGE_SIZE;
use peerdma_devices::Dmirror;
use toml::de::DeValue;

use super::{Op, OpSpec};
use crate::ast::{AddrExpr, Prot, WriteSource};
use crate::error::{RunError, ScenarioError};
use crate::parse::{Parser, RefKind, Table};
use crate::run::{StepCx, StepResult};

type Result<T> = std::result::Result<T, ScenarioError>;

/// `open`.
pub(crate) const OPEN: OpSpec = OpSpec {
    name: "open",
    keys: &["dev", "fd"],
    expect_keys: &["errno"],
    doc_keys: "`dev`, `fd` (a name for the open file)",
    doc: "open the device; dmirror binds to this process's mm",
    parse: |p, t| {
        let dev = p.name_ref(p.required(t, "dev")?, "dev", RefKind::Device)?;
        let fd = p.name(p.required(t, "fd")?, "fd")?;
        p.fds.insert(fd.clone());
        Ok(Op::Dmirror(DmirrorOp::Open { dev, fd }))
    },
};

/// `close`.
pub(crate) const CLOSE: OpSpec = OpSpec {
    name: "close",
    keys: &["fd"],
    expect_keys: &["errno"],
    doc_keys: "`fd`",
    doc: "close it (removes the mirror's notifier)",
    parse: |p, t| Ok(Op::Dmirror(DmirrorOp::Close { fd: fd(p, t)? })),
};

/// `dmirror.read`.
pub(crate) const READ: OpSpec = OpSpec {
    name: "dmirror.read",
    keys: &["fd", "at", "pages", "ptr"],
    expect_keys: &["errno", "cpages", "faults", "data"],
    doc_keys: "`fd`, `at`, `pages`, `ptr` (optional mapping to copy the data to)",
    doc: "HMM_DMIRROR_READ",
    parse: |p, t| {
        let (fd, at, pages) = fd_at_pages(p, t)?;
        let ptr = ptr(p, t)?;
        Ok(Op::Dmirror(DmirrorOp::Read { fd, at, pages, ptr }))
    },
};

/// `dmirror.write`.
pub(crate) const WRITE: OpSpec = OpSpec {
    name: "dmirror.write",
    keys: &["fd", "at", "pages", "ptr", "pattern"],
    expect_keys: &["errno", "cpages", "faults"],
    doc_keys: "`fd`, `at`, `pages`, `ptr` or `pattern` (the source)",
    doc: "HMM_DMIRROR_WRITE",
    parse: |p, t| {
        let (fd, at, pages) = fd_at_pages(p, t)?;
        let src = match (t.get("ptr"), t.get("pattern")) {
            (Some(ptr), None) => WriteSource::Ptr(p.addr(ptr, "ptr")?),
            (None, Some(pat)) => WriteSource::Pattern(p.pattern(pat, "pattern")?),
            _ => {
                return Err(p.err(
                    &t.span,
                    "a `dmirror.write` step needs exactly one source: `ptr` (an address) or `pattern`",
                ));
            }
        };
        Ok(Op::Dmirror(DmirrorOp::Write { fd, at, pages, src }))
    },
};

/// `dmirror.snapshot`.
pub(crate) const SNAPSHOT: OpSpec = OpSpec {
    name: "dmirror.snapshot",
    keys: &["fd", "at", "pages"],
    expect_keys: &["errno", "cpages", "faults", "bytes"],
    doc_keys: "`fd`, `at`, `pages`",
    doc: "HMM_DMIRROR_SNAPSHOT",
    parse: |p, t| {
        let (fd, at, pages) = fd_at_pages(p, t)?;
        Ok(Op::Dmirror(DmirrorOp::Snapshot { fd, at, pages }))
    },
};

/// `dmirror.mmap`.
pub(crate) const MMAP: OpSpec = OpSpec {
    name: "dmirror.mmap",
    keys: &["fd", "name", "len", "prot"],
    expect_keys: &["errno"],
    doc_keys: "`fd`, `name`, `len`, `prot`",
    doc: "`mmap` of the device file itself (MAP_PRIVATE): a VM_MIXEDMAP mapping of zeroed pages the driver \
          inserts",
    parse: |p, t| {
        let fd = fd(p, t)?;
        let name = p.mapping_name(p.required(t, "name")?)?;
        let len = p.len(p.required(t, "len")?, "len")?;
        let prot = p.prot(p.required(t, "prot")?)?;
        p.define_mapping(&name, len);
        Ok(Op::Dmirror(DmirrorOp::Mmap {
            fd,
            name,
            len,
            prot,
        }))
    },
};

/// `dmirror.migrate_to_dev`.
pub(crate) const MIGRATE_TO_DEV: OpSpec = OpSpec {
    name: "dmirror.migrate_to_dev",
    keys: &["fd", "at", "pages", "ptr"],
    expect_keys: &["errno", "cpages", "data"],
    doc_keys: "`fd`, `at`, `pages`, `ptr` (optional)",
    doc: "HMM_DMIRROR_MIGRATE_TO_DEV; `expect.data` checks the data read back from the device",
    parse: |p, t| {
        let (fd, at, pages) = fd_at_pages(p, t)?;
        let ptr = ptr(p, t)?;
        Ok(Op::Dmirror(DmirrorOp::MigrateToDev { fd, at, pages, ptr }))
    },
};

/// `dmirror.migrate_to_sys`.
pub(crate) const MIGRATE_TO_SYS: OpSpec = OpSpec {
    name: "dmirror.migrate_to_sys",
    keys: &["fd", "at", "pages"],
    expect_keys: &["errno", "cpages"],
    doc_keys: "`fd`, `at`, `pages`",
    doc: "HMM_DMIRROR_MIGRATE_TO_SYS; `cpages` counts the pages migrated",
    parse: |p, t| {
        let (fd, at, pages) = fd_at_pages(p, t)?;
        Ok(Op::Dmirror(DmirrorOp::MigrateToSys { fd, at, pages }))
    },
};

/// `dmirror.release`.
pub(crate) const RELEASE: OpSpec = OpSpec {
    name: "dmirror.release",
    keys: &["fd"],
    expect_keys: &["errno"],
    doc_keys: "`fd`",
    doc: "HMM_DMIRROR_RELEASE: evict all of the device's memory to system memory",
    parse: |p, t| Ok(Op::Dmirror(DmirrorOp::Release { fd: fd(p, t)? })),
};

/// `dmirror.exclusive`.
pub(crate) const EXCLUSIVE: OpSpec = OpSpec {
    name: "dmirror.exclusive",
    keys: &["fd", "at", "pages"],
    expect_keys: &["errno", "cpages", "data"],
    doc_keys: "`fd`, `at`, `pages`",
    doc: "HMM_DMIRROR_EXCLUSIVE; `expect.data` checks the data read back",
    parse: |p, t| {
        let (fd, at, pages) = fd_at_pages(p, t)?;
        Ok(Op::Dmirror(DmirrorOp::Exclusive { fd, at, pages }))
    },
};

/// `dmirror.check_exclusive`.
pub(crate) const CHECK_EXCLUSIVE: OpSpec = OpSpec {
    name: "dmirror.check_exclusive",
    keys: &["fd", "at", "pages"],
    expect_keys: &["errno"],
    doc_keys: "`fd`, `at`, `pages`",
    doc: "HMM_DMIRROR_CHECK_EXCLUSIVE (`EPERM` while an atomic entry remains)",
    parse: |p, t| {
        let (fd, at, pages) = fd_at_pages(p, t)?;
        Ok(Op::Dmirror(DmirrorOp::CheckExclusive { fd, at, pages }))
    },
};

/// `dmirror.flags`.
pub(crate) const FLAGS: OpSpec = OpSpec {
    name: "dmirror.flags",
    keys: &["fd", "flags"],
    expect_keys: &["errno"],
    doc_keys: "`fd`, `flags` (`[\"fail_alloc\"]`)",
    doc: "HMM_DMIRROR_FLAGS (base-page migration only: nothing large to fail)",
    parse: |p, t| {
        let fd = fd(p, t)?;
        let v = p.required(t, "flags")?;
        let DeValue::Array(items) = v.get_ref() else {
            return Err(p.err(
                &v.span(),
                "expected a list like `[\"fail_alloc\"]` for `flags`",
            ));
        };
        let mut fail_alloc = false;
        for item in items {
            match item.get_ref() {
                DeValue::String(s) if s.as_ref() == "fail_alloc" => fail_alloc = true,
                _ => {
                    return Err(p.err(&item.span(), "expected a dmirror flag: `fail_alloc`"));
                }
            }
        }
        Ok(Op::Dmirror(DmirrorOp::Flags { fd, fail_alloc }))
    },
};

/// The device-file ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DmirrorOp {
    /// Opens a device file.
    Open {
        /// The `[[device]]`'s name.
        dev: String,
        /// The name later steps use for the open file.
        fd: String,
    },
    /// Closes a device file.
    Close {
        /// The open file's name.
        fd: String,
    },
    /// `HMM_DMIRROR_READ`.
    Read {
        /// The open file's name.
        fd: String,
        /// Start address (page-aligned, else the ioctl fails with `EINVAL`).
        at: AddrExpr,
        /// Number of 4 KiB pages (0 fails with `EINVAL`).
        pages: u64,
        /// Where to copy the data in the process, if anywhere.
        ptr: Option<AddrExpr>,
    },
    /// `HMM_DMIRROR_WRITE`.
    Write {
        /// The open file's name.
        fd: String,
        /// Start address.
        at: AddrExpr,
        /// Number of 4 KiB pages.
        pages: u64,
        /// The data written.
        src: WriteSource,
    },
    /// `HMM_DMIRROR_SNAPSHOT`.
    Snapshot {
        /// The open file's name.
        fd: String,
        /// Start address.
        at: AddrExpr,
        /// Number of 4 KiB pages.
        pages: u64,
    },
    /// `mmap` of the dmirror device file itself: a VM_MIXEDMAP mapping whose pages the driver inserts
    /// (zeroed kernel pages, `vm_insert_page`), MAP_PRIVATE like the selftest's.
    Mmap {
        /// The open file's name.
        fd: String,
        /// The mapping's name.
        name: String,
        /// Length in bytes.
        len: u64,
        /// Protection.
        prot: Prot,
    },
    /// `HMM_DMIRROR_MIGRATE_TO_DEV`: migrate the range into the device's memory; the data read back from the
    /// device page table is checked by `expect.data` and copied to `ptr` if given.
    MigrateToDev {
        /// The open file's name.
        fd: String,
        /// Start address.
        at: AddrExpr,
        /// Number of 4 KiB pages.
        pages: u64,
        /// Where to copy the data read back (the selftests' `buffer.mirror`).
        ptr: Option<AddrExpr>,
    },
    /// `HMM_DMIRROR_MIGRATE_TO_SYS`: migrate the device's pages in the range back to system memory.
    MigrateToSys {
        /// The open file's name.
        fd: String,
        /// Start address.
        at: AddrExpr,
        /// Number of 4 KiB pages.
        pages: u64,
    },
    /// `HMM_DMIRROR_RELEASE`: evict all of the device's memory back to system memory.
    Release {
        /// The open file's name.
        fd: String,
    },
    /// `HMM_DMIRROR_EXCLUSIVE`: map the range device-exclusive (atomic); `expect.data` checks what it read.
    Exclusive {
        /// The open file's name.
        fd: String,
        /// Start address.
        at: AddrExpr,
        /// Number of 4 KiB pages.
        pages: u64,
    },
    /// `HMM_DMIRROR_CHECK_EXCLUSIVE`: `EPERM` while any page of the range is still mapped atomic.
    CheckExclusive {
        /// The open file's name.
        fd: String,
        /// Start address.
        at: AddrExpr,
        /// Number of 4 KiB pages.
        pages: u64,
    },
    /// `HMM_DMIRROR_FLAGS`: set the open file's flags (`fail_alloc`: the next large allocation fails).
    Flags {
        /// The open file's name.
        fd: String,
        /// HMM_DMIRROR_FLAG_FAIL_ALLOC.
        fail_alloc: bool,
    },
}

/// Reads `fd` (an fd some `open` step names).
fn fd(p: &mut Parser<'_>, t: &Table<'_, '_>) -> Result<String> {
    p.name_ref(p.required(t, "fd")?, "fd", RefKind::Fd)
}

/// Reads an ioctl's `fd`, `at` and `pages`.
fn fd_at_pages(p: &mut Parser<'_>, t: &Table<'_, '_>) -> Result<(String, AddrExpr, u64)> {
    let fd = fd(p, t)?;
    let at = p.addr(p.required(t, "at")?, "at")?;
    let pages = p.uint_as(
        p.required(t, "pages")?,
        "pages",
        "an integer number of pages",
    )?;
    Ok((fd, at, pages))
}

/// Reads the optional `ptr`.
fn ptr(p: &mut Parser<'_>, t: &Table<'_, '_>) -> Result<Option<AddrExpr>> {
    t.get("ptr").map(|v| p.addr(v, "ptr")).transpose()
}

impl DmirrorOp {
    /// Returns the op's name as written in `op = "..."`.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Open { .. } => OPEN.name,
            Self::Close { .. } => CLOSE.name,
            Self::Read { .. } => READ.name,
            Self::Write { .. } => WRITE.name,
            Self::Snapshot { .. } => SNAPSHOT.name,
            Self::Mmap { .. } => MMAP.name,
            Self::MigrateToDev { .. } => MIGRATE_TO_DEV.name,
            Self::MigrateToSys { .. } => MIGRATE_TO_SYS.name,
            Self::Release { .. } => RELEASE.name,
            Self::Exclusive { .. } => EXCLUSIVE.name,
            Self::CheckExclusive { .. } => CHECK_EXCLUSIVE.name,
            Self::Flags { .. } => FLAGS.name,
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
            Self::Open { dev, fd } => match Dmirror::open(&w.devices[dev], pid) {
                Ok(m) => {
                    // A name already in use (an inherited file) is rebound, as `dup2` would: the old
                    // file loses this holder.
                    let old = w.proc_mut(proc_name).fds.insert(fd.clone(), m);
                    if let Some(old) = old {
                        w.put_fd(old, None).await;
                    }
                }
                Err(e) => out.errno = Some(e),
            },
            Self::Close { fd } => {
                let m = w.proc_mut(proc_name).fds.remove(fd);
                match m {
                    Some(m) => w.put_fd(m, None).await,
                    None => out.errno = Some(peerdma_core::Errno::EBADF),
                }
            }
            Self::Read { fd, at, pages, ptr } => {
                let m = w.fd(proc_name, fd)?;
                let (va, _) = w.resolve(proc_name, at)?;
                w.check_host(pages.saturating_mul(PAGE_SIZE))?;
                let res = m.read(va, *pages).await;
                w.record_data(&mut out, pid, proc_name, ptr.as_ref(), res)
                    .await?;
            }
            Self::Write { fd, at, pages, src } => {
                let m = w.fd(proc_name, fd)?;
                let (va, _) = w.resolve(proc_name, at)?;
                let mut data = w.host_buffer(pages.saturating_mul(PAGE_SIZE))?;
                let copied = match src {
                    WriteSource::Pattern(p) => {
                        p.fill(&mut data);
                        Ok(())
                    }
                    WriteSource::Ptr(p) => {
                        let (srcva, _) = w.resolve(proc_name, p)?;
                        kernel.copy_from_user(pid, srcva, &mut data).await
                    }
                };
                match copied {
                    Err(e) => out.errno = Some(e),
                    Ok(()) => match m.write(va, *pages, &data).await {
                        Ok(res) => out.dm = Some(res),
                        Err(e) => out.errno = Some(e),
                    },
                }
            }
            Self::Snapshot { fd, at, pages } => {
                let m = w.fd(proc_name, fd)?;
                let (va, _) = w.resolve(proc_name, at)?;
                // One byte per page comes back, and the walk visits every page: bound both.
                w.check_host(*pages)?;
                let res = m.snapshot(va, *pages).await;
                w.record_data(&mut out, pid, proc_name, None, res).await?;
            }
            Self::Mmap {
                fd,
                name,
                len,
                prot,
            } => {
                w.fd(proc_name, fd)?;
                match kernel.mmap_driver_pages(pid, *len, *prot, false).await {
                    Ok(va) => {
                        w.proc_mut(proc_name)
                            .mappings
                            .insert(name.clone(), (va, *len));
                    }
                    Err(e) => out.errno = Some(e),
                }
            }
            Self::MigrateToDev { fd, at, pages, ptr } => {
                let m = w.fd(proc_name, fd)?;
                let (va, _) = w.resolve(proc_name, at)?;
                let res = m.migrate_to_dev(va, *pages).await;
                w.record_data(&mut out, pid, proc_name, ptr.as_ref(), res)
                    .await?;
            }
            Self::MigrateToSys { fd, at, pages } => {
                let m = w.fd(proc_name, fd)?;
                let (va, _) = w.resolve(proc_name, at)?;
                match m.migrate_to_sys(va, *pages).await {
                    Ok(res) => out.dm = Some(res),
                    Err(e) => out.errno = Some(e),
                }
            }
            Self::Release { fd } => {
                if let Err(e) = w.fd(proc_name, fd)?.release().await {
                    out.errno = Some(e);
                }
            }
            Self::Exclusive { fd, at, pages } => {
                let m = w.fd(proc_name, fd)?;
                let (va, _) = w.resolve(proc_name, at)?;
                let res = m.exclusive(va, *pages).await;
                w.record_data(&mut out, pid, proc_name, None, res).await?;
            }
            Self::CheckExclusive { fd, at, pages } => {
                let m = w.fd(proc_name, fd)?;
                let (va, _) = w.resolve(proc_name, at)?;
                if let Err(e) = m.check_exclusive(va, *pages).await {
                    out.errno = Some(e);
                }
            }
            Self::Flags { fd, fail_alloc } => {
                w.fd(proc_name, fd)?.set_flags(*fail_alloc);
            }
        }
        Ok(out)
    }
}
