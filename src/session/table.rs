//! The pins' storage: a striped open-addressing hash table laid out for one memory access per
//! lookup.
//!
//! Looking up a pin is on the path of every keyed legacy request, and with many studies live
//! the pin is almost never in cache: between two requests of one study, thousands of other
//! requests stream their buffers through the caches. So the layout is about memory accesses:
//! - a pin sits in the slot its hash names, or a few slots after it (linear probing), and a slot
//!   is one cache line: one miss per lookup, where control bytes plus entries cost two;
//! - [`PinTable::prefetch`] starts that miss before the lookup needs it;
//! - every stripe lives in one allocation, in 2 MiB pages once it is that large, so a lookup
//!   rarely misses the TLB too (a page walk costs as much as the miss itself under
//!   virtualisation, where proxies mostly run).
//!
//! Each of [`STRIPES`] stripes is its own table behind its own lock, so requests on different
//! cores rarely share one. Stripes grow together, doubling, under every lock; that is rare
//! (log₂ of the table's size times in all) and bounded by the `max_active` cap. Removal shifts
//! later entries back instead of leaving tombstones, so probe runs never grow with churn.
//!
//! What a pin means and when it ends is [`crate::session`]'s business; this is only storage.

use std::alloc::{self, Layout};
use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::Entry;

/// How many stripes, each with its own lock.
pub(super) const STRIPES: usize = 64;

/// The stripe of a key's hash. Bits 32..38 pick it: the low bits pick the slot within it.
pub(super) fn stripe_of(hash: u64) -> usize {
    ((hash >> 32) as usize) % STRIPES
}

/// One slot, one cache line. `hash` is the full hash of the key in `entry`, compared before the
/// key so probing past other keys rarely reads them.
#[repr(align(64))]
#[derive(Default)]
struct Slot {
    hash: u64,
    entry: Option<Entry>,
}
// One lookup, one cache line: an `Entry` that grows past 56 bytes would make it two.
const _: () = assert!(size_of::<Slot>() == 64);

const HUGE_PAGE: usize = 2 << 20;

/// A stripe grows once more than 3/4 of its slots are taken: linear probing stays short below
/// that, and a stripe is never full, so every probe ends at an empty slot.
fn max_len(slots: usize) -> usize {
    slots / 4 * 3
}

/// Every stripe's slots in one allocation: stripe `i` owns slots `i * per_stripe ..
/// (i + 1) * per_stripe`, `per_stripe` a power of two.
struct Arena {
    slots: NonNull<Slot>,
    per_stripe: usize,
}

impl Arena {
    fn layout(per_stripe: usize) -> Layout {
        let size = (STRIPES * size_of::<Slot>()).checked_mul(per_stripe).expect("pin table size overflows");
        let align = if size >= HUGE_PAGE { HUGE_PAGE } else { align_of::<Slot>() };
        Layout::from_size_align(size, align).expect("pin table size overflows")
    }

    fn new(per_stripe: usize) -> Arena {
        let layout = Arena::layout(per_stripe);
        // SAFETY: the layout has a non-zero size (STRIPES and per_stripe are at least 1).
        let raw = unsafe { alloc::alloc(layout) }.cast::<Slot>();
        let Some(slots) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        #[cfg(target_os = "linux")]
        if layout.align() == HUGE_PAGE {
            // Asked before the first write, so the kernel backs it with huge pages from the
            // start. Only advice: where it is refused the table works the same, a little slower.
            // SAFETY: the range is exactly the allocation just made.
            unsafe { libc::madvise(raw.cast(), layout.size(), libc::MADV_HUGEPAGE) };
        }
        for i in 0..STRIPES * per_stripe {
            // SAFETY: `i` is within the allocation, and the slot is not yet initialised.
            unsafe { raw.add(i).write(Slot::default()) };
        }
        Arena { slots, per_stripe }
    }

    /// Where stripe `stripe`'s slots start.
    fn stripe_start(&self, stripe: usize) -> NonNull<Slot> {
        // SAFETY: `stripe < STRIPES`, so the offset stays within the allocation.
        unsafe { self.slots.add(stripe * self.per_stripe) }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        let layout = Arena::layout(self.per_stripe);
        // SAFETY: every slot was initialised in `new`, and `&mut self` means no stripe is
        // borrowed; the layout is the one allocated with.
        unsafe {
            std::ptr::drop_in_place(std::ptr::slice_from_raw_parts_mut(
                self.slots.as_ptr(),
                STRIPES * self.per_stripe,
            ));
            alloc::dealloc(self.slots.as_ptr().cast(), layout);
        }
    }
}

