//! NUMA nodes with per-node RAM: the default local policy with zonelist fallback (mm/mempolicy.c,
//! mm/page_alloc.c `get_page_from_freelist`), per-node LRU lists and reclaim of the home node only when no
//! node has free memory above its low watermark (`node_reclaim_mode` 0; mm/vmscan.c `shrink_node`).
#![expect(
    clippy::tests_outside_test_module,
    clippy::unwrap_used,
    reason = "an integration-test crate is all tests"
)]

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;

use peerdma_core::{Errno, PAGE_SIZE, Pid, Va};
use peerdma_mm::phys::LruState;
use peerdma_mm::vmscan::LOW_WATERMARK;
use peerdma_mm::{Kernel, MmCosts, MmapArgs, Prot};
use peerdma_sim::{Metrics, RunOutcome, Sim, SimConfig};

/// Frames per 4 MiB node.
const NODE_FRAMES: u64 = (4 << 20) / PAGE_SIZE;

/// Runs `f` as the only agent of a fresh simulation with RAM nodes of `nodes` bytes; returns its result and
/// the counters.
fn run<T: 'static, F: Future<Output = T> + 'static>(
    nodes: &[u64],
    f: impl FnOnce(Rc<Kernel>) -> F,
) -> (T, Metrics) {
    let sim = Sim::new(SimConfig::default());
    let k = Kernel::new_numa(&sim, nodes, MmCosts::zero());
    let out = Rc::new(RefCell::new(None));
    let (o, fut) = (out.clone(), f(k));
    sim.spawn("test", async move { *o.borrow_mut() = Some(fut.await) });
    assert_eq!(sim.run(), RunOutcome::Completed);
    (out.borrow_mut().take().unwrap(), sim.metrics())
}

fn anon(pages: u64) -> MmapArgs {
    MmapArgs {
        len: pages * PAGE_SIZE,
        prot: Prot::RW,
        private: true,
        anonymous: true,
        ..MmapArgs::default()
    }
}

fn page(buf: Va, i: u64) -> Va {
    buf.checked_add(i * PAGE_SIZE).unwrap()
}

/// Stores a byte derived from `i` into pages `from..to` of `buf`.
async fn touch(k: &Kernel, pid: Pid, buf: Va, from: u64, to: u64) {
    for i in from..to {
        k.store(pid, page(buf, i), &[stamp(i)]).await.unwrap();
    }
}

fn stamp(i: u64) -> u8 {
    u8::try_from(i % 251).unwrap() + 1
}

/// Returns the node of the page `va` maps, or `None` when it is not resident.
fn node_of(k: &Kernel, pid: Pid, va: Va) -> Option<u32> {
    let (frame, _) = k.translate(pid, va)?;
    k.frame_info(frame).node
}

fn free(k: &Kernel) -> Vec<u64> {
    (0..k.nr_nodes()).map(|n| k.nr_free_node(n)).collect()
}

#[test]
fn one_ram_region_per_node_with_the_zero_page_on_node_0() {
    let (out, _) = run(&[4 << 20, 8 << 20], |k| async move {
        let zero = k.zero_page();
        (
            k.nr_nodes(),
            k.frame_info(zero).node,
            k.nr_free_node(0),
            k.nr_free_node(1),
        )
    });
    assert_eq!(out, (2, Some(0), NODE_FRAMES - 1, 2 * NODE_FRAMES));
}

#[test]
fn allocation_prefers_the_home_node_and_falls_back_when_it_is_low() {
    // The process lives on node 1: its pages come from node 1 until node 1 drops below its low watermark,
    // then from node 0, and nothing is reclaimed while node 0 has room.
    let until_low = NODE_FRAMES - LOW_WATERMARK + 1;
    let ((nodes, free_after, metrics_mid), _) = run(&[4 << 20, 4 << 20], |k| async move {
        let pid = k.create_process();
        k.set_home_node(pid, 1).unwrap();
        let buf = k.mmap(pid, &anon(until_low + 16)).await.unwrap();
        touch(&k, pid, buf, 0, until_low + 16).await;
        let nodes: Vec<Option<u32>> = (0..until_low + 16)
            .map(|i| node_of(&k, pid, page(buf, i)))
            .collect();
        (nodes, free(&k), k.sim.metrics())
    });
    let first_fallback = nodes.iter().position(|&n| n != Some(1)).unwrap();
    assert_eq!(
        u64::try_from(first_fallback).unwrap(),
        until_low,
        "node 1 serves until its free pages fall below the low watermark"
    );
    assert!(
        nodes[first_fallback..].iter().all(|&n| n == Some(0)),
        "then node 0: {:?}",
        &nodes[first_fallback..]
    );
    assert_eq!(free_after, [NODE_FRAMES - 1 - 16, LOW_WATERMARK - 1]);
    assert_eq!(
        metrics_mid.get("lru.scan"),
        0,
        "a low node is skipped, not reclaimed, while another node has free memory"
    );
    assert_eq!(metrics_mid.get("swap.out"), 0);
}

