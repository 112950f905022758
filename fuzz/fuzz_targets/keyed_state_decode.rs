//! Keyed state's own bytes read back, and its key layout:
//! - a state descriptors file decodes or errors (never panics), and what decodes encodes back to
//!   the same bytes (the input is also tried sealed, its CRC-32 appended, to pass the checksum);
//! - map keys decode or error, and what decodes re-encodes to the same bytes (the
//!   order-preserving encoding is canonical); two keys decoded from the two parts of the input
//!   compare as their bytes do (the encoding preserves order);
//! - state keys (`key length | key | namespace`, `state::split_state_key`) split or error, and
//!   what splits is rebuilt by `StateKey` to the same bytes; integer keys and namespaces
//!   (`StateKey::set_i64`, `push_namespace_i64`) sort as the numbers do and read back;
//! - rendering values and keys by a type name taken from the input never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sabot_kernel::state::codec;
use sabot_kernel::state::keyed::{decode_descriptors, encode_descriptors};
use sabot_kernel::state::map_key::{self, MapKey};
use sabot_kernel::state::{order_preserving_i64_inverse, read_u64_be, split_state_key, StateKey};

fn check_key<K: MapKey + Ord + std::fmt::Debug>(data: &[u8], other: &[u8]) {
    let Ok(key) = K::decode_whole(data) else { return };
    let mut again = Vec::new();
    key.encode_key(&mut again, true);
    assert_eq!(again, data, "map key {} is not canonical", K::NAME);
    if let Ok(other_key) = K::decode_whole(other) {
        assert_eq!(key.cmp(&other_key), data.cmp(other), "map keys {key:?} and {other_key:?} ({})", K::NAME);
    }
}

fn check_state_key(data: &[u8]) {
    if let Ok((key, namespace)) = split_state_key(data) {
        let mut rebuilt = StateKey::new();
        let rebuilt = rebuilt.set_bytes(key).expect("a key that fits u16");
        let mut bytes = rebuilt.as_bytes().to_vec();
        bytes.extend_from_slice(namespace);
        assert_eq!(bytes, data, "state key rebuilt");
    }
    // Integer keys and namespaces: two (key, namespace) pairs from the input's first 32 bytes.
    let Some(words) = data.get(..32) else { return };
    let word = |at: usize| i64::from_le_bytes(words[at * 8..at * 8 + 8].try_into().expect("eight bytes"));
    let encode = |key: i64, namespace: i64| {
        let mut state_key = StateKey::new();
        state_key.set_i64(key).push_namespace_i64(namespace);
        state_key.as_bytes().to_vec()
    };
    let (a, b) = ((word(0), word(1)), (word(2), word(3)));
    let (bytes_a, bytes_b) = (encode(a.0, a.1), encode(b.0, b.1));
    assert_eq!(a.cmp(&b), bytes_a.cmp(&bytes_b), "state keys of {a:?} and {b:?} sort as the numbers do");
    let (key, namespace) = split_state_key(&bytes_a).expect("an encoded state key splits");
    assert_eq!(order_preserving_i64_inverse(read_u64_be(key).expect("eight bytes")), a.0);
    assert_eq!(order_preserving_i64_inverse(read_u64_be(namespace).expect("eight bytes")), a.1);
}

fuzz_target!(|data: &[u8]| {
    let mut sealed = data.to_vec();
    sealed.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    for bytes in [data, &sealed] {
        if let Ok(states) = decode_descriptors(bytes) {
            assert_eq!(encode_descriptors(&states), bytes, "descriptors do not round-trip");
        }
    }
    // A second key from the input's second half, for the order checks.
    let (first, second) = data.split_at(data.len() / 2);
    for (one, other) in [(data, second), (first, second)] {
        check_key::<u64>(one, other);
        check_key::<i64>(one, other);
        check_key::<i32>(one, other);
        check_key::<bool>(one, other);
        check_key::<String>(one, other);
        check_key::<(String, i64)>(one, other);
        check_key::<(Vec<u8>, bool, String)>(one, other);
    }
    check_state_key(data);
    // A type name from the first bytes, then the value's bytes.
    if let Some((&split, rest)) = data.split_first() {
        let (name, value) = rest.split_at(usize::from(split).min(rest.len()));
        if let Ok(name) = std::str::from_utf8(name) {
            let _ = codec::render(name, value);
            let _ = map_key::render(name, value);
        }
    }
});