pub(super) struct PinTable {
    /// Lock `i` guards stripe `i` of the arena and holds its number of entries.
    locks: Box<[RwLock<usize>]>,
    /// Held while making a larger arena, so threads that need room at once make one between
    /// them.
    growing: Mutex<()>,
    /// Replaced only by [`PinTable::grow`], with every lock held for writing.
    arena: UnsafeCell<Arena>,
    /// The arena's address and stripe size, for [`PinTable::prefetch`] without a lock.
    hint: (AtomicUsize, AtomicUsize),
}

// SAFETY: the arena is only reached through a stripe's lock (stripe data) or with every lock
// held (the arena itself), and entries are Send + Sync (checked below).
unsafe impl Send for PinTable {}
// SAFETY: as for Send: every access to the arena goes through the locks.
unsafe impl Sync for PinTable {}
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<Entry>()
};

impl PinTable {
    /// A table with room for about `capacity` entries before it first grows.
    pub(super) fn with_capacity(capacity: usize) -> Self {
        // A margin over the even share: stripes fill unevenly, and the fullest one grows them all.
        let share = capacity / STRIPES;
        let mut per_stripe = 8;
        while max_len(per_stripe) < share + share / 8 + 1 {
            per_stripe *= 2;
        }
        let arena = Arena::new(per_stripe);
        let hint = (AtomicUsize::new(arena.slots.as_ptr() as usize), AtomicUsize::new(per_stripe));
        PinTable {
            locks: (0..STRIPES).map(|_| RwLock::new(0)).collect(),
            growing: Mutex::new(()),
            arena: UnsafeCell::new(arena),
            hint,
        }
    }

    pub(super) fn read(&self, stripe: usize) -> StripeRead<'_> {
        let len = self.locks[stripe].read().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the lock keeps the arena in place.
        let arena = unsafe { &*self.arena.get() };
        StripeRead { len, start: arena.stripe_start(stripe), slots: arena.per_stripe, _slots: PhantomData }
    }

    pub(super) fn write(&self, stripe: usize) -> StripeWrite<'_> {
        let len = self.locks[stripe].write().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the lock keeps the arena in place.
        let arena = unsafe { &*self.arena.get() };
        StripeWrite { len, start: arena.stripe_start(stripe), slots: arena.per_stripe, _slots: PhantomData }
    }

    /// [`PinTable::write`], growing the table first if the stripe has no room for one more.
    /// [`PinTable::reserve`] normally grows it before that, off the request path.
    pub(super) fn write_with_room(&self, stripe: usize) -> StripeWrite<'_> {
        loop {
            let stripe_write = self.write(stripe);
            if stripe_write.has_room() {
                return stripe_write;
            }
            let per_stripe = stripe_write.slots;
            drop(stripe_write);
            self.grow(per_stripe);
        }
    }

    /// Grows the table once a stripe is 5/8 full, so the request that would fill it to 3/4 rarely
    /// has to. For a background thread: making a larger arena takes long (at a million pins,
    /// 128 MiB of fresh huge pages take a few hundred milliseconds), only moving the entries
    /// holds the locks.
    pub(super) fn reserve(&self) {
        let (fullest, per_stripe) = (0..STRIPES)
            .map(|i| {
                let stripe = self.read(i);
                (*stripe.len, stripe.slots)
            })
            .max()
            .unwrap_or_default();
        if fullest > per_stripe / 8 * 5 {
            self.grow(per_stripe);
        }
    }

    /// Doubles every stripe, unless another thread already grew them past `per_stripe` slots.
    /// Only moving the entries holds the locks: the new arena is made before, the old one freed
    /// after.
    fn grow(&self, per_stripe: usize) {
        let _growing = self.growing.lock().unwrap_or_else(|p| p.into_inner());
        if self.hint.1.load(Ordering::Relaxed) != per_stripe {
            return; // another thread grew it meanwhile
        }
        let bigger = Arena::new(per_stripe * 2);
        let guards: Vec<RwLockWriteGuard<'_, usize>> =
            self.locks.iter().map(|lock| lock.write().unwrap_or_else(|p| p.into_inner())).collect();
        // SAFETY: every lock is held for writing, so no stripe of the arena is borrowed.
        let arena = unsafe { &mut *self.arena.get() };
        // Only a thread holding `growing` replaces the arena, and it updates the hint before
        // letting go, so the check above saw the arena as it is.
        debug_assert_eq!(arena.per_stripe, per_stripe);
        for i in 0..STRIPES {
            // SAFETY: every lock is held, so nothing else borrows either arena; each stripe is
            // borrowed once, for this iteration.
            let (from, to) = unsafe {
                (
                    std::slice::from_raw_parts_mut(arena.stripe_start(i).as_ptr(), arena.per_stripe),
                    std::slice::from_raw_parts_mut(bigger.stripe_start(i).as_ptr(), bigger.per_stripe),
                )
            };
            for slot in from {
                if let Some(entry) = slot.entry.take() {
                    place(to, slot.hash, entry);
                }
            }
        }
        let old = std::mem::replace(arena, bigger);
        self.hint.0.store(arena.slots.as_ptr() as usize, Ordering::Relaxed);
        self.hint.1.store(arena.per_stripe, Ordering::Relaxed);
        drop(guards);
        // Its slots are all empty now: dropping it only frees it.
        drop(old);
    }

    /// Asks the CPU to start loading `hash`'s home slot, so a lookup soon after does not wait
    /// for memory. Only a hint: read without a lock, so it may name a slot of an arena just
    /// replaced; then the load is wasted, never wrong, because nothing is read through it.
    #[inline]
    pub(super) fn prefetch(&self, hash: u64) {
        let base = self.hint.0.load(Ordering::Relaxed);
        let per_stripe = self.hint.1.load(Ordering::Relaxed);
        let slot = stripe_of(hash) * per_stripe + (hash as usize & (per_stripe - 1));
        let address = base.wrapping_add(slot * size_of::<Slot>());
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch reads nothing into the program and cannot fault, whatever the address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(address as *const i8);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = address;
    }
}

