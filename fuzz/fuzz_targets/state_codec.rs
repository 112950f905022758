//! State values read back: every codec decodes arbitrary bytes or errors, never panics, and
//! whatever decodes encodes back to exactly the bytes it came from (the encoding is canonical).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sabot_kernel::state::codec::StateCodec;

fn check<T: StateCodec>(data: &[u8]) {
    if let Ok(value) = T::decode(data) {
        let mut again = Vec::new();
        value.encode(&mut again);
        assert_eq!(again, data, "{} is not canonical", T::NAME);
    }
}

fuzz_target!(|data: &[u8]| {
    check::<u64>(data);
    check::<bool>(data);
    check::<String>(data);
    check::<Vec<u8>>(data);
    check::<Option<(i64, String)>>(data);
    check::<Vec<Option<Vec<u16>>>>(data);
    check::<(u8, Vec<String>, bool)>(data);
});
