//! Benchmarks of the engine's event loop: agents that sleep and contend for a simulated mutex, and many agents
//! ready at the same instants under exploration.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use peerdma_core::SimDuration;
use peerdma_sim::{Sim, SimConfig, SimMutex};

/// 16 agents × 1000 iterations of (sleep, lock, sleep, unlock): ≈ 48 000 events per iteration.
fn event_loop(c: &mut Criterion) {
    c.bench_function("engine_16x1000_lock_sleep", |b| {
        b.iter(|| {
            let sim = Sim::new(SimConfig {
                trace: false,
                ..SimConfig::default()
            });
            let m = SimMutex::new(&sim, "m");
            for a in 0..16u64 {
                let (s, m) = (sim.clone(), m.clone());
                sim.spawn(format!("a{a}"), async move {
                    for _ in 0..1000 {
                        s.sleep(SimDuration(1 + a)).await;
                        let g = m.lock().await;
                        s.sleep(SimDuration(1)).await;
                        drop(g);
                    }
                });
            }
            black_box(sim.run());
            black_box(sim.events_delivered())
        });
    });
}

/// `n` agents that each sleep 1 ns ten times, all due at the same instants, with exploration on: every
/// event is a random pick among up to `n` ready ones. Reported per iteration = 10 n events.
fn same_instant_exploration(c: &mut Criterion) {
    for n in [16u64, 1024] {
        c.bench_function(&format!("engine_explore_{n}_ready_x10"), |b| {
            b.iter(|| {
                let sim = Sim::new(SimConfig {
                    trace: false,
                    explore: true,
                    ..SimConfig::default()
                });
                for a in 0..n {
                    let s = sim.clone();
                    sim.spawn(format!("a{a}"), async move {
                        for _ in 0..10 {
                            s.sleep(SimDuration(1)).await;
                        }
                    });
                }
                black_box(sim.run());
                black_box(sim.events_delivered())
            });
        });
    }
}

criterion_group!(benches, event_loop, same_instant_exploration);
criterion_main!(benches);
