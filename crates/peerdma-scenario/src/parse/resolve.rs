//! The parser's third pass: every recorded use of a name (mapping, file, device, process, handle...) is
//! resolved against the definitions, in source order, and reported at the use when it names nothing.

use super::{NameRef, Parser, RefKind, Result, list};

impl Parser<'_> {
    pub(super) fn resolve(&mut self) -> Result<()> {
        let mut refs = std::mem::take(&mut self.refs);
        refs.sort_by_key(|r| r.span.start);
        for r in &refs {
            self.resolve_one(r)?;
        }
        for r in &self.handle_ranges {
            let Some(&total) = self.handle_lens.get(&r.handle) else {
                continue;
            };
            let bytes = r.len.unwrap_or(total.saturating_sub(r.offset));
            if r.offset.checked_add(bytes).is_some_and(|end| end <= total) && bytes > 0 {
                continue;
            }
            let span = if r.offset >= total || r.len_span.is_none() {
                r.offset_span.as_ref().or(r.len_span.as_ref())
            } else {
                r.len_span.as_ref()
            }
            .unwrap_or(&r.handle_span);
            return Err(self.err(
                span,
                format!(
                    "offset {:#x} + {bytes:#x} bytes passes the end of handle `{}` ({total:#x} bytes, the longest \
                     `dma.map` named `{}`); expected a range inside it",
                    r.offset, r.handle, r.handle
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn resolve_one(&self, r: &NameRef) -> Result<()> {
        let name = r.name.as_str();
        let unknown = |what: &str, defined: Vec<&str>, how: &str| {
            let known = if defined.is_empty() {
                format!("none is defined; {how}")
            } else {
                format!("expected one of: {}", list(defined))
            };
            Err(self.err(&r.span, format!("unknown {what} `{name}`; {known}")))
        };
        match r.kind {
            RefKind::Mapping { offset } => {
                let Some(&len) = self.mappings.get(name) else {
                    let defined: Vec<&str> = self.mappings.keys().map(String::as_str).collect();
                    let known = if defined.is_empty() {
                        "no `mmap` step has a `name`".to_owned()
                    } else {
                        format!("mappings defined: {}", list(defined))
                    };
                    return Err(self.err(
                        &r.span,
                        format!(
                            "unknown mapping `{name}` in address `{}`; {known}",
                            r.written
                        ),
                    ));
                };
                if offset < 0 {
                    return Err(self.err(
                        &r.span,
                        format!(
                            "address `{}` lies below the start of mapping `{name}`; expected an offset from 0 to \
                             {len:#x}",
                            r.written
                        ),
                    ));
                }
                if offset.unsigned_abs() > len {
                    return Err(self.err(
                        &r.span,
                        format!(
                            "address `{}` lies beyond the end of mapping `{name}` ({len:#x} bytes); expected an \
                             offset from 0 to {len:#x}",
                            r.written
                        ),
                    ));
                }
                Ok(())
            }
            RefKind::File if self.files.contains_key(name) => Ok(()),
            RefKind::File => unknown(
                "file",
                self.files.keys().map(String::as_str).collect(),
                "declare it with `[[file]]`",
            ),
            RefKind::Device if self.pci_devices.contains(name) => {
                let dmirrors: Vec<&str> = self
                    .devices
                    .keys()
                    .filter(|d| !self.pci_devices.contains(*d))
                    .map(String::as_str)
                    .collect();
                let known = if dmirrors.is_empty() {
                    "none is declared".to_owned()
                } else {
                    format!("expected one of: {}", list(dmirrors))
                };
                Err(self.err(
                    &r.span,
                    format!(
                        "device `{name}` is a `kind = \"pci\"` device, which has no device file; `open` needs a \
                         `dmirror` ({known})"
                    ),
                ))
            }
            RefKind::Device if self.devices.contains_key(name) => Ok(()),
            RefKind::Device => unknown(
                "device",
                self.devices.keys().map(String::as_str).collect(),
                "declare it with `[[device]]`",
            ),
            RefKind::Pin if self.pins.contains(name) => Ok(()),
            RefKind::Pin => unknown(
                "pin",
                self.pins.iter().map(String::as_str).collect(),
                "take one with `{ op = \"pin\", at = ..., pages = ..., flags = [...], name = ... }`",
            ),
            RefKind::PciDevice if self.pci_devices.contains(name) => Ok(()),
            RefKind::PciDevice if self.devices.contains_key(name) => {
                let known = if self.pci_devices.is_empty() {
                    "none is declared; declare one with `[[device]]` and `kind = \"pci\"`"
                        .to_owned()
                } else {
                    format!(
                        "expected one of: {}",
                        list(self.pci_devices.iter().map(String::as_str))
                    )
                };
                Err(self.err(
                    &r.span,
                    format!(
                        "device `{name}` is a `dmirror`, not a `kind = \"pci\"` device; {known}"
                    ),
                ))
            }
            RefKind::PciDevice => unknown(
                "pci device",
                self.pci_devices.iter().map(String::as_str).collect(),
                "declare it with `[[device]]` and `kind = \"pci\"`",
            ),
            RefKind::Export if self.exports.contains_key(name) => Ok(()),
            RefKind::Export => unknown(
                "export",
                self.exports.keys().map(String::as_str).collect(),
                "declare it in a `pci` device's `export = [...]`",
            ),
            RefKind::SvaDevice if self.sva_devices.contains(name) => Ok(()),
            RefKind::SvaDevice => unknown(
                "sva device",
                self.sva_devices.iter().map(String::as_str).collect(),
                "declare it with `[[device]]` and `kind = \"sva\"`",
            ),
            RefKind::SvaJob if self.sva_jobs.contains(name) => Ok(()),
            RefKind::SvaJob => unknown(
                "sva job",
                self.sva_jobs.iter().map(String::as_str).collect(),
                "submit one with `{ op = \"sva.submit\", dev = ..., job = ..., ... }`",
            ),
            RefKind::Handle if self.handles.contains(name) => Ok(()),
            RefKind::Handle => unknown(
                "dma handle",
                self.handles.iter().map(String::as_str).collect(),
                "take one with `{ op = \"dma.map\", dev = ..., at = ..., len = ..., name = ... }`",
            ),
            RefKind::GpuDevice if self.gpu_devices.contains(name) => Ok(()),
            RefKind::GpuDevice => unknown(
                "gpu device",
                self.gpu_devices.iter().map(String::as_str).collect(),
                "declare it with `[[device]]` and `kind = \"gpu\"`",
            ),
            RefKind::GpuName(what)
                if self.gpu_names.get(what).is_some_and(|s| s.contains(name)) =>
            {
                Ok(())
            }
            RefKind::GpuName(what) => unknown(
                what,
                self.gpu_names
                    .get(what)
                    .map(|s| s.iter().map(String::as_str).collect())
                    .unwrap_or_default(),
                "define it with a `gpu.*` step's `name`",
            ),
            RefKind::Fd if self.fds.contains(name) => Ok(()),
            RefKind::Fd => unknown(
                "fd",
                self.fds.iter().map(String::as_str).collect(),
                "open one with `{ op = \"open\", dev = ..., fd = ... }`",
            ),
            RefKind::Process if self.processes.contains_key(name) => Ok(()),
            RefKind::Process => unknown(
                "process",
                self.processes.keys().map(String::as_str).collect(),
                "declare it with `[[process]]` or create it with a `fork` step",
            ),
            RefKind::Child if self.children.contains(name) => Ok(()),
            RefKind::Child => unknown(
                "child process",
                self.children.iter().map(String::as_str).collect(),
                "create it with `{ op = \"fork\", child = ... }`",
            ),
        }
    }
}
