//! Unit tests of [`super::PhysMem`]: allocation, references, regions and the NUMA/zone allocator.

use super::*;

#[test]
fn zero_page_is_reserved_and_reads_zero() {
    let pm = PhysMem::new(4 * PMD_SIZE);
    let z = pm.zero_page();
    assert_eq!(pm.frame(z).owner(), FrameOwner::Zero);
    let mut buf = [1u8; 16];
    pm.read(z, 0, &mut buf);
    assert_eq!(buf, [0u8; 16]);
}

#[test]
fn put_to_zero_frees_and_realloc_bumps_generation() {
    let mut pm = PhysMem::new(4 * PMD_SIZE);
    let f = pm.alloc(0, FrameOwner::Anon).unwrap();
    let gen0 = pm.frame(f).generation;
    pm.write(f, 0, &[7]);
    pm.get(f);
    assert!(!pm.put(f));
    assert!(pm.put(f));
    assert!(!pm.frame(f).is_allocated());
    let g = pm.alloc(0, FrameOwner::Anon).unwrap();
    assert_eq!(g, f, "lowest free frame is reused first");
    assert!(pm.frame(g).generation > gen0);
    let mut b = [9u8; 1];
    pm.read(g, 0, &mut b);
    assert_eq!(b, [0], "a reallocated frame is zero-filled");
}

#[test]
fn pmd_allocation_is_aligned_and_contiguous() {
    let mut pm = PhysMem::new(8 * PMD_SIZE);
    let head = pm.alloc_pmd(0, FrameOwner::Anon).unwrap();
    assert_eq!(head.0 % FRAMES_PER_PMD, 0);
    assert_ne!(head, FrameId(0), "block 0 holds the zero page");
    for i in 0..FRAMES_PER_PMD {
        assert_eq!(pm.frame(FrameId(head.0 + i)).refcount, 1);
    }
}

#[test]
fn pin_bias_marks_maybe_dma_pinned() {
    let mut pm = PhysMem::new(2 * PMD_SIZE);
    let f = pm.alloc(0, FrameOwner::Anon).unwrap();
    assert!(!pm.frame(f).maybe_dma_pinned());
    pm.frame_mut(f).refcount += GUP_PIN_COUNTING_BIAS;
    assert!(pm.frame(f).maybe_dma_pinned());
}

#[test]
fn bar_region_frames_sit_at_the_bar_address_and_ram_frames_at_their_number() {
    let mut pm = PhysMem::new(2 * PMD_SIZE);
    let base = Pa::from_raw(0xe000_0000);
    let r = pm.add_region_at(
        MemoryKind::P2pMem {
            provider: DeviceId(1),
        },
        3,
        base,
    );
    assert_eq!(pm.nr_free(r), 3, "padding frames are not allocatable");
    let first = FrameId(pm.regions()[r].start);
    assert_eq!(pm.frame_pa(first), base);
    assert_eq!(pm.frame_pa(FrameId(first.0 + 2)), base.add(2 * PAGE_SIZE));
    assert_eq!(
        pm.frame_at_pa(base.add(2 * PAGE_SIZE + 5)),
        Some(FrameId(first.0 + 2))
    );
    assert_eq!(pm.frame_at_pa(base.add(3 * PAGE_SIZE)), None);
    assert_eq!(pm.frame_pa(FrameId(7)), FrameId(7).pa());
    assert_eq!(pm.frame_at_pa(FrameId(7).pa()), Some(FrameId(7)));
}

