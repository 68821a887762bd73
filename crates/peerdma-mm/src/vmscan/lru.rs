//! The anonymous LRU lists of one node (`struct lruvec`'s anon lists), intrusive: each frame's links live
//! in a dense table indexed by frame number, as `folio->lru` is a list head inside the folio itself
//! (include/linux/mm_types.h; mm/swap.c `lruvec_add_folio`, `lruvec_del_folio`).
//!
//! Adding at the head, taking the tail and removing any frame are O(1). The links table grows in chunks
//! of 512 frames allocated when a frame of the chunk first goes on a list, 24 bytes per frame.

use peerdma_core::FrameId;

use crate::phys::{Frame, FrameOwner, LruState, PhysMem};

/// Frames per links chunk.
const CHUNK: usize = 512;
/// "No frame" in a link.
const NIL: u64 = u64::MAX;
/// The `gen_active` of a frame on no list.
const OFF: u64 = u64::MAX;
/// The bit of `gen_active` that says the active list.
const ACTIVE_BIT: u64 = 1 << 63;

/// Where a frame sits on the LRU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LruEntry {
    /// On the active list (else the inactive one).
    pub(super) active: bool,
    /// The frame's generation when it was added: a freed and reallocated frame no longer matches.
    pub(super) generation: u64,
}

/// One frame's links: its neighbours towards the head (`prev`, newer) and the tail (`next`, older), and
/// its generation with the list bit ([`OFF`] when on no list).
#[derive(Clone, Copy, Debug)]
struct Link {
    prev: u64,
    next: u64,
    gen_active: u64,
}

const FREE_LINK: Link = Link {
    prev: NIL,
    next: NIL,
    gen_active: OFF,
};

/// One list's ends and length.
#[derive(Clone, Copy, Debug)]
struct List {
    /// Newest.
    head: u64,
    /// Oldest.
    tail: u64,
    len: u64,
}

impl Default for List {
    fn default() -> Self {
        Self {
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }
}

/// The anonymous active and inactive lists of one RAM node (`lruvec`).
///
/// A frame freed while on a list is logged by [`PhysMem::put`] and its entry dropped when the log is
/// drained ([`super::Swap::drain_freed`]: at the start of each reclaim pass and before each addition), so
/// no operation walks the lists.
#[derive(Debug, Default)]
pub struct AnonLru {
    lists: [List; 2],
    links: Vec<Option<Box<[Link; CHUNK]>>>,
}

fn split(f: u64) -> (usize, usize) {
    let f = usize::try_from(f).expect("frame index fits usize");
    (f / CHUNK, f % CHUNK)
}

impl AnonLru {
    fn link(&self, f: u64) -> Link {
        let (c, i) = split(f);
        self.links
            .get(c)
            .and_then(Option::as_ref)
            .map_or(FREE_LINK, |ch| ch[i])
    }

    fn link_mut(&mut self, f: u64) -> &mut Link {
        let (c, i) = split(f);
        if self.links.len() <= c {
            self.links.resize_with(c + 1, || None);
        }
        &mut self.links[c].get_or_insert_with(|| Box::new([FREE_LINK; CHUNK]))[i]
    }

    /// The entry of `frame`, if it is on a list.
    pub(super) fn entry(&self, frame: FrameId) -> Option<LruEntry> {
        let g = self.link(frame.0).gen_active;
        (g != OFF).then_some(LruEntry {
            active: g & ACTIVE_BIT != 0,
            generation: g & !ACTIVE_BIT,
        })
    }

    /// Every frame on a list with its entry (tests).
    #[cfg(test)]
    pub(super) fn entries(&self) -> Vec<(FrameId, LruEntry)> {
        let mut out = Vec::new();
        for active in [false, true] {
            let mut f = self.lists[usize::from(active)].head;
            while f != NIL {
                out.extend(self.entry(FrameId(f)).map(|e| (FrameId(f), e)));
                f = self.link(f).next;
            }
        }
        out
    }

    /// Puts `frame` at the head of a list (taking it off any list first) and records it in the frame.
    pub(super) fn add_head(&mut self, fr: &mut Frame, frame: FrameId, active: bool) {
        self.remove(frame);
        debug_assert!(fr.generation & ACTIVE_BIT == 0, "generation below 2^63");
        let list = &mut self.lists[usize::from(active)];
        let old_head = list.head;
        list.head = frame.0;
        if old_head == NIL {
            list.tail = frame.0;
        }
        list.len += 1;
        *self.link_mut(frame.0) = Link {
            prev: NIL,
            next: old_head,
            gen_active: fr.generation | if active { ACTIVE_BIT } else { 0 },
        };
        if old_head != NIL {
            self.link_mut(old_head).prev = frame.0;
        }
        fr.lru = if active {
            LruState::Active
        } else {
            LruState::Inactive
        };
    }

