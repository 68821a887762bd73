//! The oracle's rules for a device access at issue and at landing (`peerdma_mm::device_access`, DESIGN.md
//! §7 checks 1–3): mirror translations against the page table, pins, and frame generations.
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration-test crate is all tests"
)]

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;

use peerdma_core::{DeviceId, PAGE_SIZE};
use peerdma_mm::oracle::ViolationKind;
use peerdma_mm::{DeviceData, DeviceGrant, FrameTranslation, Kernel, MmCosts, MmapArgs, Prot};
use peerdma_sim::{Sim, SimConfig};

const DEV: DeviceId = DeviceId(5);

/// Runs `f` as the only agent (the run may stop at a violation) and returns its result and the kinds of
/// the violations the oracle recorded.
fn run<T: 'static, F: Future<Output = T> + 'static>(
    f: impl FnOnce(Rc<Kernel>) -> F,
) -> (Option<T>, Vec<ViolationKind>) {
    let sim = Sim::new(SimConfig::default());
    let k = Kernel::new(&sim, 16 << 20, MmCosts::zero());
    let out = Rc::new(RefCell::new(None));
    let (o, fut) = (out.clone(), f(k.clone()));
    sim.spawn("test", async move { *o.borrow_mut() = Some(fut.await) });
    sim.run();
    let kinds = k.oracle_violations().iter().map(|v| v.kind).collect();
    (out.borrow_mut().take(), kinds)
}

fn anon_page() -> MmapArgs {
    MmapArgs {
        len: PAGE_SIZE,
        prot: Prot::RW,
        private: true,
        anonymous: true,
        populate: true,
        ..MmapArgs::default()
    }
}

#[test]
fn a_mirror_write_lands_while_the_page_table_still_maps_the_frame() {
    let (landed, violations) = run(|k| async move {
        let pid = k.create_process();
        let va = k.mmap(pid, &anon_page()).await.unwrap();
        let (frame, _) = k.translate(pid, va).unwrap();
        let t = FrameTranslation {
            frame,
            generation: k.frame_generation(frame).unwrap(),
            grant: DeviceGrant::Mirror { pid, va },
        };
        assert!(k.device_issue(DEV, &t, true));
        let landed = k.device_land(DEV, &t, DeviceData::Write(&[7; 4096]));
        let mut b = [0u8; 1];
        k.load(pid, va, &mut b).await.unwrap();
        (landed, b[0])
    });
    assert_eq!(landed, Some((true, 7)));
    assert!(violations.is_empty(), "{violations:?}");
}

/// Check 1 at landing: once the page is unmapped and no invalidation of it is in progress, a mirror
/// translation issued before is stale — reported as such, before the freed frame's use after free.
#[test]
fn a_mirror_write_landing_after_munmap_completed_is_a_stale_translation() {
    let (landed, violations) = run(|k| async move {
        let pid = k.create_process();
        let va = k.mmap(pid, &anon_page()).await.unwrap();
        let (frame, _) = k.translate(pid, va).unwrap();
        let t = FrameTranslation {
            frame,
            generation: k.frame_generation(frame).unwrap(),
            grant: DeviceGrant::Mirror { pid, va },
        };
        assert!(k.device_issue(DEV, &t, true));
        k.munmap(pid, va, PAGE_SIZE).await.unwrap();
        k.device_land(DEV, &t, DeviceData::Write(&[7; 4096]))
    });
    assert_eq!(landed, Some(false));
    assert_eq!(violations, vec![ViolationKind::StaleTranslation]);
}

/// Check 2: a raw access (no grant but the address) to a frame freed and reallocated since its
/// translation was made is a use after free — for a read too.
#[test]
fn a_raw_read_of_a_reallocated_frame_is_a_use_after_free() {
    let (landed, violations) = run(|k| async move {
        let pid = k.create_process();
        let va = k.mmap(pid, &anon_page()).await.unwrap();
        k.store(pid, va, &[1]).await.unwrap();
        let (frame, _) = k.translate(pid, va).unwrap();
        let t = FrameTranslation {
            frame,
            generation: k.frame_generation(frame).unwrap(),
            grant: DeviceGrant::Raw,
        };
        k.munmap(pid, va, PAGE_SIZE).await.unwrap();
        assert_eq!(k.frame_generation(frame), None, "freed");
        // Take pages until that frame is someone's again.
        let other = k.create_process();
        for _ in 0..64 {
            let v = k.mmap(other, &anon_page()).await.unwrap();
            k.store(other, v, &[2]).await.unwrap();
            if k.frame_generation(frame).is_some() {
                break;
            }
        }
        assert!(k.frame_generation(frame).is_some_and(|g| g != t.generation));
        let mut buf = [0u8; 4096];
        k.device_land(DEV, &t, DeviceData::Read(&mut buf))
    });
    assert_eq!(landed, Some(false));
    assert_eq!(violations, vec![ViolationKind::UseAfterFree]);
}
