//! A reader's number for each customer of its file (see `Arrival` in the parent module).

use rustc_hash::FxHashMap;

/// A reader's number for each customer it has seen, by id: an open-addressing table, so that
/// the reader can start loading the slot of a row's customer a few rows ahead
/// ([`CustomerNumbers::prefetch`]). On a large shop the table is far bigger than the CPU's
/// caches and every customer is somewhere else in it, so each lookup would otherwise wait on
/// memory. An id of up to [`SHORT_ID_MAX`] bytes (nearly every real one) is held in its slot
/// itself, so the lookup compares words that arrived with the slot; longer ids go to a map of
/// their own.
pub(super) struct CustomerNumbers {
    /// Linear probing, at most half full; the length is a power of two.
    slots: Vec<Slot>,
    short: usize,
    pub(super) long: FxHashMap<Box<str>, usize>,
}

/// A slot of [`CustomerNumbers`], 32 bytes, so that it never straddles two cache lines: a short
/// id (its length, its bytes, then zeros: [`SHORT_ID_MAX`] + 1 bytes, little-endian in the
/// words), and in the last word's top half the customer's number plus one (0: the slot is
/// empty). Plain words, so a new table is allocated zeroed, as fresh pages already are, rather
/// than written.
type Slot = [u64; 4];
pub(super) const SHORT_ID_MAX: usize = 27;
/// The last word's bits that hold id bytes.
const ID_BITS_OF_LAST: u64 = u32::MAX as u64;

/// Slots of a new table.
const FIRST_SLOTS: usize = 1 << 12;

/// A short customer id as a slot holds it, with its hash: what a lookup needs, worked out from
/// the id alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CustomerKey {
    words: Slot,
    hash: u64,
}

impl CustomerKey {
    /// The key of `id`, or `None` for an id longer than [`SHORT_ID_MAX`] bytes.
    fn of(id: &str) -> Option<Self> {
        let bytes = id.as_bytes();
        let len = u8::try_from(bytes.len())
            .ok()
            .filter(|&l| usize::from(l) <= SHORT_ID_MAX)?;
        let mut text = [0u8; 32];
        text[0] = len;
        text[1..=bytes.len()].copy_from_slice(bytes);
        let mut words = [0; 4];
        for (word, eight) in words.iter_mut().zip(text.chunks_exact(8)) {
            let mut b = [0; 8];
            b.copy_from_slice(eight);
            *word = u64::from_le_bytes(b);
        }
        Some(Self {
            words,
            hash: xxhash_rust::xxh3::xxh3_64(&text),
        })
    }

    /// The key of the id a filled slot holds.
    fn of_slot(slot: &Slot) -> Self {
        let mut words = *slot;
        words[3] &= ID_BITS_OF_LAST;
        let mut text = [0; 32];
        for (eight, word) in text.chunks_exact_mut(8).zip(&words) {
            eight.copy_from_slice(&word.to_le_bytes());
        }
        Self {
            words,
            hash: xxhash_rust::xxh3::xxh3_64(&text),
        }
    }
}

impl Default for CustomerNumbers {
    fn default() -> Self {
        Self {
            slots: vec![[0; 4]; FIRST_SLOTS],
            short: 0,
            long: FxHashMap::default(),
        }
    }
}

impl CustomerNumbers {
    /// Where the search for `key` starts.
    fn home(&self, key: &CustomerKey) -> usize {
        // The table's length is a power of two; the hash's low bits pick the slot.
        (key.hash as usize) & (self.slots.len() - 1)
    }

    /// The slot holding `key`, or the empty slot where it would go.
    fn find(&self, key: &CustomerKey) -> usize {
        let mask = self.slots.len() - 1;
        let mut at = self.home(key);
        loop {
            let slot = &self.slots[at];
            if number_in(slot) == 0
                || (slot[..3] == key.words[..3] && slot[3] & ID_BITS_OF_LAST == key.words[3])
            {
                return at;
            }
            at = (at + 1) & mask;
        }
    }

    /// Starts loading the slot where a lookup of `id` begins: a hint, which changes nothing.
    pub(super) fn prefetch(&self, id: &str) {
        if let Some(key) = CustomerKey::of(id) {
            prefetch(&self.slots[self.home(&key)]);
        }
    }

    /// The number of customer `id`, if seen.
    #[cfg(test)]
    fn get(&self, id: &str) -> Option<usize> {
        self.get_keyed(id, CustomerKey::of(id).as_ref())
    }

