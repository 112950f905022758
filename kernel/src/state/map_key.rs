//! Map-state keys as bytes whose order is the keys' order: the [`MapKey`] trait.
//!
//! A map state's entries are stored one per user key, under `… | namespace | user key`, so the
//! backend's key order is the iteration order. The encoding therefore preserves order:
//!
//! # Encoding (version 1)
//! - `u8`, `u16`, `u32`, `u64`: big-endian, fixed width.
//! - `i32`, `i64`: big-endian with the sign bit flipped (so negative numbers sort first).
//! - `bool`: one byte, `0` or `1`.
//! - `String` (UTF-8) and `Vec<u8>`: as the last part of a key, the bytes as they are (the key
//!   ends where they end); elsewhere escaped and terminated, each `0x00` written as `0x00 0xff`
//!   and the end as `0x00 0x01`, which sorts before any continuation.
//! - `(A, B)` and `(A, B, C)`: the parts in order, each but the last in its non-last form.
//!
//! Decoding never panics: malformed bytes are a [`CodecError`].

use super::codec::CodecError;

/// A type usable as a map state's key: an order-preserving, versioned encoding.
pub trait MapKey: Sized {
    /// The type, as a state's description names it.
    const NAME: &'static str;
    /// The version of the encoding in this module's documentation.
    const VERSION: u16 = 1;

    /// The full type with generic parts (see [`super::codec::StateCodec::type_name`]).
    fn type_name() -> String {
        if Self::VERSION == 1 {
            Self::NAME.to_string()
        } else {
            format!("{}@v{}", Self::NAME, Self::VERSION)
        }
    }

    /// Appends the key's bytes; `last` is whether nothing follows them in the stored key.
    fn encode_key(&self, out: &mut Vec<u8>, last: bool);

    /// Reads one key from the front of `bytes`, advancing past it; `last` as when encoded.
    fn decode_key(bytes: &mut &[u8], last: bool) -> Result<Self, CodecError>;

    /// Reads a key that is exactly `bytes`.
    fn decode_whole(mut bytes: &[u8]) -> Result<Self, CodecError> {
        let key = Self::decode_key(&mut bytes, true)?;
        if !bytes.is_empty() {
            return Err(error::<Self>(format!("{} bytes after the key", bytes.len())));
        }
        Ok(key)
    }
}

fn error<T: MapKey>(reason: impl Into<String>) -> CodecError {
    CodecError { codec: format!("map key {}", T::NAME), reason: reason.into() }
}

fn take<'a, T: MapKey>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], CodecError> {
    if bytes.len() < n {
        return Err(error::<T>(format!("needs {n} bytes, {} left", bytes.len())));
    }
    let (head, tail) = bytes.split_at(n);
    *bytes = tail;
    Ok(head)
}

macro_rules! unsigned_key {
    ($($type:ty => $name:literal),* $(,)?) => {$(
        impl MapKey for $type {
            const NAME: &'static str = $name;

            fn encode_key(&self, out: &mut Vec<u8>, _last: bool) {
                out.extend_from_slice(&self.to_be_bytes());
            }

            fn decode_key(bytes: &mut &[u8], _last: bool) -> Result<Self, CodecError> {
                let head = take::<Self>(bytes, std::mem::size_of::<$type>())?;
                Ok(<$type>::from_be_bytes(head.try_into().expect("taken at the width")))
            }
        }
    )*};
}

unsigned_key!(u8 => "u8", u16 => "u16", u32 => "u32", u64 => "u64");

macro_rules! signed_key {
    ($($type:ty, $unsigned:ty => $name:literal),* $(,)?) => {$(
        impl MapKey for $type {
            const NAME: &'static str = $name;

            fn encode_key(&self, out: &mut Vec<u8>, _last: bool) {
                let flipped = (*self as $unsigned) ^ (1 << (<$unsigned>::BITS - 1));
                out.extend_from_slice(&flipped.to_be_bytes());
            }

            fn decode_key(bytes: &mut &[u8], _last: bool) -> Result<Self, CodecError> {
                let head = take::<Self>(bytes, std::mem::size_of::<$type>())?;
                let flipped = <$unsigned>::from_be_bytes(head.try_into().expect("taken at the width"));
                Ok((flipped ^ (1 << (<$unsigned>::BITS - 1))) as $type)
            }
        }
    )*};
}

signed_key!(i32, u32 => "i32", i64, u64 => "i64");

impl MapKey for bool {
    const NAME: &'static str = "bool";

    fn encode_key(&self, out: &mut Vec<u8>, _last: bool) {
        out.push(u8::from(*self));
    }

    fn decode_key(bytes: &mut &[u8], _last: bool) -> Result<Self, CodecError> {
        match take::<Self>(bytes, 1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(error::<Self>(format!("byte {other}"))),
        }
    }
}

fn encode_bytes(bytes: &[u8], out: &mut Vec<u8>, last: bool) {
    if last {
        out.extend_from_slice(bytes);
        return;
    }
    for &byte in bytes {
        out.push(byte);
        if byte == 0 {
            out.push(0xff);
        }
    }
    out.extend_from_slice(&[0, 1]);
}

fn decode_bytes<T: MapKey>(bytes: &mut &[u8], last: bool) -> Result<Vec<u8>, CodecError> {
    if last {
        let all = bytes.to_vec();
        *bytes = &[];
        return Ok(all);
    }
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        match bytes.get(at) {
            None => return Err(error::<T>("no terminator")),
            Some(0) => match bytes.get(at + 1) {
                Some(0xff) => {
                    out.push(0);
                    at += 2;
                }
                Some(1) => {
                    *bytes = &bytes[at + 2..];
                    return Ok(out);
                }
                other => return Err(error::<T>(format!("escape byte {other:?}"))),
            },
            Some(&byte) => {
                out.push(byte);
                at += 1;
            }
        }
    }
}