#[test]
fn contiguous_allocation_is_first_fit_lowest_address() {
    let mut pm = PhysMem::new(2 * PMD_SIZE);
    let r = pm.add_region_at(
        MemoryKind::P2pMem {
            provider: DeviceId(1),
        },
        8,
        Pa::from_raw(0),
    );
    let start = pm.regions()[r].start;
    let first = pm.alloc_contiguous(r, 2, FrameOwner::Kernel).unwrap();
    let second = pm.alloc_contiguous(r, 3, FrameOwner::Kernel).unwrap();
    assert_eq!((first.0, second.0), (start, start + 2));
    pm.put(first);
    pm.put(FrameId(first.0 + 1));
    // The 2-frame hole at the bottom is too small for 3; the run after b fits.
    let third = pm.alloc_contiguous(r, 3, FrameOwner::Kernel).unwrap();
    assert_eq!(third.0, start + 5);
    let fourth = pm.alloc_contiguous(r, 2, FrameOwner::Kernel).unwrap();
    assert_eq!(fourth.0, start, "the lowest fitting hole first");
    assert_eq!(
        pm.alloc_contiguous(r, 1, FrameOwner::Kernel),
        Err(OutOfMemory { region: r })
    );
}

#[test]
fn fallback_order_is_home_then_the_next_nodes_wrapping_round() {
    let pm = PhysMem::new_numa(&[PMD_SIZE, PMD_SIZE, PMD_SIZE]);
    assert_eq!(pm.fallback_order(0).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(pm.fallback_order(1).collect::<Vec<_>>(), [1, 2, 0]);
    assert_eq!(pm.fallback_order(2).collect::<Vec<_>>(), [2, 0, 1]);
    assert_eq!(
        (0..3).map(|n| pm.regions()[n].kind).collect::<Vec<_>>(),
        (0..3)
            .map(|node| MemoryKind::Ram { node })
            .collect::<Vec<_>>(),
        "region n is node n"
    );
}

#[test]
fn node_choice_steps_down_the_watermarks_before_taking_the_last_pages() {
    let mut pm = PhysMem::new_numa(&[PMD_SIZE, PMD_SIZE]);
    let take = |pm: &mut PhysMem, node: u32, keep: u64| {
        while pm.nr_free_node(node) > keep {
            pm.alloc(pm.node_region(node), FrameOwner::Anon).unwrap();
        }
    };
    // Home node 1 below low, node 0 above it: node 0.
    take(&mut pm, 1, LOW_WATERMARK - 1);
    assert_eq!(pm.pick_node(1), Some(0));
    // Both below low, node 0 also below min: home node 1 (above min) is next.
    take(&mut pm, 0, MIN_WATERMARK - 1);
    assert_eq!(pm.pick_node(1), Some(1));
    assert_eq!(
        pm.pick_node(0),
        Some(1),
        "node 0 is below min, node 1 above"
    );
    // Both below min: the home node while it has any page, then the other.
    take(&mut pm, 1, 1);
    assert_eq!(pm.pick_node(1), Some(1));
    take(&mut pm, 1, 0);
    assert_eq!(pm.pick_node(1), Some(0));
    let f = pm.alloc_node(1, FrameOwner::Anon).unwrap();
    assert_eq!(pm.node_of(f), Some(0));
    take(&mut pm, 0, 0);
    assert_eq!(
        pm.alloc_node(1, FrameOwner::Anon),
        Err(OutOfMemory { region: 1 })
    );
}

#[test]
fn a_thp_falls_back_to_the_next_node_with_a_free_block() {
    let mut pm = PhysMem::new_numa(&[PMD_SIZE, 2 * PMD_SIZE]);
    // Node 0's only block holds the zero page.
    let head = pm.alloc_pmd_node(0, FrameOwner::Anon).unwrap();
    assert_eq!(pm.node_of(head), Some(1));
}

#[test]
fn kernel_and_page_cache_pages_skip_movable_nodes_and_anonymous_pages_do_not() {
    let mut pm = PhysMem::new_numa(&[2 * PMD_SIZE, PMD_SIZE, PMD_SIZE]);
    pm.set_node_movable(1).unwrap();
    assert_eq!(pm.zonelist(1, GfpZone::Movable), [1, 2, 0]);
    assert_eq!(pm.zonelist(1, GfpZone::Normal), [2, 0]);
    let node = |pm: &mut PhysMem, owner| {
        let f = pm.alloc_node(1, owner).unwrap();
        (pm.node_of(f), pm.is_zone_movable_page(f))
    };
    assert_eq!(node(&mut pm, FrameOwner::Anon), (Some(1), true));
    assert_eq!(node(&mut pm, FrameOwner::Kernel), (Some(2), false));
    assert_eq!(
        node(&mut pm, FrameOwner::File { file: 0, pgoff: 0 }),
        (Some(2), false)
    );
    let thp = pm.alloc_pmd_node(1, FrameOwner::Anon).unwrap();
    assert_eq!(
        pm.node_of(thp),
        Some(0),
        "node 1 and 2 have no free 2 MiB block"
    );
    assert_eq!(
        pm.alloc_pmd_node_in(1, FrameOwner::Anon, GfpZone::Normal),
        Err(OutOfMemory { region: 1 })
    );
    assert_eq!(
        pm.nr_free_zone(GfpZone::Movable) - pm.nr_free_zone(GfpZone::Normal),
        pm.nr_free_node(1)
    );
}

#[test]
fn exhaustion_is_reported_not_panicked() {
    let mut pm = PhysMem::new(PMD_SIZE);
    for _ in 0..FRAMES_PER_PMD - 1 {
        pm.alloc(0, FrameOwner::Anon).unwrap();
    }
    assert_eq!(
        pm.alloc(0, FrameOwner::Anon),
        Err(OutOfMemory { region: 0 })
    );
}

#[test]
fn the_page_hash_is_zero_only_for_zero_pages_and_sees_every_byte() {
    let zero = vec![0u8; 4096];
    assert_eq!(hash_bytes(&zero), ZERO_HASH);
    let base: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    let h = hash_bytes(&base);
    assert_ne!(h, ZERO_HASH);
    assert_eq!(h & 1, 1);
    // One changed byte in each lane, at the start, the middle and the end of the page.
    for pos in [0, 1, 8, 16, 24, 31, 32, 2047, 4095] {
        let mut d = base.clone();
        d[pos] ^= 0x40;
        assert_ne!(hash_bytes(&d), h, "byte {pos}");
        let mut z = zero.clone();
        z[pos] = 1;
        assert_ne!(hash_bytes(&z), ZERO_HASH, "byte {pos} of a zero page");
    }
    // Two words swapped between lanes, or moved within a lane, change the hash.
    let mut d = base.clone();
    d.copy_within(0..8, 8);
    d[..8].copy_from_slice(&base[8..16]);
    assert_ne!(hash_bytes(&d), h);
    let mut d = base.clone();
    d.copy_within(0..8, 32);
    d[..8].copy_from_slice(&base[32..40]);
    assert_ne!(hash_bytes(&d), h);
}

/// A frame's metadata is 32 bytes, the owner with it.
#[test]
fn frame_metadata_is_32_bytes_and_keeps_a_file_owner() {
    assert_eq!(size_of::<Frame>(), 32);
    let mut pm = PhysMem::new(2 * PMD_SIZE);
    let f = pm.alloc(0, FrameOwner::Kernel).unwrap();
    let owner = FrameOwner::File {
        file: 7,
        pgoff: (3 << 32) | 5,
    };
    pm.set_owner(f, owner);
    assert_eq!(pm.frame(f).owner(), owner);
    assert_eq!(pm.frame_info(f).owner, owner);
}

/// Configured memory that is never used costs almost nothing: 1 TiB of RAM plus a 256 GiB device region hold
/// a few MiB of tables (a pointer and a region number per 2 MiB, 12 bytes per 512 frames), and using a frame allocates one chunk.
#[test]
fn configured_but_unused_frames_cost_almost_nothing() {
    let mut pm = PhysMem::new(1 << 40);
    let dev = pm.add_region(
        MemoryKind::DevicePrivate { owner: DeviceId(1) },
        (256u64 << 30) / PAGE_SIZE,
    );
    let frames = pm.regions().iter().map(|r| r.nr_frames).sum::<u64>();
    let before = pm.host_bytes();
    assert!(
        before * 32 < frames,
        "{before} host bytes for {frames} frames: more than 1/32 byte per frame"
    );
    let f = pm.alloc(dev, FrameOwner::Anon).unwrap();
    assert_eq!(pm.frame(f).refcount, 1);
    let after = pm.host_bytes();
    assert_eq!(after - before, 512 * 32, "one chunk of 512 frames");
    assert_eq!(pm.nr_free(dev), (256u64 << 30) / PAGE_SIZE - 1);
    // A frame never allocated reads as free, with no generation yet.
    let far = FrameId(pm.regions()[dev].start + 100_000);
    assert!(!pm.frame(far).is_allocated());
    assert_eq!(pm.frame(far).generation, 0);
    assert_eq!(
        pm.kind(far),
        MemoryKind::DevicePrivate { owner: DeviceId(1) }
    );
}

/// Token mode: every write stamps a new version, a copy carries it, freeing forgets it, reads return zeros,
/// and the content hash the oracle compares is the version.
#[test]
fn token_mode_keeps_a_version_per_page() {
    let mut pm = PhysMem::with_mode(&[4 * PMD_SIZE], DataMode::Token);
    assert_eq!(pm.data_mode(), DataMode::Token);
    let a = pm.alloc(0, FrameOwner::Anon).unwrap();
    let b = pm.alloc(0, FrameOwner::Anon).unwrap();
    assert_eq!(pm.content_hash(a), ZERO_HASH);
    pm.write(a, 0, &[1, 2, 3]);
    let v1 = pm.version(a);
    assert_ne!(v1, 0);
    assert_eq!(pm.content_hash(a), v1);
    pm.write(a, 0, &[1, 2, 3]);
    let v2 = pm.version(a);
    assert_ne!(v2, v1, "the same bytes written again are a new version");
    let mut buf = [9u8; 4];
    pm.read(a, 0, &mut buf);
    assert_eq!(buf, [0; 4], "no bytes are kept");
    assert!(pm.data(a).is_none());
    pm.copy_frame(a, b);
    assert_eq!(pm.version(b), v2);
    let kept = pm.content(b);
    assert_eq!(kept, PageContent::Token(v2));
    assert!(pm.put(b));
    assert_eq!(pm.version(b), 0, "a freed frame forgets its version");
    let c = pm.alloc(0, FrameOwner::Anon).unwrap();
    assert_eq!(c, b);
    pm.set_content(c, kept);
    assert_eq!(pm.content_hash(c), v2, "swap-in puts the version back");
}

/// Bytes mode keeps each written page once and gives it back with `content`/`set_content`; the mode can
/// change only before a page is written.
#[test]
fn bytes_mode_contents_move_as_values_and_the_mode_is_fixed_once_written() {
    let mut pm = PhysMem::new(4 * PMD_SIZE);
    let a = pm.alloc(0, FrameOwner::Anon).unwrap();
    assert_eq!(pm.content(a), PageContent::Zero);
    pm.write(a, 0, &[0; 8]);
    assert!(
        pm.data(a).is_none(),
        "zeros on an unwritten page allocate nothing"
    );
    assert_eq!(pm.set_data_mode(DataMode::Token), Ok(()));
    assert_eq!(pm.set_data_mode(DataMode::Bytes), Ok(()));
    pm.write(a, 100, &[5, 6]);
    assert_eq!(pm.set_data_mode(DataMode::Token), Err(DataModeError));
    let c = pm.content(a);
    let h = pm.content_hash(a);
    let b = pm.alloc(0, FrameOwner::Anon).unwrap();
    pm.set_content(b, c);
    assert_eq!(pm.content_hash(b), h);
    let mut buf = [0u8; 2];
    pm.read(b, 100, &mut buf);
    assert_eq!(buf, [5, 6]);
}

/// The content hash kept with a page follows every write: computed once after a write, recomputed after the
/// next one, and carried by a copy.
#[test]
fn the_kept_hash_follows_writes_and_copies() {
    let mut pm = PhysMem::new(4 * PMD_SIZE);
    let a = pm.alloc(0, FrameOwner::Anon).unwrap();
    let b = pm.alloc(0, FrameOwner::Anon).unwrap();
    pm.write(a, 10, &[1, 2, 3]);
    let h1 = pm.content_hash(a);
    assert_eq!(h1, hash_bytes(&pm.data(a).unwrap()));
    assert_eq!(pm.content_hash(a), h1, "a second read gives the kept hash");
    pm.write(a, 4095, &[9]);
    let h2 = pm.content_hash(a);
    assert_ne!(h2, h1);
    assert_eq!(h2, hash_bytes(&pm.data(a).unwrap()));
    pm.copy_frame(a, b);
    assert_eq!(pm.content_hash(b), h2);
    pm.write(b, 0, &[7]);
    assert_eq!(
        pm.content_hash(a),
        h2,
        "writing the copy leaves the source alone"
    );
    assert_eq!(pm.content_hash(b), hash_bytes(&pm.data(b).unwrap()));
    pm.copy_frame(FrameId(pm.zero_page().0), b);
    assert_eq!(
        pm.content_hash(b),
        ZERO_HASH,
        "copying the zero page clears the copy"
    );
}

#[test]
fn a_reused_page_buffer_never_shows_its_old_contents() {
    let mut pm = PhysMem::new(4 * PMD_SIZE);
    let full = [0xabu8; 4096];
    // Freed written pages leave their buffers for reuse.
    let old: Vec<FrameId> = (0..4)
        .map(|_| {
            let f = pm.alloc(0, FrameOwner::Anon).unwrap();
            pm.write(f, 0, &full);
            f
        })
        .collect();
    let src = pm.alloc(0, FrameOwner::Anon).unwrap();
    pm.write(src, 100, &[1, 2, 3]);
    for f in old {
        assert!(pm.put(f));
    }
    // A first write into a fresh frame: zeros around the bytes written.
    let a = pm.alloc(0, FrameOwner::Anon).unwrap();
    pm.write(a, 8, &[5]);
    let mut b = [0u8; 4096];
    pm.read(a, 0, &mut b);
    assert!(
        b.iter()
            .enumerate()
            .all(|(i, &x)| x == u8::from(i == 8) * 5)
    );
    // A copy into a fresh frame: exactly the source, hash included.
    let c = pm.alloc(0, FrameOwner::Anon).unwrap();
    pm.copy_frame(src, c);
    pm.read(c, 0, &mut b);
    let mut want = [0u8; 4096];
    want[100..103].copy_from_slice(&[1, 2, 3]);
    assert_eq!(b, want);
    assert_eq!(pm.content_hash(c), pm.content_hash(src));
    // A copy of a never-written page over a written one: zeros, and the buffer goes back for reuse.
    let z = pm.alloc(0, FrameOwner::Anon).unwrap();
    pm.copy_frame(z, c);
    assert_eq!(pm.data(c), None);
    assert_eq!(pm.content_hash(c), ZERO_HASH);
    // Copying a frame onto itself keeps it.
    pm.copy_frame(src, src);
    pm.read(src, 0, &mut b);
    assert_eq!(b, want);
}

/// One operation on a frame's contents for [`contents_match_a_plain_page_model`].
#[derive(Clone, Debug)]
enum ContentOp {
    /// Writes `len` bytes at `offset` of frame `f`: byte `i` is `fill` when `i % every == 0`, else 0.
    Write {
        f: usize,
        offset: usize,
        len: usize,
        fill: u8,
        every: usize,
    },
    Copy {
        src: usize,
        dst: usize,
    },
    Clear {
        f: usize,
    },
    /// `content` then `set_content` (swap-out, swap-in).
    Roundtrip {
        from: usize,
        to: usize,
    },
}

fn content_op() -> impl proptest::strategy::Strategy<Value = ContentOp> {
    use proptest::prelude::*;
    // Offsets near the page's edges and word boundaries, lengths around the inline limit.
    let offset = prop_oneof![0usize..64, 4000usize..4096, 0usize..4096];
    let len = prop_oneof![1usize..30, 1usize..200, Just(4096)];
    prop_oneof![
        6 => (0usize..3, offset, len, any::<u8>(), 1usize..40).prop_map(|(f, offset, len, fill, every)| {
            let offset = offset.min(4095);
            let len = len.min(4096 - offset);
            ContentOp::Write { f, offset, len, fill, every }
        }),
        2 => (0usize..3, 0usize..3).prop_map(|(src, dst)| ContentOp::Copy { src, dst }),
        1 => (0usize..3).prop_map(|f| ContentOp::Clear { f }),
        1 => (0usize..3, 0usize..3).prop_map(|(from, to)| ContentOp::Roundtrip { from, to }),
    ]
}

proptest::proptest! {
    /// Pages kept inline and in buffers read, hash, copy and move exactly like a plain 4 KiB array per
    /// page: every read of the whole page gives the model's bytes and the content hash is `hash_bytes` of
    /// them (so the inline hash equals the whole-page one).
    #[test]
    fn contents_match_a_plain_page_model(ops in proptest::collection::vec(content_op(), 1..40)) {
        let mut pm = PhysMem::new(4 * PMD_SIZE);
        let frames: Vec<FrameId> = (0..3).map(|_| pm.alloc(0, FrameOwner::Anon).unwrap()).collect();
        let mut model = vec![[0u8; 4096]; 3];
        for op in ops {
            match op {
                ContentOp::Write { f, offset, len, fill, every } => {
                    let data: Vec<u8> = (0..len).map(|i| if i % every == 0 { fill } else { 0 }).collect();
                    pm.write(frames[f], offset, &data);
                    model[f][offset..offset + len].copy_from_slice(&data);
                }
                ContentOp::Copy { src, dst } => {
                    pm.copy_frame(frames[src], frames[dst]);
                    model[dst] = model[src];
                }
                ContentOp::Clear { f } => {
                    pm.store.clear(frames[f].0);
                    model[f] = [0; 4096];
                }
                ContentOp::Roundtrip { from, to } => {
                    let c = pm.content(frames[from]);
                    pm.set_content(frames[to], c);
                    model[to] = model[from];
                }
            }
            for (f, want) in frames.iter().zip(&model) {
                let mut got = [0u8; 4096];
                pm.read(*f, 0, &mut got);
                proptest::prop_assert_eq!(&got[..], &want[..]);
                let mut part = [0u8; 20];
                pm.read(*f, 4070, &mut part);
                proptest::prop_assert_eq!(&part[..], &want[4070..4090]);
                proptest::prop_assert_eq!(pm.content_hash(*f), hash_bytes(want));
                if let Some(d) = pm.data(*f) {
                    proptest::prop_assert_eq!(&d[..], &want[..]);
                } else {
                    proptest::prop_assert!(want.iter().all(|&b| b == 0));
                }
            }
        }
    }
}

/// A page written in a few bytes is kept inline (no 4 KiB buffer) until its non-zero bytes spread
/// beyond the inline window; then it gets a buffer.
#[test]
fn small_writes_stay_inline_until_they_spread() {
    let mut pm = PhysMem::new(4 * PMD_SIZE);
    let a = pm.alloc(0, FrameOwner::Anon).unwrap();
    let base = pm.host_bytes();
    pm.write(a, 100, &[1]);
    pm.write(a, 104, &[2, 0, 0, 3]);
    let inline = pm.host_bytes();
    // One slot table (and the chunk list's growth), no buffer.
    assert!(
        (base + 512 * 16..base + 512 * 16 + 1024).contains(&inline),
        "{inline} bytes after {base}"
    );
    let mut b = [0u8; 12];
    pm.read(a, 98, &mut b);
    assert_eq!(b, [0, 0, 1, 0, 0, 0, 2, 0, 0, 3, 0, 0]);
    pm.write(a, 200, &[4]);
    assert!(pm.host_bytes() >= inline + 4096, "spread: a buffer");
    pm.read(a, 98, &mut b);
    assert_eq!(b, [0, 0, 1, 0, 0, 0, 2, 0, 0, 3, 0, 0]);
}
