//! `Kernel::shutdown`: a driver callback that holds the kernel (an open mirror's interval notifier) and an
//! agent still pending at the end of a run keep the kernel and its engine alive in reference cycles until the
//! kernel drops them; after `shutdown` the last handles free everything.
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration-test crate is all tests"
)]

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use peerdma_core::{PAGE_SIZE, Va};
use peerdma_mm::{IntervalNotifierOps, Kernel, MmCosts, NotifierId, NotifierRange};
use peerdma_sim::{RunOutcome, Sim, SimConfig};

/// A driver's notifier that holds the kernel, as a mirror's does.
#[derive(Debug)]
struct HoldsKernel(
    #[expect(dead_code, reason = "held, never read: the reference is the point")] Rc<Kernel>,
);

impl IntervalNotifierOps for HoldsKernel {
    fn invalidate<'a>(
        &'a self,
        _id: NotifierId,
        _r: &'a NotifierRange,
        _seq: u64,
    ) -> Pin<Box<dyn Future<Output = bool> + 'a>> {
        Box::pin(async { true })
    }

    fn name(&self) -> String {
        "holds-kernel".to_owned()
    }
}

#[test]
fn shutdown_frees_a_kernel_held_by_its_own_callbacks_and_agents() {
    let sim = Sim::new(SimConfig::default());
    let k = Kernel::new(&sim, 16 << 20, MmCosts::zero());
    let pid = k.create_process();
    k.interval_notifier_insert(
        pid,
        Va::from_raw(0x7f00_0000_0000),
        PAGE_SIZE,
        Rc::new(HoldsKernel(k.clone())),
    )
    .unwrap();
    let k2 = k.clone();
    sim.spawn("stuck", async move {
        let _keep = &k2;
        std::future::pending::<()>().await;
    });
    assert!(matches!(sim.run(), RunOutcome::Deadlock { .. }));
    let watch = Rc::downgrade(&k);
    k.shutdown();
    drop((k, sim));
    assert!(watch.upgrade().is_none(), "the kernel leaked");
}
