//! Keyed state's own bytes read back: a state descriptors file decodes or errors (never panics)
//! and what decodes encodes back to the same bytes; map keys decode or error, and what decodes
//! re-encodes to the same bytes (the order-preserving encoding is canonical); rendering values
//! and keys by a type name taken from the input never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sabot_kernel::state::keyed::{decode_descriptors, encode_descriptors};
use sabot_kernel::state::map_key::{self, MapKey};
use sabot_kernel::state::codec;

fn check_key<K: MapKey>(data: &[u8]) {
    if let Ok(key) = K::decode_whole(data) {
        let mut again = Vec::new();
        key.encode_key(&mut again, true);
        assert_eq!(again, data, "map key {} is not canonical", K::NAME);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(states) = decode_descriptors(data) {
        assert_eq!(encode_descriptors(&states), data, "descriptors do not round-trip");
    }
    check_key::<u64>(data);
    check_key::<i64>(data);
    check_key::<String>(data);
    check_key::<(String, i64)>(data);
    check_key::<(Vec<u8>, bool, String)>(data);
    // A type name from the first bytes, then the value's bytes.
    if let Some((&split, rest)) = data.split_first() {
        let (name, value) = rest.split_at(usize::from(split).min(rest.len()));
        if let Ok(name) = std::str::from_utf8(name) {
            let _ = codec::render(name, value);
            let _ = map_key::render(name, value);
        }
    }
});
