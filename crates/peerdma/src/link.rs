//! `peerdma link`: the PCIe link bandwidth model of `peerdma_pci::LinkConfig` on its own
//! (`spec/numbers.md` §1), for sizing links.

use std::fmt::Write as _;

use peerdma_pci::LinkConfig;
use peerdma_scenario::units::parse_size;
use serde_json::json;

/// The link parameters as given on the command line.
#[derive(Debug, Clone)]
pub(crate) struct LinkArgs {
    pub(crate) generation: u8,
    pub(crate) width: u8,
    pub(crate) mps: u32,
    pub(crate) mrrs: u32,
    pub(crate) rcb: u32,
    pub(crate) addr_bits: u8,
    pub(crate) ecrc: bool,
    pub(crate) sizes: Vec<String>,
}

/// One payload size and its effective bandwidths.
#[derive(Debug, Clone, Copy)]
struct Row {
    size: u64,
    write_gbps: f64,
    read_gbps: f64,
}

/// Parses a width written `x8` or `8`.
pub(crate) fn parse_width(text: &str) -> Result<u8, String> {
    let digits = text
        .strip_prefix('x')
        .or_else(|| text.strip_prefix('X'))
        .unwrap_or(text);
    digits
        .parse()
        .map_err(|_| format!("expected a link width like `x8` or `16`, found `{text}`"))
}

/// Parses a size with units (`256`, `256B`, `4KiB`) that must fit 32 bits (MPS, MRRS, RCB).
pub(crate) fn parse_size_u32(text: &str) -> Result<u32, String> {
    let bytes = parse_size(text).map_err(|e| e.to_string())?;
    u32::try_from(bytes).map_err(|_| format!("`{text}` does not fit 32 bits"))
}

/// Validates the parameters and returns the link and one row per payload size.
fn evaluate(args: &LinkArgs) -> Result<(LinkConfig, Vec<Row>), String> {
    let addr64 = match args.addr_bits {
        64 => true,
        32 => false,
        other => return Err(format!("invalid --addr {other}, expected 32 or 64")),
    };
    let link = LinkConfig::new(args.generation, args.width, args.mps, args.mrrs)
        .and_then(|l| l.with_rcb(args.rcb))
        .map_err(|e| e.to_string())?
        .with_addr64(addr64)
        .with_ecrc(args.ecrc);
    if args.sizes.is_empty() {
        return Err("--size needs at least one payload size".to_owned());
    }
    let mut rows = Vec::with_capacity(args.sizes.len());
    for text in &args.sizes {
        let size = parse_size(text.trim()).map_err(|e| format!("invalid --size: {e}"))?;
        if size == 0 {
            return Err(format!(
                "invalid --size `{text}`: a payload is at least 1 byte"
            ));
        }
        rows.push(Row {
            size,
            write_gbps: link.effective_write_gbps(size),
            read_gbps: link.effective_read_gbps(size),
        });
    }
    Ok((link, rows))
}

/// Returns the parameters of `link` as a JSON object.
pub(crate) fn link_json(link: &LinkConfig) -> serde_json::Value {
    json!({
        "gen": link.generation(),
        "width": link.width(),
        "mps": link.mps(),
        "mrrs": link.mrrs(),
        "rcb": link.rcb(),
        "addr": if link.addr64() { 64 } else { 32 },
        "ecrc": link.ecrc(),
        "raw_gbps": link.raw_gbps(),
        "usable_gbps": link.usable_tlp_gbps(),
    })
}

/// Returns `Gen3 x8` for `link`.
pub(crate) fn link_name(link: &LinkConfig) -> String {
    format!("Gen{} x{}", link.generation(), link.width())
}

/// Runs `peerdma link`: returns the table (or JSON) to print, or the message of an invalid parameter.
pub(crate) fn run(args: &LinkArgs, as_json: bool, as_csv: bool) -> Result<String, String> {
    let (link, rows) = evaluate(args)?;
    if as_csv {
        let mut out = String::from("size,write_gbps,read_gbps\n");
        for r in &rows {
            let _ = writeln!(out, "{},{:.4},{:.4}", r.size, r.write_gbps, r.read_gbps);
        }
        return Ok(out);
    }
    if as_json {
        let sizes: Vec<_> = rows
            .iter()
            .map(
                |r| json!({ "size": r.size, "write_gbps": r.write_gbps, "read_gbps": r.read_gbps }),
            )
            .collect();
        let v = json!({ "link": link_json(&link), "sizes": sizes });
        return Ok(format!("{v:#}\n"));
    }
    let mut out = format!(
        "{}, MPS {} B, MRRS {} B, RCB {} B, {}-bit addresses, {}\n\
         raw {:.2} Gb/s, usable for TLPs {:.2} Gb/s (ack every {} B, flow-control update every {} B)\n\n",
        link_name(&link),
        link.mps(),
        link.mrrs(),
        link.rcb(),
        if link.addr64() { 64 } else { 32 },
        if link.ecrc() { "ECRC" } else { "no ECRC" },
        link.raw_gbps(),
        link.usable_tlp_gbps(),
        link.ack_limit(),
        link.fc_update(),
    );
    let width = rows
        .iter()
        .map(|r| r.size.to_string().len() + 2)
        .max()
        .unwrap_or(0)
        .max("payload".len());
    let _ = writeln!(
        out,
        "{:>width$}  {:>11}  {:>11}",
        "payload", "write Gb/s", "read Gb/s"
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "{:>width$}  {:>11.2}  {:>11.2}",
            format!("{} B", r.size),
            r.write_gbps,
            r.read_gbps
        );
    }
    Ok(out)
}
