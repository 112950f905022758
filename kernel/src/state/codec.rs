//! Typed state values as bytes: the [`StateCodec`] trait and its stable encoding.
//!
//! A state's values are stored without a per-value header: the codec's name and version are
//! part of the state's description (written once with its snapshot, as Flink writes a
//! serializer snapshot), and a restore refuses a snapshot whose codec name or version differs.
//! A change of encoding therefore needs a new version, and the fixed vectors in the tests below
//! fail until it gets one.
//!
//! # Encoding (version 1)
//! - `u8`, `u16`, `u32`, `u64`, `i32`, `i64`: little-endian, fixed width.
//! - `bool`: one byte, `0` or `1` (anything else is corrupt).
//! - `f64`: its IEEE 754 bits, little-endian.
//! - `String` (UTF-8): length as `u32` little-endian, then the bytes.
//! - `Option<T>`: `0`, or `1` then `T`.
//! - `Vec<T>`: count as `u32` little-endian, then each element (so `Vec<u8>` is its length and
//!   its bytes).
//! - `(A, B)` and `(A, B, C)`: the fields in order.
//!
//! Decoding never panics and never allocates more than the input could hold: a length or count
//! is checked against the bytes left before anything is reserved, and a value must use every
//! byte it was given.

/// Why bytes are not a value of a codec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a {codec} value: {reason}")]
pub struct CodecError {
    pub codec: String,
    pub reason: String,
}

/// How a state's values become bytes and back: stable across builds, versioned by [`NAME`] and
/// [`VERSION`].
///
/// [`NAME`]: StateCodec::NAME
/// [`VERSION`]: StateCodec::VERSION
pub trait StateCodec: Sized {
    /// The type, as a state's description names it (for example `u64`, `vec<string>`).
    const NAME: &'static str;
    /// The version of the encoding described in this module's documentation.
    const VERSION: u16 = 1;

    /// The full type, with the names of generic parts (`vec<u64>`, `tuple2<u64,string>`) and the
    /// version of each part whose version is not 1 (`u64@v2`): what a state's description
    /// records, so that a restore notices any change of type or of encoding.
    fn type_name() -> String {
        if Self::VERSION == 1 {
            Self::NAME.to_string()
        } else {
            format!("{}@v{}", Self::NAME, Self::VERSION)
        }
    }

    /// Appends the value's bytes to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// Reads one value from the front of `bytes`, advancing it past what it read.
    fn decode_from(bytes: &mut &[u8]) -> Result<Self, CodecError>;

    /// Reads a value that is exactly `bytes`.
    fn decode(mut bytes: &[u8]) -> Result<Self, CodecError> {
        let value = Self::decode_from(&mut bytes)?;
        if !bytes.is_empty() {
            return Err(error::<Self>(format!("{} bytes after the value", bytes.len())));
        }
        Ok(value)
    }
}

fn error<T: StateCodec>(reason: impl Into<String>) -> CodecError {
    CodecError { codec: T::NAME.to_string(), reason: reason.into() }
}

/// Takes `n` bytes from the front of `bytes`.
fn take<'a, T: StateCodec>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], CodecError> {
    if bytes.len() < n {
        return Err(error::<T>(format!("needs {n} bytes, {} left", bytes.len())));
    }
    let (head, tail) = bytes.split_at(n);
    *bytes = tail;
    Ok(head)
}

macro_rules! fixed_width {
    ($($type:ty => $name:literal),* $(,)?) => {$(
        impl StateCodec for $type {
            const NAME: &'static str = $name;

            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }

            fn decode_from(bytes: &mut &[u8]) -> Result<Self, CodecError> {
                let head = take::<Self>(bytes, std::mem::size_of::<$type>())?;
                Ok(<$type>::from_le_bytes(head.try_into().expect("taken at the width")))
            }
        }
    )*};
}

fixed_width!(u8 => "u8", u16 => "u16", u32 => "u32", u64 => "u64", i32 => "i32", i64 => "i64", f64 => "f64");

impl StateCodec for bool {
    const NAME: &'static str = "bool";

    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }

    fn decode_from(bytes: &mut &[u8]) -> Result<Self, CodecError> {
        match take::<Self>(bytes, 1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(error::<Self>(format!("byte {other}"))),
        }
    }
}

