//! Building blocks of the structured inputs, and their encoding for seed files.
//!
//! `arbitrary` reads integers little-endian from the front of the input and picks an enum
//! variant from a `u32` (`(x * variants) >> 32`); its own collections take their lengths
//! from the *end*. [`Blob`] and [`List`] take theirs from the front instead, so an input
//! made only of integers, `bool`, `Option`, tuples, derived structs and enums, `Blob` and
//! `List` is read strictly front to back, and [`Encode`] can write one.

use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};

/// Up to 255 bytes: a length byte, then that many bytes (fewer if the input ends).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl<'a> Arbitrary<'a> for Blob {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let len = usize::from(u8::arbitrary(u)?).min(u.len());
        Ok(Self(u.bytes(len)?.to_vec()))
    }
}

impl Blob {
    /// The bytes as text, if they are UTF-8.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
}

impl From<&str> for Blob {
    fn from(s: &str) -> Self {
        Self(s.as_bytes().to_vec())
    }
}

/// Up to `MAX` elements: a count byte (taken modulo `MAX + 1`), then the elements; the list
/// ends early when the input does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct List<T, const MAX: usize>(pub Vec<T>);

impl<T, const MAX: usize> Default for List<T, MAX> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<'a, T: Arbitrary<'a>, const MAX: usize> Arbitrary<'a> for List<T, MAX> {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let count = usize::from(u8::arbitrary(u)?) % (MAX + 1);
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            if u.is_empty() {
                break;
            }
            items.push(T::arbitrary(u)?);
        }
        Ok(Self(items))
    }
}

/// Writes a value so that `arbitrary` reads it back (see the module docs).
pub trait Encode {
    /// Appends the encoding.
    fn encode(&self, out: &mut Vec<u8>);
}

macro_rules! encode_int {
    ($($t:ty),*) => {$(
        impl Encode for $t {
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
encode_int!(u8, u16, u32, u64, u128);

impl Encode for bool {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

impl<T: Encode> Encode for Option<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        self.is_some().encode(out);
        if let Some(v) = self {
            v.encode(out);
        }
    }
}

impl<A: Encode, B: Encode> Encode for (A, B) {
    fn encode(&self, out: &mut Vec<u8>) {
        self.0.encode(out);
        self.1.encode(out);
    }
}

impl Encode for Blob {
    fn encode(&self, out: &mut Vec<u8>) {
        let len = u8::try_from(self.0.len()).expect("a Blob holds at most 255 bytes");
        out.push(len);
        out.extend_from_slice(&self.0);
    }
}

impl<T: Encode, const MAX: usize> Encode for List<T, MAX> {
    fn encode(&self, out: &mut Vec<u8>) {
        assert!(self.0.len() <= MAX, "a List holds at most {MAX} elements");
        out.push(self.0.len() as u8);
        for item in &self.0 {
            item.encode(out);
        }
    }
}

/// The `u32` that makes a derived `Arbitrary` pick variant `index` of `count`.
pub fn variant(out: &mut Vec<u8>, index: u32, count: u32) {
    assert!(index < count);
    let x = (u64::from(index) << 32).div_ceil(u64::from(count));
    (x as u32).encode(out);
}

/// Encodes a derived struct: its fields in declaration order.
#[macro_export]
macro_rules! encode_struct {
    ($ty:ident { $($field:ident),* $(,)? }) => {
        impl $crate::input::Encode for $ty {
            fn encode(&self, out: &mut Vec<u8>) {
                $( $crate::input::Encode::encode(&self.$field, out); )*
            }
        }
    };
}

/// Encodes a derived enum: the variant selector, then the variant's fields in order.
/// Every variant must be listed, in declaration order.
#[macro_export]
macro_rules! encode_enum {
    ($ty:ident { $($variant:ident $( { $($field:ident),* } )? ),* $(,)? }) => {
        impl $crate::input::Encode for $ty {
            #[allow(unused_assignments, unused_variables)]
            fn encode(&self, out: &mut Vec<u8>) {
                let count = [$(stringify!($variant)),*].len() as u32;
                let mut index = 0u32;
                $(
                    if let $ty::$variant $( { $($field),* } )? = self {
                        $crate::input::variant(out, index, count);
                        $( $( $crate::input::Encode::encode($field, out); )* )?
                        return;
                    }
                    index += 1;
                )*
            }
        }
    };
}