    /// [`CustomerNumbers::get`], with `id`'s key ([`CustomerKey::of`]).
    fn get_keyed(&self, id: &str, key: Option<&CustomerKey>) -> Option<usize> {
        match key {
            Some(key) => {
                let number = number_in(&self.slots[self.find(key)]);
                (number > 0).then(|| number as usize - 1)
            }
            None => self.long.get(id).copied(),
        }
    }

    /// The number of customer `id`, numbering them with the next number if new.
    pub(super) fn number(&mut self, id: &str) -> usize {
        let key = CustomerKey::of(id);
        match self.get_keyed(id, key.as_ref()) {
            Some(number) => number,
            None => self.insert_keyed(id, key.as_ref()),
        }
    }

    /// Numbers customer `id` (not seen before) with the next number, and returns it.
    #[cfg(test)]
    fn insert(&mut self, id: &str) -> usize {
        self.insert_keyed(id, CustomerKey::of(id).as_ref())
    }

    /// [`CustomerNumbers::insert`], with `id`'s key ([`CustomerKey::of`]).
    fn insert_keyed(&mut self, id: &str, key: Option<&CustomerKey>) -> usize {
        let number = self.short + self.long.len();
        let Some(key) = key else {
            self.long.insert(id.into(), number);
            return number;
        };
        if 2 * (self.short + 1) > self.slots.len() {
            self.grow();
        }
        let at = self.find(key);
        // A reader numbers fewer customers than a u32 holds: each took a row.
        let stored = u32::try_from(number + 1).unwrap_or(u32::MAX);
        let mut slot = key.words;
        slot[3] |= u64::from(stored) << 32;
        self.slots[at] = slot;
        self.short += 1;
        number
    }

    /// Doubles the table, placing every id again.
    fn grow(&mut self) {
        let doubled = vec![[0; 4]; self.slots.len() * 2];
        let old = std::mem::replace(&mut self.slots, doubled);
        for slot in old.into_iter().filter(|s| number_in(s) > 0) {
            let at = self.find(&CustomerKey::of_slot(&slot));
            self.slots[at] = slot;
        }
    }
}

/// The number plus one a slot holds (0: empty).
fn number_in(slot: &Slot) -> u32 {
    (slot[3] >> 32) as u32
}

/// Asks the CPU to start loading the cache line that holds `value`.
#[inline]
pub(super) fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint to the cache: it neither reads into the program nor faults,
    // whatever the address, and this one is a live reference's.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(value).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn customers_are_numbered_in_first_seen_order_whatever_their_id_length() {
        let mut numbers = CustomerNumbers::default();
        let at_limit = "x".repeat(SHORT_ID_MAX);
        let past_limit = "x".repeat(SHORT_ID_MAX + 1);
        let ids = [
            "a",
            "ab",
            at_limit.as_str(),
            past_limit.as_str(),
            "b",
            "a\u{0}",
        ];
        for (expected, id) in ids.iter().enumerate() {
            assert_eq!(numbers.get(id), None, "{id:?} is new");
            assert_eq!(numbers.insert(id), expected);
        }
        for (expected, id) in ids.iter().enumerate() {
            assert_eq!(numbers.get(id), Some(expected), "{id:?}");
        }
        assert_eq!(numbers.get("x"), None);
        assert_eq!(numbers.get(&"x".repeat(SHORT_ID_MAX + 2)), None);
        assert_eq!(numbers.long.len(), 1, "only the id past the limit is boxed");
    }

    #[test]
    fn a_grown_table_finds_every_customer_it_numbered() {
        // Enough customers to double the table three times, each found again with its number.
        let mut numbers = CustomerNumbers::default();
        let ids: Vec<String> = (0..8 * FIRST_SLOTS).map(|i| format!("C{i:07}")).collect();
        for (expected, id) in ids.iter().enumerate() {
            assert_eq!(numbers.number(id), expected);
        }
        assert!(numbers.slots.len() >= 16 * FIRST_SLOTS);
        for (expected, id) in ids.iter().enumerate() {
            assert_eq!(numbers.get(id), Some(expected));
        }
    }

    #[test]
    fn a_slot_gives_back_its_ids_key() {
        let mut numbers = CustomerNumbers::default();
        let key = CustomerKey::of("C0067642").unwrap();
        let at = numbers.find(&key);
        numbers.insert("C0067642");
        assert_eq!(CustomerKey::of_slot(&numbers.slots[at]), key);
    }
}