/// A length or count: `u32` little-endian, at most what the remaining bytes can hold when each
/// item takes at least `item_size_min` bytes.
fn length<T: StateCodec>(bytes: &mut &[u8], item_size_min: usize) -> Result<usize, CodecError> {
    let length = u32::decode_from(bytes).map_err(|e| error::<T>(format!("length: {}", e.reason)))? as usize;
    if length.saturating_mul(item_size_min) > bytes.len() {
        return Err(error::<T>(format!("length {length} with {} bytes left", bytes.len())));
    }
    Ok(length)
}

fn put_length(out: &mut Vec<u8>, length: usize) {
    let length = u32::try_from(length).expect("state values are at most STATE_VALUE_SIZE_MAX bytes");
    out.extend_from_slice(&length.to_le_bytes());
}

impl StateCodec for String {
    const NAME: &'static str = "string";

    fn encode(&self, out: &mut Vec<u8>) {
        put_length(out, self.len());
        out.extend_from_slice(self.as_bytes());
    }

    fn decode_from(bytes: &mut &[u8]) -> Result<Self, CodecError> {
        let n = length::<Self>(bytes, 1)?;
        let text = take::<Self>(bytes, n)?;
        String::from_utf8(text.to_vec()).map_err(|_| error::<Self>("not UTF-8"))
    }
}

impl<T: StateCodec> StateCodec for Option<T> {
    const NAME: &'static str = "option";

    fn type_name() -> String {
        format!("option<{}>", T::type_name())
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            None => out.push(0),
            Some(value) => {
                out.push(1);
                value.encode(out);
            }
        }
    }

    fn decode_from(bytes: &mut &[u8]) -> Result<Self, CodecError> {
        match take::<Self>(bytes, 1)?[0] {
            0 => Ok(None),
            1 => Ok(Some(T::decode_from(bytes)?)),
            other => Err(error::<Self>(format!("flag {other}"))),
        }
    }
}

impl<T: StateCodec> StateCodec for Vec<T> {
    const NAME: &'static str = "vec";

    fn type_name() -> String {
        format!("vec<{}>", T::type_name())
    }

    fn encode(&self, out: &mut Vec<u8>) {
        put_length(out, self.len());
        self.iter().for_each(|value| value.encode(out));
    }

    fn decode_from(bytes: &mut &[u8]) -> Result<Self, CodecError> {
        // Every encoding above takes at least one byte, so a count cannot exceed the bytes left.
        let count = length::<Self>(bytes, 1)?;
        let mut values = Vec::with_capacity(count);
        for _ in 0..count {
            values.push(T::decode_from(bytes)?);
        }
        Ok(values)
    }
}

impl<A: StateCodec, B: StateCodec> StateCodec for (A, B) {
    const NAME: &'static str = "tuple2";

    fn type_name() -> String {
        format!("tuple2<{},{}>", A::type_name(), B::type_name())
    }

    fn encode(&self, out: &mut Vec<u8>) {
        self.0.encode(out);
        self.1.encode(out);
    }

    fn decode_from(bytes: &mut &[u8]) -> Result<Self, CodecError> {
        Ok((A::decode_from(bytes)?, B::decode_from(bytes)?))
    }
}

impl<A: StateCodec, B: StateCodec, C: StateCodec> StateCodec for (A, B, C) {
    const NAME: &'static str = "tuple3";

    fn type_name() -> String {
        format!("tuple3<{},{},{}>", A::type_name(), B::type_name(), C::type_name())
    }

    fn encode(&self, out: &mut Vec<u8>) {
        self.0.encode(out);
        self.1.encode(out);
        self.2.encode(out);
    }

    fn decode_from(bytes: &mut &[u8]) -> Result<Self, CodecError> {
        Ok((A::decode_from(bytes)?, B::decode_from(bytes)?, C::decode_from(bytes)?))
    }
}

/// Renders one encoded value of the type `type_name` names (as [`StateCodec::type_name`] writes
/// it) as text, without knowing the Rust type: for queries from outside the job. Garbage and
/// unknown types are errors, never panics.
pub fn render(type_name: &str, mut bytes: &[u8]) -> Result<String, CodecError> {
    let text = render_from(type_name.trim(), &mut bytes, 0)?;
    if !bytes.is_empty() {
        return Err(CodecError {
            codec: type_name.to_string(),
            reason: format!("{} bytes after the value", bytes.len()),
        });
    }
    Ok(text)
}