/// The slot holding `key` in a stripe, if any.
fn position(slots: &[Slot], hash: u64, key: &str) -> Option<usize> {
    let mask = slots.len() - 1;
    let mut i = hash as usize & mask;
    loop {
        let slot = &slots[i];
        match &slot.entry {
            None => return None,
            Some(entry) if slot.hash == hash && entry.key == key => return Some(i),
            Some(_) => i = (i + 1) & mask,
        }
    }
}

fn find<'s>(slots: &'s [Slot], hash: u64, key: &str) -> Option<&'s Entry> {
    position(slots, hash, key).and_then(|i| slots[i].entry.as_ref())
}

/// Puts an entry in the first free slot from its home; the stripe has one.
fn place(slots: &mut [Slot], hash: u64, entry: Entry) {
    let mask = slots.len() - 1;
    let mut i = hash as usize & mask;
    while slots[i].entry.is_some() {
        i = (i + 1) & mask;
    }
    slots[i] = Slot { hash, entry: Some(entry) };
}

/// A stripe under its read lock. It holds the stripe's address, not a slice, and lends the
/// slice only while borrowed itself: a reference kept across the lock's release, even inside
/// `drop`, could outlive an arena a growing thread frees.
pub(super) struct StripeRead<'t> {
    len: RwLockReadGuard<'t, usize>,
    start: NonNull<Slot>,
    slots: usize,
    _slots: PhantomData<&'t [Slot]>,
}

impl StripeRead<'_> {
    fn slots(&self) -> &[Slot] {
        // SAFETY: the read lock, held as long as `self`, keeps the stripe in place and unchanged.
        unsafe { std::slice::from_raw_parts(self.start.as_ptr(), self.slots) }
    }

    pub(super) fn find(&self, hash: u64, key: &str) -> Option<&Entry> {
        find(self.slots(), hash, key)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.slots().iter().filter_map(|slot| slot.entry.as_ref())
    }
}

/// A stripe under its write lock; see [`StripeRead`].
pub(super) struct StripeWrite<'t> {
    len: RwLockWriteGuard<'t, usize>,
    start: NonNull<Slot>,
    slots: usize,
    _slots: PhantomData<&'t mut [Slot]>,
}

