//! A partial GUP says why it stopped: the errno of the first page it could not take
//! (`PinnedPages::stopped_by`), so a caller needs no second GUP to learn it; and it hands back each page's
//! frame, physical address and memory kind (`PinnedPages::pages`).
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration-test crate is all tests"
)]

use std::cell::RefCell;
use std::rc::Rc;

use peerdma_core::{Errno, PAGE_SIZE};
use peerdma_mm::{GupFlags, Kernel, MemoryKind, MmCosts, MmapArgs, Prot};
use peerdma_sim::{RunOutcome, Sim, SimConfig};

#[test]
fn a_partial_pin_reports_the_errno_of_the_first_page_it_could_not_take() {
    let sim = Sim::new(SimConfig::default());
    let k = Kernel::new(&sim, 16 << 20, MmCosts::zero());
    let out = Rc::new(RefCell::new(None));
    let (k2, o) = (k.clone(), out.clone());
    sim.spawn("test", async move {
        let pid = k2.create_process();
        let args = MmapArgs {
            len: 4 * PAGE_SIZE,
            prot: Prot::RW,
            private: true,
            anonymous: true,
            populate: true,
            ..MmapArgs::default()
        };
        let va = k2.mmap(pid, &args).await.expect("mmap");
        // The third page becomes read-only: a write pin stops there.
        k2.mprotect(pid, va.add(2 * PAGE_SIZE), PAGE_SIZE, Prot::READ)
            .await
            .expect("mprotect");
        let pins = k2
            .get_user_pages(pid, va, 4, GupFlags::PIN | GupFlags::WRITE)
            .await
            .expect("the first two pages pin");
        let whole = k2
            .get_user_pages(pid, va, 2, GupFlags::PIN | GupFlags::WRITE)
            .await
            .expect("two pages pin");
        // Each page comes back with its frame, physical address and memory kind.
        for (p, &f) in whole.pages().iter().zip(whole.frames()) {
            assert_eq!(p.frame, f);
            assert_eq!(p.pa, k2.frame_pa(f));
            assert!(matches!(p.kind, MemoryKind::Ram { .. }), "{:?}", p.kind);
        }
        *o.borrow_mut() = Some((pins.frames().len(), pins.stopped_by(), whole.stopped_by()));
    });
    assert_eq!(sim.run(), RunOutcome::Completed);
    assert_eq!(*out.borrow(), Some((2, Some(Errno::EFAULT), None)));
}
