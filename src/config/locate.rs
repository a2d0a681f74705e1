//! Finds where a key path sits in the YAML text, so a problem that validation found in the parsed
//! value can be reported at its file, line and column. What is wrong is decided elsewhere
//! (`validate.rs`); this only points at the spot.
//!
//! The YAML parser attaches the position of the node it is reading to any error raised while that
//! node is being visited. To find where a key path sits, the document is read once more with a
//! visitor that walks the path and fails on the node it names; the error carries the position.
//! If a step of the path is absent (a defaulted value), the failure is raised on the deepest
//! mapping that does exist, which is the right place to add the key.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserializer;

use super::{yaml, Problem};

/// A path of mapping keys and sequence indexes into the config document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(Vec<Segment>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
    /// The second occurrence of a key in a mapping (a duplicate).
    Again(String),
}

impl KeyPath {
    pub(crate) fn key(&self, key: &str) -> KeyPath {
        let mut next = self.clone();
        next.0.push(Segment::Key(key.to_owned()));
        next
    }

    pub(crate) fn index(&self, index: usize) -> KeyPath {
        let mut next = self.clone();
        next.0.push(Segment::Index(index));
        next
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Segment::Key(k) if i == 0 => write!(f, "{k}")?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
                Segment::Again(k) => write!(f, ".{k}")?,
            }
        }
        Ok(())
    }
}

/// Where a duplicate key the parser reported (`PATH: duplicate field `KEY``, positioned at the
/// start of its mapping) sits: the line and column of its second occurrence.
pub(crate) fn duplicate(text: &str, message: &str) -> Option<(usize, usize)> {
    let (before, after) = message.split_once("duplicate field `")?;
    let key = after.split('`').next()?;
    let mut path = KeyPath::default();
    for part in before.trim().trim_end_matches(':').split('.').filter(|p| !p.is_empty()) {
        let (name, indexes) = part.split_once('[').map_or((part, ""), |(n, i)| (n, i));
        path = path.key(name);
        for index in indexes.split('[').filter(|i| !i.is_empty()) {
            path = path.index(index.trim_end_matches(']').parse().ok()?);
        }
    }
    path.0.push(Segment::Again(key.to_owned()));
    let err = Seek { path: &path.0 }.deserialize(yaml::Deserializer::from_str(text)).err()?;
    // Only the marker's failure is a position; any other (the path not found) is not.
    err.to_string().contains(MARKER).then(|| err.location().map(|at| (at.line(), at.column()))).flatten()
}

/// Sets `problem`'s line and column to where its key path sits in `text`; leaves them unset if
/// the parser gives no position.
pub(crate) fn problem(text: &str, problem: &mut Problem) {
    let seek = Seek { path: &problem.path.0 };
    if let Err(err) = seek.deserialize(yaml::Deserializer::from_str(text)) {
        if let Some(at) = err.location() {
            problem.line = Some(at.line());
            problem.column = Some(at.column());
        }
    }
}

struct Seek<'p> {
    path: &'p [Segment],
}

impl<'de> DeserializeSeed<'de> for Seek<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.path.split_first() {
            None => d.deserialize_any(Found),
            Some((Segment::Key(key), rest)) => d.deserialize_any(SeekKey { key, skip: 0, rest }),
            Some((Segment::Index(index), rest)) => d.deserialize_any(SeekIndex { index: *index, rest }),
            Some((Segment::Again(key), rest)) => d.deserialize_any(SeekKey { key, skip: 1, rest }),
        }
    }
}

/// What [`Found`]'s failure says, to tell it from a path that was not found.
const MARKER: &str = "nothing (this visitor marks a position)";

/// Fails on whatever node it is given, so the error carries that node's position.
struct Found;

impl<'de> Visitor<'de> for Found {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(MARKER)
    }
}

/// The value of `key` in a mapping, after `skip` earlier occurrences of it (1: a duplicate).
struct SeekKey<'p> {
    key: &'p str,
    skip: usize,
    rest: &'p [Segment],
}

impl<'de> Visitor<'de> for SeekKey<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a mapping with key {}", self.key)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut skip = self.skip;
        while let Some(key) = map.next_key::<yaml::Value>()? {
            if key.as_str() == Some(self.key) {
                if skip == 0 {
                    return map.next_value_seed(Seek { path: self.rest });
                }
                skip -= 1;
            }
            map.next_value::<IgnoredAny>()?;
        }
        Err(de::Error::custom("key not present"))
    }
}

struct SeekIndex<'p> {
    index: usize,
    rest: &'p [Segment],
}

impl<'de> Visitor<'de> for SeekIndex<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a sequence with an element {}", self.index)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while i < self.index {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Err(de::Error::custom("element not present"));
            }
            i += 1;
        }
        match seq.next_element_seed(Seek { path: self.rest })? {
            Some(()) => Ok(()),
            None => Err(de::Error::custom("element not present")),
        }
    }
}
