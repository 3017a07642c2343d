//! Lenient typed reading of remote JSON: a field of the wrong type reads as
//! absent instead of failing the whole document, and whatever is not named
//! is skipped without being built.
//!
//! Parsing into `serde_json::Value` first gives the same leniency but builds
//! every string, array and map of the document: for a Flow Service list page
//! (80 connections, most of each unused) that was a fifth of the work of a
//! first pass's listing.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A value kept only when it is a JSON string; borrowed from the document
/// when it has no escapes (most of what is read is checked, cut or copied
/// into something else, never kept as read).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Text<'a>(pub Option<Cow<'a, str>>);

/// A value kept only when it is a JSON object that reads as `T` (a field of
/// `T` may fail it: then the document fails, as with derive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object<T>(pub Option<T>);

/// A value kept only when it is a JSON array of `T`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Array<T>(pub Option<Vec<T>>);

impl<T> Default for Object<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<T> Default for Array<T> {
    fn default() -> Self {
        Self(None)
    }
}

/// Implements the scalar and container arms of a visitor that reads
/// anything it does not want as `$none`, skipping its contents.
macro_rules! skip_other_kinds {
    ($none:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($none)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($none)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($none)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($none)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($none)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($none)
        }
    };
}

/// Skips the rest of a sequence.
fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

/// Skips the rest of a map.
fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'a>, E> {
                Ok(Text(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'a>, E> {
                Ok(Text(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'a>, E> {
                Ok(Text(Some(Cow::Owned(v))))
            }
            skip_other_kinds!(Text(None));
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Text<'a>, A::Error> {
                drain_seq(seq).map(|()| Text(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Text<'a>, A::Error> {
                drain_map(map).map(|()| Text(None))
            }
        }
        deserializer.deserialize_any(V(PhantomData))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Object<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(|t| Object(Some(t)))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Object<T>, E> {
                Ok(Object(None))
            }
            skip_other_kinds!(Object(None));
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Object<T>, A::Error> {
                drain_seq(seq).map(|()| Object(None))
            }
        }
        deserializer.deserialize_any(V(PhantomData))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Array<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Array<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Array<T>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(item) = seq.next_element()? {
                    out.push(item);
                }
                Ok(Array(Some(out)))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Array<T>, E> {
                Ok(Array(None))
            }
            skip_other_kinds!(Array(None));
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Array<T>, A::Error> {
                drain_map(map).map(|()| Array(None))
            }
        }
        deserializer.deserialize_any(V(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(default)]
    struct Doc<'a> {
        #[serde(borrow)]
        name: Text<'a>,
        #[serde(borrow)]
        inner: Object<Inner<'a>>,
        #[serde(borrow)]
        list: Array<Object<Inner<'a>>>,
    }

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(default)]
    struct Inner<'a> {
        #[serde(borrow)]
        id: Text<'a>,
    }

    #[test]
    fn wrong_kinds_read_as_absent_and_the_rest_is_skipped() {
        let doc: Doc = serde_json::from_str(
            r#"{"name": {"deep": [1, {"x": null}]}, "inner": [1, 2], "list": "no",
                "unused": {"a": [true, 1.5, "s"]}}"#,
        )
        .unwrap();
        assert_eq!(doc.name, Text(None));
        assert!(doc.inner.0.is_none());
        assert!(doc.list.0.is_none());
        for odd in ["null", "true", "-1", "18446744073709551615", "1.5e300"] {
            let text = format!(r#"{{"name": {odd}, "inner": {odd}, "list": {odd}}}"#);
            let doc: Doc = serde_json::from_str(&text).unwrap();
            assert_eq!(doc.name, Text(None), "{odd}");
            assert!(doc.inner.0.is_none() && doc.list.0.is_none(), "{odd}");
        }
    }

    #[test]
    fn right_kinds_are_kept() {
        let doc: Doc = serde_json::from_str(
            r#"{"name": "n\u00e9", "inner": {"id": "a", "x": 1},
                "list": [{"id": "b"}, "not an object", {"id": 7}]}"#,
        )
        .unwrap();
        assert_eq!(doc.name.0.as_deref(), Some("n\u{e9}"));
        assert_eq!(doc.inner.0.unwrap().id.0.as_deref(), Some("a"));
        let list = doc.list.0.unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!(list[0].0.as_ref().unwrap().id.0.as_deref(), Some("b"));
        assert!(list[1].0.is_none());
        assert_eq!(list[2].0.as_ref().unwrap().id, Text(None));
    }
}