    /// Returns whether `frame` (with metadata `fr`) is on the active list.
    pub(super) fn is_active(&self, fr: &Frame, frame: FrameId) -> bool {
        self.entry(frame).is_some_and(|e| {
            e.active && e.generation == fr.generation && fr.lru == LruState::Active
        })
    }

    /// Takes `frame` off its list, if it is on one; returns its entry.
    pub(super) fn remove(&mut self, frame: FrameId) -> Option<LruEntry> {
        let e = self.entry(frame)?;
        let l = self.link(frame.0);
        let list = &mut self.lists[usize::from(e.active)];
        list.len -= 1;
        if l.prev == NIL {
            list.head = l.next;
        }
        if l.next == NIL {
            list.tail = l.prev;
        }
        if l.prev != NIL {
            self.link_mut(l.prev).next = l.next;
        }
        if l.next != NIL {
            self.link_mut(l.next).prev = l.prev;
        }
        *self.link_mut(frame.0) = FREE_LINK;
        Some(e)
    }

    /// Takes the tail (oldest) frame off a list.
    pub(super) fn pop_tail(&mut self, active: bool) -> Option<(FrameId, LruEntry)> {
        let t = self.lists[usize::from(active)].tail;
        if t == NIL {
            return None;
        }
        let e = self
            .remove(FrameId(t))
            .expect("listed frames have an entry");
        Some((FrameId(t), e))
    }

    /// Returns whether the entry still describes the frame: allocated since as the same anonymous page and
    /// not moved by anyone else.
    pub(super) fn current(phys: &PhysMem, frame: FrameId, e: LruEntry) -> bool {
        let fr = phys.frame(frame);
        let state = if e.active {
            LruState::Active
        } else {
            LruState::Inactive
        };
        fr.owner() == FrameOwner::Anon && fr.generation == e.generation && fr.lru == state
    }

    /// Drops the entry of `frame`, freed since it was added, unless the frame came back to a list as a new
    /// page since (its entry is then current).
    pub(super) fn forget_freed(&mut self, phys: &PhysMem, frame: FrameId) {
        if let Some(e) = self.entry(frame)
            && !Self::current(phys, frame, e)
        {
            self.remove(frame);
        }
    }

    /// Returns the number of entries on a list (including those of frames freed since the log of freed
    /// frames was last drained).
    pub(super) fn len(&self, active: bool) -> u64 {
        self.lists[usize::from(active)].len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lists keep the order of a sequence-numbered map (the structure they replace): head insertion,
    /// tail removal and removal from the middle, on both lists.
    #[test]
    fn lists_keep_insertion_order() {
        let mut lru = AnonLru::default();
        let mut model: [std::collections::BTreeMap<u64, u64>; 2] = Default::default();
        let mut seq = 0u64;
        let mut fr = Frame::default();
        let mut x = 12345u64;
        for _ in 0..3000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let f = x % 700 + 1000;
            let active = x & (1 << 20) != 0;
            match (x >> 32) % 4 {
                0 | 1 => {
                    for m in &mut model {
                        m.retain(|_, &mut g| g != f);
                    }
                    fr.generation = f * 3;
                    lru.add_head(&mut fr, FrameId(f), active);
                    model[usize::from(active)].insert(seq, f);
                    seq += 1;
                }
                2 => {
                    let got = lru.pop_tail(active).map(|(g, _)| g.0);
                    let want = model[usize::from(active)].pop_first().map(|(_, g)| g);
                    assert_eq!(got, want);
                }
                _ => {
                    let e = lru.remove(FrameId(f));
                    let on = model.iter().position(|m| m.values().any(|&g| g == f));
                    assert_eq!(e.map(|e| usize::from(e.active)), on);
                    assert_eq!(e.map(|e| e.generation), on.map(|_| f * 3));
                    for m in &mut model {
                        m.retain(|_, &mut g| g != f);
                    }
                }
            }
            for active in [false, true] {
                assert_eq!(lru.len(active), model[usize::from(active)].len() as u64);
            }
        }
        let listed: Vec<u64> = lru.entries().iter().map(|(f, _)| f.0).collect();
        let want: Vec<u64> = model
            .iter()
            .flat_map(|m| m.values().rev().copied())
            .collect();
        assert_eq!(listed, want, "head to tail, inactive then active");
    }
}
