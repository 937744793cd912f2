//! Keys that take one of a fixed set of names (`smtp.tls`, `relays.mode`, …). The names a key
//! accepts are read from the enum's own derived `Deserialize`, so an error's list of allowed
//! values cannot lag behind the enum.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};

/// An enum the configuration reads by name. Implemented by `by_name!` beside each enum.
pub trait ConfigEnum: Sized {
    /// Every name the enum accepts, in declaration order.
    fn names() -> &'static [&'static str];
}

/// The message for a name that is not one of `T`'s.
pub(crate) fn not_one_of<T: ConfigEnum>(value: &str) -> String {
    format!("`{value}` is not one of: {}", T::names().join(", "))
}

/// Implements `Deserialize`, `Serialize` and [`ConfigEnum`] for an enum that derives both with
/// `#[serde(remote = "Self")]` (so that the derived code stays reachable as inherent functions).
/// Reading goes through a string, so that a wrong name is reported with the enum's own list,
/// whatever the source (file, environment, an item of a comma-separated list).
macro_rules! by_name {
    ($($enum:ty),+ $(,)?) => {$(
        impl<'de> serde::Deserialize<'de> for $enum {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let name = <String as serde::Deserialize>::deserialize(deserializer)?;
                // The inherent function is the derived one (`remote = "Self"`).
                <$enum>::deserialize(serde::de::value::StrDeserializer::<D::Error>::new(&name))
                    .map_err(|_| {
                        <D::Error as serde::de::Error>::custom(
                            $crate::config::enums::not_one_of::<$enum>(&name),
                        )
                    })
            }
        }

        impl serde::Serialize for $enum {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                <$enum>::serialize(self, serializer)
            }
        }

        impl $crate::config::enums::ConfigEnum for $enum {
            fn names() -> &'static [&'static str] {
                $crate::config::enums::variants(<$enum>::deserialize)
            }
        }
    )+};
}
pub(crate) use by_name;

/// The variant names a derived `Deserialize` passes to `deserialize_enum`, captured by a
/// deserializer that answers nothing else.
pub(crate) fn variants<T>(derived: fn(Probe) -> Result<T, Captured>) -> &'static [&'static str] {
    match derived(Probe) {
        Err(Captured(Some(names))) => names,
        // Not an enum of names: nothing to list.
        Ok(_) | Err(Captured(None)) => &[],
    }
}

/// A deserializer that only records the variants it is asked for.
pub(crate) struct Probe;

/// The error of [`Probe`]: the variants, when it was asked for an enum.
#[derive(Debug)]
pub(crate) struct Captured(Option<&'static [&'static str]>);

impl fmt::Display for Captured {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("variant names captured")
    }
}

impl std::error::Error for Captured {}

impl de::Error for Captured {
    fn custom<M: fmt::Display>(_: M) -> Self {
        Captured(None)
    }
}

impl<'de> Deserializer<'de> for Probe {
    type Error = Captured;

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Captured> {
        Err(Captured(Some(variants)))
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Captured> {
        Err(Captured(None))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct identifier
        ignored_any
    }
}