/// Splits `name<a,b>` into `name` and its top-level arguments.
fn type_parts(type_name: &str) -> Result<(&str, Vec<&str>), CodecError> {
    let malformed = || CodecError { codec: type_name.to_string(), reason: "malformed type name".to_string() };
    let Some(open) = type_name.find('<') else {
        return Ok((type_name, Vec::new()));
    };
    let inner = type_name[open + 1..].strip_suffix('>').ok_or_else(malformed)?;
    let (mut depth, mut start, mut arguments) = (0_i32, 0, Vec::new());
    for (at, character) in inner.char_indices() {
        match character {
            '<' => depth += 1,
            '>' => depth -= 1,
            ',' if depth == 0 => {
                arguments.push(&inner[start..at]);
                start = at + 1;
            }
            _ => {}
        }
        if depth < 0 {
            return Err(malformed());
        }
    }
    arguments.push(&inner[start..]);
    Ok((&type_name[..open], arguments))
}

fn render_from(type_name: &str, bytes: &mut &[u8], depth: usize) -> Result<String, CodecError> {
    if depth > 16 {
        return Err(CodecError { codec: type_name.to_string(), reason: "types nested too deeply".to_string() });
    }
    let (name, arguments) = type_parts(type_name)?;
    let unknown = || CodecError { codec: type_name.to_string(), reason: "not a type this build knows".to_string() };
    let text = match (name, arguments.as_slice()) {
        ("u8", []) => u8::decode_from(bytes)?.to_string(),
        ("u16", []) => u16::decode_from(bytes)?.to_string(),
        ("u32", []) => u32::decode_from(bytes)?.to_string(),
        ("u64", []) => u64::decode_from(bytes)?.to_string(),
        ("i32", []) => i32::decode_from(bytes)?.to_string(),
        ("i64", []) => i64::decode_from(bytes)?.to_string(),
        ("f64", []) => f64::decode_from(bytes)?.to_string(),
        ("bool", []) => bool::decode_from(bytes)?.to_string(),
        ("string", []) => format!("{:?}", String::decode_from(bytes)?),
        ("option", [inner]) => match take::<Option<u8>>(bytes, 1)?[0] {
            0 => "None".to_string(),
            1 => format!("Some({})", render_from(inner, bytes, depth + 1)?),
            other => return Err(error::<Option<u8>>(format!("flag {other}"))),
        },
        ("vec", [inner]) => {
            let count = length::<Vec<u8>>(bytes, 1)?;
            let items: Result<Vec<String>, CodecError> =
                (0..count).map(|_| render_from(inner, bytes, depth + 1)).collect();
            format!("[{}]", items?.join(", "))
        }
        ("tuple2" | "tuple3", parts) if parts.len() == if name == "tuple2" { 2 } else { 3 } => {
            let items: Result<Vec<String>, CodecError> =
                parts.iter().map(|part| render_from(part, bytes, depth + 1)).collect();
            format!("({})", items?.join(", "))
        }
        _ => return Err(unknown()),
    };
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<T: StateCodec>(value: &T) -> Vec<u8> {
        let mut out = Vec::new();
        value.encode(&mut out);
        out
    }

    // Goal: the encoding is the documented one, byte for byte: these vectors were written from the
    // module documentation, not copied from the code's output, and a change of encoding fails
    // here until the codec's VERSION changes with it.
    #[test]
    fn encodings_match_fixed_vectors() {
        assert_eq!(bytes(&0x0102_0304_0506_0708_u64), [8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(bytes(&-2_i64), [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(bytes(&0x0102_u16), [2, 1]);
        assert_eq!(bytes(&-1_i32), [0xff; 4]);
        assert_eq!(bytes(&1.0_f64), [0, 0, 0, 0, 0, 0, 0xf0, 0x3f]);
        assert_eq!(bytes(&true), [1]);
        assert_eq!(bytes(&"hé".to_string()), [3, 0, 0, 0, b'h', 0xc3, 0xa9]);
        assert_eq!(bytes(&vec![9_u8, 8]), [2, 0, 0, 0, 9, 8]);
        assert_eq!(bytes(&Some(5_u8)), [1, 5]);
        assert_eq!(bytes(&None::<u64>), [0]);
        assert_eq!(bytes(&vec![1_u16, 2]), [2, 0, 0, 0, 1, 0, 2, 0]);
        assert_eq!(bytes(&(7_u8, "a".to_string(), false)), [7, 1, 0, 0, 0, b'a', 0]);
        assert_eq!((u64::NAME, u64::VERSION, <Vec<String>>::NAME), ("u64", 1, "vec"));
    }

    // Goal: values render as text from their type name alone (for queries from outside a job),
    // and garbage or unknown types are errors.
    #[test]
    fn values_render_from_their_type_names() {
        let value: (u64, Vec<Option<String>>, bool) = (7, vec![None, Some("a".into())], true);
        let rendered = render(&<(u64, Vec<Option<String>>, bool)>::type_name(), &bytes(&value)).unwrap();
        assert_eq!(rendered, r#"(7, [None, Some("a")], true)"#);
        assert_eq!(render("tuple2<u64,i64>", &bytes(&(3_u64, -4_i64))).unwrap(), "(3, -4)");
        assert!(render("u64", &[1, 2]).is_err());
        assert!(render("u64", &bytes(&(1_u64, 1_u8))).is_err());
        assert!(render("u128", &[0; 16]).is_err());
        assert!(render("vec<u64", &[0; 4]).is_err());
        assert!(render("tuple2<u64>", &[0; 8]).is_err());
    }

    // Goal: a state's description names the whole type, so a change of any inner type is noticed.
    #[test]
    fn type_names_name_generic_parts() {
        assert_eq!(u64::type_name(), "u64");
        assert_eq!(<Vec<Option<String>>>::type_name(), "vec<option<string>>");
        assert_eq!(<(u64, i64)>::type_name(), "tuple2<u64,i64>");
        assert_eq!(<(bool, f64, Vec<u8>)>::type_name(), "tuple3<bool,f64,vec<u8>>");
    }

    // Goal: encode then decode is the identity, for values of every codec and their nestings.
    #[test]
    fn values_round_trip() {
        fn round_trip<T: StateCodec + PartialEq + std::fmt::Debug>(value: T) {
            assert_eq!(T::decode(&bytes(&value)).unwrap(), value);
        }
        round_trip(u64::MAX);
        round_trip(i64::MIN);
        round_trip(f64::MIN_POSITIVE);
        round_trip(String::new());
        round_trip("ключ".to_string());
        round_trip(vec![Some((1_u32, "x".to_string())), None]);
        round_trip(vec![vec![true, false], vec![]]);
        round_trip((vec![0_u8; 300], -5_i32, Some(2.5_f64)));
    }

    // Goal: garbage is an error naming the codec, never a panic or an allocation of a claimed
    // size: every truncation and every single-byte change of valid values, trailing bytes, bad
    // flags, invalid UTF-8, and counts far beyond the input.
    #[test]
    fn garbage_is_refused() {
        let value = (vec![Some("abc".to_string()), None], 77_u64, true);
        let encoded = bytes(&value);
        for cut in 0..encoded.len() {
            assert!(<(Vec<Option<String>>, u64, bool)>::decode(&encoded[..cut]).is_err(), "cut at {cut}");
        }
        for at in 0..encoded.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut changed = encoded.clone();
                changed[at] ^= flip;
                let _ = <(Vec<Option<String>>, u64, bool)>::decode(&changed);
            }
        }
        let mut trailing = bytes(&5_u64);
        trailing.push(0);
        assert_eq!(u64::decode(&trailing).unwrap_err().reason, "1 bytes after the value");
        assert_eq!(bool::decode(&[2]).unwrap_err(), CodecError { codec: "bool".into(), reason: "byte 2".into() });
        assert!(String::decode(&[2, 0, 0, 0, 0xff, 0xfe]).unwrap_err().reason.contains("UTF-8"));
        let huge = [0xff, 0xff, 0xff, 0xff, 1, 2];
        assert!(<Vec<u64>>::decode(&huge).unwrap_err().reason.contains("length 4294967295"));
        assert!(<Vec<u8>>::decode(&huge).is_err());
        assert!(<Option<u8>>::decode(&[3, 0]).unwrap_err().reason.contains("flag 3"));
    }
}
