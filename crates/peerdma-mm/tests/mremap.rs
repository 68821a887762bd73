//! `mremap(2)` that moves and shrinks at once (MREMAP_MAYMOVE | MREMAP_FIXED with a smaller new length):
//! mm/mremap.c unmaps the old tail first (`mremap_to`), so its pages are zapped inside their own UNMAP
//! invalidation, mirrors drop them and their frames are freed — none stays behind in the page table once
//! the old VMA is gone.
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration-test crate is all tests"
)]

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use peerdma_core::{PAGE_SIZE, Range, Va};
use peerdma_mm::mremap::MremapFlags;
use peerdma_mm::{
    IntervalNotifierOps, Kernel, MmCosts, MmapArgs, NotifierEvent, NotifierId, NotifierRange, Prot,
};
use peerdma_sim::{RunOutcome, Sim, SimConfig};

/// Records every invalidation it sees: event and range.
#[derive(Debug, Default)]
struct Recorder(RefCell<Vec<(NotifierEvent, Range<Va>)>>);

impl IntervalNotifierOps for Recorder {
    fn invalidate<'a>(
        &'a self,
        _id: NotifierId,
        r: &'a NotifierRange,
        _seq: u64,
    ) -> Pin<Box<dyn Future<Output = bool> + 'a>> {
        self.0.borrow_mut().push((r.event, r.range));
        Box::pin(async { true })
    }

    fn name(&self) -> String {
        "recorder".to_owned()
    }
}

#[test]
fn a_move_that_shrinks_zaps_the_old_tail_inside_an_unmap_invalidation() {
    let sim = Sim::new(SimConfig::default());
    let k: Rc<Kernel> = Kernel::new(&sim, 64 << 20, MmCosts::zero());
    sim.spawn("test", async move {
        let pid = k.create_process();
        let args = MmapArgs {
            len: 4 * PAGE_SIZE,
            prot: Prot::RW,
            private: true,
            anonymous: true,
            ..MmapArgs::default()
        };
        let va = k.mmap(pid, &args).await.unwrap();
        for i in 0..4u8 {
            k.store(pid, va.add(u64::from(i) * PAGE_SIZE), &[i + 1; 8])
                .await
                .unwrap();
        }
        let tail: Vec<_> = (1..4)
            .map(|i| {
                k.pte_at(pid, va.add(i * PAGE_SIZE))
                    .unwrap()
                    .frame()
                    .unwrap()
            })
            .collect();
        let rec = Rc::new(Recorder::default());
        let to = va.add(64 * PAGE_SIZE);
        k.interval_notifier_insert(pid, va, 128 * PAGE_SIZE, rec.clone())
            .unwrap();
        let flags = MremapFlags {
            maymove: true,
            fixed: true,
            new_addr: Some(to),
            ..MremapFlags::default()
        };
        let got = k.mremap(pid, va, 4 * PAGE_SIZE, PAGE_SIZE, flags).await;
        assert_eq!(got, Ok(to));
        let tail_range = Range::new(va.add(PAGE_SIZE), va.add(4 * PAGE_SIZE));
        assert!(
            rec.0
                .borrow()
                .iter()
                .any(|&(e, r)| e == NotifierEvent::Unmap && r.contains_range(&tail_range)),
            "no UNMAP invalidation of the old tail: {:?}",
            rec.0.borrow()
        );
        for i in 0..4 {
            assert_eq!(k.pte_at(pid, va.add(i * PAGE_SIZE)), None, "old page {i}");
        }
        for f in tail {
            assert!(!k.frame_info(f).allocated, "tail frame {f} not freed");
        }
        let mut buf = [0u8; 8];
        k.load(pid, to, &mut buf).await.unwrap();
        assert_eq!(buf, [1; 8], "the moved page");
        assert_eq!(
            k.pte_at(pid, to.add(PAGE_SIZE)),
            None,
            "nothing beyond the new length"
        );
    });
    assert_eq!(sim.run(), RunOutcome::Completed);
}