impl MapKey for Vec<u8> {
    const NAME: &'static str = "bytes";

    fn encode_key(&self, out: &mut Vec<u8>, last: bool) {
        encode_bytes(self, out, last);
    }

    fn decode_key(bytes: &mut &[u8], last: bool) -> Result<Self, CodecError> {
        decode_bytes::<Self>(bytes, last)
    }
}

impl MapKey for String {
    const NAME: &'static str = "string";

    fn encode_key(&self, out: &mut Vec<u8>, last: bool) {
        encode_bytes(self.as_bytes(), out, last);
    }

    fn decode_key(bytes: &mut &[u8], last: bool) -> Result<Self, CodecError> {
        String::from_utf8(decode_bytes::<Self>(bytes, last)?).map_err(|_| error::<Self>("not UTF-8"))
    }
}

impl<A: MapKey, B: MapKey> MapKey for (A, B) {
    const NAME: &'static str = "tuple2";

    fn type_name() -> String {
        format!("tuple2<{},{}>", A::type_name(), B::type_name())
    }

    fn encode_key(&self, out: &mut Vec<u8>, last: bool) {
        self.0.encode_key(out, false);
        self.1.encode_key(out, last);
    }

    fn decode_key(bytes: &mut &[u8], last: bool) -> Result<Self, CodecError> {
        Ok((A::decode_key(bytes, false)?, B::decode_key(bytes, last)?))
    }
}

impl<A: MapKey, B: MapKey, C: MapKey> MapKey for (A, B, C) {
    const NAME: &'static str = "tuple3";

    fn type_name() -> String {
        format!("tuple3<{},{},{}>", A::type_name(), B::type_name(), C::type_name())
    }

    fn encode_key(&self, out: &mut Vec<u8>, last: bool) {
        self.0.encode_key(out, false);
        self.1.encode_key(out, false);
        self.2.encode_key(out, last);
    }

    fn decode_key(bytes: &mut &[u8], last: bool) -> Result<Self, CodecError> {
        Ok((A::decode_key(bytes, false)?, B::decode_key(bytes, false)?, C::decode_key(bytes, last)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::testing::Lcg;

    fn encoded<K: MapKey>(key: &K) -> Vec<u8> {
        let mut out = Vec::new();
        key.encode_key(&mut out, true);
        out
    }

    // Goal: the encoding is the documented one (a change of it is noticed).
    // Method: fixed vectors written from the module documentation.
    #[test]
    fn encodings_match_fixed_vectors() {
        assert_eq!(encoded(&0x0102_u16), vec![1, 2]);
        assert_eq!(encoded(&-1_i32), vec![0x7f, 0xff, 0xff, 0xff]);
        assert_eq!(encoded(&1_i64), vec![0x80, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(encoded(&true), vec![1]);
        assert_eq!(encoded(&"a\0".to_string()), vec![b'a', 0]);
        assert_eq!(encoded(&("a\0".to_string(), 7_u8)), vec![b'a', 0, 0xff, 0, 1, 7]);
        assert_eq!(encoded(&(vec![0_u8], vec![1_u8], 2_u8)), vec![0, 0xff, 0, 1, 1, 0, 1, 2]);
    }

    // Goal: byte order of encodings is the order of the keys, and decoding inverts encoding.
    // Method: random pairs of keys of each type (seeded), compared both ways.
    #[test]
    fn order_is_preserved_and_decoding_inverts() {
        fn check<K: MapKey + Ord + Clone + std::fmt::Debug>(keys: &[K]) {
            for a in keys {
                assert_eq!(&K::decode_whole(&encoded(a)).unwrap(), a);
                for b in keys {
                    assert_eq!(encoded(a).cmp(&encoded(b)), a.cmp(b), "{a:?} vs {b:?}");
                }
            }
        }
        let seed = 11;
        println!("seed {seed}");
        let mut rng = Lcg::new(seed);
        let mut strings = vec![String::new(), "a".into(), "a\0".into(), "a\0\0b".into(), "\0".into(), "b".into()];
        let mut bytes: Vec<Vec<u8>> = Vec::new();
        for _ in 0..30 {
            let length = rng.below(4) as usize;
            let value: Vec<u8> = (0..length).map(|_| [0_u8, 1, 0xff, b'a'][rng.below(4) as usize]).collect();
            strings.push(String::from_utf8_lossy(&value).into_owned());
            bytes.push(value);
        }
        check(&strings);
        check(&bytes);
        check(&[i64::MIN, -5, -1, 0, 1, i64::MAX]);
        check(&[i32::MIN, -1, 0, 3, i32::MAX]);
        check(&[0_u64, 1, 255, 256, u64::MAX]);
        let pairs: Vec<(String, i64)> = strings.iter().flat_map(|s| [(s.clone(), -1_i64), (s.clone(), 2)]).collect();
        check(&pairs);
        let triples: Vec<(Vec<u8>, bool, String)> = bytes
            .iter()
            .take(10)
            .flat_map(|b| [(b.clone(), false, "x".into()), (b.clone(), true, "".into())])
            .collect();
        check(&triples);
    }

    // Goal: garbage is an error, never a panic.
    #[test]
    fn garbage_is_refused() {
        assert!(u64::decode_whole(&[1, 2]).is_err());
        assert!(u8::decode_whole(&[1, 2]).is_err());
        assert!(bool::decode_whole(&[2]).is_err());
        assert!(<(String, u8)>::decode_whole(b"abc").is_err());
        assert!(<(String, u8)>::decode_whole(&[b'a', 0, 7, 1]).is_err());
        assert!(String::decode_whole(&[0xff, 0xfe]).is_err());
    }
}