#[test]
fn a_low_node_swaps_out_its_own_cold_pages_only_when_the_fallback_also_fails() {
    // Node 0 is home. Its pages fill node 0 to the low watermark, then node 1; only then does reclaim run,
    // on node 0, so every page that goes to swap was on node 0 and node 1's pages all stay resident.
    let node0 = NODE_FRAMES - 1 - (LOW_WATERMARK - 1);
    let both = node0 + NODE_FRAMES - (LOW_WATERMARK - 1);
    let extra = 300;
    let ((before, placed, after, resident, data_ok), m) =
        run(&[4 << 20, 4 << 20], |k| async move {
            let pid = k.create_process();
            let buf = k.mmap(pid, &anon(both + extra)).await.unwrap();
            touch(&k, pid, buf, 0, both).await;
            let before = (free(&k), k.sim.metrics().get("lru.scan"));
            let placed: Vec<Option<u32>> =
                (0..both).map(|i| node_of(&k, pid, page(buf, i))).collect();
            touch(&k, pid, buf, both, both + extra).await;
            let after = k.sim.metrics().get("swap.out");
            let resident: Vec<bool> = (0..both)
                .map(|i| node_of(&k, pid, page(buf, i)).is_some())
                .collect();
            // Every page reads back, swapped or not.
            let mut ok = true;
            for i in 0..both + extra {
                let mut b = [0u8; 1];
                k.load(pid, page(buf, i), &mut b).await.unwrap();
                ok &= b[0] == stamp(i);
            }
            (before, placed, after, resident, ok)
        });
    assert_eq!(
        before,
        (vec![LOW_WATERMARK - 1, LOW_WATERMARK - 1], 0),
        "both nodes filled to the watermark with no reclaim"
    );
    let node0 = usize::try_from(node0).unwrap();
    assert!(placed[..node0].iter().all(|&n| n == Some(0)));
    assert!(placed[node0..].iter().all(|&n| n == Some(1)));
    assert!(after > 0, "once every node is low, reclaim swaps pages out");
    let swapped: Vec<usize> = (0..resident.len()).filter(|&i| !resident[i]).collect();
    assert!(!swapped.is_empty());
    assert!(
        swapped.iter().all(|&i| i < node0),
        "only the home node's pages were reclaimed: {swapped:?}"
    );
    assert!(data_ok, "every page reads back intact");
    assert!(m.get("swap.in") > 0);
}

#[test]
fn each_node_keeps_its_own_lru_lists() {
    let ((lists, total), _) = run(&[4 << 20, 4 << 20], |k| async move {
        let near = k.create_process();
        let far = k.create_process();
        k.set_home_node(far, 1).unwrap();
        let a = k.mmap(near, &anon(3)).await.unwrap();
        let b = k.mmap(far, &anon(5)).await.unwrap();
        touch(&k, near, a, 0, 3).await;
        touch(&k, far, b, 0, 5).await;
        let lists: Vec<u64> = (0..2)
            .map(|n| k.nr_lru_pages_node(n, LruState::Inactive))
            .collect();
        (lists, k.nr_lru_pages(LruState::Inactive))
    });
    assert_eq!(lists, [3, 5]);
    assert_eq!(total, 8, "the global count sums the nodes");
}

#[test]
fn home_node_is_validated_and_inherited_by_fork() {
    let ((bad, child_home, child_node), _) = run(&[4 << 20, 4 << 20], |k| async move {
        let pid = k.create_process();
        let bad = k.set_home_node(pid, 2);
        k.set_home_node(pid, 1).unwrap();
        let buf = k.mmap(pid, &anon(1)).await.unwrap();
        touch(&k, pid, buf, 0, 1).await;
        let child = k.fork(pid).await.unwrap();
        // The child's COW copy is allocated on its (inherited) home node.
        k.store(child, buf, &[42]).await.unwrap();
        (bad, k.home_node(child), node_of(&k, child, buf))
    });
    assert_eq!(bad, Err(Errno::EINVAL));
    assert_eq!(child_home, 1);
    assert_eq!(child_node, Some(1));
}

#[test]
fn device_pages_come_back_with_the_process_policy_or_node_0() {
    let ((with_pid, without), _) = run(&[4 << 20, 4 << 20], |k| async move {
        let pid = k.create_process();
        k.set_home_node(pid, 1).unwrap();
        let a = k.alloc_ram_page(Some(pid)).unwrap();
        let b = k.alloc_ram_page(None).unwrap();
        (k.frame_info(a).node, k.frame_info(b).node)
    });
    assert_eq!((with_pid, without), (Some(1), Some(0)));
}