impl StripeWrite<'_> {
    fn slots(&self) -> &[Slot] {
        // SAFETY: the write lock, held as long as `self`, makes the stripe ours alone.
        unsafe { std::slice::from_raw_parts(self.start.as_ptr(), self.slots) }
    }

    fn slots_mut(&mut self) -> &mut [Slot] {
        // SAFETY: as in `slots`, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.start.as_ptr(), self.slots) }
    }

    pub(super) fn find(&self, hash: u64, key: &str) -> Option<&Entry> {
        find(self.slots(), hash, key)
    }

    fn has_room(&self) -> bool {
        *self.len < max_len(self.slots)
    }

    /// Adds an entry whose key is not in the table. The stripe must have room
    /// ([`PinTable::write_with_room`]).
    pub(super) fn insert_unique(&mut self, hash: u64, entry: Entry) {
        assert!(self.has_room(), "pin table stripe is full");
        place(self.slots_mut(), hash, entry);
        *self.len += 1;
    }

    pub(super) fn remove(&mut self, hash: u64, key: &str) -> Option<Entry> {
        let mut hole = position(self.slots(), hash, key)?;
        *self.len -= 1;
        let slots = self.slots_mut();
        let removed = slots[hole].entry.take();
        // Backward shift: an entry after the hole moves into it unless its home slot lies
        // between the hole and where it sits, so every entry stays reachable from its home.
        let mask = slots.len() - 1;
        let mut i = hole;
        loop {
            i = (i + 1) & mask;
            if slots[i].entry.is_none() {
                return removed;
            }
            let home = slots[i].hash as usize & mask;
            if (i.wrapping_sub(home) & mask) >= (i.wrapping_sub(hole) & mask) {
                slots.swap(hole, i);
                hole = i;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PoolName;
    use crate::session::Pin;
    use std::sync::atomic::AtomicU32;

    fn entry(key: &str) -> Entry {
        Entry {
            key: key.into(),
            pin: Pin {
                pool: PoolName::V1,
                first_seen: 0,
                last_seen: AtomicU32::new(0),
                stored_last_seen: AtomicU32::new(0),
                seq: 0,
            },
        }
    }

    fn insert(table: &PinTable, hash: u64, key: &str) {
        table.write_with_room(stripe_of(hash)).insert_unique(hash, entry(key));
    }

    fn find(table: &PinTable, hash: u64, key: &str) -> Option<String> {
        table.read(stripe_of(hash)).find(hash, key).map(|e| e.key.to_string())
    }

    /// Every key of one stripe lands in its last five home slots, so runs are long, wrap around
    /// the stripe's end and overlap, through several growths: removal must keep every other key
    /// reachable.
    #[test]
    fn colliding_keys_stay_reachable_through_growth_and_removal() {
        let table = PinTable::with_capacity(0);
        let hash_of = |n: u64| (7 << 32) | (u32::MAX as u64 - n % 5);
        let keys: Vec<String> = (0..200).map(|n| n.to_string()).collect();
        for (n, key) in keys.iter().enumerate() {
            insert(&table, hash_of(n as u64), key);
        }
        for (n, key) in keys.iter().enumerate().filter(|(n, _)| n % 3 == 0) {
            let mut stripe = table.write(7);
            assert_eq!(stripe.remove(hash_of(n as u64), key).map(|e| e.key.to_string()), Some(key.clone()));
            assert!(stripe.remove(hash_of(n as u64), key).is_none(), "{key} removed twice");
        }
        for (n, key) in keys.iter().enumerate() {
            assert_eq!(find(&table, hash_of(n as u64), key), (n % 3 != 0).then(|| key.clone()), "key {key}");
        }
        assert_eq!(*table.write(7).len, 200 - 67);
        assert_eq!(table.read(7).iter().count(), 200 - 67);
        assert_eq!((0..STRIPES).map(|i| table.read(i).iter().count()).sum::<usize>(), 200 - 67);
        // A key with another key's hash is not found by that hash alone.
        assert!(find(&table, hash_of(1), "no-such-key").is_none());
    }

    fn per_stripe(table: &PinTable) -> usize {
        table.read(0).slots
    }

    /// The background upkeep grows the table before a request has to.
    #[test]
    fn reserve_grows_once_a_stripe_is_five_eighths_full() {
        let table = PinTable::with_capacity(0);
        assert_eq!(per_stripe(&table), 8);
        let in_stripe_3 = |n: u64| (3 << 32) | n;
        for n in 0..5 {
            insert(&table, in_stripe_3(n), &n.to_string());
        }
        table.reserve();
        assert_eq!(per_stripe(&table), 8, "5 of 8 is not yet over 5/8");
        insert(&table, in_stripe_3(5), "5");
        table.reserve();
        assert_eq!(per_stripe(&table), 16);
        assert_eq!(*table.read(3).len, 6);
        assert!((0..6).all(|n| find(&table, in_stripe_3(n), &n.to_string()).is_some()));
    }

    /// Spread keys through growths past the huge-page size: every one stays findable, no stripe
    /// ever fills, and concurrent readers see every key present before they started.
    #[test]
    fn the_table_grows_without_losing_keys_under_concurrent_lookups() {
        let table = PinTable::with_capacity(5);
        let hash_of = |n: u64| n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for n in 0..1000u64 {
            insert(&table, hash_of(n), &n.to_string());
        }
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                for round in 0..20 {
                    for n in (round..1000u64).step_by(7) {
                        assert!(find(&table, hash_of(n), &n.to_string()).is_some(), "{n} lost during growth");
                        table.prefetch(hash_of(n));
                    }
                }
            });
            for n in 1000..60_000u64 {
                insert(&table, hash_of(n), &n.to_string());
            }
            reader.join().unwrap();
        });
        let per_stripe = per_stripe(&table);
        assert!(
            STRIPES * per_stripe * size_of::<Slot>() > HUGE_PAGE,
            "the test should reach huge-page arenas"
        );
        for n in 0..60_000u64 {
            assert!(find(&table, hash_of(n), &n.to_string()).is_some(), "{n}");
        }
        for i in 0..STRIPES {
            assert!(*table.write(i).len <= max_len(per_stripe));
        }
    }
}
